"""The task worker's receive loop: take a task message, run it, send the outcome.

::

    msgrcv(task queue, mtype)         # preemptive: 0 (any); targeted: worker id + 1
      -> check header (else: log and set aside as a dead letter, never crash)
      -> scoreboard[i] = busy (task id, producer token, reply key, pid)
      -> unpickle the call (from the message, or from a spill file it unlinks)
      -> run fn(*args, **kwargs)
      -> pickle the outcome (spilled into the producer's directory when large)
      -> msgsnd(producer's reply queue)  # never the task queue: no deadlock
      -> scoreboard[i] = idle; exit after max_tasks_per_child tasks

The tasks of a BATCH message are read in place and run in order; their results
go back together (:class:`~mqexecutor.worker.batcher.ResultBatcher`). A stop
request (:func:`request_stop`, from STOP_SIGNAL) is honoured between two
tasks: a message received after it goes back on the queue.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable
from typing import Any

import sysv_ipc

from .. import codec, context, functions, outbox, queues, spill
from ..codec import PLAIN_TYPES, PROTOCOL
from ..config import PoolConfig
from ..functions import BY_VALUE_PREFIX
from ..limits import msgmax
from ..protocol import (
    F_BATCH,
    F_FN_REF,
    F_KEEP_SPILL,
    F_SPILL,
    F_TARGETED,
    F_VALUES,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    WIRE_VERSION,
    Kind,
    ProtocolError,
    Status,
    batch_entries,
    build,
    entry_payload_start,
    ok_result,
    parse,
    reference_text,
    task_payload,
    task_timeout,
    unpack_header,
)
from ..relay import WorkerRelay
from ..scoreboard import Scoreboard
from .batcher import NO_VALUE, ResultBatcher
from .replies import Replier, drop_results, encode_outcome, format_exc

__all__ = ["TaskWorker", "request_stop", "stop_requested", "EXIT_INIT_FAILED", "EXIT_MEMORY"]

#: Exit status of a worker whose initializer raised.
EXIT_INIT_FAILED = 3
#: Exit status of a worker recycled because its resident set grew above
#: ``max_memory_per_child`` (after ``max_tasks_per_child`` tasks: 0).
EXIT_MEMORY = 4

#: Flags a task read in place from a batch must not have (see handle_batch).
_NOT_PLAIN = 0xFFFF & ~(F_FN_REF | F_TARGETED)

_stop = False


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Finish the current task, take no other one (the STOP_SIGNAL handler)."""
    global _stop
    _stop = True


def stop_requested() -> bool:
    """Whether :func:`request_stop` was called in this process."""
    return _stop


