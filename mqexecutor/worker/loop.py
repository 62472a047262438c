"""The task worker process: receive a task message, run it, send the result.

One worker is one process started by the pool owner (an ``MQExecutor`` or
``mqexecutor serve``). Its loop::

    msgrcv(task queue, mtype)         # preemptive: 0 (any); targeted: worker id + 1
      -> check header (else: log and set aside, never crash)
      -> mark the scoreboard slot busy (task id, producer token, reply key)
      -> unpickle the call (from the message, or from a spill file it unlinks)
      -> run fn(*args, **kwargs)
      -> pickle the outcome (spilled into the producer's directory when large)
      -> msgsnd(producer's reply queue)  # never the task queue: no deadlock
      -> mark the slot idle; exit after max_tasks_per_child tasks

Stopping: the owner sends SIGUSR1 (repeatedly, to close the race with msgrcv).
The worker finishes the task it runs, never takes another, and exits; a message
received after the stop request is put back on the queue. A watchdog thread
does the same when the owner process dies (pidfd), so leftover tasks wait for
the next owner. SIGINT is ignored: Ctrl-C is the owner's to handle.
"""
from __future__ import annotations

import errno
import faulthandler
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any, NamedTuple

import sysv_ipc

from .. import codec, deadletter, outbox, persistence, queues, spill
from ..codec import PLAIN_TYPES, PROTOCOL
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
    RESULT_MTYPE,
    WIRE_VERSION,
    Kind,
    ProtocolError,
    Status,
    batch_entries,
    build,
    ok_result,
    parse,
    split_batch,
    task_payload,
    unpack_header,
    values_body,
)
from ..scoreboard import Scoreboard

__all__ = ["worker_id", "current_task_id", "WorkerConfig", "run_worker", "EXIT_INIT_FAILED"]

#: Flags a task read in place from a batch must not have (see handle_batch).
_NOT_PLAIN = 0xFFFF & ~(F_FN_REF | F_TARGETED)

#: Exit status of a worker whose initializer raised.
EXIT_INIT_FAILED = 3
STOP_SIGNAL = signal.SIGUSR1

_worker_id: int | None = None
_task_id: int | None = None
_stop = False
_owner_dead = False


def worker_id() -> int | None:
    """Id (0..max_workers-1) of the task worker running the calling code.

    Returns None outside a task worker. Ids are stable: a worker replaced after
    ``max_tasks_per_child`` tasks or a crash keeps its id (Swoole's task worker id).
    """
    return _worker_id


def current_task_id() -> int | None:
    """``task_id`` of the task running in this worker, None outside a task."""
    return _task_id


class WorkerConfig(NamedTuple):
    """Everything a worker needs, passed at spawn (plain data, picklable)."""

    worker_id: int
    task_key: int
    targeted: bool
    owner_pid: int
    owner_token: int
    owner_reply_key: int
    scoreboard_path: str
    initializer: bytes | None = None
    max_tasks: int | None = None
    private_queue: bool = False
    owner_subdir: str = ""
    spill_env: str | None = None
    #: fnmatch patterns of "module:qualname" that JSON tasks may call
    #: (:mod:`mqexecutor.external`); empty: JSON tasks are refused.
    allow: tuple = ()
    #: HMAC key: when set, messages without a valid tag are refused unread.
    authkey: bytes | None = None
    #: "module:function" handed every message as Swoole's onTask would be
    #: (:mod:`mqexecutor.swoole`); None: messages are mqexecutor's own.
    swoole_handler: str | None = None
    #: Reclaim dead producers' leftovers (``persistence.collect_garbage``)
    #: ``SWEEP_DELAY`` seconds after start, in the owner-watch thread: the first
    #: pool of a process asks its first worker, so its constructor does not
    #: wait for it.
    sweep: bool = False


def _on_stop(signum, frame) -> None:
    global _stop
    _stop = True


_cleanup_on_term = None


def _on_term(signum, frame) -> None:
    """SIGTERM: die at once, as an unhandled SIGTERM would. When the owner is
    dying too (e.g. ``kill -TERM -<pgid>``, ``timeout``, ``docker stop``), first
    remove what only the owner could have removed."""
    owner = _cleanup_on_term
    if owner is not None:
        pid, cleanup = owner
        for _ in range(20):  # up to 0.2 s for the owner to go
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                try:
                    cleanup()
                except Exception:  # noqa: BLE001
                    pass
                break
            except PermissionError:
                break
            time.sleep(0.01)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die of the signal itself
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(128 + signal.SIGTERM)


