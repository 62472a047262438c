"""MQFuture: the Future of one task, and the only code that changes a Future's
state.

A ``concurrent.futures.Future`` with the task's bookkeeping on it (its message
until the outcome, its target, retries left), a lighter lock than the
Condition of a Future, and its own way to wait (see :class:`MQFuture`).
Producer code (dispatch, collector, monitor) moves a Future through its states
only with the methods and functions here.
"""
from __future__ import annotations

import _thread
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import _base as _futures_base
from typing import Any

from .errors import BrokenMQPool, RemoteTraceback, TaskUnpicklingError
from .protocol import Status
from .queues import SPIN_SECONDS

__all__ = ["MQFuture", "set_outcome", "fail", "finish_values", "deferring_callbacks",
           "PENDING", "RUNNING", "FINISHED", "DONE_STATES", "CANCELLED_STATES"]

RUNNING = _futures_base.RUNNING
FINISHED = _futures_base.FINISHED
PENDING = _futures_base.PENDING
CANCELLED_STATES = frozenset((_futures_base.CANCELLED, _futures_base.CANCELLED_AND_NOTIFIED))
DONE_STATES = frozenset((_futures_base.FINISHED, _futures_base.CANCELLED,
                         _futures_base.CANCELLED_AND_NOTIFIED))
_InvalidStateError = _futures_base.InvalidStateError
#: Per thread: the list the Futures whose done callbacks are put off go to.
_deferral = threading.local()


