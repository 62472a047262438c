"""PoolState: everything the threads of one executor share.

The dispatcher, the collector and the monitor reach the pool through it; none
of them holds the executor itself, so an executor that is garbage-collected
shuts down, as ProcessPoolExecutor does.
"""
from __future__ import annotations

import collections
import threading
from typing import Any

from ..manager.launch import ManagerProcess
from .dispatch import Dispatcher
from .pool import PoolFlags, Resources, WorkerProcess

__all__ = ["PoolState"]


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
        #: Logging records and printed text workers dropped (relay.BUFFER full).
        self.relay_dropped = 0
        self.collector: threading.Thread | None = None
        self.monitor: threading.Thread | None = None

    def request_shutdown(self, cancel_futures: bool = False, abandon: bool = False) -> None:
        """Stop accepting tasks; the monitor tears down once nothing is pending
        (at once with ``abandon``)."""
        with self.dispatch.lock:
            self.flags.shutdown_requested = True
            if abandon:
                self.flags.abandon = True
        if cancel_futures:
            self.dispatch.cancel_backlog()
            self.dispatch.withdraw_queued()
        self.res.wake()

    def break_pool(self, message: str) -> None:
        """Fail every pending Future with BrokenMQPool; later submits raise it."""
        with self.dispatch.lock:
            if self.flags.broken is None:
                self.flags.broken = message
        self.dispatch.fail_all(message)
        self.res.wake()
