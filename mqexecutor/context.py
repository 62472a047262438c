"""What code running in a task worker can ask about where it runs.

A leaf module (it imports nothing of mqexecutor): the worker loop sets these
values, and task code, :mod:`mqexecutor.external` and :mod:`mqexecutor.swoole`
read them without importing the worker.
"""
from __future__ import annotations

import os
import sys

__all__ = ["worker_id", "current_task_id", "report"]

#: Set by the worker process at start (``set_worker``); None outside a worker.
_worker_id: int | None = None
#: Set by the worker loop around each task; None between tasks.
_task_id: int | None = None


def worker_id() -> int | None:
    """Id (0..max_workers-1) of the task worker running the calling code.

    Returns None outside a task worker. Ids are stable: a worker replaced after
    ``max_tasks_per_child`` tasks or a crash keeps its id (Swoole's task worker id).
    """
    return _worker_id


def current_task_id() -> int | None:
    """``task_id`` of the task running in this worker, None outside a task."""
    return _task_id


def set_worker(wid: int | None) -> None:
    """Record which task worker this process is (the worker process, at start)."""
    global _worker_id
    _worker_id = wid


def set_task(task_id: int | None) -> None:
    """Record the task being run (the worker loop, around each task)."""
    global _task_id
    _task_id = task_id


def report(message: str) -> None:
    """Write one line about this worker on stderr (``mqexecutor worker <id>
    (pid <pid>): <message>``); never raises."""
    try:
        sys.stderr.write(f"mqexecutor worker {_worker_id} (pid {os.getpid()}): {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