@contextlib.contextmanager
def deferring_callbacks(into: list[MQFuture]) -> Iterator[None]:
    """In this thread, while the block runs, a Future completed does not run
    its done callbacks: it is appended to ``into``, and the caller runs them
    (``fut._invoke_callbacks()``) once it holds no lock a callback could need
    (producer/receiver.py: a thread that completes Futures while it waits in
    ``result()``)."""
    outer = getattr(_deferral, "into", None)
    _deferral.into = into
    try:
        yield
    finally:
        _deferral.into = outer


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
        original_task_id (int | None), original_pid (int | None): for a task
            inherited from a dead producer (``MQExecutor.recovered``), its task
            id and pid in that producer.

    State follows ProcessPoolExecutor: PENDING while the task waits in this
    process (``cancel()`` succeeds), RUNNING once it is in the kernel queue.

    In place of the ``threading.Condition`` of a Future (8 objects for the
    garbage collector to scan, which made up half the cost of ``submit()`` with
    100k tasks pending), each MQFuture has a bare reentrant lock: ``result()``
    and ``exception()`` sleep on a lock of their own (``_ResultWaiter``), so the
    Condition's wait and notify are never needed.
    """

    def __init__(self, task_id: int = 0, fn_name: str = "", dispatch: Any = None):
        # The attributes of Future.__init__ (the same from Python 3.8 to 3.15);
        # _state, _result and _exception start as the class defaults below,
        # _done_callbacks is made on first use.
        self._condition = _FutureLock()  # type: ignore[assignment]
        self._waiters: list = []
        self.task_id = task_id
        self.fn_name = fn_name
        #: The pool's Dispatcher (its lock guards the PENDING -> RUNNING move).
        self._dispatch = dispatch

    _state = PENDING
    _result = None
    _exception = None
    worker_id: int | None = None
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
    _timeout: float | None = None  # its time limit, seconds
    _context: Any = None  # the contextvars.Context of its submit (relay.py), in a notebook
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

    # -- what the pool does to it (under the pool's lock) ------------------------------
    def _sending(self) -> None:
        """About to be handed to the kernel queue: RUNNING. The pool's lock is
        held, so nobody can cancel it meanwhile (``cancel`` takes it), and no
        result can arrive before the message is sent, so the Future's own lock
        is not needed (PENDING -> RUNNING notifies no waiter)."""
        self._state = RUNNING

    def _unsent(self) -> None:
        """The kernel queue was full after all: PENDING again (pool's lock held)."""
        self._state = PENDING

    def _sent(self) -> None:
        """The message is in the kernel queue: count the attempt, and drop the
        message unless it may be sent again."""
        self._attempts += 1
        if not self._keep:
            self._message = b""

    def _sent_in_batch(self, batch: list[MQFuture]) -> None:
        """The message is in the kernel queue, in a BATCH with ``batch``: keep
        the message, the rest of the batch is sent again if a worker dies."""
        self._attempts += 1
        self._batch = batch

    def _withdraw(self) -> bool:
        """Cancel a task taken back from the kernel queue before any worker got
        it (``shutdown(cancel_futures=True)``). Caller holds the pool's lock."""
        with self._condition:
            if self._state != RUNNING:
                return False
            self._state = PENDING
        super().cancel()
        self.set_running_or_notify_cancel()
        return True

    def _cancel_pending(self) -> None:
        """Cancel a task that never left this process (its backlog), and wake
        whoever waits (``set_running_or_notify_cancel``)."""
        if self.cancel():
            self.set_running_or_notify_cancel()

    # -- concurrent.futures.Future ------------------------------------------------------
    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        """As ``concurrent.futures.Future.add_done_callback``: ``fn(future)`` runs
        in the thread that completes the Future: the pool's collector thread,
        or a thread waiting in ``result()`` that took the reply itself
        (producer/receiver.py; after it stops polling); at once, in this
        thread, when the Future is done already. An exception it raises is
        logged (``concurrent.futures`` logger), as concurrent.futures does."""
        with self._condition:
            if self._state not in DONE_STATES:
                if not self._done_callbacks:
                    self._done_callbacks = []
                self._done_callbacks.append(fn)  # type: ignore[union-attr]
                return
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - logged, as concurrent.futures does
            _futures_base.LOGGER.exception("exception calling callback for %r", self)

    def _invoke_callbacks(self) -> None:
        """As ``Future._invoke_callbacks``, but put off in a thread that
        completes Futures while it waits (see :func:`deferring_callbacks`)."""
        if not self._done_callbacks:
            return
        into = getattr(_deferral, "into", None)
        if into is not None:
            into.append(self)
            return
        super()._invoke_callbacks()  # type: ignore[misc]

    def set_result(self, result: Any) -> None:
        """As ``concurrent.futures.Future.set_result`` (for the executor only)."""
        with self._condition:
            if self._state in DONE_STATES:
                raise _InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = FINISHED
            for waiter in self._waiters:
                waiter.add_result(self)
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def done(self) -> bool:
        """As ``Future.done`` (reads the state without taking the Condition)."""
        return self._state in DONE_STATES

    def cancelled(self) -> bool:
        """As ``Future.cancelled``."""
        return self._state in CANCELLED_STATES

    def running(self) -> bool:
        """As ``Future.running``."""
        return self._state == RUNNING

    def _wait(self, timeout: float | None) -> None:
        if self._state in DONE_STATES:
            return
        if timeout is None or timeout >= SPIN_SECONDS:
            receiver = getattr(self._dispatch, "receiver", None)
            start = time.monotonic()
            if receiver is None or not receiver.poll(self, SPIN_SECONDS):
                # poll for the collector's work: waking from a lock costs more
                deadline = time.monotonic() + SPIN_SECONDS
                while time.monotonic() < deadline:
                    os.sched_yield()  # releases the GIL for the collector
                    if self._state in DONE_STATES:
                        return
            elif self._state in DONE_STATES:
                return
            if timeout is not None:  # poll() may run callbacks: the time it took
                timeout -= time.monotonic() - start
        waiter = _ResultWaiter()
        with self._condition:
            if self._state in DONE_STATES:
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

        While few tasks are out (at most 2 per worker, none in the backlog),
        a thread other than the collector waiting 200 µs or more polls the
        pool's reply queue for up to 200 µs and completes the Futures of the
        results it takes, its own among them, instead of waiting for the
        collector thread (producer/receiver.py); it then runs the done
        callbacks of those Futures, which may take longer. Then it sleeps
        until the Future is done. ``timeout`` counts all of it.

        Raises:
            CancelledError: the Future was cancelled.
            TimeoutError: not done within ``timeout`` seconds.
            Exception: the exception the task raised, with the worker's
                traceback as ``__cause__`` (RemoteTraceback), or the pool's
                error (e.g. TerminatedWorkerError when its worker died).
        """
        self._wait(timeout)
        state = self._state
        if state == FINISHED:
            exc = self._exception
            if exc is not None:  # not `if exc`: an exception may be falsy (gh-132063)
                try:
                    raise exc
                finally:
                    exc = self = None  # no cycle through this frame's traceback
            return self._result
        if state in CANCELLED_STATES:
            raise _futures_base.CancelledError()
        raise _futures_base.TimeoutError()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``concurrent.futures.Future.exception``: the task's exception, or
        None when it returned. Waits as ``result()`` does (the calling thread
        may take the reply itself), and raises CancelledError and
        TimeoutError as it does."""
        self._wait(timeout)
        return super().exception(0)

    def cancel(self) -> bool:
        """Cancel the task if it has not been handed to the kernel queue yet.

        Returns True when cancelled, False when it is running or done (as
        ``concurrent.futures.Future.cancel``; :meth:`terminate` stops a
        running task too).
        """
        dispatch = self._dispatch
        if dispatch is None:
            cancelled = super().cancel()
        else:
            with dispatch.lock:
                cancelled = super().cancel()
        if cancelled:
            self._wake_result_waiters()
        return cancelled

    def terminate(self) -> bool:
        """Stop this task, whether it waits or runs (pebble's cancel of a
        running future): a task still in this process is cancelled as
        :meth:`cancel` does; one in the kernel queue will not run; one a
        worker runs has that worker stopped (SIGTERM, then SIGKILL) and
        replaced under the same id. The Future then ends CANCELLED:
        ``cancelled()`` is True and ``result()`` raises CancelledError.

        Returns:
            bool: True when it was stopped or will not run; False when it is
            done already, or when it was submitted through
            ``MQExecutor.attach`` and left this process (only the pool's
            owner can stop its workers).
        """
        if self.cancel():
            return True
        dispatch = self._dispatch
        if dispatch is None or self._state in DONE_STATES:
            return False
        return dispatch.terminate(self)

    def _terminated(self) -> bool:
        """End as CANCELLED a task that left this process (``terminate``):
        wake whoever waits, run the callbacks. False when it is done already."""
        with self._condition:
            if self._state in DONE_STATES:
                return False
            self._state = _futures_base.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def _wake_result_waiters(self) -> None:
        with self._condition:
            for waiter in self._waiters:
                if type(waiter) is _ResultWaiter:
                    waiter.wake()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" task_id={self.task_id}>"


def fail(fut: MQFuture, err: BaseException) -> None:
    """Fail ``fut`` with ``err`` unless it is done (cancelled meanwhile)."""
    try:
        fut.set_exception(err)
    except _InvalidStateError:
        pass


def set_outcome(fut: MQFuture, status: int, value: Any, worker: int) -> None:
    """Complete ``fut`` with an outcome a worker sent: ``value`` for Status.OK,
    ``(exception, traceback text)`` for RAISED and BAD_TASK (the worker's
    traceback becomes the exception's ``__cause__``). Nothing when it is done."""
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
    except _InvalidStateError:
        pass  # cancelled or failed meanwhile


def finish_values(futures: Iterable[MQFuture], values: Iterable[Any]) -> None:
    """Complete each Future with its value (RESULT VALUES): ``set_result``,
    inline, since this is the hot path of a burst of plain results. Futures
    done meanwhile (cancelled, failed) are skipped."""
    for fut, value in zip(futures, values):
        with fut._condition:
            if fut._state in DONE_STATES:
                continue
            fut._result = value
            fut._state = FINISHED
            for waiter in fut._waiters:
                waiter.add_result(fut)
        if fut._done_callbacks:
            fut._invoke_callbacks()  # type: ignore[attr-defined]