def _flush_output() -> None:
    """What tasks printed goes out after each message, not when the worker
    exits: a worker's stdout is a pipe or a file (block-buffered) when its
    manager started as a fresh interpreter."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


_PAGE = os.sysconf("SC_PAGE_SIZE")


class TaskWorker:
    """One task worker's state and loop.

    Args:
        config (PoolConfig): the pool.
        wid (int): this worker's id, 0..max_workers-1.
        start_thread (callable): ``start_thread(target, name) -> Thread`` for
            helper threads (see :mod:`mqexecutor.worker.process`).

    Raises:
        sysv_ipc.ExistentialError: the task queue is gone (the pool was torn
            down before this worker started).
    """

    def __init__(self, config: PoolConfig, wid: int,
                 start_thread: Callable[..., Any]):
        self.cfg = config
        self.wid = wid
        self.pid = os.getpid()
        self.queue = sysv_ipc.MessageQueue(config.task_key, 0, max_message_size=msgmax())
        self.board = Scoreboard(config.scoreboard_path, config.max_workers)
        self.replier = Replier()
        self.inline_max = msgmax() - HEADER_SIZE
        self.mtype = wid + 1 if config.targeted else 0
        self.max_tasks = config.max_tasks_per_child or 0
        self.max_rss = config.max_memory_per_child or 0
        #: The pool's time limit, for a task whose message has none (ns; 0: none).
        self.default_limit_ns = int(config.task_timeout * 1e9) if config.task_timeout else 0
        self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC) \
            if self.max_rss else -1
        #: Set once this worker must take no other task: its exit status.
        self.recycle: int | None = None
        self.rejected = 0
        self.done = 0  # tasks run, for max_tasks_per_child
        #: Tasks terminated by their producer (scoreboard), as last read.
        self.terminated: set[tuple[int, int]] = set()
        self.terminated_seen = 0
        self.subdirs: dict[tuple[int, int], str] = {}  # (pid, token) -> spill subdir
        self.spin = False  # poll before blocking in the next receive
        self.results = ResultBatcher(self.replier, outbox.outbox_path(config.board_dir, wid),
                                     wid, self.pid, start_thread)
        #: What tasks log (and, for a notebook, print), sent to their producer.
        self.relay: WorkerRelay | None = None
        if config.log_level is not None or config.relay_output:
            self.relay = WorkerRelay(self.replier.send, wid, self.pid,
                                     (config.owner_reply_key, config.owner_pid,
                                      config.owner_token), start_thread, config.authkey)
            if config.log_level is not None:
                self.relay.capture_logs(config.log_level)
            if config.relay_output:
                self.relay.capture_output()
        # The handler of every message, chosen once: Swoole packets, or
        # mqexecutor's own messages (and JSON tasks, told by their first byte).
        self.handle: Callable[[bytes], None] = self.handle_message
        if config.swoole_handler:
            from .. import swoole  # only pools with a Swoole handler load it
            self._swoole = swoole
            self._swoole_handler = swoole.load_handler(config.swoole_handler)
            self.handle = self.handle_swoole

    # -- the loop ----------------------------------------------------------------
    def initialize(self) -> bool:
        """Run the pool's initializer; on failure tell the owner and return False."""
        cfg = self.cfg
        if not cfg.initializer:
            return True
        try:
            initializer, initargs = cfg.initializer
            initializer(*initargs)
            return True
        except BaseException as exc:  # noqa: BLE001
            # As ProcessPoolExecutor's workers (relayed to the owner's handlers)
            logging.getLogger("concurrent.futures").critical("Exception in initializer:",
                                                             exc_info=True)
            msg = encode_outcome(Status.INIT_FAILED, 0, cfg.owner_token, self.wid,
                                 (exc, format_exc(exc)), self.inline_max, cfg.owner_subdir,
                                 cfg.authkey)
            self.board.init_failed(self.wid)
            self.replier.send(cfg.owner_reply_key, msg, cfg.owner_pid)
            return False

    def run(self) -> int:
        """Receive and handle messages until a stop request, the queue's
        removal or ``max_tasks_per_child`` tasks. Returns the exit status."""
        if not self.initialize():
            return EXIT_INIT_FAILED
        while not _stop:
            got = self.receive()
            if got is None:
                break
            raw, mtype = got
            if _stop:
                self.requeue(raw, mtype)
                break
            self.handle(raw)
            _flush_output()
            self.spin = True
            if self.recycle is not None:
                return self.recycle
        return 0

    def after_task(self) -> None:
        """Count a task; after ``max_tasks_per_child`` of them, or with a
        resident set above ``max_memory_per_child``, take no other one."""
        self.done += 1
        if self.max_tasks and self.done >= self.max_tasks:
            self.recycle = 0
        elif self.max_rss and self.rss() > self.max_rss:
            self.recycle = EXIT_MEMORY

    def rss(self) -> int:
        """This process's resident set, bytes (/proc/self/statm)."""
        return int(os.pread(self._statm, 64, 0).split()[1]) * _PAGE

    def receive(self) -> tuple[bytes, int] | None:
        """The next message for this worker (None: stop, or the queue is gone)."""
        if self.spin:  # right after a task: the next one may be close
            self.spin = False
            got = queues.spin_receive(self.queue, self.mtype)
            if got is not None:
                return got  # taken after a stop request: run() puts it back
        while not _stop:
            try:
                return self.queue.receive(type=self.mtype)
            except sysv_ipc.ExistentialError:
                return None  # the queue was removed: nothing more to do
            except OSError as exc:
                if exc.errno != errno.E2BIG:
                    raise
                # A message larger than our buffer (msgmax was lowered after it
                # was sent): grow the buffer instead of looping on E2BIG.
                size = self.queue.max_message_size * 2
                self.queue = sysv_ipc.MessageQueue(self.cfg.task_key, 0,
                                                   max_message_size=size)
            except sysv_ipc.Error:
                continue  # EINTR: the loop re-checks _stop
        return None

    def requeue(self, raw: bytes, mtype: int) -> None:
        """Put back a message taken after the stop request (if the queue stays
        full for 2 s, run it rather than lose it)."""
        try:
            if queues.send_patiently(self.queue, raw, mtype):
                return
        except (sysv_ipc.Error, OSError):
            return  # the queue is gone
        self.handle(raw)

    def reject(self, raw: bytes | memoryview, reason: str) -> None:
        """Count, log and keep a message this worker will not run (dead letter)."""
        raw = bytes(raw)
        self.rejected += 1
        try:
            self.board.add_rejected(self.wid)
        except (ValueError, IndexError):
            pass
        from .. import deadletter  # json and base64: off every worker's start-up
        kept = deadletter.record(self.cfg.task_key, raw, reason, self.wid)
        where = f"; kept in {kept}" if kept else ""
        context.report(f"set aside a message of {len(raw)} bytes: {reason}{where}")

    # -- handlers ----------------------------------------------------------------
    def handle_swoole(self, raw: bytes) -> None:
        """Hand a message to the pool's Swoole handler (:mod:`mqexecutor.swoole`)."""
        reason = self._swoole.handle_packet(raw, self._swoole_handler)
        if reason is not None:
            self.reject(raw, reason)
        else:
            self.after_task()

    def handle_message(self, raw: bytes) -> None:
        """Handle a message of mqexecutor's own (a TASK or a BATCH) or a JSON task."""
        if raw[:1] == b"{":
            from .. import external  # on the first JSON task: off every worker's start-up
            reason = external.handle_json(raw, self.cfg.allow, self.replier.send_raw)
            if reason is not None:
                self.reject(raw, reason)
            else:
                self.after_task()
            return
        if len(raw) >= HEADER_SIZE and raw[:2] == MAGIC and raw[4] & F_BATCH:
            self.handle_batch(raw)
            return
        self.handle_task(raw)
        self.board.idle(self.wid)
        self.after_task()

    def handle_batch(self, raw: bytes) -> None:
        """Run the tasks of a BATCH message in order. The slot moves from one
        task to the next without going idle, so a death between two tasks still
        names one of them and the producer re-sends the rest. A stop request or
        max_tasks_per_child between two tasks puts the rest back in the queue.
        Results go back together (:class:`ResultBatcher`).

        Inner tasks are read in place; one with anything but the plain flags
        (FN_REF, TARGETED), or any pool with an authkey, takes the checked
        path of :meth:`handle_task` instead (a time limit, for instance)."""
        try:
            h = unpack_header(raw)
            entries = batch_entries(raw, HEADER_SIZE)
        except ProtocolError as exc:
            self.reject(raw, f"bad batch: {exc}")
            return
        cfg = self.cfg
        mtype = self.wid + 1 if h.flags & F_TARGETED else 1
        results = self.results
        with results.lock:  # empty here: the previous batch's results went at its end
            results.values_ok = bool(h.flags & F_VALUES) and cfg.authkey is None
        view = memoryview(raw)
        fast = cfg.authkey is None
        unpack = HEADER_STRUCT.unpack_from
        task_kind = int(Kind.TASK)  # an enum member's lookup costs 80 ns per task
        try:
            for i, (off, n) in enumerate(entries):
                if _stop or self.recycle is not None:
                    results.flush()
                    for o, m in entries[i:]:
                        self.requeue(raw[o:o + m], mtype)
                    return
                if results.due():
                    results.flush()
                self.after_task()
                if fast and n > HEADER_SIZE + 2:
                    (magic, version, kind, flags, _status, task_id, token, reply, pid,
                     _worker, length) = unpack(raw, off)
                    if (magic == MAGIC and version == WIRE_VERSION and kind == task_kind
                            and length == n - HEADER_SIZE and not flags & _NOT_PLAIN):
                        start = entry_payload_start(raw, off)
                        if start <= off + n:
                            self.run_task(view[off:off + n], flags, task_id, token, reply,
                                          pid, view[start:off + n], results,
                                          self.default_limit_ns)
                            continue
                self.handle_task(raw[off:off + n], results)
        finally:
            results.flush()
            self.board.idle(self.wid)

    def handle_task(self, raw: bytes, results: ResultBatcher | None = None) -> None:
        """Run one TASK message and send its outcome, or leave it in ``results``.
        Leaves the slot busy (the caller marks it idle)."""
        try:
            h, body = parse(raw, self.cfg.authkey)
            if h.kind != Kind.TASK:
                raise ProtocolError(f"kind {h.kind} is not a task")
            payload = task_payload(body, h.flags)
            limit = task_timeout(body, h.flags)
        except ProtocolError as exc:
            self.reject(raw, str(exc))
            return
        self.run_task(raw, h.flags, h.task_id, h.token, h.reply, h.pid, payload, results,
                      int(limit * 1e9) if limit else self.default_limit_ns)

    def run_task(self, raw: bytes | memoryview, flags: int, task_id: int, token: int,
                 reply: int, pid: int, payload: memoryview,
                 results: ResultBatcher | None = None, limit_ns: int = 0) -> None:
        """Run the task of a checked TASK message (``raw``, whose header fields
        and payload are given; ``limit_ns``: its time limit, 0 for none) and
        send its outcome, or leave it in ``results``. A task its producer
        terminated is not run: the outcome is Status.CANCELLED."""
        cfg = self.cfg
        if reply == 0:
            self.reject(raw, "reply key 0 (IPC_PRIVATE) names no queue: refused")
            return
        spilled = bool(flags & F_SPILL)
        keep = bool(flags & F_KEEP_SPILL)
        if bool(flags & F_TARGETED) != cfg.targeted:
            mine = "targeted" if cfg.targeted else "preemptive"
            theirs = "targeted" if flags & F_TARGETED else "preemptive"
            err = ValueError(f"task {task_id} was sent in {theirs} mode to a {mine} "
                             "pool: refused")
            self.reject(raw, str(err))
            if spilled and not keep:
                spill.discard(reference_text(payload))
            refusal = encode_outcome(Status.BAD_TASK, task_id, token, self.wid, (err, ""),
                                     self.inline_max, self.subdir(pid, token), cfg.authkey)
            self.replier.send(reply, refusal, pid, token)
            return
        board = self.board
        board.busy(self.wid, task_id, token, reply, pid, limit_ns)
        if board.generation() != self.terminated_seen:  # terminate() was called
            self.terminated_seen = board.generation()
            self.terminated = board.terminated()
        if self.terminated and (token, task_id) in self.terminated:
            if spilled and not keep:
                spill.discard(reference_text(payload))
            skipped = build(Kind.RESULT, 0, Status.CANCELLED, task_id, token, 0, self.pid,
                            self.wid, b"", cfg.authkey)
            if results is not None:
                results.add(reply, pid, token, skipped, 0.0, task_id)
            elif not self.replier.send(reply, skipped, pid, token):
                drop_results([skipped], pid, token)
            return
        ran = 0.0
        fn = args = kwargs = None
        try:
            try:
                if spilled:
                    fn, args, kwargs = codec.loads(payload, True, keep=keep)
                else:
                    fn, args, kwargs = pickle.loads(payload)
                if flags & F_FN_REF:
                    if fn[:1] == BY_VALUE_PREFIX:
                        fn = functions.load_by_value(fn, self.subdir(pid, token))
                    else:
                        fn = functions.load_function(fn)
            except BaseException as exc:  # noqa: BLE001 - SystemExit at unpickle too
                status, outcome = Status.BAD_TASK, (exc, format_exc(exc))
                self.reject(raw, f"task {task_id} could not be read: "
                                 f"{type(exc).__name__}: {exc}")
            else:
                context._task_id = task_id
                relay = self.relay
                if relay is not None:
                    relay.begin(task_id, reply, pid, token)
                started = time.perf_counter()
                try:
                    status, outcome = Status.OK, fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - as ProcessPoolExecutor
                    status, outcome = Status.RAISED, (exc, format_exc(exc))
                finally:
                    context._task_id = None
                    ran = time.perf_counter() - started
                    if relay is not None:
                        relay.end()  # what it logged and printed goes first
            msg: bytes | None = None
            value: Any = NO_VALUE
            if not status and cfg.authkey is None and type(outcome) in PLAIN_TYPES:
                data = pickle.dumps(outcome, PROTOCOL)  # a plain value: the short way
                if len(data) <= self.inline_max:
                    msg = ok_result(task_id, token, self.pid, self.wid, data)
                    value = outcome
            if msg is None:
                msg = encode_outcome(status, task_id, token, self.wid, outcome,
                                     self.inline_max, self.subdir(pid, token),
                                     cfg.authkey, self.pid)
            if results is not None:
                results.add(reply, pid, token, msg, ran, task_id, value)
            elif not self.replier.send(reply, msg, pid, token):
                drop_results([msg], pid, token)
            # Only now are the call and its outcome freed: a destructor that
            # kills this process cannot take a finished task's result with it
            # (the manager delivers the outbox; a notice of the death finds
            # the task done).
            del value, outcome
            fn = args = kwargs = None
        finally:
            context._task_id = None

    def subdir(self, pid: int, token: int) -> str:
        """The spill sub-directory of producer (``pid``, ``token``), cached."""
        subdir = self.subdirs.get((pid, token))
        if subdir is None:
            if len(self.subdirs) > 256:
                self.subdirs.clear()
            subdir = self.subdirs[pid, token] = spill.producer_subdir(pid, token)
        return subdir
