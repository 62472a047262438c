"""What one pool's producer side owns: its kernel resources and files, its
flags, its view of the workers, and the registry of this process's live pools
(for interpreter exit)."""
from __future__ import annotations

import os
import random
import threading
import weakref
from typing import Any

import sysv_ipc

from .. import journal, persistence, queues, spill
from ..limits import msgmax
from ..protocol import HEADER_SIZE, TAG_SIZE, WIRE_VERSION
from ..scoreboard import Scoreboard

__all__ = ["Resources", "PoolFlags", "WorkerProcess", "live_pools", "register",
           "interpreter_exiting"]

_RNG = random.SystemRandom()


class PoolFlags:
    """Where a pool is in its life (loky's ``_ExecutorFlags``).

    Attributes:
        shutdown_requested (bool): ``shutdown()`` was called.
        abandon (bool): stop the workers now and leave queued tasks in the
            queue (explicit key, ``shutdown(wait=False)`` or ``keep_queued``).
        terminating (bool): ``terminate_workers()``/``kill_workers()``.
        broken (str | None): why the pool cannot be used any more.
    """

    __slots__ = ("shutdown_requested", "abandon", "terminating", "broken")

    def __init__(self) -> None:
        self.shutdown_requested = False
        self.abandon = False
        self.terminating = False
        self.broken: str | None = None