def _watch_owner(owner_pid: int, main_ident: int, sweep: bool = False) -> None:
    """Wait for the owner process to exit, then stop the worker. With ``sweep``,
    first reclaim dead producers' leftovers ``SWEEP_DELAY`` seconds after start
    (unless the owner is gone by then)."""
    global _stop, _owner_dead
    try:
        fd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        fd = None
    except (AttributeError, OSError):  # old kernel: poll
        fd = -1
    if sweep and fd is not None:  # (None: the owner is gone already)
        if fd == -1:
            time.sleep(SWEEP_DELAY)
            _sweep()
        elif not select.select([fd], [], [], SWEEP_DELAY)[0]:
            _sweep()
    if fd is not None and fd >= 0:
        select.select([fd], [], [])
        os.close(fd)
    elif fd == -1:
        while True:
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(0.2)
    _owner_dead = True
    _stop = True
    while True:  # repeat: the signal may land just before msgrcv blocks
        try:
            signal.pthread_kill(main_ident, STOP_SIGNAL)
        except (ProcessLookupError, OSError):
            return
        time.sleep(0.05)


#: Seconds after start at which a worker asked to (WorkerConfig.sweep) reclaims
#: dead producers' leftovers: after the first tasks of a new pool, usually.
SWEEP_DELAY = 0.05


def _sweep() -> None:
    try:
        persistence.collect_garbage()
    except Exception as exc:  # noqa: BLE001 - best effort, as the CLI's gc
        _report(f"reclaiming dead producers' leftovers failed: {exc!r}")


def _format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _alive(pid: int) -> bool:
    """Whether producer ``pid`` lives; an unknown pid (<= 0) counts as alive."""
    return pid <= 0 or persistence.pid_alive(pid)


class _Liveness:
    """Whether producers live, asked before every result is sent: one poll() of
    a pidfd kept per producer pid (readable once the process exited, zombie
    included), about 1 us, against about 15 us for kill(0) plus reading
    /proc/<pid>/stat. Falls back to :func:`_alive` where pidfds do not exist."""

    LIMIT = 64  # pidfds kept open

    def __init__(self) -> None:
        self._polls: dict[int, Any] = {}
        self._fds: dict[int, int] = {}

    def alive(self, pid: int) -> bool:
        if pid <= 0:
            return True
        poller = self._polls.get(pid)
        if poller is None:
            if len(self._fds) >= self.LIMIT:
                self.close()
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return False
            except (AttributeError, OSError):  # no pidfd here: the slow way
                return _alive(pid)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            self._fds[pid] = fd
            self._polls[pid] = poller
        if poller.poll(0):
            # That process exited. The pid may have been given to a new
            # producer since: ask again with a fresh pidfd.
            self.forget(pid)
            return self.alive(pid) if _alive(pid) else False
        return True

    def forget(self, pid: int) -> None:
        self._polls.pop(pid, None)
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for pid in list(self._fds):
            self.forget(pid)


