"""MQExecutor: a concurrent.futures Executor whose task workers are fed by a
System V message queue. See docs/architecture.md for the path of one task.

Threads in the submitting process (none of them holds the executor itself, so
an executor that is garbage-collected shuts down as ProcessPoolExecutor does):

* the caller's thread pickles the call and sends it with a non-blocking msgsnd;
  when the kernel queue is full the task waits in the in-process *backlog*;
* the *collector* thread blocks in msgrcv on this executor's private reply queue,
  completes Futures, and refills the task queue from the backlog;
* the *manager* thread watches the worker processes (their sentinels), replaces
  those that exit, fails the task of one that died, polls the backlog while the
  kernel queue is full, and tears everything down at shutdown.
"""
from __future__ import annotations

import _thread
import collections
import enum
import errno
import itertools
import multiprocessing
import multiprocessing.connection
import operator
import os
import pickle
import random
import struct
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import _base as _futures_base
from typing import Any, NamedTuple

import sysv_ipc

from . import codec, deadletter, ipcinfo, journal, outbox, persistence, queues, spill
from .errors import (
    BrokenMQPool,
    QueueModeError,
    RemoteTraceback,
    ResultUnpicklingError,
    TaskUnpicklingError,
    TerminatedWorkerError,
)
from .limits import msgmax
from .protocol import (
    CONTROL_MTYPE,
    F_BATCH,
    F_FN_REF,
    F_KEEP_SPILL,
    F_SPILL,
    F_TARGETED,
    F_VALUES,
    HEADER_FORMAT,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    PREEMPTIVE_MTYPE,
    RESULT_MTYPE,
    TAG_SIZE,
    WIRE_VERSION,
    Kind,
    ProtocolError,
    Status,
    build,
    flatten,
    join_batch,
    parse,
    replace_route,
    split_batch,
    split_task_body,
    split_values,
    targeted_mtype,
    task_body,
    unpack_header,
)
from .scoreboard import BUSY, INIT_FAILED, Scoreboard
from .worker import STOP_SIGNAL, WorkerConfig, run_worker

__all__ = ["MQExecutor", "MQFuture", "Mode", "PoolStats", "StrandedTask", "CapacityWarning",
           "TaskOptions"]


class CapacityWarning(RuntimeWarning):
    """The kernel refused the queue capacity (``msg_qbytes``) asked for."""


class PoolStats(NamedTuple):
    """A snapshot of an executor's queue and tasks (:meth:`MQExecutor.stats`), a
    named tuple.

    Attributes:
        key (int), msqid (int): the task queue.
        queued_messages (int), queued_bytes (int): messages and bytes waiting in
            the kernel queue (all producers').
        capacity_bytes (int): the queue's msg_qbytes.
        backlog (int): this executor's tasks waiting in this process for room.
        running (int): its tasks in the kernel queue or running in a worker.
        completed (int): its tasks finished (result or exception) so far.
        workers (int): live worker processes started by this executor.
        inherited (int): tasks found in the queue when it attached.
        rejected (int): messages its workers set aside as dead letters.
    """

    key: int
    msqid: int
    queued_messages: int
    queued_bytes: int
    capacity_bytes: int
    backlog: int
    running: int
    completed: int
    workers: int
    inherited: int
    rejected: int = 0


class StrandedTask(NamedTuple):
    """A task found in the queue for a worker id this pool does not have (a
    named tuple).

    It is left in the queue for a pool with enough workers.
    Attributes: task_id (as sent), worker_id, fn_name, producer_pid.
    """

    task_id: int
    worker_id: int
    fn_name: str
    producer_pid: int

_RNG = random.SystemRandom()
_RUNNING = _futures_base.RUNNING
_FINISHED = _futures_base.FINISHED
_PENDING = _futures_base.PENDING
_CANCELLED_STATES = frozenset((_futures_base.CANCELLED,
                               _futures_base.CANCELLED_AND_NOTIFIED))
_DONE_STATES = frozenset((_futures_base.FINISHED, _futures_base.CANCELLED,
                          _futures_base.CANCELLED_AND_NOTIFIED))


class Mode(enum.IntEnum):
    """How tasks reach task workers, named after Swoole's ``task_ipc_mode``.

    * ``TARGETED`` (2): each worker receives only messages of type worker id + 1;
      ``submit_to`` picks the worker, ``submit`` the least loaded one.
    * ``PREEMPTIVE`` (3): all workers compete for every message (msgrcv type 0).
    """

    TARGETED = 2
    PREEMPTIVE = 3


class _FutureLock(_thread.RLock):  # type: ignore[misc,valid-type]
    """What an MQFuture has as ``_condition``: a reentrant lock, as
    ``concurrent.futures.wait`` and ``as_completed`` take it, whose
    ``notify_all`` does nothing (see MQFuture)."""

    __slots__ = ()

    def notify_all(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        """As ``Condition.wait`` never notified: times out. MQFuture's own
        ``result(timeout)`` calls ``Future.result(0)`` once it is done."""
        if timeout is None:
            raise RuntimeError("an MQFuture is waited on through result() or exception()")
        if timeout > 0:
            state = self._release_save()  # type: ignore[attr-defined]
            try:
                time.sleep(timeout)
            finally:
                self._acquire_restore(state)  # type: ignore[attr-defined]
        return False


class _ResultWaiter:
    """What ``MQFuture.result()``/``exception()`` block on: a lock released once
    the Future is done. It sits in the Future's ``_waiters`` list, beside those
    of ``concurrent.futures.wait`` and ``as_completed``."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()

    def wake(self, _future: Any = None) -> None:
        try:
            self.lock.release()
        except RuntimeError:  # woken already
            pass

    add_result = add_exception = add_cancelled = wake


class MQFuture(Future):
    """A ``concurrent.futures.Future`` that knows its task.

    Attributes:
        task_id (int): the id carried by the task's message header (unique per
            executor, starting at 1).
        fn_name (str): qualified name of the submitted function.
        worker_id (int | None): in targeted mode, the worker the task was sent to.

    State follows ProcessPoolExecutor: PENDING while the task waits in this
    process (``cancel()`` succeeds), RUNNING once it is in the kernel queue.

    In place of the ``threading.Condition`` of a Future (8 objects for the
    garbage collector to scan, which made up half the cost of ``submit()`` with
    100k tasks pending), each MQFuture has a bare reentrant lock: ``result()``
    and ``exception()`` sleep on a lock of their own (``_ResultWaiter``), so the
    Condition's wait and notify are never needed.
    """

    def __init__(self, task_id: int = 0, fn_name: str = "", lock: Any = None):
        # The attributes of Future.__init__ (the same from Python 3.8 to 3.14);
        # _state, _result and _exception start as the class defaults below,
        # _done_callbacks is made on first use.
        self._condition = _FutureLock()  # type: ignore[assignment]
        self._waiters: list = []
        self.task_id = task_id
        self.fn_name = fn_name
        self._mq_lock = lock

    _state = _PENDING
    _result = None
    _exception = None
    worker_id: int | None = None
    #: For a task inherited from a dead producer (``MQExecutor.recovered``):
    #: its task id and pid in that producer; None otherwise.
    original_task_id: int | None = None
    original_pid: int | None = None

    #: Until a callback is added: one object less per pending task to scan.
    _done_callbacks: list | tuple = ()

    # The task itself, while it is pending (the pool's bookkeeping: kept on the
    # Future rather than in an object of its own, one object less per pending
    # task to make and for the garbage collector to scan). Class defaults until
    # ``_task`` sets them.
    _message = b""  # the whole TASK message; b"" once sent, unless _keep
    _mtype = 0  # its SysV message type
    _worker = -1  # targeted mode: the worker it goes to; -1 in preemptive mode
    _spill_ref: str | None = None  # its spill file, when it has one
    _retries = 0  # runs left after a worker death
    _attempts = 0  # times it was sent
    _keep = False  # keep _message: it may be sent again
    #: The Futures whose tasks went in one BATCH message with this one.
    _batch: list[MQFuture] | None = None

    def _task(self, message: bytes, mtype: int, worker: int, spill_ref: str | None,
              retries: int, keep: bool) -> None:
        self._message = message
        self._mtype = mtype
        if worker >= 0:
            self._worker = worker
        if spill_ref is not None:
            self._spill_ref = spill_ref
        if retries:
            self._retries = retries
        if keep:
            self._keep = keep

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        """As ``concurrent.futures.Future.add_done_callback``."""
        with self._condition:
            if self._state not in _DONE_STATES:
                if not self._done_callbacks:
                    self._done_callbacks = []
                self._done_callbacks.append(fn)  # type: ignore[union-attr]
                return
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - logged, as concurrent.futures does
            _futures_base.LOGGER.exception("exception calling callback for %r", self)

    def set_result(self, result: Any) -> None:
        """As ``concurrent.futures.Future.set_result`` (for the executor only)."""
        with self._condition:
            if self._state in _DONE_STATES:
                raise _futures_base.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = _futures_base.FINISHED
            for waiter in self._waiters:
                waiter.add_result(self)
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def done(self) -> bool:
        """As ``Future.done`` (reads the state without taking the Condition)."""
        return self._state in _DONE_STATES

    def cancelled(self) -> bool:
        """As ``Future.cancelled``."""
        return self._state in _CANCELLED_STATES

    def running(self) -> bool:
        """As ``Future.running``."""
        return self._state == _RUNNING

    def _wait(self, timeout: float | None) -> None:
        if self._state in _DONE_STATES:
            return
        if timeout is None or timeout >= queues.SPIN_SECONDS:
            deadline = time.monotonic() + queues.SPIN_SECONDS
            while time.monotonic() < deadline:
                os.sched_yield()  # releases the GIL for the collector
                if self._state in _DONE_STATES:
                    return
            if timeout is not None:
                timeout -= queues.SPIN_SECONDS
        waiter = _ResultWaiter()
        with self._condition:
            if self._state in _DONE_STATES:
                return
            self._waiters.append(waiter)
        try:
            if timeout is None:
                waiter.lock.acquire()
            elif timeout > 0:
                waiter.lock.acquire(timeout=timeout)
        finally:
            with self._condition:
                self._waiters.remove(waiter)

    def result(self, timeout: float | None = None) -> Any:
        """As ``concurrent.futures.Future.result``: the task's return value.

        Raises:
            CancelledError: the Future was cancelled.
            TimeoutError: not done within ``timeout`` seconds.
            Exception: the exception the task raised, with the worker's
                traceback as ``__cause__`` (RemoteTraceback), or the pool's
                error (e.g. TerminatedWorkerError when its worker died).
        """
        self._wait(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``concurrent.futures.Future.exception``: the task's exception, or
        None when it returned. Raises CancelledError and TimeoutError as
        ``result()``."""
        self._wait(timeout)
        return super().exception(0)

    def cancel(self) -> bool:
        """Cancel the task if it has not been handed to the kernel queue yet.

        Returns True when cancelled, False when it is running or done (as
        ``concurrent.futures.Future.cancel``).
        """
        lock = self._mq_lock
        if lock is None:
            cancelled = super().cancel()
        else:
            with lock:
                cancelled = super().cancel()
        if cancelled:
            self._wake_result_waiters()
        return cancelled

    def _wake_result_waiters(self) -> None:
        with self._condition:
            for waiter in self._waiters:
                if type(waiter) is _ResultWaiter:
                    waiter.wake()

    def _withdraw(self) -> bool:
        """Cancel a task taken back from the kernel queue before any worker got
        it (``shutdown(cancel_futures=True)``). Caller holds the state lock."""
        with self._condition:
            if self._state != _futures_base.RUNNING:
                return False
            self._state = _futures_base.PENDING
        super().cancel()
        self.set_running_or_notify_cancel()
        return True

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" task_id={self.task_id}>"


