"""The Receiver: who takes a pool's replies off its reply queue, the collector
thread or a thread waiting in ``MQFuture.result()``.

A reply that the collector takes while blocked in msgrcv has to wake it, and
the GIL then goes from the waiting thread to the collector and back: tens of
microseconds each when the two threads run on different CPUs
(``benchmarks/latency_placement.py``, docs/benchmarks.md). So, while few
tasks are out and none waits in the backlog, a thread in ``result()`` or
``exception()`` polls the reply queue itself for up to
``queues.SPIN_SECONDS`` and completes the Futures of what it takes:

* ``lock`` is held by whoever receives: by the collector for the whole of its
  blocking msgrcv, by a waiting thread while it polls (msgrcv with
  IPC_NOWAIT) and handles. Replies are handled one at a time, in the order
  they came.
* A waiting thread counts itself in ``callers``. The collector does not
  enter msgrcv while there is one, nor for ``LINGER`` seconds after the
  last (it polls the queue every ``POLL`` seconds meanwhile, for the replies
  nobody waits for in ``result()``). A waiting thread that finds the
  collector blocked in msgrcv sends it a message of type ``WAKE_MTYPE``:
  blocked there, the collector would be handed every reply by the kernel.
* A waiting thread handles only single RESULT messages of a task (a return
  value or an exception). Anything else it takes (output relayed from a
  task, a worker's death, a RESULT BATCH) it leaves to the collector (in
  ``inbox``, the handover), which handles it before it receives anything
  more, and it stops polling. It never refills the task queue.
* The done callbacks of the Futures it completes run after it has stopped
  polling and is no longer counted (``future.deferring_callbacks``), so that a
  callback may wait on another Future.
"""
from __future__ import annotations

import collections
import functools
import itertools
import os
import threading
import time
import traceback
from typing import Any

import sysv_ipc

from .. import queues
from ..future import DONE_STATES, MQFuture, deferring_callbacks
from ..protocol import (
    F_BATCH,
    F_SPILL,
    F_VALUES,
    HEADER_SIZE,
    MAGIC,
    RESULT_MTYPE,
    WAKE_MTYPE,
    WIRE_VERSION,
    Kind,
    Status,
)

__all__ = ["Receiver", "LINGER", "POLL"]

#: Seconds after the last waiting thread during which the collector stays out
#: of a blocking msgrcv (so that the next ``result()`` need not wake it).
LINGER = 0.02
#: Seconds between the collector's polls of the reply queue meanwhile.
POLL = 0.001
#: Replies a waiting thread takes before it lets the lock go.
_DRAIN = 64
#: The arguments of one call, for itertools.starmap.
_ONCE = ((),)
_RESULT = int(Kind.RESULT)
#: The statuses of a RESULT that a waiting thread completes a Future with.
_CALLER_STATUSES = frozenset((int(Status.OK), int(Status.RAISED), int(Status.BAD_TASK)))


