#!/usr/bin/env python3
"""Post JSON tasks to an mqexecutor pool with sysv_ipc only (no mqexecutor).

What a program in any language does (docs/external.md): send one JSON object
per task to the pool's queue, naming a function the pool allows, and read the
JSON reply from a queue of its own.

    mqexecutor serve 0x2b2b0001 --allow 'math:*'
    python examples/external_python.py 0x2b2b0001 math:hypot '[3, 4]'
    {"v":1,"id":1,"ok":true,"result":5.0,"worker":0,"pid":4250}

Several calls: repeat ``--call FN ARGS_JSON``; they are all posted first, then
the replies are matched to the calls by ``id`` (workers answer in any order).

Exit status: 0 every task returned, 1 one failed (error reply), 2 usage or
queue problem, 3 a reply did not come within ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import sysv_ipc


def msgmax() -> int:
    """kernel.msgmax, the largest message in bytes (8192 by default)."""
    try:
        with open("/proc/sys/kernel/msgmax") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 8192


def new_reply_queue(size: int) -> sysv_ipc.MessageQueue:
    """Our own reply queue: a fresh random key (IPC_CREX), mode 0600.

    The key is drawn here rather than with ``MessageQueue(None, ...)``, whose
    keys repeat from one process to the next: a worker that answered an
    earlier process on the same key would find a different queue there.
    """
    rng = random.SystemRandom()
    for _ in range(64):
        try:
            return sysv_ipc.MessageQueue(rng.randrange(0x10000, 0x7FFFFFFF),
                                         sysv_ipc.IPC_CREX, mode=0o600,
                                         max_message_size=size)
        except sysv_ipc.ExistentialError:
            continue  # that key is taken: draw another
    raise OSError("no free SysV key for a reply queue")


def call_many(key: int, calls: list[tuple[str, list, dict]],
              timeout: float = 10.0) -> list[dict]:
    """Run ``calls`` ([(fn, args, kwargs)]) on the pool of ``key``.

    Returns the JSON replies (dicts) in the order of ``calls``.

    Raises:
        sysv_ipc.ExistentialError: no queue has this key.
        TimeoutError: a reply did not arrive within ``timeout`` seconds.
    """
    size = msgmax()
    tasks = sysv_ipc.MessageQueue(key, 0, max_message_size=size)  # never create it
    replies = new_reply_queue(size)
    try:
        deadline = time.monotonic() + timeout
        for i, (fn, args, kwargs) in enumerate(calls, 1):
            message = json.dumps({"v": 1, "id": i, "fn": fn, "args": args, "kwargs": kwargs,
                                  "reply": {"key": replies.key, "mtype": 1}})
            while True:  # never block for good on a full queue
                try:
                    tasks.send(message.encode(), block=False, type=1)
                    break
                except sysv_ipc.BusyError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the pool's queue stayed full") from None
                    time.sleep(0.01)
        results: dict[int, dict] = {}
        while len(results) < len(calls):
            try:
                raw, _mtype = replies.receive(block=False)
            except sysv_ipc.BusyError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(calls) - len(results)} reply(ies) missing "
                                       f"after {timeout} s") from None
                time.sleep(0.005)
                continue
            reply = json.loads(raw)
            results[reply["id"]] = reply
        return [results[i] for i in range(1, len(calls) + 1)]
    finally:
        replies.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("key", help="the pool's SysV key, decimal or 0x hex")
    parser.add_argument("fn", nargs="?", help="module:qualname, e.g. math:hypot")
    parser.add_argument("args", nargs="?", default="[]", help="JSON array of arguments")
    parser.add_argument("--call", nargs=2, action="append", default=[],
                        metavar=("FN", "ARGS_JSON"), help="another call (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    opts = parser.parse_args(argv)
    key = int(opts.key, 0)
    if key > 0x7FFFFFFF:
        key -= 1 << 32  # ipcs prints key_t unsigned
    pairs = ([(opts.fn, opts.args)] if opts.fn else []) + [tuple(c) for c in opts.call]
    if not pairs:
        parser.error("name a function (FN) or use --call")
    calls = []
    for fn, args in pairs:
        args = json.loads(args)
        if not isinstance(args, list):
            parser.error(f"arguments of {fn} must be a JSON array")
        calls.append((fn, args, {}))
    try:
        replies = call_many(key, calls, opts.timeout)
    except sysv_ipc.ExistentialError:
        print(f"external_python.py: no queue has key 0x{key & 0xFFFFFFFF:08x}: is the "
              "pool running?", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"external_python.py: {exc}", file=sys.stderr)
        return 3
    status = 0
    for reply in replies:
        print(json.dumps(reply, separators=(",", ":")))
        if not reply.get("ok"):
            err = reply["error"]
            print(f"external_python.py: {err['code']}: {err['type']}: {err['message']}",
                  file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