def _spill_reference(task_message: bytes) -> str:
    """The spill reference carried by a TASK message with F_SPILL."""
    try:
        _name, payload = split_task_body(memoryview(task_message)[HEADER_SIZE:])
    except ProtocolError:
        return ""
    return bytes(payload).decode("ascii", "replace")


class _FnInfo:
    """What submit() needs to know of a function, made once (``_fn_info``)."""

    __slots__ = ("name", "prefix", "reference", "owner", "attr", "bare_call")

    def __init__(self, fn: Any):
        self.name = _fn_name(fn)
        self.prefix = task_body(self.name, b"")
        #: "module:qualname" when the function may travel as a reference, and
        #: where it is found: the reference holds while getattr(owner, attr) is fn.
        self.reference = codec.function_reference(fn)
        self.owner: Any = None
        self.attr = ""
        #: The payload of a call without arguments, by reference: the same
        #: bytes every time, pickled once.
        self.bare_call = b""
        if self.reference is not None:
            try:
                self.owner, self.attr = codec.holder(self.reference)
                self.bare_call = pickle.dumps((self.reference, (), {}), codec.PROTOCOL)
            except (KeyError, AttributeError):
                self.reference = None


_NAMES: dict[Any, _FnInfo] = {}


def _fn_info(fn: Any) -> _FnInfo:
    """The _FnInfo of ``fn``, cached for hashable functions."""
    try:
        return _NAMES[fn]
    except (KeyError, TypeError):
        pass
    info = _FnInfo(fn)
    try:
        if len(_NAMES) > 1024:
            _NAMES.clear()
        _NAMES[fn] = info
    except TypeError:  # unhashable callable
        pass
    return info


def _fn_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        inner = getattr(fn, "func", None)
        if inner is not None:
            return f"partial({_fn_name(inner)})"
        return type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def _process_chunk(fn: Callable, chunk: list[tuple]) -> list:
    """Run ``fn`` over a chunk of argument tuples (map with chunksize > 1)."""
    return [fn(*args) for args in chunk]


def _process_chunk1(fn: Callable, chunk: list) -> list:
    """Run ``fn`` over a chunk of single arguments (map of one iterable with
    chunksize > 1: the items travel as they are, not as 1-tuples)."""
    return [fn(arg) for arg in chunk]


def _cpu_count() -> int:
    counter = getattr(os, "process_cpu_count", None)
    if counter is not None:
        return counter() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# All live pools of this process, for interpreter exit. Children created by fork
# must not act on their parent's pools.
_live_states: weakref.WeakSet[_PoolState] = weakref.WeakSet()
_interpreter_shutdown = False


def _python_exit() -> None:
    global _interpreter_shutdown
    _interpreter_shutdown = True
    for state in list(_live_states):
        if state.pid == os.getpid():
            state.request_shutdown()
    for state in list(_live_states):
        if state.pid == os.getpid() and state.manager is not None:
            state.manager.join()


def _after_fork_in_child() -> None:
    _live_states.clear()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
os.register_at_fork(after_in_child=_after_fork_in_child)