class _Replier:
    """Sends results to producers' reply queues, opened by key and cached."""

    #: Seconds a reply queue may stay full before the worker checks that its
    #: producer is still the process that has its pid.
    FULL_PATIENCE = 10.0

    def __init__(self) -> None:
        self._queues: dict[int, sysv_ipc.MessageQueue] = {}
        self._liveness = _Liveness()
        self._lock = threading.RLock()

    def _queue(self, key: int) -> sysv_ipc.MessageQueue:
        q = self._queues.get(key)
        if q is None:
            if key == 0:  # IPC_PRIVATE: msgget would create a queue nobody reads
                raise sysv_ipc.ExistentialError("reply key 0 (IPC_PRIVATE) names no queue")
            if len(self._queues) > 256:
                self._queues.clear()
            q = sysv_ipc.MessageQueue(key, 0, max_message_size=msgmax())
            self._queues[key] = q
        return q

    def send(self, key: int, message: bytes, producer_pid: int, token: int = 0) -> bool:
        """Send without ever blocking for good: retry while the queue is full and
        the producer lives. Returns False when the result had to be dropped.

        A producer that died is cleaned up after: its reply queue and spill
        directory are removed, so nothing it left behind leaks. Thread-safe
        (the outbox's flusher thread sends too)."""
        with self._lock:
            return self._send(key, message, producer_pid, token)

    def _send(self, key: int, message: bytes, producer_pid: int, token: int) -> bool:
        if not self._liveness.alive(producer_pid):
            self._bury(key, producer_pid, token)
            return False
        delay = 0.0001
        waited = 0.0
        full_since = 0.0
        reopened = False
        while True:
            try:
                self._queue(key).send(message, block=False, type=RESULT_MTYPE)
                return True
            except sysv_ipc.BusyError:
                pass
            except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError):
                self._queues.pop(key, None)
                return False
            except sysv_ipc.Error:  # EINTR
                pass
            except OSError:
                # EINVAL: the cached queue was removed and the key reused by a
                # new queue. Open it again once.
                self._queues.pop(key, None)
                if reopened:
                    return False
                reopened = True
                continue
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.02)
            if waited > 0.2:
                waited = 0.0
                full_since = full_since or time.monotonic()
                if not self._liveness.alive(producer_pid):
                    self._bury(key, producer_pid, token)
                    return False
                if (token and time.monotonic() - full_since > self.FULL_PATIENCE
                        and not self._owns(key, producer_pid, token)):
                    # Full for long, and the pid lives but its producer's
                    # metadata is gone: the pid belongs to another process
                    # now, and nobody will read this queue.
                    self._queues.pop(key, None)
                    return False

    def send_raw(self, key: int, mtype: int, message: bytes) -> bool:
        """Send ``message`` with type ``mtype`` to the queue of ``key`` (for
        external producers' replies). Never blocks: gives up after ~1 s of a full
        queue. Returns False when it could not be sent."""
        for _ in range(100):
            try:
                q = self._queues.get(key) or self._queue(key)
                q.send(message, block=False, type=mtype)
                return True
            except sysv_ipc.BusyError:
                time.sleep(0.01)
            except OSError:  # a stale cached queue (key reused): open it again
                if self._queues.pop(key, None) is None:
                    return False
            except (sysv_ipc.Error, ValueError):
                self._queues.pop(key, None)
                return False
        return False

    @staticmethod
    def _owns(key: int, producer_pid: int, token: int) -> bool:
        """Whether the metadata of producer (pid, token) exists and names ``key``
        as its reply queue (every MQExecutor writes it when it starts)."""
        meta = persistence.read_meta(spill.producer_subdir(producer_pid, token))
        return meta is not None and meta.reply_key == key and meta.owner_pid == producer_pid

    def _bury(self, key: int, producer_pid: int, token: int) -> None:
        """Remove the reply queue and spill directory of a producer that died,
        only when its own metadata names that reply key: a forged header
        naming a dead pid must not destroy a live producer's queue."""
        self._queues.pop(key, None)
        if not token or key == 0:
            return
        subdir = spill.producer_subdir(producer_pid, token)
        meta = persistence.read_meta(subdir)
        if meta is None or meta.reply_key != key or meta.owner_pid != producer_pid:
            return
        try:
            sysv_ipc.MessageQueue(key, 0).remove()
        except sysv_ipc.Error:
            pass
        spill.remove_subdir(subdir)


def _result_message(status: int, task_id: int, token: int, wid: int, obj: Any,
                    inline_max: int, subdir: str, authkey: bytes | None, pid: int = 0
                    ) -> bytes:
    body, spilled = codec.dumps(obj, inline_max, subdir)
    flags = F_SPILL if spilled else 0
    return build(Kind.RESULT, flags, status, task_id, token, 0, pid or os.getpid(), wid,
                 body, authkey)


def _encode_outcome(status: int, task_id: int, token: int, wid: int, obj: Any,
                    inline_max: int, subdir: str, authkey: bytes | None = None,
                    pid: int = 0) -> bytes:
    """Pickle an outcome; when that fails, pickle the failure instead. ``pid``:
    this process's, when the caller knows it."""
    if authkey:
        inline_max -= 32
    try:
        return _result_message(status, task_id, token, wid, obj, inline_max, subdir, authkey,
                               pid)
    except BaseException as exc:  # noqa: BLE001 - SystemExit at pickle time is an outcome
        failure = (exc, _format_exc(exc))
    try:
        return _result_message(Status.RAISED, task_id, token, wid, failure, inline_max,
                               subdir, authkey)
    except BaseException as exc2:  # noqa: BLE001
        text = f"{type(failure[0]).__name__}: {failure[0]}"
        plain = (RuntimeError(f"the task's outcome could not be pickled ({text}), "
                              f"nor the error itself ({type(exc2).__name__}: {exc2})"),
                 failure[1])
        return _result_message(Status.RAISED, task_id, token, wid, plain, inline_max,
                               subdir, authkey)


