"""mqexecutor: a process pool fed by a System V message queue.

``MQExecutor`` is a drop-in ``concurrent.futures.ProcessPoolExecutor`` whose task
workers read a Linux System V message queue, with cloudpickle so lambdas and
notebook functions run, Swoole's targeted and preemptive modes, payloads of any
size through spill files, and queues that can outlive the executor.

Its processes (details in docs/architecture.md)::

  your process (the owner)            manager process          task workers
  ------------------------            ---------------          ------------
  submit(fn, *args)                   one thread: forks,  -->  msgrcv(task queue)
    pickle (cloudpickle if needed)    reaps and replaces       run fn, pickle outcome
    msgsnd(task queue) or backlog     the task workers         msgsnd(reply queue)
  collector thread <-- msgrcv(reply queue) <---------------------------'
    outcome -> MQFuture
  monitor thread <-- manager's reports (started, exited, broken); teardown

Results never travel on the task queue, and the reply queue is always being
drained by the collector, so a full task queue cannot deadlock the pool.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public names, and the module each comes from. They are imported on first
#: use (PEP 562), so that a manager process, which imports only
#: ``mqexecutor.manager``, starts without the producer's modules.
_EXPORTS = {
    "MQExecutor": "executor", "MQFuture": "future", "Mode": "mode", "PoolStats": "producer.state",
    "StrandedTask": "producer.adoption", "TaskOptions": "options",
    "CapacityWarning": "options", "ftok": "queues", "worker_id": "context",
    "current_task_id": "context", "remove_queue": "persistence", "msgmax": "limits",
    "msgmnb": "limits", "progress": "progress", "progress_map": "progress",
    "BrokenMQPool": "errors", "BrokenProcessPool": "errors",
    "TerminatedWorkerError": "errors", "TaskUnpicklingError": "errors",
    "ResultUnpicklingError": "errors", "QueueModeError": "errors",
    "RemoteTraceback": "errors", "TaskTimeoutError": "errors",
}

__all__ = [
    "MQExecutor", "MQFuture", "Mode", "PoolStats", "StrandedTask", "TaskOptions",
    "CapacityWarning", "ftok", "worker_id", "current_task_id", "remove_queue", "msgmax",
    "msgmnb", "progress", "progress_map", "BrokenMQPool", "BrokenProcessPool",
    "TerminatedWorkerError", "TaskUnpicklingError", "ResultUnpicklingError",
    "QueueModeError", "RemoteTraceback", "TaskTimeoutError", "__version__",
]

if TYPE_CHECKING:
    from .context import current_task_id, worker_id
    from .errors import (
        BrokenMQPool,
        BrokenProcessPool,
        QueueModeError,
        RemoteTraceback,
        ResultUnpicklingError,
        TaskTimeoutError,
        TaskUnpicklingError,
        TerminatedWorkerError,
    )
    from .executor import MQExecutor
    from .future import MQFuture
    from .limits import msgmax, msgmnb
    from .mode import Mode
    from .options import CapacityWarning, TaskOptions
    from .persistence import remove_queue
    from .producer.adoption import StrandedTask
    from .producer.state import PoolStats
    from .progress import progress, progress_map
    from .queues import ftok


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mqexecutor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
