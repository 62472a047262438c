"""Tasks lost with a task worker killed between taking them and saying so.

A worker writes the task it takes into its scoreboard slot a few
microseconds after msgrcv hands it the message. A worker killed in between
(SIGKILL from outside, the OOM killer) takes the message with it, and the
manager process, finding its slot idle, reports no task: that task's Future
would wait forever, and ``shutdown(wait=True)`` with it.

So when the manager reports a worker that died by itself while its slot was
idle (``EXITED`` with ``unreported``), the owner looks for its tasks that are
RUNNING (sent) and yet neither in the kernel queue nor in any worker's slot:

1. it waits until every live worker runs a task or sleeps in msgrcv
   (:meth:`PoolState.wait_receiving`), so that no live worker is in that
   window with a task it took before step 2;
2. it takes every message of the pool's message types out of the kernel
   queue and puts them back in the same order, noting its own task ids
   (the dispatcher's lock held, so that it sends nothing meanwhile);
3. it reads the slots: a task running, or in a BATCH with a task running,
   is not lost.

Steps 1-3 run twice, and only a task found in both is lost: a worker back
in msgrcv after step 1 may take a task just before step 2 and mark its slot
just after step 3; by the second step 1 it has marked it, or it has finished
that task and sent its result.

A task left over either went with the dead worker, or it is done and its
result was sent before the slot went idle (a worker sends, then marks its
slot idle; the manager delivers a dead worker's outbox before clearing its
slot). The owner sends itself a WORKER_DIED notice with the cause LOST for
each, through its own reply queue: the collector reads it after any result
sent before, ignores it for a task that is done by then or was sent again
since (the notice carries how many times it had been sent), and otherwise
sends the task again when it still has its message (it never started), or
fails it with TerminatedWorkerError. Tasks that an ``attach()`` producer sent
to the pool are not looked for: that producer is not told of worker exits.

The dispatcher's lock is held while the messages are out of the queue, and
for at most ``PUT_BACK_PATIENCE`` seconds of a full queue while they go back
(another producer of a shared queue may fill the room); the rest go back in
order after it is released. Nothing is searched once the pool is torn down
or abandoned.
"""
from __future__ import annotations

import sys
import threading
from typing import Any

import sysv_ipc

from .. import queues
from ..future import RUNNING
from ..protocol import (
    RESULT_MTYPE,
    DeathCause,
    Kind,
    ProtocolError,
    Status,
    build,
    death_body,
    flatten,
    unpack_header,
)
from ..scoreboard import BUSY

__all__ = ["LostTasks", "RECEIVE_WAIT"]

#: Seconds to wait at most for every live worker to run a task or sleep in
#: msgrcv: before the search (step 1), and before ``shutdown(cancel_futures=
#: True)`` takes a new pool's tasks back.
RECEIVE_WAIT = 2.0
#: Seconds a message taken out of the queue may wait for room to go back
#: while the dispatcher's lock is held; then it goes back without the lock.
PUT_BACK_PATIENCE = 0.5