class _PoolState:
    """Everything the executor's threads share. Holds no reference to the executor."""

    def __init__(self, *, key: int | None, max_workers: int, mode: Mode, mp_context: Any,
                 initializer: bytes | None, max_tasks_per_child: int | None,
                 queue_mode: int, attach: bool = False, allow: tuple = (),
                 swoole_handler: str | None = None, authkey: bytes | None = None,
                 retries: int = 0, durable: bool | str = False, sweep: bool = False):
        self.pid = os.getpid()
        self.sweep = sweep  # worker 0's first start reclaims dead producers' leftovers
        self.token = _RNG.getrandbits(64) or 1
        self.mode = mode
        self.targeted = mode == Mode.TARGETED
        self.max_workers = max_workers
        self.ctx = mp_context
        self.initializer = initializer
        self.max_tasks_per_child = max_tasks_per_child
        self.explicit_key = key is not None
        self.attach = attach
        self.authkey = authkey
        self.retries = retries
        self.journal: journal.Journal | None = None
        self.allow = tuple(allow)
        self.swoole_handler = swoole_handler
        self.abandon = False
        self.completed = 0
        self.lock = threading.RLock()
        self.backlog: collections.deque[MQFuture] = collections.deque()
        self.pending: dict[int, MQFuture] = {}
        # Targeted mode: tasks given to each worker (changed under the lock) and
        # outcomes taken for each (by the collector alone, without the lock, so
        # that it never waits on submit() for it); the difference is the load.
        self.outstanding = [0] * max_workers
        self.finished = [0] * max_workers
        self.ids = itertools.count(1)
        self.processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self.handled: set[int] = set()  # pids of exited workers already dealt with
        self.batch_limit = 1  # tasks per message, adapted to the task rate
        self.batch_fixed = False
        # A private queue gets at most `depth` messages at a time: the other
        # tasks wait in the backlog, where they go out several to a message.
        # A named queue takes all it can hold, so that its tasks outlive us.
        self.hold_back = key is None
        self.depth = 2 * max_workers
        self.last_target = 0  # targeted mode: the worker chosen last by submit()
        self.target_credit = 0  # ... and how many more it gets before a new choice
        self.rate_mark = (time.monotonic(), 0)
        self.busy_mark = (0, 0.0)  # tasks, seconds reported by workers
        self.shutdown_requested = False
        self.terminating = False
        self.broken: str | None = None
        self.closed = False
        self.inline_max = msgmax() - HEADER_SIZE - (TAG_SIZE if authkey else 0)
        self.subdir = spill.producer_subdir(self.pid, self.token)
        self.task_subdir = spill.key_subdir(key) if key is not None else self.subdir
        # Set below before any use; None only if construction failed.
        self.task_queue: sysv_ipc.MessageQueue = None  # type: ignore[assignment]
        self.reply_queue: sysv_ipc.MessageQueue = None  # type: ignore[assignment]
        self.board: Scoreboard | None = None
        self.collector: threading.Thread | None = None
        self.manager: threading.Thread | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if key is not None:
                self.task_queue = queues.open_queue(key, create=not attach, mode=queue_mode)
            # The keys of the queues made here are named in meta.json before
            # they are made: a process killed in between leaves nothing `gc`
            # cannot tie to a dead owner (it checks the queue's ctime).
            reply_key = queues.random_key()
            task_key = key if key is not None else queues.random_key()
            self.write_meta(key, mode, attach, max_workers, task_key, reply_key)
            self.reply_queue = queues.create_private(key=reply_key)
            if key is None:
                self.task_queue = queues.create_private(queue_mode, key=task_key)
            if (self.reply_queue.key, self.task_queue.key) != (reply_key, task_key):
                self.write_meta(key, mode, attach, max_workers)  # a key was taken
            self.fit_to_queue()
            # Root 0's sub-directory holds meta.json (made above) and the
            # scoreboard; spill files make theirs as they are written.
            if durable:
                self.journal = journal.Journal(
                    durable if isinstance(durable, str)
                    else journal.default_spool(key))  # type: ignore[arg-type]  # key set
            if not attach:
                self.board = Scoreboard(
                    os.path.join(spill.root_dir(0), self.subdir, "scoreboard"),
                    max_workers, create=True)
        except BaseException:
            self.release_resources()
            raise

    def write_meta(self, key: int | None, mode: Mode, attach: bool, max_workers: int,
                   task_key: int | None = None, reply_key: int | None = None) -> None:
        """Record this producer in meta.json (see :mod:`mqexecutor.persistence`):
        its queues, or the keys they are about to be made under."""
        persistence.write_meta(self.subdir, persistence.QueueMeta(
            key=self.task_queue.key if task_key is None else task_key, mode=int(mode),
            workers=0 if attach else max_workers, wire=WIRE_VERSION, owner_pid=self.pid,
            owner_token=self.token,
            reply_key=self.reply_queue.key if reply_key is None else reply_key,
            private=key is None))

    def fit_to_queue(self) -> None:
        """Largest body that fits one message: msgmax, or the queue's capacity
        when that is smaller (a message larger than msg_qbytes never fits)."""
        limit = msgmax()
        try:
            limit = min(limit, self.task_queue.max_size)
        except (sysv_ipc.Error, AttributeError):
            pass
        self.inline_max = limit - HEADER_SIZE - (TAG_SIZE if self.authkey else 0)

    # -- resources ---------------------------------------------------------------
    def release_resources(self) -> None:
        """Remove the reply queue, a private task queue and this producer's spill
        directory; close the wake-up pipe. Idempotent."""
        if self.closed:
            return
        self.closed = True
        queues.remove_quietly(self.reply_queue)
        if not self.explicit_key:
            queues.remove_quietly(self.task_queue)
        if self.board is not None:
            self.board.close()
        spill.remove_subdir(self.subdir)
        if not self.explicit_key and self.task_queue is not None:
            spill.remove_subdir(spill.key_subdir(self.task_queue.key))
        fds = (self.wake_r, self.wake_w)
        # -1 first: a late wake() must not write into a file that reuses the number
        self.wake_r = self.wake_w = -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def wake(self) -> None:
        fd = self.wake_w
        if fd < 0:
            return  # resources released
        try:
            os.write(fd, b"\0")
        except OSError:  # full (already woken) or closed
            pass

    # -- workers -----------------------------------------------------------------
    def spawn(self, wid: int) -> None:
        assert self.task_queue is not None and self.reply_queue is not None
        assert self.board is not None
        cfg = WorkerConfig(
            worker_id=wid, task_key=self.task_queue.key, targeted=self.targeted,
            owner_pid=self.pid, owner_token=self.token,
            owner_reply_key=self.reply_queue.key, scoreboard_path=self.board.path,
            initializer=self.initializer, max_tasks=self.max_tasks_per_child,
            private_queue=not self.explicit_key, owner_subdir=self.subdir,
            spill_env=os.environ.get(spill.ENV_SPILL_DIR), allow=self.allow,
            swoole_handler=self.swoole_handler, authkey=self.authkey,
            sweep=self.sweep and wid == 0)
        if wid == 0:
            self.sweep = False
        self.board.idle(wid)
        outbox.create(outbox.outbox_path(os.path.dirname(self.board.path), wid),
                      msgmax() - HEADER_SIZE)
        p = self.ctx.Process(target=run_worker, args=(cfg,),
                             name=f"mqexecutor-worker-{wid}")
        p.start()
        self.processes[wid] = p

    def signal_workers(self, signum: int) -> None:
        for p in list(self.processes.values()):
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def stop_workers(self) -> None:
        """Ask every worker to stop after its current task; wait until all exited."""
        while True:
            alive = [p for p in self.processes.values() if p.exitcode is None]
            if not alive:
                break
            self.signal_workers(STOP_SIGNAL)
            for p in alive:
                p.join(0.05)
        for p in self.processes.values():
            p.join()

    # -- sending -------------------------------------------------------------------
    def room(self) -> bool:
        """Whether a message may go to the kernel queue now (see ``hold_back``)."""
        if not self.hold_back or len(self.pending) - len(self.backlog) < self.depth:
            return True  # fewer tasks out than `depth`: fewer messages too
        try:
            return self.task_queue.current_messages < self.depth
        except (sysv_ipc.Error, OSError):
            return True  # let msgsnd report it

    def feed(self) -> bool:
        """Move tasks from the backlog to the kernel queue while there is room.
        Returns True when the backlog is empty."""
        with self.lock:
            backlog = self.backlog
            while backlog:
                if not self.room():
                    return False
                item = backlog[0]
                if item._state in _DONE_STATES:
                    # cancelled, or completed by a result that came before it
                    # was sent again (a duplicate): nothing to send
                    backlog.popleft()
                    self.forget(item)
                    if item._state in _CANCELLED_STATES:
                        item.set_running_or_notify_cancel()
                    continue
                if self.batch_limit > 1 and len(backlog) > 1 and item._spill_ref is None:
                    sent_n = self.send_batch()
                    if sent_n > 1:
                        continue
                    if sent_n == 0:
                        return False
                    continue  # sent_n == 1: sent alone
                try:
                    sent = self.send_now(item)
                except BaseException as exc:  # noqa: BLE001 - fail the task, keep feeding
                    backlog.popleft()
                    self.forget(item)
                    item.set_exception(exc if isinstance(exc, BrokenMQPool)
                                      else BrokenMQPool(f"sending the task failed: {exc!r}"))
                    continue
                if not sent:
                    return False
                backlog.popleft()
            return True

    def send_now(self, item: MQFuture) -> bool:
        """Send a task straight to the kernel queue (caller holds the lock).

        The Future turns RUNNING just before msgsnd, because a worker may answer
        before msgsnd returns; it goes back to PENDING if the queue is full.
        Nobody can cancel it meanwhile: ``MQFuture.cancel`` takes the same lock,
        and no result can arrive before the message is sent, so the Future's own
        condition is not needed (PENDING -> RUNNING notifies no waiter).
        Returns False when the queue is full."""
        item._state = _RUNNING
        try:
            self.task_queue.send(item._message, block=False, type=item._mtype)
        except BaseException as exc:
            item._state = _PENDING
            if isinstance(exc, sysv_ipc.BusyError) or type(exc) is sysv_ipc.Error:
                return False  # full, or EINTR
            if isinstance(exc, (sysv_ipc.Error, OSError)):
                raise BrokenMQPool(f"the task queue is gone: {exc}") from None
            raise
        item._attempts += 1
        if not item._keep:
            item._message = b""
        return True

    def send_batch(self) -> int:
        """Send small tasks from the head of the backlog in one BATCH message
        (caller holds the lock): the consecutive ones of the head's message type,
        and in targeted mode also those among tasks for other workers, which
        keep their place. Returns how many were sent: 0 when the queue is full,
        1 when only the head qualified (sent alone)."""
        backlog = self.backlog
        first = backlog[0]
        limit = self.inline_max + HEADER_SIZE - 64
        items: list[MQFuture] = []
        skipped: list[MQFuture] = []
        parts: list[bytes] = []  # the body: length, message, length, message...
        size = 0
        mtype = first._mtype
        batch_limit = self.batch_limit
        scan = batch_limit * (self.max_workers if self.targeted else 1)
        for item in itertools.islice(backlog, scan):
            if item._mtype != mtype:
                if not self.targeted:
                    break
                skipped.append(item)
                continue
            msg = item._message
            n = len(msg)
            if (item._spill_ref is not None or item._state in _DONE_STATES
                    or size + 4 + n > limit):
                break
            items.append(item)
            parts.append(_LEN.pack(n))
            parts.append(msg)
            size += 4 + n
            if len(items) >= batch_limit or size + 4 + n > limit:
                break  # full (or no room for another task of this size)
        if len(items) < 2:
            try:
                return 1 if self.send_now(first) and backlog.popleft() else 0
            except BrokenMQPool as exc:
                backlog.popleft()
                self.forget(first)
                first.set_exception(exc)
                return 1
        body = b"".join(parts)
        flags = F_BATCH | (F_TARGETED if self.targeted else 0)
        if self.authkey is None and self.journal is None:
            flags |= F_VALUES  # plain return values may come back together
        message = build(Kind.TASK, flags, 0, first.task_id, self.token,
                        self.reply_queue.key, self.pid, first._worker, body)
        for it in items:  # as in send_now
            it._state = _RUNNING
        try:
            self.task_queue.send(message, block=False, type=first._mtype)
        except BaseException as exc:
            for it in items:
                it._state = _PENDING
            if isinstance(exc, sysv_ipc.BusyError) or type(exc) is sysv_ipc.Error:
                return 0
            if isinstance(exc, (sysv_ipc.Error, OSError)):
                raise BrokenMQPool(f"the task queue is gone: {exc}") from None
            raise
        for _ in range(len(items) + len(skipped)):
            backlog.popleft()
        backlog.extendleft(reversed(skipped))
        for it in items:
            it._attempts += 1
            it._batch = items  # kept: may be sent again
        return len(items)

    def note_results(self, n: int) -> None:
        """Adapt how many tasks go in one message to the observed task rate:
        enough to cover about 5 ms of work, at most 256 (the collector calls it).

        The time a task takes is what workers report with their RESULT BATCH
        messages (:meth:`note_busy`) when there were some since the last
        estimate; else the time between results, which overstates it when
        this process is the bottleneck."""
        if self.batch_fixed:
            return
        t0, c0 = self.rate_mark
        count = c0 + n
        if count < 64:
            self.rate_mark = (t0, count)
            return
        now = time.monotonic()
        elapsed = now - t0
        self.rate_mark = (now, 0)
        busy_tasks, busy_s = self.busy_mark
        if busy_tasks:
            self.busy_mark = (0, 0.0)
            per_task = busy_s / busy_tasks
        elif elapsed > 0:
            per_task = elapsed * self.max_workers / count  # seconds of work per task
        else:
            return
        self.batch_limit = max(1, min(256, int(0.005 / max(per_task, 1e-7))))

    def note_busy(self, tasks: int, seconds: float) -> None:
        """A worker reports that ``tasks`` tasks took it ``seconds`` to run."""
        n, busy = self.busy_mark
        self.busy_mark = (n + tasks, busy + seconds)

    def forget(self, item: MQFuture) -> None:
        """Drop a task that will not run (caller holds the lock)."""
        self.pending.pop(item.task_id, None)
        if self.journal is not None:
            self.journal.forget(self.token, item.task_id)
        if item._worker >= 0:
            self.outstanding[item._worker] -= 1
        if item._spill_ref:
            spill.discard(item._spill_ref)
            item._spill_ref = None

    def withdraw_queued(self) -> None:
        """Take this executor's tasks back from the kernel queue and cancel them
        (shutdown with cancel_futures=True). Other producers' tasks go back."""
        queue = self.task_queue
        if queue is None:
            return
        mtypes = ([targeted_mtype(w) for w in range(self.max_workers)]
                  if self.targeted else [PREEMPTIVE_MTYPE])
        foreign: list[tuple[bytes, int]] = []
        with self.lock:
            for mtype in mtypes:
                while True:
                    try:
                        whole, got = queue.receive(block=False, type=mtype)
                    except sysv_ipc.Error:
                        break
                    for raw in flatten(whole):
                        try:
                            h = unpack_header(raw)
                        except ProtocolError:
                            foreign.append((raw, got))
                            continue
                        if h.token != self.token:
                            foreign.append((raw, got))
                            continue
                        item = self.pending.get(h.task_id)
                        if item is None:
                            continue
                        if item._withdraw():
                            self.forget(item)
                            if h.flags & F_SPILL:
                                spill.discard(_spill_reference(raw))
        for raw, mtype in foreign:
            _send_back(queue, raw, mtype)

    def cancel_backlog(self) -> None:
        with self.lock:
            while self.backlog:
                item = self.backlog.popleft()
                self.forget(item)
                if item.cancel():
                    item.set_running_or_notify_cancel()

    # -- outcomes --------------------------------------------------------------------
    def take(self, task_id: int) -> MQFuture | None:
        """Remove the pending task ``task_id`` whose outcome came (the collector
        thread only: it alone counts ``finished``). Returns None when it is not
        pending anymore."""
        item = self.pending.pop(task_id, None)  # atomic under the GIL
        if item is not None:
            if item._worker >= 0:
                self.finished[item._worker] += 1
            item._batch = None  # what a Future the caller keeps need not keep
            item._message = b""
        return item

    def loads(self) -> list[int]:
        """Targeted mode: the tasks each worker has been given and not answered."""
        return list(map(operator.sub, self.outstanding, self.finished))

    def break_pool(self, message: str) -> None:
        """Fail every pending Future with BrokenMQPool; later submits raise it."""
        with self.lock:
            if self.broken is None:
                self.broken = message
            items = list(self.pending.values())
            self.pending.clear()
            self.backlog.clear()
            self.outstanding = list(self.finished)
        for item in items:
            if item._spill_ref:
                spill.discard(item._spill_ref)
            if self.journal is not None:
                self.journal.forget(self.token, item.task_id)
            if not item.done():
                try:
                    item.set_exception(BrokenMQPool(message))
                except _futures_base.InvalidStateError:
                    pass
        self.wake()

    def request_shutdown(self, cancel_futures: bool = False, abandon: bool = False) -> None:
        with self.lock:
            self.shutdown_requested = True
            if abandon:
                self.abandon = True
        if cancel_futures:
            self.cancel_backlog()
            self.withdraw_queued()
        self.wake()


