"""Exceptions raised by mqexecutor.

All failures that ProcessPoolExecutor reports as ``BrokenProcessPool`` are
subclasses of :class:`concurrent.futures.process.BrokenProcessPool` here too, so
code written against ProcessPoolExecutor keeps catching them. Unlike there, most
of them fail one Future and leave the pool serving.
"""
from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "BrokenProcessPool", "BrokenMQPool", "TerminatedWorkerError", "TaskUnpicklingError",
    "ResultUnpicklingError", "RemoteTraceback", "QueueModeError", "TaskTimeoutError",
]


class BrokenMQPool(BrokenProcessPool):
    """The pool cannot run tasks any more (e.g. a worker's initializer raised).

    Raised by pending Futures and by every later ``submit``, as
    ProcessPoolExecutor's BrokenProcessPool.
    """


class TerminatedWorkerError(BrokenProcessPool):
    """The task worker running this task died (signal, ``os._exit``, OOM killer).

    Only this task's Future fails; the worker is replaced under the same id and
    the pool keeps serving (ProcessPoolExecutor breaks the whole pool instead).
    The name is loky's.

    Attributes:
        worker_id (int): id of the dead worker (0..max_workers-1).
        pid (int): its process id.
        exitcode (int | None): its exit status; negative for a signal, as in
            ``multiprocessing.Process.exitcode``.
        task_id (int): the task it was running.
        fn_name (str): qualified name of the task's function, when known.
    """

    def __init__(self, message: str, *, worker_id: int = -1, pid: int = 0,
                 exitcode: int | None = None, task_id: int = 0, fn_name: str = ""):
        super().__init__(message)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode
        self.task_id = task_id
        self.fn_name = fn_name

    def __reduce__(self):
        return (_rebuild_terminated, (self.args[0], self.worker_id, self.pid,
                                      self.exitcode, self.task_id, self.fn_name))


def _rebuild_terminated(message, worker_id, pid, exitcode, task_id, fn_name):
    return TerminatedWorkerError(message, worker_id=worker_id, pid=pid,
                                 exitcode=exitcode, task_id=task_id, fn_name=fn_name)


class TaskTimeoutError(TimeoutError):
    """The task ran longer than its time limit (``MQExecutor(task_timeout=)``,
    ``ex.with_options(timeout=)``): its worker was stopped (SIGTERM, then
    SIGKILL) and replaced under the same id. Retries do not apply.

    Attributes:
        task_id (int), fn_name (str): the task.
        limit (float): its time limit, seconds.
        worker_id (int), pid (int): the worker that was stopped.
    """

    def __init__(self, message: str, *, task_id: int = 0, fn_name: str = "",
                 limit: float = 0.0, worker_id: int = -1, pid: int = 0):
        super().__init__(message)
        self.task_id = task_id
        self.fn_name = fn_name
        self.limit = limit
        self.worker_id = worker_id
        self.pid = pid

    def __reduce__(self):
        return (_rebuild_timeout, (self.args[0], self.task_id, self.fn_name, self.limit,
                                   self.worker_id, self.pid))


def _rebuild_timeout(message, task_id, fn_name, limit, worker_id, pid):
    return TaskTimeoutError(message, task_id=task_id, fn_name=fn_name, limit=limit,
                            worker_id=worker_id, pid=pid)


class TaskUnpicklingError(BrokenProcessPool):
    """The worker could not unpickle this task's call (function or arguments).

    A subclass of BrokenProcessPool because ProcessPoolExecutor raises that in
    this case; here only this Future fails. ``__cause__`` holds the worker's error.
    """


class ResultUnpicklingError(BrokenProcessPool):
    """This process could not unpickle the task's result.

    A subclass of BrokenProcessPool because ProcessPoolExecutor raises that in
    this case; here only this Future fails. ``__cause__`` holds the error.
    """


class QueueModeError(ValueError):
    """A queue is used in a way its owner did not intend (e.g. ``submit_to`` on a
    preemptive pool)."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a task worker.

    Set as the ``__cause__`` of the exception that ``Future.result()`` raises,
    as ProcessPoolExecutor does.
    """

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