class Receiver:
    """The receiving side of one pool, shared by its collector and the
    threads that wait in ``result()`` (see the module's docstring).

    Args:
        collector (collector.Collector): the pool's collector (not imported
            here: it makes this object); a waiting thread handles a reply
            with its ``handle_message``.
    """

    def __init__(self, collector: Any):
        self.collector = collector
        self.queue = collector.queue
        self.dispatch = collector.dispatch
        #: Held by whoever receives from the reply queue.
        self.lock = threading.Lock()
        #: Guards ``callers``, ``blocked``, ``wake_sent``; the collector waits
        #: on it while a thread polls.
        self.turn = threading.Condition(threading.Lock())
        self.callers = 0
        #: The collector is in (or about to enter) a blocking msgrcv.
        self.blocked = False
        #: A WAKE message is in the queue, not yet taken by the collector.
        self.wake_sent = False
        #: When the last waiting thread stopped polling (time.monotonic()).
        self.last_caller = -LINGER
        #: The collector has ended: nobody else may receive.
        self.closed = False
        #: threading.get_ident() of the collector thread (it never polls here).
        self.collector_ident: int | None = None
        #: ``(message, mtype)`` taken by a waiting thread: the one it handles
        #: (removed once handled), or those it left to the collector, in order
        #: (the handover; the collector handles them before anything else).
        self.inbox: collections.deque[tuple[bytes, int]] = collections.deque()
        self.receive_now = functools.partial(self.queue.receive, False, RESULT_MTYPE)

    # -- a thread waiting in result() -------------------------------------------------
    def poll(self, fut: MQFuture, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``fut`` to be done, taking replies off the
        reply queue and completing their Futures meanwhile (the calling thread
        does what the collector would). Returns False, at once, when this
        thread should wait as before instead: it is the collector; the pool
        has a backlog or more than two tasks per worker out; the collector
        has ended; a reply waits in the handover (``inbox``).

        Args:
            fut (MQFuture): the Future this thread waits for (a Future of
                this pool).
            seconds (float): the longest time to poll, in seconds
                (``queues.SPIN_SECONDS`` from ``MQFuture._wait``); the done
                callbacks run afterwards may take longer.

        Returns:
            bool: True when this thread polled (``fut`` may still be
            pending: the caller then sleeps until it is done).

        Raises:
            KeyboardInterrupt: a Ctrl-C in this thread while it polled or
                handled a reply. The reply is left to the collector, which
                handles it again, with its Future back in pending if it was
                taken out and not completed (:meth:`rescue`); the done
                callbacks of the Futures this thread completed run before it
                propagates. (An exception raised by unpickling a result fails
                that result's Future, as in the collector.)
        """
        dispatch = self.dispatch
        if (self.closed or self.inbox or dispatch.backlog
                or len(dispatch.pending) > 2 * dispatch.max_workers
                or threading.get_ident() == self.collector_ident):
            return False
        turn = self.turn
        deferred: list[MQFuture] = []
        stop = counted = False
        try:
            with turn:
                self.callers += 1
                counted = True  # no interrupt in between: no call
                wake = self.blocked and not self.wake_sent
                if wake:
                    self.wake_sent = True
            if wake:
                try:
                    self.queue.send(b"", block=False, type=WAKE_MTYPE)
                except (sysv_ipc.Error, OSError):
                    # a full queue: the collector is not blocked for long
                    self.wake_sent = False
            with deferring_callbacks(deferred):
                deadline = time.monotonic() + seconds
                lock = self.lock
                while fut._state not in DONE_STATES:
                    if lock.acquire(False):
                        try:
                            stop = self.take()
                        finally:
                            lock.release()
                        if stop or deferred or fut._state in DONE_STATES:
                            break
                    if time.monotonic() >= deadline or dispatch.backlog:
                        break
                    os.sched_yield()
        finally:
            try:
                if counted:
                    with turn:
                        self.callers -= 1
                        if fut._state in DONE_STATES and not stop:
                            self.last_caller = time.monotonic()
                        else:  # it goes to sleep, or left a reply: the collector's turn
                            self.last_caller = -LINGER
                            turn.notify()
            finally:
                for done in deferred:
                    done._invoke_callbacks()
        return True

    def take(self) -> bool:
        """Take replies off the queue and handle them (``lock`` held). Returns
        True when polling must stop: a reply was handed over, or the queue
        cannot be read (removed: the collector meets that too).

        A reply goes from msgrcv to ``inbox`` in C code (``deque.extend``
        over one call), where no KeyboardInterrupt can come in between, and
        leaves it once handled; one this thread may not handle stays there
        for the collector. See :meth:`rescue`."""
        if self.closed or self.inbox:
            return True
        collector = self.collector
        pending = self.dispatch.pending
        inbox = self.inbox
        receive = self.receive_now
        fut = None
        task_id = 0
        stop = False
        try:
            for _ in range(_DRAIN):
                try:
                    inbox.extend(itertools.starmap(receive, _ONCE))
                except sysv_ipc.BusyError:
                    break
                except (sysv_ipc.Error, OSError):
                    stop = True
                    break
                raw = inbox[0][0]
                if not _single_result(raw):
                    stop = True  # left in inbox: the collector's
                    break
                task_id = int.from_bytes(raw[8:16], "little")
                fut = pending.get(task_id)
                try:
                    n = collector.handle_message(raw)
                    if collector.observe is not None:
                        collector.observe(n, raw)
                except Exception:  # noqa: BLE001 - as the collector: it must go on
                    traceback.print_exc()
                inbox.popleft()
                fut = None
        except BaseException:
            self.rescue(task_id, fut)
            raise
        state = collector.state
        if state.flags.shutdown_requested and not pending:
            state.res.wake()  # the monitor waits for the last outcome to tear down
        return stop

    def rescue(self, task_id: int, fut: MQFuture | None) -> None:
        """This thread was interrupted (KeyboardInterrupt) while it took or
        handled a reply: leave what ``inbox`` holds to the collector, which
        handles it again, after putting back in pending the Future of
        ``task_id`` if it was taken out and not completed (one completed is
        not pending anymore: the collector leaves it alone)."""
        dispatch = self.dispatch
        if fut is not None:
            if fut._state not in DONE_STATES:
                if task_id not in dispatch.pending:
                    dispatch.pending[task_id] = fut
                    if fut._worker >= 0:  # as take() counted it
                        dispatch.finished[fut._worker] -= 1
            else:  # completed, maybe not all the way: wake result() again
                fut._wake_result_waiters()
                self.collector.journal.forget(self.collector.token, task_id)
        with self.turn:
            self.turn.notify()

    # -- the collector ------------------------------------------------------------------
    def collector_turn(self, found_nothing: bool) -> bool:
        """The collector's wait while threads poll (see the module). Returns
        True when it may block in msgrcv; False when it should take only what
        waits (the handover in ``inbox``, then msgrcv with IPC_NOWAIT).

        Args:
            found_nothing (bool): its last poll found the queue empty; it
                waits ``POLL`` seconds before the next (unless woken).
        """
        turn = self.turn
        with turn:
            if self.inbox:
                return False
            if not self.callers:
                if time.monotonic() - self.last_caller >= LINGER:
                    return True
                if not found_nothing:
                    return False
            # A poll every POLL seconds even while threads poll: should one be
            # interrupted where it could not count itself out, the replies
            # still come in (and the stop message at teardown).
            turn.wait(POLL)
            return False

    def enter_msgrcv(self) -> bool:
        """The collector, holding ``lock``, is about to block in msgrcv: True
        when it may (no thread polls, nothing handed over); ``blocked`` is set
        then, so that a thread that starts polling sends a WAKE message."""
        with self.turn:
            if self.callers or self.inbox:
                return False
            self.blocked = True
            return True

    def spin(self, seconds: float) -> tuple[bytes, int] | None:
        """The collector polls for a reply for up to ``seconds`` (a result is
        likely close), unless a thread starts polling: ``queues.spin_receive``."""
        if self.callers:
            return None
        return queues.spin_receive(self.queue, seconds=seconds, give_up=self.polled)

    def polled(self) -> bool:
        """Whether a thread polls the reply queue now."""
        return self.callers > 0

    def close(self) -> None:
        """The collector ends (``lock`` held): nobody receives anymore."""
        self.closed = True


def _single_result(raw: bytes) -> bool:
    """Whether ``raw`` is a RESULT of one task that a waiting thread may
    handle: a return value or an exception, inline (a spill file is
    unlinked as it is read: it could not be read again after an interrupt),
    not a batch, not a notice."""
    return (len(raw) >= HEADER_SIZE and raw[:2] == MAGIC and raw[2] == WIRE_VERSION
            and raw[3] == _RESULT and not raw[4] & (F_BATCH | F_VALUES | F_SPILL)
            and int.from_bytes(raw[6:8], "little") in _CALLER_STATUSES)