def _report(message: str) -> None:
    try:
        sys.stderr.write(f"mqexecutor worker {_worker_id} (pid {os.getpid()}): {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _discard_spill(message: bytes) -> bool:
    """Unlink the spill file a RESULT message that will never be read names.
    Returns whether it named one."""
    try:
        h, body = parse(message)
    except ProtocolError:
        return False
    if h.flags & F_SPILL:
        spill.discard(bytes(body).decode("ascii", "replace"))
        return True
    return False


def _drop_results(messages: list[bytes], pid: int, token: int) -> None:
    """Results that could not be sent: unlink their spill files, and the
    producer's spill directory if that left it empty (spilling re-created it)."""
    spilled = False
    for m in messages:
        spilled = _discard_spill(m) or spilled
    if spilled:
        spill.remove_if_empty(spill.producer_subdir(pid, token))


#: ``_Outbox.add``'s value for a result that is not a plain inline value.
_NO_VALUE: Any = object()


class _Outbox:
    """The results of one BATCH message's tasks, sent together in RESULT BATCH
    messages (see :mod:`mqexecutor.outbox`, which keeps them in a file until
    they are sent, for the owner to deliver if this worker dies).

    Results are sent when the next would not fit in one message, before a task
    starts once the oldest waiting result is ``FLUSH_AGE`` seconds old, when the
    batch ends, and by a thread (``mqexecutor-outbox``) once the oldest is
    ``FLUSH_AGE`` old while a long task runs: a slow task never holds back the
    results of the quick ones before it.

    When the producer asked for it (F_VALUES on its BATCH) and every result
    waiting is a plain return value (``codec.PLAIN_TYPES``, inline, no
    authkey), they go in one RESULT VALUES message instead: their task ids and
    one pickle of the values, which the producer unpickles once."""

    #: Seconds a result may wait for others before it is sent.
    FLUSH_AGE = 0.001

    def __init__(self, worker: _Worker, path: str):
        self.worker = worker
        self.box: outbox.Outbox | None
        try:
            self.box = outbox.Outbox(path)
        except (OSError, ValueError):
            self.box = None  # no file from the owner: results are sent one by one
        self.limit = msgmax() - HEADER_SIZE
        if self.box is not None:
            self.limit = min(self.limit, self.box.capacity)
        self.since = 0.0
        self.busy = 0.0  # seconds spent running the tasks of the waiting results
        self.route = outbox.Route(0, 0, 0)
        #: Whether the producer of the current BATCH reads RESULT VALUES
        #: (its BATCH had F_VALUES); then the return values of the results
        #: waiting are kept here too, while all are plain (``plain``).
        self.values_ok = False
        self.plain = True
        self.value_ids: list[int] = []
        self.values: list[Any] = []
        self.lock = threading.Lock()
        self.waiting = threading.Event()  # set while results wait
        self.flusher: threading.Thread | None = None

    def add(self, reply: int, pid: int, token: int, message: bytes, busy: float,
            task_id: int = 0, value: Any = _NO_VALUE) -> None:
        """Keep (or send) the result ``message`` of task ``task_id``, which ran
        ``busy`` seconds; ``value``: its return value when ``message`` is a
        plain inline Status.OK result (``ok_result``)."""
        with self.lock:
            box = self.box
            if box is None or 4 + len(message) > self.limit:
                self._flush()
                self.send(outbox.Route(reply, pid, token), message, [message])
                return
            if box.count:
                route = self.route
                if (reply != route.reply or pid != route.pid or token != route.token
                        or box.used + 4 + len(message) > self.limit):
                    self._flush()
            if not box.count:
                self.route = outbox.Route(reply, pid, token)
                self.since = time.monotonic()
                if self.flusher is None:
                    self.flusher = threading.Thread(target=self._flush_late,
                                                    name="mqexecutor-outbox", daemon=True)
                    self.flusher.start()
                self.waiting.set()
            box.add(self.route, message)
            self.busy += busy
            if self.values_ok and self.plain:
                if value is _NO_VALUE:
                    self.plain = False
                else:
                    self.value_ids.append(task_id)
                    self.values.append(value)

    def due(self) -> bool:
        box = self.box
        return (box is not None and box.count > 0
                and time.monotonic() - self.since >= self.FLUSH_AGE)

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush_late(self) -> None:
        """The flusher thread: send what waits once the oldest is FLUSH_AGE old."""
        box = self.box
        assert box is not None
        while True:
            self.waiting.wait()
            with self.lock:
                if not box.count:
                    self.waiting.clear()
                    continue
                delay = self.since + self.FLUSH_AGE - time.monotonic()
                if delay <= 0:
                    self._flush()
                    self.waiting.clear()
                    continue
            time.sleep(delay)

    def _flush(self) -> None:
        box = self.box
        if box is None or not box.count:
            return
        busy_us = min(int(self.busy * 1e6), 2**63) or 1
        self.busy = 0.0
        route = self.route
        if box.count == 1:
            message = box.first()
            self.send(route, message, [message])
        elif self.values_ok and self.plain:
            # plain values only: one pickle of them all (the outbox file keeps
            # the RESULT messages, for the owner to deliver if this worker dies)
            message = build(Kind.RESULT, F_VALUES, 0, busy_us, route.token, 0,
                            self.worker.pid, self.worker.cfg.worker_id,
                            values_body(self.value_ids, pickle.dumps(self.values, PROTOCOL)))
            self.send(route, message, [])  # no spill file to drop if not sent
        else:  # the inner messages carry their own HMAC: the outer header none;
            # its task id field tells how long the tasks ran (microseconds)
            message = build(Kind.RESULT, F_BATCH, 0, busy_us, route.token, 0,
                            self.worker.pid, self.worker.cfg.worker_id, box.body())
            self.send(route, message)
        box.clear()
        self.plain = True
        self.value_ids = []
        self.values = []

    def send(self, route: outbox.Route, message: bytes, inner: list[bytes] | None = None
             ) -> None:
        """Send ``message`` along ``route``; if the producer is gone, drop its
        results: ``inner``, or when None the entries of the RESULT BATCH
        ``message`` (split only then)."""
        if not self.worker.replier.send(route.reply, message, route.pid, route.token):
            if inner is None:
                inner = split_batch(memoryview(message)[HEADER_SIZE:])
            _drop_results(inner, route.pid, route.token)


class _Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.pid = os.getpid()
        self.queue = sysv_ipc.MessageQueue(cfg.task_key, 0, max_message_size=msgmax())
        self.board = Scoreboard(cfg.scoreboard_path, cfg.worker_id + 1)
        self.replier = _Replier()
        self.inline_max = msgmax() - HEADER_SIZE
        self.mtype = cfg.worker_id + 1 if cfg.targeted else 0
        self.rejected = 0
        self.done = 0  # tasks run, for max_tasks_per_child
        self.subdirs: dict[tuple[int, int], str] = {}  # (pid, token) -> spill subdir
        self.spin = False  # poll before blocking in the next receive
        self.outbox = _Outbox(self, outbox.outbox_path(os.path.dirname(cfg.scoreboard_path),
                                                       cfg.worker_id))
        self.swoole = None
        if cfg.swoole_handler:
            from .. import swoole
            self.swoole = swoole.load_handler(cfg.swoole_handler)

    def initialize(self) -> bool:
        if not self.cfg.initializer:
            return True
        try:
            initializer, initargs = pickle.loads(self.cfg.initializer)
            initializer(*initargs)
            return True
        except BaseException as exc:  # noqa: BLE001
            msg = _encode_outcome(Status.INIT_FAILED, 0, self.cfg.owner_token,
                                  self.cfg.worker_id, (exc, _format_exc(exc)),
                                  self.inline_max, self.cfg.owner_subdir, self.cfg.authkey)
            self.board.init_failed(self.cfg.worker_id)
            self.replier.send(self.cfg.owner_reply_key, msg, self.cfg.owner_pid)
            return False

    def receive(self) -> tuple[bytes, int] | None:
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
        """Put back a message taken after the stop request."""
        for _ in range(400):
            try:
                self.queue.send(raw, block=False, type=mtype)
                return
            except sysv_ipc.BusyError:
                time.sleep(0.005)
            except sysv_ipc.Error:
                return
        self.handle(raw)  # no room for 2 s: run it rather than lose it

    def reject(self, raw: bytes | memoryview, reason: str) -> None:
        """Count, log and keep a message this worker will not run (dead letter)."""
        raw = bytes(raw)
        self.rejected += 1
        try:
            self.board.add_rejected(self.cfg.worker_id)
        except (ValueError, IndexError):
            pass
        kept = deadletter.record(self.cfg.task_key, raw, reason, self.cfg.worker_id)
        where = f"; kept in {kept}" if kept else ""
        _report(f"set aside a message of {len(raw)} bytes: {reason}{where}")

    def handle(self, raw: bytes) -> None:
        if self.swoole is not None:
            from .. import swoole
            reason = swoole.handle_packet(raw, self.swoole)
            if reason is not None:
                self.reject(raw, reason)
            else:
                self.done += 1
            return
        if raw[:1] == b"{":
            from .. import external
            reason = external.handle_json(raw, self.cfg.allow, self.replier.send_raw)
            if reason is not None:
                self.reject(raw, reason)
            else:
                self.done += 1
            return
        if len(raw) >= HEADER_SIZE and raw[:2] == b"MQ" and raw[4] & F_BATCH:
            self.handle_batch(raw)
            return
        self.handle_task(raw)
        self.board.idle(self.cfg.worker_id)
        self.done += 1

    def handle_batch(self, raw: bytes) -> None:
        """Run the tasks of a BATCH message in order. The slot moves from one
        task to the next without going idle, so a death between two tasks still
        names one of them and the producer re-sends the rest. A stop request or
        max_tasks_per_child between two tasks puts the rest back in the queue.
        Results go back together (:class:`_Outbox`).

        Inner tasks are read in place; one with anything but the plain flags
        (FN_REF, TARGETED), or any pool with an authkey, takes the checked
        path of :meth:`handle_task` instead."""
        try:
            h = unpack_header(raw)
            entries = batch_entries(raw, HEADER_SIZE)
        except ProtocolError as exc:
            self.reject(raw, f"bad batch: {exc}")
            return
        cfg = self.cfg
        mtype = cfg.worker_id + 1 if h.flags & F_TARGETED else 1
        results = self.outbox
        with results.lock:  # empty here: the previous batch's results went at its end
            results.values_ok = bool(h.flags & F_VALUES) and cfg.authkey is None
        view = memoryview(raw)
        fast = cfg.authkey is None
        unpack = HEADER_STRUCT.unpack_from
        task_kind = int(Kind.TASK)  # an enum member's lookup costs 80 ns per task
        try:
            for i, (off, n) in enumerate(entries):
                if _stop or (cfg.max_tasks and self.done >= cfg.max_tasks):
                    results.flush()
                    for o, m in entries[i:]:
                        self.requeue(raw[o:o + m], mtype)
                    return
                if results.due():
                    results.flush()
                self.done += 1
                if fast and n > HEADER_SIZE + 2:
                    (magic, version, kind, flags, _status, task_id, token, reply, pid,
                     _worker, length) = unpack(raw, off)
                    if (magic == MAGIC and version == WIRE_VERSION and kind == task_kind
                            and length == n - HEADER_SIZE and not flags & _NOT_PLAIN):
                        start = off + HEADER_SIZE + 2 + (raw[off + 40] | raw[off + 41] << 8)
                        if start <= off + n:
                            self.run_task(view[off:off + n], flags, task_id, token, reply,
                                          pid, view[start:off + n], results)
                            continue
                self.handle_task(raw[off:off + n], results)
        finally:
            results.flush()
            self.board.idle(cfg.worker_id)

    def handle_task(self, raw: bytes, results: _Outbox | None = None) -> None:
        """Run one TASK message and send its outcome, or leave it in ``results``.
        Leaves the slot busy (the caller marks it idle)."""
        try:
            h, body = parse(raw, self.cfg.authkey)
            if h.kind != Kind.TASK:
                raise ProtocolError(f"kind {h.kind} is not a task")
            payload = task_payload(body)
        except ProtocolError as exc:
            self.reject(raw, str(exc))
            return
        self.run_task(raw, h.flags, h.task_id, h.token, h.reply, h.pid, payload, results)

    def run_task(self, raw: bytes | memoryview, flags: int, task_id: int, token: int,
                 reply: int, pid: int, payload: memoryview,
                 results: _Outbox | None = None) -> None:
        """Run the task of a checked TASK message (``raw``, whose header fields
        and payload are given) and send its outcome, or leave it in ``results``."""
        global _task_id
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
                spill.discard(bytes(payload).decode("ascii", "replace"))
            refusal = _encode_outcome(Status.BAD_TASK, task_id, token, cfg.worker_id,
                                      (err, ""), self.inline_max, self.subdir(pid, token),
                                      cfg.authkey)
            self.replier.send(reply, refusal, pid, token)
            return
        self.board.busy(cfg.worker_id, task_id, token, reply, pid)
        ran = 0.0
        try:
            try:
                if spilled:
                    fn, args, kwargs = codec.loads(payload, True, keep=keep)
                else:
                    fn, args, kwargs = pickle.loads(payload)
                if flags & F_FN_REF:
                    fn = codec.load_function(fn)
            except BaseException as exc:  # noqa: BLE001 - SystemExit at unpickle too
                status, outcome = Status.BAD_TASK, (exc, _format_exc(exc))
                self.reject(raw, f"task {task_id} could not be read: "
                                 f"{type(exc).__name__}: {exc}")
            else:
                _task_id = task_id
                started = time.perf_counter()
                try:
                    status, outcome = Status.OK, fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - as ProcessPoolExecutor
                    status, outcome = Status.RAISED, (exc, _format_exc(exc))
                finally:
                    _task_id = None
                    ran = time.perf_counter() - started
                del fn, args, kwargs
            msg: bytes | None = None
            value: Any = _NO_VALUE
            if not status and cfg.authkey is None and type(outcome) in PLAIN_TYPES:
                data = pickle.dumps(outcome, PROTOCOL)  # a plain value: the short way
                if len(data) <= self.inline_max:
                    msg = ok_result(task_id, token, self.pid, cfg.worker_id, data)
                    value = outcome
            if msg is None:
                msg = _encode_outcome(status, task_id, token, cfg.worker_id, outcome,
                                      self.inline_max, self.subdir(pid, token),
                                      cfg.authkey, self.pid)
            del outcome
            if results is not None:
                results.add(reply, pid, token, msg, ran, task_id, value)
            elif not self.replier.send(reply, msg, pid, token):
                _drop_results([msg], pid, token)
            del value
        finally:
            _task_id = None

    def subdir(self, pid: int, token: int) -> str:
        """The spill sub-directory of producer (``pid``, ``token``), cached."""
        subdir = self.subdirs.get((pid, token))
        if subdir is None:
            if len(self.subdirs) > 256:
                self.subdirs.clear()
            subdir = self.subdirs[pid, token] = spill.producer_subdir(pid, token)
        return subdir

    def cleanup_after_owner(self) -> None:
        """The owner died: remove what only it could have removed."""
        cfg = self.cfg
        for key in ([cfg.task_key] if cfg.private_queue else []) + [cfg.owner_reply_key]:
            if key == 0:
                continue
            try:
                sysv_ipc.MessageQueue(key, 0).remove()
            except sysv_ipc.Error:
                pass
        if cfg.owner_subdir:
            spill.remove_subdir(cfg.owner_subdir)

    def run(self) -> int:
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
            self.spin = True
            if self.cfg.max_tasks and self.done >= self.cfg.max_tasks:
                break
        if _owner_dead:
            self.cleanup_after_owner()
        return 0


def run_worker(cfg: WorkerConfig) -> None:
    """Entry point of a task worker process (target of ``multiprocessing.Process``).

    Exits with status 0 after a stop request or ``max_tasks`` tasks, and with
    ``EXIT_INIT_FAILED`` (3) when the initializer raised.
    """
    global _worker_id, _stop, _owner_dead
    _worker_id = cfg.worker_id
    _stop = False
    _owner_dead = False
    if cfg.spill_env:
        os.environ[spill.ENV_SPILL_DIR] = cfg.spill_env
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, _on_stop)
    try:
        faulthandler.enable()
    except (RuntimeError, ValueError, OSError):
        pass
    watcher = threading.Thread(target=_watch_owner, name="mqexecutor-owner-watch",
                               args=(cfg.owner_pid, threading.main_thread().ident,
                                     cfg.sweep), daemon=True)
    watcher.start()
    try:
        worker = _Worker(cfg)
    except sysv_ipc.ExistentialError:
        sys.exit(0)  # the pool was torn down before this worker started
    global _cleanup_on_term
    _cleanup_on_term = (cfg.owner_pid, worker.cleanup_after_owner)
    signal.signal(signal.SIGTERM, _on_term)
    code = worker.run()
    sys.stdout.flush()
    sys.exit(code)
