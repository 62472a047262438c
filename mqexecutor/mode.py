"""Mode: how tasks reach task workers (Swoole's ``task_ipc_mode``)."""
from __future__ import annotations

import enum

__all__ = ["Mode"]


class Mode(enum.IntEnum):
    """How tasks reach task workers, named after Swoole's ``task_ipc_mode``.

    * ``TARGETED`` (2): each worker receives only messages of type worker id + 1;
      ``submit_to`` picks the worker, ``submit`` the least loaded one.
    * ``PREEMPTIVE`` (3): all workers compete for every message (msgrcv type 0).
    """

    TARGETED = 2
    PREEMPTIVE = 3
