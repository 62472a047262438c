"""Starting a pool's manager process from its owner, and talking to it.

How the manager process starts depends on ``mp_context`` (its start method):

* ``None`` or ``"fork"``: forked from the owner when the owner has exactly one
  thread (counted by the kernel: /proc/self/task), which makes fork() safe: no
  other thread can hold a lock the child would inherit locked. About 1 ms; the
  task workers then inherit the owner's modules, data and open files, as
  ProcessPoolExecutor's fork workers do. When the owner has other threads
  (a Jupyter kernel, a web server, another pool), as ``"forkserver"``.
* ``"forkserver"`` or ``"spawn"``: a fresh interpreter (``sys.executable``)
  given the owner's ``sys.path``; it imports mqexecutor (and cloudpickle) and
  forks the task workers itself, a process with one thread: what a forkserver
  does, one per pool. Tens of milliseconds.

Either way no process with more than one thread ever forks.

The manager process leads a process group of its own, which its workers
join: a signal to the owner's process group (Ctrl-C in a terminal, a Jupyter
kernel restart, which SIGKILLs the kernel's group) does not reach them, and
the manager, seeing its owner gone, stops the workers and removes the owner's
queues and spill directory (tasks of a private queue are stopped at once,
those of a queue with a key finish first).
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
from typing import Any

from .. import codec
from ..config import PoolConfig
from . import process
from .channel import Channel

__all__ = ["ManagerProcess", "start_method", "single_threaded"]

#: File descriptors of the owner's pool machinery (the owner's ends of live
#: managers' connections): a manager forked later closes them, so that a
#: pool's manager sees its owner's end close when the owner dies.
_OWNER_FDS: set[int] = set()


def single_threaded() -> bool:
    """Whether this process has exactly one thread, as the kernel counts them
    (threads of C libraries, e.g. a BLAS, included)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # no /proc: cannot tell, so not safe
        return False


def start_method(mp_context: Any) -> str:
    """``"fork"`` or ``"exec"``: how to start a manager now, for ``mp_context``
    (None, a ``multiprocessing`` context, or a start method name).

    Raises:
        ValueError: an unknown start method.
        TypeError: ``mp_context`` is neither None, a str, nor has
            ``get_start_method()``.
    """
    if mp_context is None:
        method = "fork"
    elif isinstance(mp_context, str):
        method = mp_context
    elif hasattr(mp_context, "get_start_method"):
        method = mp_context.get_start_method()
    else:
        raise TypeError(f"mp_context must be a multiprocessing context, a start method "
                        f"name or None, not {mp_context!r}")
    if method not in ("fork", "forkserver", "spawn"):
        raise ValueError(f"unknown start method {method!r}: use 'fork', 'forkserver' or "
                         "'spawn'")
    return "fork" if method == "fork" and single_threaded() else "exec"


def _pickle_for_child(config: PoolConfig) -> tuple[bytes, list[int]]:
    """The config for a fresh-interpreter manager (an initializer by value,
    with cloudpickle), and the file descriptors it needs (none). A
    multiprocessing Queue or Lock in ``initargs`` cannot go this way (as with
    ProcessPoolExecutor and spawn, pickling raises): a proxy of a
    ``multiprocessing.Manager()`` can (the manager gets the owner's authkey).

    Raises:
        What pickling the initializer or its arguments raises.
    """
    if config.initializer is None:
        return pickle.dumps(config, 5), []
    return codec.dumps_by_value(config), []


class ManagerProcess:
    """The owner's end of a pool's manager process.

    Args:
        config (PoolConfig): the pool.
        method (str): ``"fork"`` or ``"exec"`` (see :func:`start_method`).

    Raises:
        OSError: the process could not be started.
    """

    def __init__(self, config: PoolConfig, method: str):
        self.method = method
        self._send_lock = threading.Lock()
        self._popen: Any = None
        self.exitcode: int | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        data = b""
        try:
            if method == "fork":
                self.pid = self._fork(config, ours, theirs)
            else:
                data, fds = _pickle_for_child(config)
                self.pid = self._exec(theirs, fds)
        finally:
            theirs.close()
        self.conn = Channel(ours.detach())
        self._fd = self.conn.fileno()
        _OWNER_FDS.add(self._fd)
        if data:
            self.conn.send_bytes(data)

    @staticmethod
    def _fork(config: PoolConfig, ours: socket.socket, theirs: socket.socket) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:  # the manager process: never returns into the owner's code
            os.setpgid(0, 0)  # its own process group: see the module docstring
            ours.close()
            for fd in _OWNER_FDS:  # other pools' connections are not ours
                try:
                    os.close(fd)
                except OSError:
                    pass
            code = process.serve(config, Channel(theirs.detach()))
        except BaseException:  # noqa: BLE001
            import traceback
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        return 0  # not reached

    def _exec(self, theirs: socket.socket, fds: list[int]) -> int:
        import subprocess  # only this start method needs it
        fd = theirs.fileno()
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                "from mqexecutor.manager.process import main; main()")
        try:
            flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a private helper: do without it
            flags = []
        if not sys.executable:
            raise OSError("sys.executable is empty: cannot start the manager process")
        self._popen = subprocess.Popen([sys.executable, *flags, "-c", code, str(fd)],
                                       pass_fds=(fd, *fds), stdin=subprocess.DEVNULL,
                                       process_group=0)
        return self._popen.pid

    # -- messages ------------------------------------------------------------------
    def send(self, *message: Any) -> bool:
        """Send a command (thread-safe); False when the manager is gone."""
        with self._send_lock:
            try:
                self.conn.send(message)
                return True
            except (OSError, ValueError):
                return False

    def receive(self) -> list[tuple]:
        """The messages the manager sent that are waiting (does not block).

        Raises:
            EOFError: the manager's end closed (it exited).
        """
        out = [self.conn.recv()]  # called when readable: a message, or EOF
        while self.conn.poll():
            out.append(self.conn.recv())
        return out

    # -- ending ------------------------------------------------------------------------
    def join(self) -> int | None:
        """Reap the manager process (blocks until it exits); its exit code,
        negative for a signal, as ``multiprocessing.Process.exitcode``."""
        if self.exitcode is None:
            if self._popen is not None:
                self.exitcode = self._popen.wait()
            else:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self.exitcode = os.waitstatus_to_exitcode(status)
                except ChildProcessError:
                    self.exitcode = 0
        return self.exitcode

    def close(self) -> None:
        """Close the owner's end of the connection (idempotent)."""
        _OWNER_FDS.discard(self._fd)
        try:
            self.conn.close()
        except OSError:
            pass
