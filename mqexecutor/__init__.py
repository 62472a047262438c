"""mqexecutor: a process pool fed by a System V message queue.

``MQExecutor`` is a drop-in ``concurrent.futures.ProcessPoolExecutor`` whose task
workers read a Linux System V message queue, with cloudpickle so lambdas and
notebook functions run, Swoole's targeted and preemptive modes, payloads of any
size through spill files, and queues that can outlive the executor.

The path of one task (details in docs/architecture.md)::

  caller thread                 kernel                      task worker i
  -------------                 ------                      -------------
  submit(fn, *args)
    cloudpickle (fn,args,kw) --(> msgmax - 40? spill file, 0600)
    header + body
    msgsnd(task queue, IPC_NOWAIT) --> [task queue: key, mtype] --> msgrcv(mtype)
      full? -> backlog (deque);                                    scoreboard[i] = task
               refilled by the                                     unpickle, run fn
               collector / manager                                 pickle outcome
    returns MQFuture (RUNNING once                                   |
    in the kernel queue)                                             v
                                       [reply queue: private] <-- msgsnd(reply key)
  collector thread  <-- msgrcv ------------'
    unpickle outcome -> Future.set_result / set_exception
  manager thread: worker sentinels -> fail the dead worker's task, respawn same id

Results never travel on the task queue, and the reply queue is always being
drained by the collector, so a full task queue cannot deadlock the pool.
"""
from __future__ import annotations

from .errors import (
                     BrokenMQPool,
                     BrokenProcessPool,
                     QueueModeError,
                     RemoteTraceback,
                     ResultUnpicklingError,
                     TaskUnpicklingError,
                     TerminatedWorkerError,
)
from .executor import (
                     CapacityWarning,
                     MQExecutor,
                     MQFuture,
                     Mode,
                     PoolStats,
                     StrandedTask,
                     TaskOptions,
)
from .limits import msgmax, msgmnb
from .persistence import remove_queue
from .progress import progress, progress_map
from .queues import ftok
from .worker import current_task_id, worker_id

__version__ = "0.1.0"

__all__ = [
    "MQExecutor", "MQFuture", "Mode", "ftok", "worker_id", "current_task_id",
    "PoolStats", "StrandedTask", "TaskOptions", "CapacityWarning", "remove_queue",
    "BrokenMQPool", "BrokenProcessPool", "TerminatedWorkerError", "TaskUnpicklingError",
    "ResultUnpicklingError", "QueueModeError", "RemoteTraceback", "msgmax", "msgmnb",
    "progress", "progress_map", "__version__",
]