def _set_outcome(fut: MQFuture, status: int, value: Any, worker: int) -> None:
    try:
        if status == Status.OK:
            fut.set_result(value)
        elif status == Status.RAISED:
            exc, tb = value
            if tb:
                exc.__cause__ = RemoteTraceback(tb)
            fut.set_exception(exc)
        elif status == Status.BAD_TASK:
            exc, tb = value
            if tb:
                exc.__cause__ = RemoteTraceback(tb)
            err = TaskUnpicklingError(
                f"task {fut.task_id} ({fut.fn_name}) could not be read by task worker "
                f"{worker}: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            fut.set_exception(err)
        else:
            fut.set_exception(BrokenMQPool(f"unexpected result status {status}"))
    except _futures_base.InvalidStateError:
        pass  # cancelled or failed meanwhile


REPLY_QUEUE_GONE = ("the reply queue was removed from the kernel (ipcrm?) while the pool "
                    "was running: the outcomes of its tasks cannot come back")


def _collector_loop(state: _PoolState) -> None:
    """Drain the reply queue for good: complete Futures, refill the task queue."""
    queue = state.reply_queue
    assert queue is not None
    spin = False
    while True:
        got = queues.spin_receive(queue) if spin else None
        try:
            raw, _mtype = got or queue.receive()
        except sysv_ipc.ExistentialError:
            # Removed at shutdown, after this thread was joined; else by hand.
            if not state.closed:
                state.break_pool(REPLY_QUEUE_GONE)
            return
        except sysv_ipc.Error:
            continue  # EINTR
        except OSError as exc:
            if exc.errno == errno.E2BIG:  # not ours: our messages fit msgmax
                try:
                    queue.receive(block=False)
                except Exception:  # noqa: BLE001
                    pass
                continue
            raise
        if _mtype == CONTROL_MTYPE:
            return  # sent by the manager after the last worker exited
        handled = 0
        for more in range(255, -1, -1):
            try:
                handled += _handle_message(state, raw)
            except BaseException:  # noqa: BLE001 - the collector must not die
                traceback.print_exc()
            if not more:
                break
            try:  # drain what else is waiting before refilling the task queue
                raw, _mtype = queue.receive(block=False)
            except (sysv_ipc.Error, OSError):
                break
            if _mtype == CONTROL_MTYPE:
                return
        state.note_results(handled)
        if state.backlog:
            state.feed()
        if state.shutdown_requested and not state.pending:
            state.wake()  # the manager waits for the last outcome to tear down
        # A few tasks out and none waiting here: the next result is likely
        # close, and polling for it beats being woken (about 30 us here).
        spin = not state.backlog and 0 < len(state.pending) <= state.max_workers


def _handle_message(state: _PoolState, raw: bytes) -> int:
    """Handle one message of the reply queue: a result, or a RESULT BATCH of
    them (sent by a worker for the tasks of one BATCH). Returns how many
    results it carried."""
    if len(raw) >= HEADER_SIZE and raw[4] & F_VALUES and raw[:2] == b"MQ":
        return _handle_values(state, raw)
    if len(raw) >= HEADER_SIZE and raw[4] & F_BATCH and raw[:2] == b"MQ":
        try:
            h = unpack_header(raw)
            if h.kind != Kind.RESULT or h.token != state.token:
                return 0
            if state.authkey is None and state.journal is None:
                n = _handle_plain_batch(state, raw)
            else:
                inner = split_batch(memoryview(raw)[HEADER_SIZE:])
                for message in inner:  # each checked on its own (HMAC included)
                    _handle_result(state, message)
                n = len(inner)
        except ProtocolError as exc:
            sys.stderr.write(f"mqexecutor: refused a message on the reply queue: {exc}\n")
            return 0
        if h.task_id:  # microseconds the worker spent running these tasks
            state.note_busy(n, h.task_id / 1e6)
        return n
    _handle_result(state, raw)
    return 1


_ENTRY = struct.Struct("<I" + HEADER_FORMAT[1:])  # a batch entry's length, then header


def _handle_plain_batch(state: _PoolState, raw: bytes) -> int:
    """The results of a RESULT BATCH, read in place (no copy per entry): a
    plain return value completes its Future here; any other entry (exception,
    spill file, stale, odd) goes through :func:`_handle_result`. Only without
    authkey and journal. Returns how many entries it held.

    Raises:
        ProtocolError: an entry runs past the end of the message (the entries
            before it are handled).
    """
    view = memoryview(raw)
    end = len(raw)
    off = HEADER_SIZE
    token = state.token
    pending = state.pending
    count = done = 0
    try:
        while off < end:
            if off + _ENTRY.size > end:
                raise ProtocolError("batch entry shorter than a header")
            (n, magic, version, kind, flags, status, task_id, tok, _reply, _pid, _worker,
             length) = _ENTRY.unpack_from(raw, off)
            start = off + 4
            off = start + n
            if n < HEADER_SIZE or off > end:
                raise ProtocolError(f"batch entry of {n} bytes does not fit the batch body")
            count += 1
            item = pending.get(task_id)
            if (item is None or flags or status or tok != token or length != n - HEADER_SIZE
                    or (magic, version, kind) != _PLAIN_RESULT or item._keep and item._spill_ref
                    or state.take(task_id) is None):
                _handle_result(state, bytes(view[start:off]))
                continue
            done += 1
            _set_value(state, item, view[start + HEADER_SIZE:off])
    finally:
        state.completed += done
    return count


def _handle_values(state: _PoolState, raw: bytes) -> int:
    """Complete the Futures of a RESULT VALUES message: plain return values
    of several tasks, unpickled together. Returns how many it held."""
    try:
        h = unpack_header(raw)
        if (h.kind != Kind.RESULT or h.token != state.token or h.status or state.authkey
                or state.journal is not None):
            # a pool with an authkey or a journal never asks for RESULT VALUES
            raise ProtocolError("RESULT VALUES must be a Status.OK result for this "
                                "producer, which has no authkey and no journal")
        ids, pickled = split_values(memoryview(raw)[HEADER_SIZE:])
    except ProtocolError as exc:
        sys.stderr.write(f"mqexecutor: refused a message on the reply queue: {exc}\n")
        return 0
    pending = state.pending
    finished = state.finished
    try:
        values = pickle.loads(pickled)
        if type(values) is not list or len(values) != len(ids):
            raise ProtocolError(f"{len(ids)} task ids but not as many values")
    except BaseException as exc:  # noqa: BLE001 - fails those tasks, as _set_value
        for task_id in ids:
            fut = state.take(task_id)
            if fut is not None:
                _unpickling_failed(state, fut, task_id, exc)
        return len(ids)
    done = 0
    for task_id, value in zip(ids, values):
        # state.take() and set_result(), inline: the hot path of a burst
        fut = pending.pop(task_id, None)
        if fut is None:
            continue  # not ours anymore (cancelled at shutdown, a duplicate)
        worker = fut._worker
        if worker >= 0:
            finished[worker] += 1
        fut._batch = None
        fut._message = b""
        done += 1
        with fut._condition:
            if fut._state in _DONE_STATES:
                continue  # cancelled or failed meanwhile
            fut._result = value
            fut._state = _FINISHED
            for waiter in fut._waiters:
                waiter.add_result(fut)
        if fut._done_callbacks:
            fut._invoke_callbacks()  # type: ignore[attr-defined]
    state.completed += done
    if h.task_id:  # microseconds the worker spent running these tasks
        state.note_busy(len(ids), h.task_id / 1e6)
    return len(ids)


def _set_value(state: _PoolState, fut: MQFuture, data: memoryview) -> None:
    """Complete ``fut`` (taken from pending) with the return value pickled in ``data``."""
    try:
        value = pickle.loads(data)
    except BaseException as exc:  # noqa: BLE001 - SystemExit at unpickle too
        _unpickling_failed(state, fut, fut.task_id, exc)
        return
    try:
        fut.set_result(value)
    except _futures_base.InvalidStateError:
        pass  # cancelled or failed meanwhile


_LEN = struct.Struct("<I")  # a batch entry's length
_PLAIN_RESULT = (MAGIC, WIRE_VERSION, int(Kind.RESULT))
_TASK = int(Kind.TASK)  # for the header submit() packs itself


def _handle_result(state: _PoolState, raw: bytes) -> None:
    # Fast path: a task's return value, inline, without HMAC (most results).
    # Anything else, or anything odd, takes the checked path below.
    if len(raw) >= HEADER_SIZE and state.authkey is None:
        (magic, version, kind, flags, status, task_id, token, _reply, _pid, _worker,
         length) = HEADER_STRUCT.unpack_from(raw)
        if ((magic, version, kind) == _PLAIN_RESULT and not flags and not status
                and token == state.token and length == len(raw) - HEADER_SIZE):
            item = state.pending.get(task_id)
            if item is None:
                return  # not ours anymore (e.g. cancelled at shutdown)
            if not (item._keep and item._spill_ref) and state.journal is None:
                if state.take(task_id) is None:
                    return
                state.completed += 1
                _set_value(state, item, memoryview(raw)[HEADER_SIZE:])
                return
    try:
        h, body = parse(raw, state.authkey)
    except ProtocolError as exc:
        sys.stderr.write(f"mqexecutor: refused a message on the reply queue: {exc}\n")
        return
    spilled = bool(h.flags & F_SPILL)
    if h.kind != Kind.RESULT or h.token != state.token:
        if spilled and h.token == state.token:
            spill.discard(bytes(body).decode("ascii", "replace"))
        return
    if h.status == Status.INIT_FAILED:
        try:
            init_exc, tb = codec.loads(body, spilled)
            what = f"{type(init_exc).__name__}: {init_exc}"
        except BaseException as load_err:  # noqa: BLE001
            what = f"an exception that could not be unpickled ({load_err!r})"
            tb = ""
        state.break_pool(f"the initializer of task worker {h.worker} raised {what}; "
                         f"the pool is not usable anymore\n{tb}")
        return
    if h.status == Status.WORKER_DIED:
        _worker_died(state, h.task_id, body, spilled)
        return
    fut = state.take(h.task_id)
    if fut is None:
        if spilled:
            spill.discard(bytes(body).decode("ascii", "replace"))
        return
    if fut._keep and fut._spill_ref:
        spill.discard(fut._spill_ref)  # normally gone already: the worker unlinks it
    state.completed += 1
    try:
        value = codec.loads(body, spilled)
    except BaseException as exc:  # noqa: BLE001 - SystemExit at unpickle too
        _unpickling_failed(state, fut, h.task_id, exc)
        return
    _set_outcome(fut, h.status, value, h.worker)
    if state.journal is not None:  # delivered: forget it
        state.journal.forget(state.token, h.task_id)


def _unpickling_failed(state: _PoolState, fut: MQFuture, task_id: int,
                       exc: BaseException) -> None:
    unpickle_err = ResultUnpicklingError(
        f"the result of task {fut.task_id} ({fut.fn_name}) could not be unpickled: "
        f"{type(exc).__name__}: {exc}")
    unpickle_err.__cause__ = exc
    try:
        fut.set_exception(unpickle_err)
    except _futures_base.InvalidStateError:
        pass
    if state.journal is not None:
        state.journal.forget(state.token, task_id)


def _worker_died(state: _PoolState, task_id: int, body: Any, spilled: bool) -> None:
    """The worker running ``task_id`` died: send again the tasks of its batch
    that never started, run the task again if it has retries left, else fail it."""
    try:
        err = codec.loads(body, spilled)
    except BaseException as exc:  # noqa: BLE001
        err = TerminatedWorkerError(f"the task worker running task {task_id} died "
                                    f"({exc!r})", task_id=task_id)
    with state.lock:
        again: list[MQFuture] = []
        lost: list[MQFuture] = []
        dead = state.pending.get(task_id)
        batch = dead._batch if dead is not None else None
        if batch is not None:
            ids = [it.task_id for it in batch]
            at = ids.index(task_id) if task_id in ids else len(batch)
            again = [it for it in batch[at + 1:] if it.task_id in state.pending
                     and not it.done() and it._message]
            # Tasks before it in the batch ran, but their results were still in
            # the worker's outbox: run them again if they have retries left.
            for it in batch[:at]:
                if it.task_id not in state.pending or it.done():
                    continue
                if it._retries > 0 and it._message:
                    it._retries -= 1
                    again.append(it)
                else:
                    lost.append(state.take(it.task_id) or it)
        item = state.pending.get(task_id)
        if item is not None and not item.done() and item._retries > 0 and item._message:
            item._retries -= 1  # run it again (retries=)
            again.insert(0, item)
            item = None
        elif item is not None:
            item = state.take(task_id)
        for it in reversed(again):
            it._batch = None
            state.backlog.appendleft(it)
    if again:
        state.feed()
        state.wake()
    for it in lost:
        reason = err.args[0] if isinstance(err, BaseException) and err.args else str(err)
        _fail_item(state, it, TerminatedWorkerError(
            f"task {it.task_id} ran, but its result was lost: {reason}",
            worker_id=getattr(err, "worker_id", -1), pid=getattr(err, "pid", 0),
            exitcode=getattr(err, "exitcode", None), task_id=it.task_id))
    if item is None or item.done():
        return
    _fail_item(state, item, err)


def _fail_item(state: _PoolState, fut: MQFuture, err: BaseException) -> None:
    """Fail the Future of a task whose worker died (already taken from pending)."""
    if isinstance(err, TerminatedWorkerError):
        err.fn_name = fut.fn_name
        tries = f" (attempt {fut._attempts})" if fut._attempts > 1 else ""
        err.args = (f"{err.args[0]} ({fut.fn_name}){tries}",)
    if fut._spill_ref and fut._keep:
        spill.discard(fut._spill_ref)
    if state.journal is not None:
        state.journal.forget(state.token, fut.task_id)
    try:
        fut.set_exception(err)
    except _futures_base.InvalidStateError:
        pass


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        import signal as _signal
        try:
            name = _signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"signal {name}"
    return f"exit code {exitcode}"


def _worker_exited(state: _PoolState, wid: int) -> None:
    """A worker process ended: fail the task it was running, then replace it."""
    p = state.processes[wid]
    p.join()
    state.handled.add(p.pid or 0)
    assert state.board is not None
    slot = state.board.read(wid)
    state.board.idle(wid)
    _deliver_outbox(state, wid)
    if slot.state == BUSY:
        # The notice travels on the producer's reply queue, behind any result
        # the worker sent before dying, so a task that did complete is never
        # reported dead, and the producer re-queues the rest of its batch.
        _tell_producer(state, wid, p, slot, _describe_exit(p.exitcode))
    if slot.state == INIT_FAILED:
        return  # the collector breaks the pool with the initializer's error
    if not _queue_exists(state):
        state.break_pool("the task queue was removed from the kernel (ipcrm?) while "
                         "the pool was running")
        return
    if state.broken is not None or state.terminating:
        return
    try:
        state.spawn(wid)
    except Exception as exc:  # noqa: BLE001
        state.break_pool(f"could not start a replacement for task worker {wid}: {exc!r}")


def _queue_exists(state: _PoolState) -> bool:
    try:
        _ = state.task_queue.current_messages
        return True
    except sysv_ipc.ExistentialError:
        return False
    except (sysv_ipc.Error, OSError):
        return True


def _deliver_outbox(state: _PoolState, wid: int) -> None:
    """Send on the results a dead worker still held in its outbox (see
    :mod:`mqexecutor.outbox`), ahead of the notice of its death."""
    assert state.board is not None
    got = outbox.drain(outbox.outbox_path(os.path.dirname(state.board.path), wid))
    if got is None:
        return
    route, messages = got
    if len(messages) == 1:
        message = messages[0]
    else:
        message = build(Kind.RESULT, F_BATCH, 0, 0, route.token, 0, state.pid, wid,
                        join_batch(messages))
    _send_to_producer(state, route.token, route.reply, route.pid, message)


def _tell_producer(state: _PoolState, wid: int, p: Any, slot: Any, reason: str) -> None:
    """Tell the producer of the task a dead worker was running (this executor,
    or another process that attached) through its reply queue."""
    err = TerminatedWorkerError(
        f"task worker {wid} (pid {p.pid}) died with {reason} while running task "
        f"{slot.task_id}", worker_id=wid, pid=p.pid or 0, exitcode=p.exitcode,
        task_id=slot.task_id)
    try:
        body, spilled = codec.dumps(err, state.inline_max,
                                    spill.producer_subdir(slot.producer_pid, slot.token))
    except OSError:
        return
    msg = build(Kind.RESULT, F_SPILL if spilled else 0, Status.WORKER_DIED,
                slot.task_id, slot.token, 0, p.pid or 0, wid, body, state.authkey)
    _send_to_producer(state, slot.token, slot.reply, slot.producer_pid, msg)


def _send_to_producer(state: _PoolState, token: int, reply: int, producer_pid: int,
                      message: bytes) -> None:
    """Put ``message`` on the reply queue of a producer (this executor, or
    another process that attached); waits up to 2 s for room."""
    try:
        queue = (state.reply_queue if token == state.token
                 else queues.open_queue(reply, create=False))
    except (sysv_ipc.Error, OSError):
        return
    for _ in range(400):  # the producer's collector drains its queue: room comes
        try:
            queue.send(message, block=False, type=RESULT_MTYPE)
            return
        except sysv_ipc.BusyError:
            if token != state.token and not persistence.pid_alive(producer_pid):
                return
            time.sleep(0.005)
        except (sysv_ipc.Error, OSError):
            # Gone (EIDRM, or EINVAL once its id is freed): the producer is
            # gone, or, for this executor's own queue, its collector breaks
            # the pool when its receive meets the removal.
            return


def _manager_loop(state: _PoolState) -> None:
    """Watch workers, poll the backlog, and tear down at shutdown."""
    delay = 0.005
    try:
        while True:
            with state.lock:
                # Every worker not yet handled, dead or alive: a worker that died
                # since the last turn has a readable sentinel, so wait() returns.
                sentinels = {p.sentinel: wid for wid, p in state.processes.items()
                             if p.pid not in state.handled}
                backlog = bool(state.backlog)
            timeout = delay if backlog else None
            ready = multiprocessing.connection.wait(list(sentinels) + [state.wake_r],
                                                    timeout)
            if state.wake_r in ready:
                try:
                    while os.read(state.wake_r, 4096):
                        pass
                except OSError:
                    pass
            for sentinel in ready:
                wid = sentinels.get(sentinel)  # type: ignore[arg-type]
                if wid is not None:
                    _worker_exited(state, wid)
            if backlog:
                delay = 0.005 if state.feed() else min(delay * 2, 0.05)
            if state.broken is not None or state.abandon:
                break
            if state.shutdown_requested:
                with state.lock:
                    idle = not state.pending
                if idle:
                    break
                if state.terminating and all(p.exitcode is not None
                                             for p in state.processes.values()):
                    state.break_pool("the task workers were terminated")
                    break
    finally:
        _teardown(state)


def _teardown(state: _PoolState) -> None:
    """Stop workers, let the collector take the last results, cancel what is
    left (tasks left in a persistent queue stay there), release resources."""
    state.stop_workers()
    collector = state.collector
    if collector is not None and collector.is_alive() and state.reply_queue is not None:
        try:  # behind every result already sent: the collector handles those first
            state.reply_queue.send(b"stop", block=True, type=CONTROL_MTYPE)
        except sysv_ipc.Error:
            pass
        if collector is not threading.current_thread():
            collector.join()
    with state.lock:
        items = list(state.pending.values())
        state.pending.clear()
        state.backlog.clear()
    for fut in items:
        if fut.done():
            continue
        if fut.running():  # still in the kernel queue: it stays there
            fut._withdraw()
            continue
        if fut.cancel():
            fut.set_running_or_notify_cancel()
        if fut._spill_ref and state.journal is None:
            spill.discard(fut._spill_ref)  # durable: the next owner runs it
    state.release_resources()


_gc_done = False


def _sweep_once() -> bool:
    """True the first time in this process: the pool made then has its first
    worker reclaim the leftovers of dead producers (``persistence.collect_garbage``,
    run by the worker shortly after it starts, off the path to the first result)."""
    global _gc_done
    if _gc_done:
        return False
    _gc_done = True
    return True


def _check_key_mode(key: Any, mode: Any) -> tuple[int | None, Mode]:
    if key is not None:
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"key must be an int SysV key or None, not {key!r}")
        key = queues.parse_key(key)
        if key == 0:
            raise ValueError("key 0 is IPC_PRIVATE; pass key=None for a private queue")
    try:
        mode = Mode(mode)
    except ValueError:
        raise ValueError(f"mode must be Mode.TARGETED (2) or Mode.PREEMPTIVE (3), "
                         f"not {mode!r}") from None
    return key, mode