class Resources:
    """The kernel queues and files of one producer, made in the constructor.

    Args:
        key (int | None): the task queue's key; None for a private queue.
        queue_mode (int): permission bits of a queue made here.
        attach (bool): the pool is served elsewhere (no scoreboard here).
        max_workers (int), mode (int): recorded in meta.json.
        authkey (bytes | None): shortens the largest inline body by its tag.
        durable (bool | str): the spool directory of a journal (see
            :mod:`mqexecutor.journal`), or True for the default one.

    Raises:
        sysv_ipc.ExistentialError, sysv_ipc.PermissionsError: as
            :func:`mqexecutor.queues.open_queue` for an explicit key.
        OSError: no free key, or a file that cannot be made.
    """

    def __init__(self, *, key: int | None, queue_mode: int, attach: bool, max_workers: int,
                 mode: int, authkey: bytes | None, durable: bool | str):
        self.pid = os.getpid()
        self.token = _RNG.getrandbits(64) or 1
        self.explicit_key = key is not None
        self.tag = TAG_SIZE if authkey else 0
        self.subdir = spill.producer_subdir(self.pid, self.token)
        self.task_subdir = spill.key_subdir(key) if key is not None else self.subdir
        self.closed = False
        # Set below before any use; None only if construction failed.
        self.task_queue: sysv_ipc.MessageQueue = None  # type: ignore[assignment]
        self.reply_queue: sysv_ipc.MessageQueue = None  # type: ignore[assignment]
        self.board: Scoreboard | None = None
        self.journal: journal.Journal | journal.NullJournal = journal.NULL_JOURNAL
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.inline_max = 0
        try:
            if key is not None:
                self.task_queue = queues.open_queue(key, create=not attach, mode=queue_mode)
            # The keys of the queues made here are named in meta.json before
            # they are made: a process killed in between leaves nothing `gc`
            # cannot tie to a dead owner (it checks the queue's ctime).
            reply_key = queues.random_key()
            task_key = key if key is not None else queues.random_key()
            meta = (key, mode, attach, max_workers)
            self.write_meta(*meta, task_key, reply_key)
            self.reply_queue = queues.create_private(key=reply_key)
            if key is None:
                self.task_queue = queues.create_private(queue_mode, key=task_key)
            if (self.reply_queue.key, self.task_queue.key) != (reply_key, task_key):
                self.write_meta(*meta)  # a key was taken
            self.fit_to_queue()
            # Root 0's sub-directory holds meta.json (made above), the
            # scoreboard and the outboxes; spill files make theirs as needed.
            if durable:
                self.journal = journal.Journal(
                    durable if isinstance(durable, str)
                    else journal.default_spool(key))  # type: ignore[arg-type]  # key set
            if not attach:
                self.board = Scoreboard(os.path.join(self.board_dir, "scoreboard"),
                                        max_workers, create=True)
        except BaseException:
            self.release()
            raise

    @property
    def board_dir(self) -> str:
        """The directory of the scoreboard and the outbox files."""
        return os.path.join(spill.root_dir(0), self.subdir)

    def write_meta(self, key: int | None, mode: int, attach: bool, max_workers: int,
                   task_key: int | None = None, reply_key: int | None = None) -> None:
        """Record this producer in meta.json (see :mod:`mqexecutor.persistence`):
        its queues, or the keys they are about to be made under."""
        persistence.write_meta(self.subdir, persistence.QueueMeta(
            key=self.task_queue.key if task_key is None else task_key, mode=int(mode),
            workers=0 if attach else max_workers, wire=WIRE_VERSION, owner_pid=self.pid,
            owner_token=self.token,
            reply_key=self.reply_queue.key if reply_key is None else reply_key,
            private=key is None))

    def fit_to_queue(self) -> None:
        """Largest body that fits one message: msgmax, or the queue's capacity
        when that is smaller (a message larger than msg_qbytes never fits)."""
        limit = msgmax()
        try:
            limit = min(limit, self.task_queue.max_size)
        except (sysv_ipc.Error, AttributeError):
            pass
        self.inline_max = limit - HEADER_SIZE - self.tag

    def wake(self) -> None:
        """Wake the monitor thread (a byte in its pipe)."""
        fd = self.wake_w
        if fd < 0:
            return  # released
        try:
            os.write(fd, b"\0")
        except OSError:  # full (already woken) or closed
            pass

    def drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass

    def task_queue_exists(self) -> bool:
        try:
            _ = self.task_queue.current_messages
            return True
        except sysv_ipc.ExistentialError:
            return False
        except (sysv_ipc.Error, OSError):
            return True

    def release(self) -> None:
        """Remove the reply queue, a private task queue and this producer's spill
        directory; close the wake-up pipe. Idempotent."""
        if self.closed:
            return
        self.closed = True
        queues.remove_quietly(self.reply_queue)
        if not self.explicit_key:
            queues.remove_quietly(self.task_queue)
        if self.board is not None:
            self.board.close()
        spill.remove_subdir(self.subdir)
        if not self.explicit_key and self.task_queue is not None:
            spill.remove_subdir(spill.key_subdir(self.task_queue.key))
        fds = (self.wake_r, self.wake_w)
        # -1 first: a late wake() must not write into a file that reuses the number
        self.wake_r = self.wake_w = -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class WorkerProcess:
    """A task worker as its owner sees it (the values of
    ``MQExecutor._processes``, as ProcessPoolExecutor's Process objects): the
    manager process forked it and reports when it exits.

    Attributes:
        worker_id (int), pid (int), name (str).
        exitcode (int | None): None while it runs; negative for a signal.
    """

    def __init__(self, worker_id: int, pid: int):
        self.worker_id = worker_id
        self.pid = pid
        self.name = f"mqexecutor-worker-{worker_id}"
        self.exitcode: int | None = None
        self._exited = threading.Event()

    def _set_exit(self, exitcode: int) -> None:
        self.exitcode = exitcode
        self._exited.set()

    def is_alive(self) -> bool:
        """True until the manager reported its exit (and while its pid lives)."""
        return self.exitcode is None and persistence.pid_alive(self.pid)

    def join(self, timeout: float | None = None) -> None:
        """Wait until it exited (at most ``timeout`` seconds)."""
        self._exited.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM it (the pool reports its task and replaces it)."""
        self._signal(15)

    def kill(self) -> None:
        """SIGKILL it (the pool reports its task and replaces it)."""
        self._signal(9)

    def _signal(self, signum: int) -> None:
        if self.exitcode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def __repr__(self) -> str:
        state = "alive" if self.exitcode is None else f"exitcode={self.exitcode}"
        return f"<WorkerProcess {self.name} pid={self.pid} {state}>"


# All live pools of this process (PoolState objects), for interpreter exit.
# Children created by fork must not act on their parent's pools.
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_exiting = False


def live_pools() -> list[Any]:
    """The live pools made by this process."""
    pid = os.getpid()
    return [s for s in list(_live) if s.pid == pid]


def register(state: Any) -> None:
    """Add a pool to :func:`live_pools`."""
    _live.add(state)


def interpreter_exiting() -> bool:
    """Whether the interpreter is shutting down (new tasks are refused)."""
    return _exiting


def _python_exit() -> None:
    global _exiting
    _exiting = True
    pools = live_pools()
    for state in pools:
        state.request_shutdown()
    for state in pools:
        if state.monitor is not None and state.monitor.ident is not None:
            state.monitor.join()


def _after_fork_in_child() -> None:
    _live.clear()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
os.register_at_fork(after_in_child=_after_fork_in_child)
