"""Checks of MQExecutor's arguments: each raises an error that names the
argument and what was wrong with it, before anything is made."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sysv_ipc

from . import ipcinfo, persistence, queues, spill
from .errors import QueueModeError
from .future import MQFuture
from .mode import Mode
from .protocol import MAX_TIMEOUT

__all__ = ["check_key_mode", "check_authkey", "check_retries", "check_capacity",
           "check_timeout", "check_max_memory",
           "check_max_workers", "check_max_tasks_per_child", "check_batch_size",
           "check_no_live_owner", "set_capacity", "cpu_count", "CapacityWarning", "TaskOptions"]


class CapacityWarning(RuntimeWarning):
    """The kernel refused the queue capacity (``msg_qbytes``) asked for."""


def cpu_count() -> int:
    """CPUs this process may use (``os.process_cpu_count`` on 3.13+)."""
    counter = getattr(os, "process_cpu_count", None)
    if counter is not None:
        return counter() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_key_mode(key: Any, mode: Any) -> tuple[int | None, Mode]:
    """The checked key (None, or a key_t) and Mode.

    Raises:
        TypeError: ``key`` is not an int or None.
        ValueError: ``key`` is 0 (IPC_PRIVATE) or out of range; an unknown mode.
    """
    if key is not None:
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"key must be an int SysV key or None, not {key!r}")
        key = queues.parse_key(key)
        if key == 0:
            raise ValueError("key 0 is IPC_PRIVATE; pass key=None for a private queue")
    try:
        mode = Mode(mode)
    except ValueError:
        raise ValueError(f"mode must be Mode.TARGETED (2) or Mode.PREEMPTIVE (3), "
                         f"not {mode!r}") from None
    return key, mode


def check_max_workers(max_workers: Any) -> int:
    """``max_workers``, or the CPUs this process may use when None.

    Raises:
        TypeError: not an int. ValueError: <= 0 (as ProcessPoolExecutor).
    """
    if max_workers is None:
        return cpu_count()
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int, not {max_workers!r}")
    if max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    return max_workers


def check_timeout(seconds: Any, name: str = "timeout") -> float | None:
    """A time limit: None, or a number of seconds in (0, protocol.MAX_TIMEOUT].

    Raises:
        TypeError: not a number. ValueError: not > 0, or too large.
    """
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {seconds!r}")
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"{name} must be > 0 and <= {MAX_TIMEOUT:.0f} seconds, "
                         f"not {seconds!r}")
    return float(seconds)


def check_max_memory(nbytes: Any) -> int | None:
    """``max_memory_per_child``: None or a number of bytes >= 1 MiB.

    Raises:
        TypeError: not an int. ValueError: under 1 MiB (a worker needs more).
    """
    if nbytes is None:
        return None
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"max_memory_per_child must be an int number of bytes, "
                        f"not {nbytes!r}")
    if nbytes < 2**20:
        raise ValueError(f"max_memory_per_child must be at least 1 MiB (bytes), not {nbytes}")
    return nbytes


def check_max_tasks_per_child(n: Any) -> int | None:
    """Raises TypeError (not an int) or ValueError (< 1), as ProcessPoolExecutor."""
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError("max_tasks_per_child must be an integer")
        if n <= 0:
            raise ValueError("max_tasks_per_child must be >= 1")
    return n


def check_authkey(authkey: Any) -> bytes | None:
    """Raises TypeError (str, not bytes-like) or ValueError (under 16 bytes)."""
    if authkey is None:
        return None
    if isinstance(authkey, str):
        raise TypeError("authkey must be bytes (e.g. os.urandom(32)), not str")
    try:
        authkey = bytes(authkey)
    except TypeError:
        raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}") from None
    if len(authkey) < 16:
        raise ValueError(f"authkey must be at least 16 bytes, not {len(authkey)}")
    return authkey


def check_retries(retries: Any) -> int:
    """Raises TypeError (not an int) or ValueError (< 0)."""
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int, not {retries!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, not {retries}")
    return retries


def check_capacity(capacity: Any) -> None:
    """Raises TypeError (not an int number of bytes) or ValueError (<= 0)."""
    if capacity is None:
        return
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int number of bytes, not {capacity!r}")
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0 bytes, not {capacity}")


def check_batch_size(batch_size: Any) -> int | None:
    """Raises ValueError unless None or an int >= 1."""
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None (adaptive) or an int >= 1, "
                         f"not {batch_size!r}")
    return batch_size


def set_capacity(queue: sysv_ipc.MessageQueue, capacity: int) -> None:
    """Ask the kernel for ``capacity`` bytes of msg_qbytes; warn
    (CapacityWarning) when it refuses."""
    try:
        if queue.max_size != capacity:
            queue.max_size = capacity
        return
    except (sysv_ipc.PermissionsError, OSError, ValueError) as exc:
        reason = exc
    warnings.warn(
        f"mqexecutor: the kernel refused capacity={capacity} bytes for the queue of key "
        f"0x{queue.key & 0xFFFFFFFF:08x} ({reason}; raising msg_qbytes above "
        f"kernel.msgmnb needs CAP_SYS_RESOURCE). The limit in force is "
        f"{queue.max_size} bytes; tasks beyond it wait in this process.",
        CapacityWarning, stacklevel=4)


def check_no_live_owner(key: int, mode: Mode, live: list) -> None:
    """Refuse a key served in the other mode by a live pool: one of ``live``
    (this process's pools) or another process (its meta.json).

    Raises:
        QueueModeError: it is.
    """
    for state in live:
        if (not state.res.closed and not state.attach and state.res.explicit_key
                and state.res.task_queue is not None and state.res.task_queue.key == key
                and state.dispatch.targeted != (mode == Mode.TARGETED)):
            theirs = Mode.TARGETED if state.dispatch.targeted else Mode.PREEMPTIVE
            raise QueueModeError(
                f"key 0x{key & 0xFFFFFFFF:08x} is served by a {theirs.name} pool of "
                f"this process; this executor asked for {mode.name}")
    meta = persistence.read_meta(spill.key_subdir(key))
    if (meta is not None and meta.mode != int(mode) and meta.owner_pid != os.getpid()
            and persistence.pid_alive(meta.owner_pid)
            and ipcinfo.queue_info(key) is not None):
        raise QueueModeError(
            f"key 0x{key & 0xFFFFFFFF:08x} is served by pid {meta.owner_pid} in "
            f"{Mode(meta.mode).name} mode; this executor asked for {mode.name}")


class TaskOptions:
    """Per-task options bound to an executor (``MQExecutor.with_options``).

    Attributes:
        retries (int | None): runs after a worker death (None: the executor's).
        timeout (float | None): time limit of each task, seconds (None: the
            executor's ``task_timeout``).
    """

    def __init__(self, executor: Any, *, retries: int | None = None,
                 timeout: float | None = None):
        self._executor = executor
        self.retries = retries
        self.timeout = timeout

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> MQFuture:
        """As ``MQExecutor.submit``, with these options."""
        return self._executor._state.dispatch.submit(fn, args, kwargs, None, self.retries,
                                                     self.timeout)

    def submit_to(self, worker_id: int, fn: Callable, /, *args: Any, **kwargs: Any
                  ) -> MQFuture:
        """As ``MQExecutor.submit_to``, with these options."""
        ex = self._executor
        ex._check_target(worker_id)
        return ex._state.dispatch.submit(fn, args, kwargs, worker_id, self.retries,
                                         self.timeout)

    def map(self, fn: Callable, *iterables: Iterable, **kw: Any) -> Iterator:
        """As ``MQExecutor.map``, with these options."""
        return self._executor.map(fn, *iterables, _options=self, **kw)
