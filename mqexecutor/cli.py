"""The ``mqexecutor`` command (also ``python -m mqexecutor``): serve a pool on a
key and inspect, purge or remove queues. See docs/cli.md.

Every error is one line on stderr and a non-zero exit status: 1 for a queue
that does not exist, 2 for bad usage, 3 for permission denied, 4 for a queue
that is not one of ours (use ``--force``).
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

import sysv_ipc

from . import deadletter, ipcinfo, persistence, spill
from .executor import MQExecutor
from .limits import msgmax
from .mode import Mode
from .protocol import Flag, Kind, ProtocolError, flatten, parse, split_task_body
from .queues import parse_key

__all__ = ["main", "build_parser"]

EXIT_NO_QUEUE, EXIT_USAGE, EXIT_PERMISSION, EXIT_NOT_OURS = 1, 2, 3, 4


class CLIError(Exception):
    """An error reported as one line on stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _key(text: str) -> int:
    try:
        key = parse_key(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if key == 0:
        raise argparse.ArgumentTypeError("key 0 is IPC_PRIVATE, not a queue key")
    return key


def _hex(key: int) -> str:
    return f"0x{key & 0xFFFFFFFF:08x}"


def _info(key: int) -> ipcinfo.QueueInfo:
    info = ipcinfo.queue_info(key)
    if info is None:
        raise CLIError(f"no message queue has key {_hex(key)} ({key})", EXIT_NO_QUEUE)
    return info


def _capacity(key: int) -> int | None:
    if key == 0:  # IPC_PRIVATE: opening by key would create a queue
        return None
    try:
        return sysv_ipc.MessageQueue(key, 0).max_size
    except sysv_ipc.Error:
        return None


def _peek(info: ipcinfo.QueueInfo) -> list[tuple[int, bytes]] | None:
    try:
        return ipcinfo.peek(info.msqid, max_size=max(msgmax(), 1 << 16))
    except PermissionError:
        raise CLIError(f"permission denied reading the queue of key {_hex(info.key)}",
                       EXIT_PERMISSION) from None
    except FileNotFoundError:
        raise CLIError(f"no message queue has key {_hex(info.key)}", EXIT_NO_QUEUE) from None


def _ours(key: int, messages: list[tuple[int, bytes]] | None) -> bool:
    if persistence.read_meta(spill.key_subdir(key)) is not None:
        return True
    if not messages:
        return False
    return all(raw[:2] == b"MQ" for _, raw in messages)


def _known_queues() -> dict[int, tuple[str, persistence.QueueMeta]]:
    """Queues mqexecutor made, by key: (role, meta)."""
    known: dict[int, tuple[str, persistence.QueueMeta]] = {}
    for subdir, meta in persistence.producer_metas():
        if subdir.startswith("k-"):
            known[meta.key] = ("pool", meta)
        else:
            if meta.private:
                known.setdefault(meta.key, ("private", meta))
            else:
                known.setdefault(meta.key, ("pool", meta))
            known[meta.reply_key] = ("reply", meta)
    return known


def cmd_ls(args: argparse.Namespace) -> int:
    """``mqexecutor ls [--all]``: one row per queue (key, msqid, perms, messages, bytes, capacity,
    pids, role, mode). Returns 0."""
    known = _known_queues()
    rows = []
    for q in ipcinfo.list_queues():
        role_meta = known.get(q.key)
        if role_meta is None and not args.all:
            continue
        role, meta = role_meta if role_meta else ("-", None)
        mode = Mode(meta.mode).name.lower() if meta and role != "reply" else "-"
        cap = _capacity(q.key)
        rows.append((_hex(q.key), str(q.msqid), f"{q.perms & 0o777:o}", str(q.qnum),
                     str(q.cbytes), "?" if cap is None else str(cap), str(q.lspid),
                     str(q.lrpid), role, mode))
    header = ("KEY", "MSQID", "PERMS", "MESSAGES", "BYTES", "CAPACITY", "LSPID", "LRPID",
              "ROLE", "MODE")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    """``mqexecutor stat KEY``: one queue in detail, peeked with MSG_COPY (tasks per worker, spill
    files referenced). Raises CLIError (exit 1, 3) for a missing or unreadable queue."""
    info = _info(args.key)
    messages = _peek(info)
    meta = persistence.read_meta(spill.key_subdir(args.key))
    cap = _capacity(args.key)
    print(f"key:              {_hex(info.key)} ({info.key})")
    print(f"msqid:            {info.msqid}")
    print(f"permissions:      {info.perms & 0o777:o} (uid {info.uid}, gid {info.gid})")
    print(f"messages:         {info.qnum}")
    print(f"bytes:            {info.cbytes}")
    print(f"capacity:         {'?' if cap is None else cap} bytes (msg_qbytes)")
    print(f"last sender:      pid {info.lspid}")
    print(f"last receiver:    pid {info.lrpid}")
    if meta is not None:
        alive = "alive" if persistence.pid_alive(meta.owner_pid) else "gone"
        print(f"pool:             {Mode(meta.mode).name.lower()} mode, {meta.workers} "
              f"workers, wire version {meta.wire}, last owner pid {meta.owner_pid} ({alive})")
    if messages is None:
        print("per worker:       unknown (the kernel lacks msgrcv MSG_COPY)")
        return 0
    per_type: collections.Counter[int] = collections.Counter()
    names: collections.Counter[str] = collections.Counter()
    spilled = foreign = 0
    for raw in [inner for _, whole in messages for inner in flatten(whole)]:
        try:
            h, body = parse(raw)
            name, _ = split_task_body(body, h.flags)
        except ProtocolError:
            foreign += 1
            continue
        if h.kind != Kind.TASK:
            foreign += 1
            continue
        per_type[h.worker if h.flags & Flag.TARGETED else -1] += 1
        names[name] += 1
        if h.flags & Flag.SPILL:
            spilled += 1
    for worker, n in sorted(per_type.items()):
        label = "any worker" if worker < 0 else f"worker {worker}"
        print(f"waiting for {label + ':':<13} {n}")
    print(f"spill files:      {spilled} referenced")
    if foreign:
        print(f"other messages:   {foreign} (not mqexecutor tasks)")
    for name, n in names.most_common(5):
        print(f"function:         {name} x{n}")
    return 0


def _drop(args: argparse.Namespace, action, what: str) -> tuple[ipcinfo.QueueInfo, int, int]:
    """Check the queue is ours (or --force), then run ``action(key)``."""
    info = _info(args.key)
    if not args.force and not _ours(args.key, _peek(info)):
        raise CLIError(f"the queue of key {_hex(args.key)} is not one of mqexecutor's "
                       "(use --force)", EXIT_NOT_OURS)
    try:
        messages, files = action(args.key)
    except sysv_ipc.PermissionsError:
        raise CLIError(f"permission denied {what} the queue of key {_hex(args.key)}",
                       EXIT_PERMISSION) from None
    return info, messages, files


def cmd_purge(args: argparse.Namespace) -> int:
    """``mqexecutor purge KEY [--force]``: drop the queued tasks and their spill files. Raises
    CLIError (exit 1, 3, 4)."""
    _, messages, files = _drop(args, persistence.purge_queue, "purging")
    print(f"purged {messages} message(s) and {files} spill file(s) from {_hex(args.key)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """``mqexecutor rm KEY [--force]``: purge, then remove the queue and its spill directory.
    Raises CLIError (exit 1, 3, 4)."""
    info, messages, files = _drop(args, persistence.remove_queue, "removing")
    print(f"removed queue {_hex(args.key)} (msqid {info.msqid}) with {messages} "
          f"message(s) and {files} spill file(s)")
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    """``mqexecutor dead KEY [--purge]``: list (or remove) the dead letters workers set aside.
    Returns 0."""
    records = deadletter.list_records(args.key)
    if args.purge:
        print(f"removed {deadletter.purge(args.key)} dead letter(s) of {_hex(args.key)}")
        return 0
    if not records:
        print(f"no dead letters for {_hex(args.key)}")
    for rec in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("time", 0)))
        head = rec["message"][:16].hex()
        print(f"{when}  worker {rec.get('worker')}  {rec.get('size')} bytes  "
              f"{rec.get('reason')}  [{head}...]")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """``mqexecutor gc``: reclaim what dead producers left (persistence.collect_garbage). Returns
    0."""
    removed = persistence.collect_garbage()
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print("nothing to reclaim")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``mqexecutor serve KEY``: run a pool in the foreground until SIGINT/SIGTERM; running tasks
    finish, queued ones stay. Returns 0, or non-zero when the pool broke.

    The pool is an MQExecutor on KEY, made before this process starts any
    thread: its manager process is forked from here (see
    :mod:`mqexecutor.manager.launch`), the same manager as every pool's."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.swoole_handler:
        from . import swoole
        try:
            swoole.load_handler(args.swoole_handler)
        except (ImportError, AttributeError, ValueError) as exc:
            raise CLIError(f"--swoole-handler: {exc}", EXIT_USAGE) from None
    try:
        ex = MQExecutor(args.key, args.workers, mode=args.mode,
                        max_tasks_per_child=args.max_tasks_per_child,
                        task_timeout=args.task_timeout,
                        max_memory_per_child=(None if args.max_memory_per_child is None
                                              else args.max_memory_per_child * 2**20),
                        allow=args.allow, swoole_handler=args.swoole_handler)
    except sysv_ipc.PermissionsError as exc:
        raise CLIError(str(exc), EXIT_PERMISSION) from None
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    mode = Mode(args.mode).name.lower()
    print(f"mqexecutor: serving key {_hex(args.key)} (msqid {ex.msqid}) with "
          f"{args.workers} {mode} task workers; {ex.inherited} inherited task(s)",
          flush=True)

    def report(fut):
        if fut.cancelled():
            return
        exc = fut.exception()
        outcome = "ok" if exc is None else f"raised {type(exc).__name__}: {exc}"
        print(f"mqexecutor: inherited task {fut.original_task_id} of pid "
              f"{fut.original_pid} ({fut.fn_name}): {outcome}", flush=True)

    for fut in ex.recovered():
        fut.add_done_callback(report)
    while not stop.wait(0.5):
        if ex.broken is not None:
            print(f"mqexecutor: error: the pool broke: {ex.broken}", file=sys.stderr,
                  flush=True)
            ex.shutdown(wait=False)
            return 1
    print("mqexecutor: stopping: running tasks finish, queued tasks stay in the queue",
          flush=True)
    ex.shutdown(wait=True, keep_queued=True)
    left = ipcinfo.queue_info(args.key)
    print(f"mqexecutor: stopped; {left.qnum if left else 0} task(s) left in the queue",
          flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``mqexecutor`` command."""
    parser = argparse.ArgumentParser(
        prog="mqexecutor", description="Serve and inspect mqexecutor task queues. "
        "Keys are decimal or 0x hex, as ipcs prints them.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run a pool of task workers on KEY until SIGINT/SIGTERM")
    p.add_argument("key", type=_key, metavar="KEY")
    p.add_argument("--workers", "-w", type=int, default=2, help="task workers (default 2)")
    p.add_argument("--mode", type=int, choices=[2, 3], default=3,
                   help="2 targeted, 3 preemptive (default 3)")
    p.add_argument("--max-tasks-per-child", type=int, default=None, metavar="N")
    p.add_argument("--task-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a task running longer (its worker is replaced); tasks "
                   "may set their own limit with with_options(timeout=)")
    p.add_argument("--max-memory-per-child", type=int, default=None, metavar="MIB",
                   help="replace a worker whose resident memory exceeds MIB mebibytes "
                   "after a task")
    p.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                   help="let JSON tasks call functions matching this fnmatch pattern of "
                   "'module:qualname' (repeatable; default: none). See docs/external.md")
    p.add_argument("--swoole-handler", default=None, metavar="MODULE:FUNCTION",
                   help="read every message as a Swoole task packet and call "
                   "FUNCTION(data, task_id=, flags=) as onTask. See docs/external.md")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("ls", help="list mqexecutor's queues")
    p.add_argument("--all", "-a", action="store_true", help="list every queue")
    p.set_defaults(func=cmd_ls)
    for name, func, text in (("stat", cmd_stat, "show one queue in detail"),
                             ("purge", cmd_purge, "drop the queued tasks and their spill files"),
                             ("rm", cmd_rm, "remove the queue")):
        p = sub.add_parser(name, help=text)
        p.add_argument("key", type=_key, metavar="KEY")
        if name != "stat":
            p.add_argument("--force", action="store_true",
                           help="also act on a queue that is not mqexecutor's")
        p.set_defaults(func=func)
    p = sub.add_parser("dead", help="list (or --purge) the messages workers set aside")
    p.add_argument("key", type=_key, metavar="KEY")
    p.add_argument("--purge", action="store_true", help="remove them")
    p.set_defaults(func=cmd_dead)
    p = sub.add_parser("gc", help="reclaim queues and spill files of dead producers")
    p.set_defaults(func=cmd_gc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit (where 3.14 reports the broken pipe)
        return code
    except BrokenPipeError:
        # The reader went away (``mqexecutor ls | head``): no traceback, and no
        # second error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", 1) is not None and getattr(args, "workers", 1) <= 0:
        print("mqexecutor: error: --workers must be greater than 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"mqexecutor: error: {exc}", file=sys.stderr)
        return exc.code
    except sysv_ipc.ExistentialError as exc:
        print(f"mqexecutor: error: {exc}", file=sys.stderr)
        return EXIT_NO_QUEUE
    except sysv_ipc.PermissionsError as exc:
        print(f"mqexecutor: error: {exc}", file=sys.stderr)
        return EXIT_PERMISSION