class LostTasks:
    """The search for lost tasks of one pool, run in a short-lived thread
    (``mqexecutor-lost-tasks``) after each unreported worker death; a death
    during a search runs it once more.

    Args:
        state (PoolState): the pool (its dispatcher, resources and workers).
    """

    def __init__(self, state: Any):
        self.state = state
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.again = False
        #: (worker id, pid, exit status) of the last unreported death.
        self.last = (-1, 0, 0)

    def worker_died(self, wid: int, pid: int, exitcode: int) -> None:
        """Worker ``wid`` (``pid``) died by itself with its slot idle: search."""
        with self.lock:
            self.last = (wid, pid, exitcode)
            if self.thread is not None:
                self.again = True
                return
            thread = threading.Thread(target=self._run, name="mqexecutor-lost-tasks",
                                      daemon=True)
            try:
                thread.start()
            except RuntimeError:  # at interpreter shutdown: nothing to wait for
                return
            self.thread = thread

    def _run(self) -> None:
        while True:
            try:
                self.search()
            except Exception as exc:  # noqa: BLE001 - a pool torn down meanwhile
                flags = self.state.flags
                if flags.broken is None and not flags.shutdown_requested:
                    sys.stderr.write(f"mqexecutor: looking for tasks lost with a dead worker "
                                     f"failed: {exc!r}\n")
            with self.lock:
                if not self.again:
                    self.thread = None
                    return
                self.again = False

    def search(self) -> list[int]:
        """Steps 1-3 of the module docstring; reports what is left over to
        the collector. Returns the task ids reported."""
        state = self.state
        dispatch = state.dispatch
        res = state.res
        board = res.board
        if board is None or res.task_queue is None or state.flags.broken is not None:
            return []
        with dispatch.lock:
            if not any(f._state == RUNNING for f in list(dispatch.pending.values())):
                return []
        # Twice: a worker that came back to msgrcv after step 1 may have taken
        # a task before step 2 and not yet marked its slot; by the second
        # look it has, or it has finished that task and sent its result.
        state.wait_receiving(RECEIVE_WAIT)
        first = self.unaccounted()
        if not first:
            return []
        state.wait_receiving(RECEIVE_WAIT)
        # the same task, not sent again in between
        seen = set(first)
        lost = [(t, n) for t, n in self.unaccounted() if (t, n) in seen]
        wid, pid, exitcode = self.last
        token = res.token

        def still_wanted() -> bool:
            return not res.closed and state.flags.broken is None
        for task_id, sends in lost:
            # the limit field of the body carries how many times the task had
            # been sent: the collector ignores a notice about an earlier send
            notice = build(Kind.RESULT, 0, Status.WORKER_DIED, task_id, token, 0, pid, wid,
                           death_body(wid, pid, exitcode, task_id, DeathCause.LOST, sends),
                           dispatch.authkey)
            if not queues.send_patiently(res.reply_queue, notice, RESULT_MTYPE,
                                         patience=None, still_wanted=still_wanted):
                break
        return [t for t, _ in lost]

    def unaccounted(self) -> list[tuple[int, int]]:
        """Steps 2-3: this producer's RUNNING tasks neither in the kernel
        queue, nor in a busy slot (nor in a BATCH with a task in one), nor
        waiting in the backlog to be sent again, as (task id, times sent).
        Nothing while the pool is torn down or abandoned."""
        state = self.state
        dispatch = state.dispatch
        res = state.res
        board = res.board
        token = res.token
        leftover: list[tuple[bytes, int]] = []
        with dispatch.lock:
            if res.closed or state.flags.abandon or board is None:
                return []
            queued, leftover = self.queued_task_ids()
            busy = set()
            for wid in range(board.nslots):
                slot = board.read(wid)
                if slot.state == BUSY and slot.token == token:
                    busy.add(slot.task_id)
            waiting = {id(it) for it in dispatch.backlog}
            lost = []
            # a copy: the collector takes finished tasks out without the lock
            for task_id, fut in list(dispatch.pending.items()):
                if (fut._state != RUNNING or task_id in queued or task_id in busy
                        or id(fut) in waiting):
                    continue
                batch = fut._batch
                if batch is not None and any(it.task_id in busy for it in batch):
                    continue
                lost.append((task_id, fut._attempts))
        self.put_back(leftover)
        return lost

    def put_back(self, messages: list[tuple[bytes, int]]) -> None:
        """Send back, in order and without the dispatcher's lock, the messages
        that did not go back within ``PUT_BACK_PATIENCE`` (another producer
        of a shared queue filled the room meanwhile)."""
        state = self.state
        for whole, mtype in messages:
            queues.send_patiently(state.res.task_queue, whole, mtype, patience=None,
                                  still_wanted=lambda: state.flags.broken is None)

    def queued_task_ids(self) -> tuple[set[int], list[tuple[bytes, int]]]:
        """The ids of this producer's tasks in the kernel queue: every message
        of the pool's types is taken out and put back, in the same order
        (caller holds the dispatcher's lock), and the messages that did not
        go back within ``PUT_BACK_PATIENCE`` seconds, to be sent (in order)
        once the lock is released: a producer sending into a shared queue can
        fill the room they left, and the lock must not wait on it."""
        dispatch = self.state.dispatch
        queue = self.state.res.task_queue
        token = self.state.res.token
        mtypes = dispatch.mtypes()
        taken: list[tuple[bytes, int]] = []
        try:
            for mtype in mtypes:
                while True:
                    try:
                        taken.append(queue.receive(block=False, type=mtype))
                    except sysv_ipc.BusyError:
                        break
        finally:
            leftover: list[tuple[bytes, int]] = []
            for k, (whole, mtype) in enumerate(taken):
                if not queues.send_patiently(queue, whole, mtype, patience=PUT_BACK_PATIENCE):
                    leftover = taken[k:]
                    break
        ids = set()
        for whole, _mtype in taken:
            for raw in flatten(whole):
                try:
                    h = unpack_header(raw)
                except ProtocolError:
                    continue
                if h.token == token:
                    ids.add(h.task_id)
        return ids, leftover
