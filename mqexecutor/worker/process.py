"""A task worker process: set-up, then :class:`~mqexecutor.worker.loop.TaskWorker`.

A task worker is forked by the pool's manager process (:mod:`mqexecutor.manager`),
a process with a single thread, and runs :func:`run_worker` until it returns
its exit status.

Signals:

* STOP_SIGNAL (SIGUSR1), sent by the manager: finish the task being run, take
  no other one, exit 0. The manager repeats it until the worker exits (it may
  land just before msgrcv blocks). Helper threads start with it blocked, so
  the kernel delivers it to the main thread, whose msgrcv it interrupts.
* SIGINT is ignored: Ctrl-C is the owner's to handle.
* SIGTERM and SIGKILL kill at once (the manager reports the task that died).

A watchdog thread (``mqexecutor-manager-watch``) stops the worker when its
manager process dies, and removes the owner's queues and spill directory when
the owner is gone too.
"""
from __future__ import annotations

import faulthandler
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import sysv_ipc

from .. import context, persistence
from ..config import PoolConfig
from .loop import EXIT_INIT_FAILED, TaskWorker, request_stop

__all__ = ["run_worker", "STOP_SIGNAL", "EXIT_INIT_FAILED"]

#: The manager's request to stop after the current task.
STOP_SIGNAL = signal.SIGUSR1


def start_thread(target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
    """Start a daemon helper thread with STOP_SIGNAL blocked in it, so that the
    signal always reaches the main thread (blocked in msgrcv)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
    try:
        t = threading.Thread(target=target, name=name, args=args, daemon=True)
        t.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return t


def _watch_manager(manager_pid: int, main_ident: int) -> None:
    """Wait for the manager process to exit, then stop this worker."""
    try:
        fd = os.pidfd_open(manager_pid)
    except ProcessLookupError:
        fd = None
    except (AttributeError, OSError):  # old kernel: poll our parent
        fd = -1
    if fd is not None and fd >= 0:
        select.select([fd], [], [])
        os.close(fd)
    elif fd == -1:
        while os.getppid() == manager_pid:
            time.sleep(0.2)
    request_stop()
    while True:  # repeat: the signal may land just before msgrcv blocks
        try:
            signal.pthread_kill(main_ident, STOP_SIGNAL)
        except (ProcessLookupError, OSError):
            return
        time.sleep(0.05)


def run_worker(config: PoolConfig, wid: int, manager_pid: int) -> int:
    """Be task worker ``wid`` of the pool ``config`` until told to stop; returns
    the exit status: 0 after a stop request, ``max_tasks_per_child`` tasks or
    the removal of the task queue, ``EXIT_INIT_FAILED`` (3) when the
    initializer raised. Called in a process just forked by the manager
    (``manager_pid``)."""
    context.set_worker(wid)
    if config.spill_env:
        os.environ["MQEXECUTOR_SPILL_DIR"] = config.spill_env
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(STOP_SIGNAL, request_stop)
    try:
        faulthandler.enable()
    except (RuntimeError, ValueError, OSError):
        pass
    start_thread(_watch_manager, "mqexecutor-manager-watch", manager_pid,
                 threading.get_ident())
    try:
        worker = TaskWorker(config, wid, start_thread)
    except sysv_ipc.ExistentialError:
        return 0  # the pool was torn down before this worker started
    code = worker.run()
    if not persistence.pid_alive(manager_pid) and not persistence.pid_alive(config.owner_pid):
        # Owner and manager are both gone: nobody else will remove these.
        persistence.release_producer(config.owner_reply_key, config.owner_subdir,
                                     config.task_key if config.private_queue else None)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code
