"""PoolState: everything the threads of one executor share.

The dispatcher, the collector and the monitor reach the pool through it; none
of them holds the executor itself, so an executor that is garbage-collected
shuts down, as ProcessPoolExecutor does.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, NamedTuple

from ..manager.launch import ManagerProcess
from ..scoreboard import BUSY
from .dispatch import Dispatcher
from .pool import PoolFlags, Resources, WorkerProcess
from .recovery import RECEIVE_WAIT, LostTasks

__all__ = ["PoolState", "PoolStats"]

#: Seconds ``shutdown(cancel_futures=True)`` waits for a new pool's workers to
#: start before it takes its tasks back from the kernel queue.
READY_WAIT = 10.0
#: Looks (2 ms apart) at a sleeping worker whose wchan the kernel hides before
#: it is taken to be in msgrcv.
UNKNOWN_WCHAN_LOOKS = 25


class PoolState:
    """Everything the threads of one executor share. Holds no reference to
    the executor.

    Attributes:
        config (PoolConfig): the pool (``None`` for an attached producer).
        res (Resources), flags (PoolFlags), dispatch (Dispatcher).
        manager (ManagerProcess | None): the manager process (not for attach()).
        processes (dict): worker id -> :class:`WorkerProcess`, as the manager
            reports them.
        collector, monitor (threading.Thread | None): the pool's threads.
    """

    def __init__(self, config: Any, res: Resources, dispatch: Dispatcher, flags: PoolFlags,
                 attach: bool):
        self.config = config
        self.res = res
        self.dispatch = dispatch
        self.flags = flags
        self.attach = attach
        self.pid = res.pid
        self.manager: ManagerProcess | None = None
        self.processes: dict[int, WorkerProcess] = {}
        #: Worker exits by cause (manager.process.CAUSES), as the manager reports them.
        self.exits: collections.Counter[str] = collections.Counter()
        #: Set once the manager started the workers (or the pool broke first).
        self.ready = threading.Event()
        #: Logging records and printed text workers dropped (relay.BUFFER full).
        self.relay_dropped = 0
        self.collector: threading.Thread | None = None
        self.monitor: threading.Thread | None = None
        #: The search for tasks lost with a worker (producer/recovery.py).
        self.lost_tasks = LostTasks(self)

    def request_shutdown(self, cancel_futures: bool = False, abandon: bool = False) -> None:
        """Stop accepting tasks; the monitor tears down once nothing is pending
        (at once with ``abandon``)."""
        with self.dispatch.lock:
            self.flags.shutdown_requested = True
            if abandon:
                self.flags.abandon = True
        if cancel_futures:
            self.dispatch.cancel_backlog()
            # Tasks the workers take meanwhile run, as those in
            # ProcessPoolExecutor's call queue do: wait until they can.
            self.ready.wait(READY_WAIT)
            self.wait_receiving(RECEIVE_WAIT)
            self.dispatch.withdraw_queued()
        self.res.wake()

    def wait_receiving(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until every live worker of this pool
        runs a task (scoreboard) or waits in msgrcv (``/proc/PID/wchan``), so
        that a pool just started gives its workers their first tasks before
        ``shutdown(cancel_futures=True)`` takes the rest back, as
        ProcessPoolExecutor's call queue keeps the tasks it holds. Returns at
        once where wchan cannot be read."""
        board = self.res.board
        if board is None or self.flags.broken is not None:
            return
        deadline = time.monotonic() + timeout
        waiting = dict(self.processes)
        unknown: dict[int, int] = {}
        while waiting and time.monotonic() < deadline:
            for wid, proc in list(waiting.items()):
                if proc.exitcode is not None or board.read(wid).state == BUSY:
                    del waiting[wid]
                    continue
                seen = _receiving(proc.pid)
                if seen is None:  # sleeping, wchan hidden: after a while, believe it
                    unknown[wid] = unknown.get(wid, 0) + 1
                    seen = unknown[wid] >= UNKNOWN_WCHAN_LOOKS
                else:
                    unknown.pop(wid, None)
                if seen:
                    del waiting[wid]
            if waiting:
                time.sleep(0.002)

    def break_pool(self, message: str) -> None:
        """Fail every pending Future with BrokenMQPool; later submits raise it."""
        with self.dispatch.lock:
            if self.flags.broken is None:
                self.flags.broken = message
        self.dispatch.fail_all(message)
        self.ready.set()
        self.res.wake()


def _receiving(pid: int) -> bool | None:
    """Whether process ``pid`` sleeps in msgrcv, as /proc tells: its wchan
    while it sleeps. True when it is gone; None when it sleeps and the kernel
    hides wchan (``"0"``), or it woke up between the two reads (a process
    running shows ``"0"`` too, so a ``"0"`` counts only between two reads
    that find it sleeping)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            before = f.read().rpartition(b")")[2].split()[0]
        if before != b"S":
            return False
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
        if wchan == "do_msgrcv":
            return True
        if wchan not in ("0", ""):
            return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            after = f.read().rpartition(b")")[2].split()[0]
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return None
    return None if after == b"S" else False


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
        workers (int): live worker processes of this executor's pool.
        inherited (int): tasks found in the queue when it attached.
        rejected (int): messages its workers set aside as dead letters.
        recycles (dict[str, int]): workers replaced, by cause: ``"max_tasks"``
            (max_tasks_per_child), ``"memory"`` (max_memory_per_child),
            ``"timeout"`` (a time limit), ``"terminate"`` (MQFuture.terminate),
            ``"died"`` (a crash, a signal, the OOM killer).
        relay_dropped (int): logging records and printed text the workers
            dropped because more than ``relay.BUFFER`` waited to be sent.
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
    recycles: dict | None = None
    relay_dropped: int = 0