def _check_authkey(authkey: Any) -> bytes | None:
    if authkey is None:
        return None
    if isinstance(authkey, str):
        raise TypeError("authkey must be bytes (e.g. os.urandom(32)), not str")
    try:
        authkey = bytes(authkey)
    except TypeError:
        raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}") from None
    if len(authkey) < 16:
        raise ValueError(f"authkey must be at least 16 bytes, not {len(authkey)}")
    return authkey


def _check_retries(retries: Any) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int, not {retries!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, not {retries}")
    return retries


def _check_capacity(capacity: Any) -> None:
    if capacity is None:
        return
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int number of bytes, not {capacity!r}")
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0 bytes, not {capacity}")


def _set_capacity(state: _PoolState, capacity: int) -> None:
    """Ask the kernel for ``capacity`` bytes of msg_qbytes; warn when refused."""
    queue = state.task_queue
    try:
        if queue.max_size != capacity:
            queue.max_size = capacity
        state.fit_to_queue()
        return
    except (sysv_ipc.PermissionsError, OSError, ValueError) as exc:
        reason = exc
    warnings.warn(
        f"mqexecutor: the kernel refused capacity={capacity} bytes for the queue of key "
        f"0x{queue.key & 0xFFFFFFFF:08x} ({reason}; raising msg_qbytes above "
        f"kernel.msgmnb needs CAP_SYS_RESOURCE). The limit in force is "
        f"{queue.max_size} bytes; tasks beyond it wait in this process.",
        CapacityWarning, stacklevel=4)


def _producer_alive(pid: int, token: int) -> bool:
    """Whether the producer (pid, token) of a queued task still waits for it."""
    if pid == os.getpid():
        return any(s.token == token and not s.closed for s in list(_live_states))
    return persistence.pid_alive(pid)


def _check_no_live_owner(key: int, mode: Mode) -> None:
    for state in list(_live_states):  # a live pool of this process
        if (state.pid == os.getpid() and not state.closed and not state.attach
                and state.explicit_key and state.task_queue is not None
                and state.task_queue.key == key and state.mode != mode):
            raise QueueModeError(
                f"key 0x{key & 0xFFFFFFFF:08x} is served by a {state.mode.name} pool of "
                f"this process; this executor asked for {mode.name}")
    meta = persistence.read_meta(spill.key_subdir(key))
    if (meta is not None and meta.mode != int(mode) and meta.owner_pid != os.getpid()
            and persistence.pid_alive(meta.owner_pid)
            and ipcinfo.queue_info(key) is not None):
        raise QueueModeError(
            f"key 0x{key & 0xFFFFFFFF:08x} is served by pid {meta.owner_pid} in "
            f"{Mode(meta.mode).name} mode; this executor asked for {mode.name}")


def _send_back(queue: sysv_ipc.MessageQueue, raw: bytes, mtype: int) -> None:
    """Put a message taken from ``queue`` back (up to ~2 s of a full queue)."""
    for _ in range(400):
        try:
            queue.send(raw, block=False, type=mtype)
            return
        except sysv_ipc.BusyError:
            time.sleep(0.005)
        except sysv_ipc.Error:
            return


class MQExecutor(Executor):
    """A process pool fed by a System V message queue; a drop-in replacement for
    ``concurrent.futures.ProcessPoolExecutor`` on Linux.

    Args:
        key (int | None): SysV key of the task queue. None (default): a fresh
            private queue, removed at shutdown. An int: that key's queue, created
            (with ``queue_mode``) if absent and kept after shutdown, so tasks left
            in it survive the executor (Swoole's ``message_queue_key``); tasks
            that dead producers left there are adopted (:meth:`recovered`).
            :func:`mqexecutor.ftok` turns a path into a key.
        max_workers (int | None): number of task worker processes; None means the
            number of CPUs this process may use.
        mode (Mode | int): ``Mode.PREEMPTIVE`` (3, default): workers compete for
            every task. ``Mode.TARGETED`` (2): worker i receives message type i + 1
            and ``submit_to`` chooses the worker. Named after Swoole's task_ipc_mode.
        initializer (callable | None), initargs (tuple): run once in each worker
            at start, as ProcessPoolExecutor. If it raises, the pool is broken.
        max_tasks_per_child (int | None): a worker exits after this many tasks and
            is replaced under the same worker id (Swoole's task_max_request).
        mp_context: a ``multiprocessing`` context to start workers with; default
            ``fork`` (fast start; workers re-forked later from a helper thread).
        queue_mode (int): permission bits of a queue this executor creates
            (default 0o600: only this user can post tasks, i.e. run code).
        allow (iterable of str): fnmatch patterns of ``"module:qualname"`` that
            JSON tasks from other programs may call (:mod:`mqexecutor.external`);
            empty (default): JSON tasks are refused.
        swoole_handler (str | None): ``"module:function"`` that receives every
            message as Swoole packets, like Swoole's onTask (:mod:`mqexecutor.swoole`).
        authkey (bytes | None): a secret of 16 bytes or more. Every message then
            carries an HMAC-SHA256 and workers refuse, without unpickling, any
            message whose HMAC is missing or wrong (so a local user who can
            write to the queue cannot run code). None: no HMAC.
        retries (int): run a task again, at most this many times, when the
            worker running it dies (default 0). Per task:
            ``ex.with_options(retries=N).submit(...)``.
        batch_size (int | None): at most this many small tasks per message when
            tasks wait in the backlog (a full kernel queue). None (default):
            adapted to the task rate, so that one message holds about 5 ms of
            work; 1: one task per message always.
        durable (bool | str): record every task in a spool directory (a path, or
            True for the default) before it is queued, and forget it once its
            outcome is delivered; after the whole process tree is killed, the
            next executor on the key runs again every unfinished task
            (at-least-once; :mod:`mqexecutor.journal`). Needs an explicit key.
        capacity (int | None): bytes of msg_qbytes to ask the kernel for. Above
            kernel.msgmnb this needs CAP_SYS_RESOURCE; when refused, a
            CapacityWarning names the limit in force and tasks beyond it wait in
            this process.

    Raises:
        ValueError: ``max_workers`` <= 0, an unknown ``mode``, or
            ``max_tasks_per_child`` < 1.
        QueueModeError: the key's queue holds tasks of the other mode or another
            wire version, or a live pool of the other mode serves it.
        TypeError: ``initializer`` not callable, ``key`` not an int.
        sysv_ipc.PermissionsError: the queue of ``key`` belongs to someone else.
        OSError: the kernel refused to create a queue (e.g. msgmni reached).
    """

    def __init__(self, key: int | None = None, max_workers: int | None = None, *,
                 mode: Mode | int = Mode.PREEMPTIVE, initializer: Callable | None = None,
                 initargs: tuple = (), max_tasks_per_child: int | None = None,
                 mp_context: Any = None, queue_mode: int = 0o600,
                 capacity: int | None = None, allow: Iterable[str] = (),
                 swoole_handler: str | None = None, authkey: bytes | None = None,
                 retries: int = 0, durable: bool | str = False,
                 batch_size: int | None = None):
        key, mode = _check_key_mode(key, mode)
        if durable and key is None:
            raise ValueError("durable=True needs an explicit key: a private queue dies "
                             "with its executor, so there is nothing to recover into")
        if max_workers is None:
            max_workers = _cpu_count()
        elif isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, not {max_workers!r}")
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        _check_capacity(capacity)
        authkey = _check_authkey(authkey)
        retries = _check_retries(retries)
        if mp_context is None:
            mp_context = multiprocessing.get_context("fork")
        init_bytes = None
        if initializer is not None:
            init_bytes = codec.dumps_by_value((initializer, tuple(initargs)))
        if key is not None:
            _check_no_live_owner(key, mode)
        if swoole_handler is not None:
            from . import swoole
            swoole.load_handler(swoole_handler)  # fail here, not in every worker
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be None (adaptive) or an int >= 1, "
                             f"not {batch_size!r}")
        self._batch_size = batch_size
        self._setup(_PoolState(key=key, max_workers=max_workers, mode=mode,
                               mp_context=mp_context, initializer=init_bytes,
                               max_tasks_per_child=max_tasks_per_child,
                               queue_mode=queue_mode, allow=tuple(allow),
                               swoole_handler=swoole_handler, authkey=authkey,
                               retries=retries, durable=durable, sweep=_sweep_once()),
                    capacity)

    @classmethod
    def attach(cls, key: int, *, mode: Mode | int = Mode.PREEMPTIVE,
               workers: int | None = None, authkey: bytes | None = None,
               retries: int = 0, durable: bool | str = False) -> MQExecutor:
        """An executor that starts no workers and submits to the pool another
        process serves on ``key`` (``mqexecutor serve`` or an MQExecutor).

        Its ``submit``, ``map`` and Futures work as usual; its results come back
        on its own reply queue, so it never sees another producer's results.

        Args:
            key (int): the pool's SysV key (decimal, or parsed from 0x hex with
                :func:`mqexecutor.queues.parse_key`).
            mode: the pool's mode; a mismatch with the pool raises.
            workers (int | None): the pool's size, for ``submit_to`` range checks;
                read from the pool's metadata when None.
            authkey (bytes | None): the pool's HMAC key, when it has one.
            retries (int): as in the constructor; a worker death is reported to
                this process by the pool's owner.
            durable (bool | str): as in the constructor; the pool's next owner
                recovers this producer's unfinished tasks if it dies.

        Raises:
            sysv_ipc.ExistentialError: no queue has this key.
            QueueModeError: the pool serving the key runs in the other mode.
        """
        checked, mode = _check_key_mode(key, mode)
        if checked is None:
            raise TypeError("attach() needs the key of a served queue, not None")
        key = checked
        meta = persistence.read_meta(spill.key_subdir(key))
        if meta is not None and meta.mode != int(mode) and persistence.pid_alive(meta.owner_pid):
            raise QueueModeError(
                f"the pool on key 0x{key & 0xFFFFFFFF:08x} (pid {meta.owner_pid}) runs in "
                f"{Mode(meta.mode).name} mode; attach() asked for {mode.name}")
        if workers is None:
            workers = meta.workers if meta is not None and meta.workers > 0 else 1
        self = cls.__new__(cls)
        self._setup(_PoolState(key=key, max_workers=workers, mode=mode,
                               mp_context=None, initializer=None, max_tasks_per_child=None,
                               queue_mode=0o600, attach=True,
                               authkey=_check_authkey(authkey),
                               retries=_check_retries(retries), durable=durable), None)
        return self

    def _setup(self, state: _PoolState, capacity: int | None) -> None:
        fixed = getattr(self, "_batch_size", None)
        if fixed is not None:
            state.batch_limit = fixed
            state.batch_fixed = True
        self._mode = state.mode
        self._max_workers = state.max_workers
        self._key: int = state.task_queue.key
        self._state = state
        self._recovered: list[MQFuture] = []
        self._stranded: list[StrandedTask] = []
        self._inherited = 0
        try:
            if capacity is not None:
                _set_capacity(state, capacity)
            if state.explicit_key and not state.attach:
                self._adopt_leftovers()
                persistence.write_meta(spill.key_subdir(self._key), persistence.QueueMeta(
                    key=self._key, mode=int(state.mode), workers=state.max_workers,
                    wire=WIRE_VERSION, owner_pid=state.pid, owner_token=state.token,
                    reply_key=state.reply_queue.key))
            if not state.attach:
                for wid in range(state.max_workers):
                    state.spawn(wid)
        except BaseException:
            state.terminating = True
            state.signal_workers(9)
            for p in state.processes.values():
                p.join()
            state.release_resources()
            raise
        state.collector = threading.Thread(target=_collector_loop, args=(state,),
                                           name="mqexecutor-collector", daemon=True)
        state.manager = threading.Thread(target=_manager_loop, args=(state,),
                                         name="mqexecutor-manager", daemon=True)
        state.collector.start()
        state.manager.start()
        _live_states.add(state)
        self._executor_manager_thread = state.manager
        weakref.finalize(self, _PoolState.request_shutdown, state)

    def _adopt_leftovers(self) -> None:
        """Take over the tasks that dead producers left in the queue (see
        :mod:`mqexecutor.persistence`). Raises QueueModeError, leaving the queue
        as it was, when they were sent in the other mode or wire version."""
        state = self._state
        queue = state.task_queue
        found: list[tuple[bytes, int]] = []
        while True:
            try:
                whole, mtype = queue.receive(block=False)
            except sysv_ipc.BusyError:
                break
            except sysv_ipc.Error:
                continue  # EINTR
            found.extend((raw, mtype) for raw in flatten(whole))
        journaled: dict[tuple[int, int], tuple[bytes, Any]] = {}
        if state.journal is not None:
            for token, tid, msg in state.journal.entries():
                try:
                    h = unpack_header(msg)
                except ProtocolError:
                    continue
                if _producer_alive(h.pid, h.token):
                    continue  # its producer lives and will get the outcome
                journaled[(token, tid)] = (msg, h)
        if not found and not journaled:
            return
        keep: list[tuple[bytes, int]] = []
        adopt: list[tuple[bytes, int, Any]] = []
        problem = None
        for raw, mtype in found:
            if state.swoole_handler is not None or raw[:1] == b"{":
                keep.append((raw, mtype))  # JSON tasks, Swoole packets: for the workers
                continue
            try:
                h = unpack_header(raw)
            except ProtocolError as exc:
                if raw[:2] == b"MQ" and len(raw) > 2 and raw[2] != WIRE_VERSION:
                    problem = (f"the queue of key 0x{self._key & 0xFFFFFFFF:08x} holds tasks "
                               f"of wire version {raw[2]}; this mqexecutor speaks version "
                               f"{WIRE_VERSION}")
                else:
                    deadletter.record(self._key, raw, f"found at start: {exc}", None)
                    warnings.warn(f"mqexecutor: set aside a message of {len(raw)} bytes "
                                  f"found in the queue: {exc}", RuntimeWarning, stacklevel=4)
                continue
            if h.kind != Kind.TASK:
                continue
            if bool(h.flags & F_TARGETED) != state.targeted:
                theirs = "TARGETED" if h.flags & F_TARGETED else "PREEMPTIVE"
                problem = (f"the queue of key 0x{self._key & 0xFFFFFFFF:08x} holds tasks sent "
                           f"in {theirs} mode; this executor is {state.mode.name}")
            if _producer_alive(h.pid, h.token):
                keep.append((raw, mtype))  # a live producer still waits for it
                continue
            journaled.pop((h.token, h.task_id), None)  # in the queue: adopted from there
            adopt.append((raw, mtype, h))
        if problem is not None:
            for raw, mtype in found:
                _send_back(queue, raw, mtype)
            raise QueueModeError(problem)
        # Recorded tasks no longer queued: running when their producer died, or
        # still waiting in its backlog (durable mode).
        for msg, h in journaled.values():
            if bool(h.flags & F_TARGETED) != state.targeted:
                warnings.warn(f"mqexecutor: spool entry of task {h.task_id} was sent in "
                              "the other mode; left in the spool", RuntimeWarning,
                              stacklevel=4)
                continue
            mtype = targeted_mtype(h.worker) if state.targeted else PREEMPTIVE_MTYPE
            adopt.append((msg, mtype, h))
        kept_adopt = []
        for raw, mtype, h in adopt:
            if state.targeted and not 0 <= h.worker < state.max_workers:
                try:
                    name, _ = split_task_body(parse(raw)[1])
                except ProtocolError:
                    name = "?"
                self._stranded.append(StrandedTask(h.task_id, h.worker, name, h.pid))
                if any(raw is r for r, _ in found):
                    keep.append((raw, mtype))
                continue
            kept_adopt.append((raw, mtype, h))
        for raw, mtype in keep:
            _send_back(queue, raw, mtype)
        self._inherited = len(kept_adopt) + len(self._stranded)
        if self._stranded:
            warnings.warn(
                f"mqexecutor: {len(self._stranded)} task(s) in the queue of key "
                f"0x{self._key & 0xFFFFFFFF:08x} target worker ids this pool of "
                f"{state.max_workers} does not have; they stay queued (see stranded())",
                RuntimeWarning, stacklevel=4)
        with state.lock:
            for raw, mtype, h in kept_adopt:
                task_id = next(state.ids)
                try:
                    name, payload = split_task_body(parse(raw)[1])
                    message = replace_route(raw, task_id, state.token, state.reply_queue.key,
                                            state.pid, state.authkey)
                except ProtocolError as exc:
                    deadletter.record(self._key, raw, f"not adopted: {exc}", None)
                    continue
                fut = MQFuture(task_id, name, state.lock)
                fut.original_task_id = h.task_id
                fut.original_pid = h.pid
                worker = h.worker if state.targeted else -1
                if worker >= 0:
                    fut.worker_id = worker
                    state.outstanding[worker] += 1
                ref = bytes(payload).decode("ascii", "replace") if h.flags & F_SPILL else None
                durable = state.journal is not None
                if state.journal is not None:
                    state.journal.move((h.token, h.task_id), (state.token, task_id), message)
                fut._task(message, mtype, worker, ref, 0,
                          durable or bool(h.flags & F_KEEP_SPILL))
                state.pending[task_id] = fut
                state.backlog.append(fut)
                self._recovered.append(fut)
        state.feed()

    # -- properties --------------------------------------------------------------
    @property
    def key(self) -> int:
        """SysV key of the task queue (a random key for a private queue)."""
        assert self._state.task_queue is not None
        return self._state.task_queue.key

    @property
    def msqid(self) -> int:
        """Kernel id of the task queue."""
        assert self._state.task_queue is not None
        return self._state.task_queue.id

    @property
    def mode(self) -> Mode:
        """The executor's :class:`Mode`."""
        return self._mode

    @property
    def max_workers(self) -> int:
        """Number of task workers."""
        return self._max_workers

    @property
    def _processes(self) -> dict[int, Any]:
        """Worker processes by pid (as ProcessPoolExecutor's private attribute)."""
        return {p.pid: p for p in self._state.processes.values() if p.pid is not None}

    @property
    def inherited(self) -> int:
        """Number of tasks of dead producers found in the queue when this executor
        attached to its key (adopted ones plus stranded ones)."""
        return self._inherited

    def recovered(self) -> list[MQFuture]:
        """Futures of the tasks this executor adopted from producers that died
        (explicit keys only). Each has a new ``task_id``, the old one in
        ``original_task_id``, the dead producer's pid in ``original_pid`` and the
        function's qualified name in ``fn_name``. Returns a new list."""
        return list(self._recovered)

    def stranded(self) -> list[StrandedTask]:
        """Tasks found in the queue for worker ids this pool does not have
        (targeted mode, a smaller pool than the one they were sent to). They are
        left in the queue; a warning was issued at start."""
        return list(self._stranded)

    def stats(self) -> PoolStats:
        """A :class:`PoolStats` snapshot: kernel queue messages, bytes and
        capacity, this executor's backlog, running and completed tasks, live
        workers and inherited tasks."""
        state = self._state
        info = ipcinfo.queue_info(self._key) if self._key is not None else None
        try:
            capacity = state.task_queue.max_size
        except (sysv_ipc.Error, AttributeError):
            capacity = 0
        with state.lock:
            backlog = len(state.backlog)
            running = len(state.pending) - backlog
            workers = sum(1 for p in state.processes.values() if p.exitcode is None)
        return PoolStats(
            key=self._key, msqid=info.msqid if info else -1,
            queued_messages=info.qnum if info else 0,
            queued_bytes=info.cbytes if info else 0, capacity_bytes=capacity,
            backlog=backlog, running=running, completed=state.completed, workers=workers,
            inherited=self._inherited,
            rejected=_rejected(state))

    # -- submitting --------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> MQFuture:
        """Schedule ``fn(*args, **kwargs)`` and return its :class:`MQFuture`.

        Never blocks because the kernel queue is full: the task then waits in
        this process. In targeted mode the worker with the fewest outstanding
        tasks is chosen; the worker chosen last keeps getting them while it has
        less than a message's worth more than that (the tasks packed in one
        BATCH message: 1 unless tasks are short and many wait).

        Raises:
            RuntimeError: after ``shutdown()`` or interpreter shutdown.
            BrokenMQPool: the pool is broken (a worker's initializer raised).
        A call that cannot be pickled does not raise here: its Future fails with
        the pickling error, as in ProcessPoolExecutor.
        """
        return self._submit(fn, args, kwargs, None)

    def submit_to(self, worker_id: int, fn: Callable, /, *args: Any,
                  **kwargs: Any) -> MQFuture:
        """Run ``fn(*args, **kwargs)`` on task worker ``worker_id`` (Swoole
        task_ipc_mode 2: ``$serv->task($data, $dst_worker_id)``).

        Args:
            worker_id (int): 0..max_workers-1.

        Raises:
            QueueModeError (a ValueError): the executor is not Mode.TARGETED
                (Swoole ignores the target in mode 3; mqexecutor refuses).
            ValueError: ``worker_id`` out of range.
            RuntimeError, BrokenMQPool: as :meth:`submit`.
        """
        self._check_target(worker_id)
        return self._submit(fn, args, kwargs, worker_id)

    def _check_target(self, worker_id: Any) -> None:
        if self._mode != Mode.TARGETED:
            raise QueueModeError("submit_to() sends to one worker and needs "
                                 "mode=Mode.TARGETED; this executor is Mode.PREEMPTIVE")
        if (isinstance(worker_id, bool) or not isinstance(worker_id, int)
                or not 0 <= worker_id < self._max_workers):
            raise ValueError(f"worker_id must be in 0..{self._max_workers - 1}, "
                             f"not {worker_id!r}")

    def with_options(self, *, retries: int | None = None) -> TaskOptions:
        """A view of this executor whose ``submit``, ``submit_to`` and ``map``
        apply per-task options.

        Args:
            retries (int | None): runs after a worker death (None: the
                executor's ``retries``).

        Example: ``ex.with_options(retries=3).submit(fetch, url)``.
        """
        return TaskOptions(self, retries=None if retries is None else _check_retries(retries))

    def _check_open(self) -> None:
        state = self._state
        if state.broken is not None:
            raise BrokenMQPool(state.broken)
        if state.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _interpreter_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _submit(self, fn: Callable, args: tuple, kwargs: dict,
                target: int | None, retries: int | None = None) -> MQFuture:
        state = self._state
        if state.broken is not None or state.shutdown_requested or _interpreter_shutdown:
            self._check_open()
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        if retries is None:
            retries = state.retries
        info = _fn_info(fn)
        prefix = info.prefix
        fut = MQFuture(0, info.name, state.lock)
        keep = retries > 0 or state.journal is not None
        flags = F_TARGETED if state.targeted else 0
        call: Any = fn
        if (info.reference is not None and getattr(info.owner, info.attr, None) is fn
                and not codec.by_value_registry()):
            call = info.reference  # made once; still names this very function
            flags |= F_FN_REF
        room = state.inline_max - len(prefix)
        body = None
        if flags & F_FN_REF:
            if not args and not kwargs and len(info.bare_call) <= room:
                body = info.bare_call
            else:
                body = codec.dumps_plain_call(call, args, kwargs, room)
        spilled = False
        if body is None:
            try:
                body, spilled = codec.dumps((call, args, kwargs), room, state.task_subdir)
            except Exception as exc:  # noqa: BLE001 - fails the Future, as ProcessPoolExecutor
                fut.set_exception(exc)
                return fut
        spill_ref = body.decode("ascii") if spilled else None
        if spilled:
            flags |= F_SPILL | (F_KEEP_SPILL if keep else 0)
        with state.lock:
            try:
                self._check_open()
            except BaseException:
                if spill_ref:
                    spill.discard(spill_ref)
                raise
            task_id = next(state.ids)
            fut.task_id = task_id
            if state.targeted:
                if target is None:
                    # The least busy worker. The one used last keeps the task on
                    # a tie (it may still be polling for its next task, see
                    # queues.SPIN_SECONDS), and while tasks go several to a
                    # message, until it has a message's worth more than the
                    # least busy: its tasks then lie together in the backlog,
                    # one BATCH message's worth at a time.
                    # Tasks it may take before this is looked at again: credit.
                    target = state.last_target
                    if state.target_credit > 0:
                        state.target_credit -= 1
                    else:
                        busy = state.outstanding[target] - state.finished[target]
                        if busy:
                            loads = state.loads()
                            least = min(loads)
                            # a message's worth: batch_limit tasks, or as many
                            # of this one's size as fit in one message
                            run = max(1, min(state.batch_limit, state.inline_max // (
                                HEADER_SIZE + 4 + len(prefix) + len(body))))
                            if busy - least >= run:
                                target = state.last_target = loads.index(least)
                                busy = least
                            state.target_credit = run - 1 - (busy - least)
                state.outstanding[target] += 1
                fut.worker_id = target
                mtype, worker = target + 1, target  # protocol.targeted_mtype
            else:
                mtype, worker = PREEMPTIVE_MTYPE, -1
            assert state.reply_queue is not None
            if state.authkey is None:  # build() without HMAC, in one step
                message = HEADER_STRUCT.pack(
                    MAGIC, WIRE_VERSION, _TASK, flags, 0, task_id, state.token,
                    state.reply_queue.key, state.pid, worker,
                    len(prefix) + len(body)) + prefix + body
            else:
                message = build(Kind.TASK, flags, 0, task_id, state.token,
                                state.reply_queue.key, state.pid, worker, prefix + body,
                                state.authkey)
            fut._task(message, mtype, worker, spill_ref, retries, keep)
            if state.journal is not None:
                try:
                    state.journal.record(state.token, task_id, message)
                except OSError:
                    if worker >= 0:
                        state.outstanding[worker] -= 1
                    if spill_ref:
                        spill.discard(spill_ref)
                    raise
            state.pending[task_id] = fut
            try:
                if not state.backlog and state.room() and state.send_now(fut):
                    return fut
            except BaseException:  # BrokenMQPool, or e.g. KeyboardInterrupt in msgsnd
                state.forget(fut)
                raise
            # The kernel queue is full: the task waits in the backlog, which the
            # collector refills from as results arrive (the manager polls too).
            state.backlog.append(fut)
            if len(state.backlog) == 1:
                state.wake()
        return fut

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None,
            _options: TaskOptions | None = None) -> Iterator:
        """Ordered, lazy ``map(fn, *iterables)`` run by the workers, as Python
        3.14's ProcessPoolExecutor.map.

        Args:
            timeout (float | None): seconds, counted from this call, after which
                the iterator raises TimeoutError (and cancels what is left).
            chunksize (int): argument tuples sent per task (>= 1).
            buffersize (int | None): at most this many tasks (chunks) submitted
                ahead of the result being read; None submits everything now.

        Raises:
            ValueError: chunksize < 1 or buffersize < 1.
            TypeError: buffersize not an int.
        Exceptions of ``fn`` are raised by the iterator when their item is reached.
        """
        if buffersize is not None:
            if isinstance(buffersize, bool) or not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        args_iter: Iterator
        run_chunk: Callable = _process_chunk
        if chunksize > 1 and len(iterables) == 1:
            args_iter = _chunks(iter(iterables[0]), chunksize)
            run_chunk = _process_chunk1
        elif chunksize > 1:
            args_iter = _chunks(zip(*iterables), chunksize)
        else:
            args_iter = zip(*iterables)

        retries = _options.retries if _options is not None else None

        def submit_one(executor: MQExecutor, a: Any) -> MQFuture:
            if chunksize > 1:
                return executor._submit(run_chunk, (fn, a), {}, None, retries)
            return executor._submit(fn, a, {}, None, retries)

        if buffersize:
            fs = collections.deque(submit_one(self, a)
                                   for a in itertools.islice(args_iter, buffersize))
        else:
            fs = collections.deque(submit_one(self, a) for a in args_iter)
        # A weak reference lets the executor be garbage-collected while the
        # iterator lives, as in CPython.
        ref = weakref.ref(self)
        del self

        def results() -> Iterator:
            try:
                while fs:
                    if buffersize:
                        executor = ref()
                        if executor is not None:
                            nxt = next(args_iter, None)
                            if nxt is not None:
                                fs.append(submit_one(executor, nxt))
                        del executor
                    fut = fs.popleft()
                    try:
                        value = fut.result(None if end is None else end - time.monotonic())
                    except BaseException:
                        fut.cancel()
                        raise
                    finally:
                        del fut
                    if chunksize > 1:
                        yield from value
                    else:
                        yield value
            finally:
                for f in fs:
                    f.cancel()
        return results()

    # -- stopping ----------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks and release the pool, as ProcessPoolExecutor.

        Args:
            wait (bool): block until pending tasks are done and every worker
                process has exited.
            cancel_futures (bool): cancel tasks that no worker has taken yet,
                also those already in the kernel queue.

        Queues and spill files of this executor are removed once the last task
        is done; the queue of an explicit key is kept. Calling it again is harmless.

        With an explicit key and ``wait=False``, workers stop after their current
        task and the tasks still in the kernel queue stay there for the next
        executor on the key (their Futures here are cancelled); with a private
        queue, pending tasks still run, as in ProcessPoolExecutor.
        """
        state = self._state
        abandon = not wait and state.explicit_key
        state.request_shutdown(cancel_futures, abandon=abandon)
        if abandon:  # stop workers now: the tasks still queued stay for the next pool
            state.signal_workers(STOP_SIGNAL)
        if wait and state.manager is not None and state.manager is not threading.current_thread() \
                and state.collector is not threading.current_thread():
            state.manager.join()

    def _force_shutdown(self, signum: int) -> None:
        state = self._state
        state.terminating = True
        self.shutdown(wait=False, cancel_futures=True)
        state.signal_workers(signum)

    def terminate_workers(self) -> None:
        """Shut down and send SIGTERM to every worker, as Python 3.14's
        ProcessPoolExecutor.terminate_workers. Tasks they were running fail with
        a BrokenProcessPool subclass (TerminatedWorkerError or BrokenMQPool);
        tasks not yet taken are cancelled."""
        import signal as _signal
        self._force_shutdown(_signal.SIGTERM)

    def kill_workers(self) -> None:
        """As :meth:`terminate_workers`, with SIGKILL (Python 3.14)."""
        import signal as _signal
        self._force_shutdown(_signal.SIGKILL)


def _rejected(state: _PoolState) -> int:
    try:
        return state.board.rejected() if state.board is not None else 0
    except (ValueError, OSError):  # closed at shutdown
        return 0


class TaskOptions:
    """Per-task options bound to an executor (:meth:`MQExecutor.with_options`)."""

    def __init__(self, executor: MQExecutor, *, retries: int | None = None):
        self._executor = executor
        self.retries = retries

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> MQFuture:
        """As :meth:`MQExecutor.submit`, with these options."""
        return self._executor._submit(fn, args, kwargs, None, self.retries)

    def submit_to(self, worker_id: int, fn: Callable, /, *args: Any, **kwargs: Any
                  ) -> MQFuture:
        """As :meth:`MQExecutor.submit_to`, with these options."""
        ex = self._executor
        ex._check_target(worker_id)
        return ex._submit(fn, args, kwargs, worker_id, self.retries)

    def map(self, fn: Callable, *iterables: Iterable, **kw: Any) -> Iterator:
        """As :meth:`MQExecutor.map`, with these options."""
        return self._executor.map(fn, *iterables, _options=self, **kw)


def _chunks(iterator: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk
