"""The manager process: forks the task workers, watches them, replaces them.

As Swoole's manager process (master, manager, task workers), one process per
pool, with a single thread, so that forking a task worker is safe (no lock of
another thread can be held in the child). It is started by the pool's owner
(:mod:`mqexecutor.manager.launch`) and:

* forks ``max_workers`` task workers, then one again under the same worker id
  for each that exits (a crash, ``max_tasks_per_child``), unless the pool is
  stopping;
* when a worker exits: delivers the results still in its outbox file, reads
  its scoreboard slot and, if it died running a task, sends a WORKER_DIED
  notice to that task's producer (behind the results, so a task that
  completed is never reported dead);
* tells its owner over the control connection when workers start and exit,
  and when the pool cannot go on (the task queue removed, a fork that fails);
* stops the workers when its owner asks (``STOP``), signals them
  (``SIGNAL``: terminate_workers, kill_workers), and when its owner dies: then
  it also removes what the owner would have removed (the tasks of a private
  queue are stopped at once, those of a queue with a key finish first);
* stops the worker running a task past its time limit, or a task its owner
  terminated (SIGTERM, then SIGKILL after ``KILL_GRACE`` seconds), and reports
  that cause with the death;
* reclaims the leftovers of dead producers once, shortly after start, when
  asked (the first pool of a process).

Control messages (tuples over a :class:`~mqexecutor.manager.channel.Channel`),
owner to manager: ``(STOP,)``, ``(SIGNAL, signum)``, ``(WATCH,)`` (watch time
limits from now on), ``(TERMINATE, token, task_id)``; manager to owner:
``(READY,)``, ``(STARTED, wid, pid)``, ``(EXITED, wid, pid, exitcode, cause,
unreported)`` (cause: one of ``CAUSES``; unreported: it died by itself while
its slot was idle, so it may have taken a task it did not say, see
producer/recovery.py), ``(BROKEN, reason)``, ``(STOPPED,)``.
"""
from __future__ import annotations

import gc
import os
import select
import signal
import sys
import time
from typing import Any

import sysv_ipc

from .. import outbox, persistence, queues
from ..config import PoolConfig
from ..limits import msgmax
from ..protocol import (
    F_BATCH,
    HEADER_SIZE,
    RESULT_MTYPE,
    DeathCause,
    Kind,
    Status,
    build,
    death_body,
    join_batch,
)
from ..scoreboard import BUSY, INIT_FAILED, Scoreboard
from ..worker import EXIT_MEMORY, STOP_SIGNAL, run_worker
from .channel import Channel

__all__ = ["Manager", "main", "READY", "STARTED", "EXITED", "BROKEN", "STOPPED", "STOP",
           "SIGNAL", "WATCH", "TERMINATE", "CAUSES", "describe_exit"]

# control messages (see the module docstring)
READY, STARTED, EXITED, BROKEN, STOPPED = "ready", "started", "exited", "broken", "stopped"
STOP, SIGNAL, WATCH, TERMINATE = "stop", "signal", "watch", "terminate"
#: Why a worker exited (EXITED's cause): it was stopped (shutdown, signals of
#: the owner), recycled after max_tasks_per_child or for its memory, stopped
#: for a time limit or a terminated task, or it died by itself.
CAUSES = ("stopped", "max_tasks", "memory", "timeout", "terminate", "died")

#: Seconds between a SIGTERM to a worker the manager stops (time limit,
#: terminate) and the SIGKILL that follows if it is still alive.
KILL_GRACE = 0.5
#: Seconds between two looks at the workers' deadlines, while watching them.
DEADLINE_TICK = 0.05

#: Seconds after start at which a manager asked to (PoolConfig.sweep) reclaims
#: dead producers' leftovers: after the first tasks of a new pool, usually.
SWEEP_DELAY = 0.05
#: Seconds between two STOP_SIGNALs to a worker that has not exited yet.
STOP_REPEAT = 0.05


def describe_exit(exitcode: int | None) -> str:
    """``"exit code N"``, ``"signal SIGKILL"`` or ``"an unknown status"``."""
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"signal {name}"
    return f"exit code {exitcode}"


class Manager:
    """One pool's manager: its task workers and their replacement.

    Args:
        config (PoolConfig): the pool.
        control (Channel | None): the connection to the owner; None for a
            manager without owner (tests).
    """

    def __init__(self, config: PoolConfig, control: Channel | None):
        self.cfg = config
        self.control = control
        self.pid = os.getpid()
        self.board = Scoreboard(config.scoreboard_path, config.max_workers)
        self.workers: dict[int, int] = {}  # worker id -> pid, live workers only
        self.stopping = False  # no replacement any more: STOP, SIGNAL, or owner gone
        self.owner_gone = False
        self.control_closed = False  # the owner's end closed without STOP
        self.terminated = False  # got SIGTERM itself
        self.sweep_at = time.monotonic() + SWEEP_DELAY if config.sweep else None
        self.watching = config.watch_deadlines  # look at the deadlines in the slots
        #: Workers being stopped: wid -> (pid, task_id, token, cause, SIGKILL time)
        self.stopping_task: dict[int, tuple[int, int, int, int, float]] = {}
        try:
            self.reply_queue: sysv_ipc.MessageQueue | None = queues.open_queue(
                config.owner_reply_key, create=False)
        except sysv_ipc.Error:
            self.reply_queue = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- talking to the owner --------------------------------------------------
    def tell(self, *message: Any) -> None:
        """Send a control message to the owner (ignored once it is gone)."""
        if self.control is None or self.owner_gone or self.control_closed:
            return
        try:
            self.control.send(message)
        except (OSError, EOFError, ValueError):
            self.control_closed = True

    # -- workers ---------------------------------------------------------------
    def spawn(self, wid: int) -> None:
        """Fork task worker ``wid`` (its slot idle, its outbox file empty).

        Raises:
            OSError: fork() or the outbox file failed.
        """
        self.board.idle(wid)
        outbox.create(outbox.outbox_path(self.cfg.board_dir, wid), msgmax() - HEADER_SIZE)
        pid = os.fork()
        if pid == 0:  # the task worker
            code = 1
            try:
                os.close(self.wake_r)
                os.close(self.wake_w)
                if self.control is not None:
                    self.control.close()
                gc.enable()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = run_worker(self.cfg, wid, self.pid)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - print it, never return into the manager
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        self.workers[wid] = pid
        self.tell(STARTED, wid, pid)

    def reap(self) -> None:
        """Handle every worker that exited since the last call."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wid = next((w for w, p in self.workers.items() if p == pid), None)
            if wid is not None:
                del self.workers[wid]
                self.worker_exited(wid, pid, os.waitstatus_to_exitcode(status))

    def worker_exited(self, wid: int, pid: int, exitcode: int) -> None:
        """Worker ``wid`` (``pid``) exited: deliver its outbox, report the task
        it died running, tell the owner, and start a replacement."""
        slot = self.board.read(wid)
        # The results it had not sent go first, then its slot is cleared: a
        # producer looking for lost tasks (producer/recovery.py) never sees
        # such a task neither running nor answered.
        self.deliver_outbox(wid)
        self.board.idle(wid)
        why: int = DeathCause.DIED
        stopped = self.stopping_task.pop(wid, None)
        if (stopped is not None and stopped[0] == pid and slot.state == BUSY
                and (slot.task_id, slot.token) == stopped[1:3]):
            why = stopped[3]
        if slot.state == BUSY:
            # The notice travels on the producer's reply queue, behind any
            # result the worker sent before dying, so a task that did complete
            # is never reported dead, and the producer re-queues the rest of
            # its batch.
            self.report_death(wid, pid, exitcode, slot, why)
        cause = "stopped" if slot.state == INIT_FAILED else self.cause(exitcode, why)
        self.tell(EXITED, wid, pid, exitcode, cause, cause == "died" and slot.state != BUSY)
        if slot.state == INIT_FAILED or self.stopping:
            return  # INIT_FAILED: the owner breaks the pool with the error
        if not self.task_queue_exists():
            self.tell(BROKEN, "the task queue was removed from the kernel (ipcrm?) while "
                              "the pool was running")
            self.stopping = True
            return
        try:
            self.spawn(wid)
        except Exception as exc:  # noqa: BLE001
            self.tell(BROKEN, f"could not start a replacement for task worker {wid}: {exc!r}")
            self.stopping = True

    def cause(self, exitcode: int, why: int) -> str:
        """The cause of a worker's exit (one of CAUSES): "stopped" for every
        exit once the pool is stopping (shutdown, terminate_workers(),
        kill_workers(): no replacement follows)."""
        if why == DeathCause.TIMEOUT:
            return "timeout"
        if why == DeathCause.TERMINATED:
            return "terminate"
        if self.stopping:
            return "stopped"
        if exitcode == 0:
            return "max_tasks"
        if exitcode == EXIT_MEMORY:
            return "memory"
        return "died"

    def watch_deadlines(self) -> None:
        """Stop each worker whose task is past its deadline; SIGKILL those
        stopped ``KILL_GRACE`` seconds ago and still alive."""
        now_ns = time.monotonic_ns()
        for wid, pid in list(self.workers.items()):
            killing = self.stopping_task.get(wid)
            if killing is not None:
                if killing[0] == pid and time.monotonic() >= killing[4]:
                    _signal(pid, signal.SIGKILL)
                continue
            slot = self.board.read(wid)
            if slot.state == BUSY and slot.deadline and now_ns >= slot.deadline:
                self.stop_task(wid, pid, slot, DeathCause.TIMEOUT)

    def stop_task(self, wid: int, pid: int, slot: Any, why: int) -> None:
        """Stop worker ``wid`` (``pid``), which runs the task of ``slot``:
        SIGTERM now, SIGKILL ``KILL_GRACE`` seconds later (watch_deadlines)."""
        self.stopping_task[wid] = (pid, slot.task_id, slot.token, why,
                                   time.monotonic() + KILL_GRACE)
        self.watching = True  # for the SIGKILL, if it comes to that
        _signal(pid, signal.SIGTERM)

    def terminate(self, token: int, task_id: int) -> None:
        """The owner terminated task (token, task_id): stop the worker running
        it, if one does (one that takes it later will not run it: the owner
        put it in the scoreboard's list of terminated tasks first)."""
        for wid, pid in list(self.workers.items()):
            slot = self.board.read(wid)
            if slot.state == BUSY and (slot.token, slot.task_id) == (token, task_id) \
                    and wid not in self.stopping_task:
                self.stop_task(wid, pid, slot, DeathCause.TERMINATED)

    def task_queue_exists(self) -> bool:
        try:
            sysv_ipc.MessageQueue(self.cfg.task_key, 0)
            return True
        except sysv_ipc.ExistentialError:
            return False
        except sysv_ipc.Error:
            return True

    def signal_workers(self, signum: int) -> None:
        for pid in list(self.workers.values()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop_workers(self) -> None:
        """Ask every worker to stop after its current task (STOP_SIGNAL, again
        every STOP_REPEAT seconds); return once all exited and were handled."""
        self.stopping = True
        while True:
            self.reap()
            if not self.workers:
                return
            self.signal_workers(STOP_SIGNAL)
            self.wait_for_children(STOP_REPEAT)

    def wait_for_children(self, timeout: float) -> None:
        """Sleep until a child exits (SIGCHLD) or ``timeout`` seconds pass."""
        select.select([self.wake_r], [], [], timeout)
        self.drain_wakeups()

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass

    # -- notices to producers ------------------------------------------------------
    def deliver_outbox(self, wid: int) -> None:
        """Send on the results a dead worker still held in its outbox file
        (:mod:`mqexecutor.outbox`), ahead of the notice of its death."""
        got = outbox.drain(outbox.outbox_path(self.cfg.board_dir, wid))
        if got is None:
            return
        route, messages = got
        if len(messages) == 1:
            message = messages[0]
        else:
            message = build(Kind.RESULT, F_BATCH, 0, 0, route.token, 0, self.pid, wid,
                            join_batch(messages))
        self.send_to_producer(route.token, route.reply, route.pid, message)

    def report_death(self, wid: int, pid: int, exitcode: int, slot: Any,
                     why: int = 0) -> None:
        """Tell the producer of the task a dead worker was running (the owner,
        or another process that attached) through its reply queue; ``why``:
        a DeathCause."""
        limit_ms = (slot.deadline - slot.started) // 1_000_000 \
            if why == DeathCause.TIMEOUT and slot.deadline else 0
        msg = build(Kind.RESULT, 0, Status.WORKER_DIED, slot.task_id, slot.token, 0, pid, wid,
                    death_body(wid, pid, exitcode, slot.task_id, why, limit_ms),
                    self.cfg.authkey)
        self.send_to_producer(slot.token, slot.reply, slot.producer_pid, msg)

    def send_to_producer(self, token: int, reply: int, producer_pid: int,
                         message: bytes) -> None:
        """Put ``message`` on the reply queue of a producer (the owner, or
        another process that attached); waits up to 2 s for room."""
        try:
            queue = (self.reply_queue if token == self.cfg.owner_token and self.reply_queue
                     else queues.open_queue(reply, create=False))
            queues.send_patiently(queue, message, RESULT_MTYPE,
                                  still_wanted=lambda: persistence.pid_alive(producer_pid))
        except (sysv_ipc.Error, OSError, ValueError):
            # Gone (EIDRM, or EINVAL once its id is freed): the producer is
            # gone, or, for the owner's queue, its collector breaks the pool
            # when its receive meets the removal.
            pass

    # -- the loop ------------------------------------------------------------------
    def run(self) -> int:
        """Start the workers, then serve until told to stop or the owner dies.
        Returns the exit status of the manager process."""
        try:
            for wid in range(self.cfg.max_workers):
                self.spawn(wid)
        except Exception as exc:  # noqa: BLE001
            self.tell(BROKEN, f"could not start task worker: {exc!r}")
            self.stop_workers()
            self.tell(STOPPED)
            return 1
        self.tell(READY)
        owner_fd = _pidfd(self.cfg.owner_pid)
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        if self.control is not None:
            poller.register(self.control.fileno(), select.POLLIN)
        if owner_fd is not None and owner_fd >= 0:
            poller.register(owner_fd, select.POLLIN)
        while True:
            timeout = None
            if self.sweep_at is not None:
                timeout = max(0, int((self.sweep_at - time.monotonic()) * 1000))
            elif owner_fd == -1:  # no pidfd here: poll the owner
                timeout = 200
            if self.watching:
                timeout = min(timeout if timeout is not None else 10**9,
                              int(DEADLINE_TICK * 1000))
            if self.control is not None and self.control.pending():
                timeout = 0  # read with the config (main()): not on the socket any more
            events = poller.poll(timeout)
            self.drain_wakeups()
            if self.terminated:
                return self.on_sigterm()
            self.reap()
            if self.watching:
                self.watch_deadlines()
            if self.sweep_at is not None and time.monotonic() >= self.sweep_at:
                self.sweep_at = None
                _sweep()
            ready = {fd for fd, _ in events}
            if self.control is not None and (self.control.fileno() in ready
                                             or self.control.pending()):
                if not self.handle_commands():
                    break  # STOP, or the owner closed its end
            if owner_fd is not None and owner_fd >= 0:
                if owner_fd in ready:
                    self.owner_gone = True
                    break
            elif not persistence.pid_alive(self.cfg.owner_pid):
                self.owner_gone = True
                break
        if self.owner_gone and self.cfg.private_queue:
            # Nobody will read the outcomes of a private pool's tasks: stop
            # them now, as a signal to the owner's process group would have.
            self.stopping = True
            self.signal_workers(signal.SIGTERM)
        self.stop_workers()
        if not self.owner_gone and self.control_closed:
            # The owner's end closed without STOP: it is exiting (its fds close
            # before it turns into a zombie), or it dropped the connection.
            self.owner_gone = _wait_for_exit(owner_fd, self.cfg.owner_pid, 1.0)
        if self.owner_gone:
            persistence.release_producer(
                self.cfg.owner_reply_key, self.cfg.owner_subdir,
                self.cfg.task_key if self.cfg.private_queue else None)
        else:
            self.tell(STOPPED)
        return 0

    def handle_commands(self) -> bool:
        """Read the owner's commands; False when the loop must end (STOP, or
        the owner's end closed: then ``owner_gone`` is set)."""
        assert self.control is not None
        try:
            while self.control.poll():
                command = self.control.recv()
                if command[0] == STOP:
                    return False
                if command[0] == SIGNAL:
                    self.stopping = True
                    self.signal_workers(command[1])
                elif command[0] == WATCH:
                    self.watching = True
                elif command[0] == TERMINATE:
                    self.terminate(command[1], command[2])
        except (EOFError, OSError):
            self.control_closed = True
            return False
        return True

    def on_sigterm(self) -> int:
        """SIGTERM (sent to the manager itself, or to its own process group:
        it leads one, so a signal to the owner's group does not reach it):
        kill the workers with it, and if the owner is gone too (``kill -TERM
        -<pgid>`` of both groups, ``docker stop``) remove what only it would
        have removed; then die of the signal."""
        self.stopping = True
        self.signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while self.workers and time.monotonic() < deadline:
            self.reap()
            self.wait_for_children(0.01)
        for _ in range(20):  # up to 0.2 s for the owner to go
            if not persistence.pid_alive(self.cfg.owner_pid):
                persistence.release_producer(
                    self.cfg.owner_reply_key, self.cfg.owner_subdir,
                    self.cfg.task_key if self.cfg.private_queue else None)
                break
            time.sleep(0.01)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return 128 + signal.SIGTERM


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid``; None when it is gone already, -1 without pidfds."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (AttributeError, OSError):
        return -1


def _wait_for_exit(pidfd: int | None, pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (its pidfd, if any) exits within ``timeout`` s."""
    if pidfd is None:
        return True
    if pidfd >= 0:
        return bool(select.select([pidfd], [], [], timeout)[0])
    deadline = time.monotonic() + timeout
    while persistence.pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _sweep() -> None:
    try:
        persistence.collect_garbage()
    except Exception as exc:  # noqa: BLE001 - best effort, as the CLI's gc
        sys.stderr.write(f"mqexecutor manager (pid {os.getpid()}): reclaiming dead "
                         f"producers' leftovers failed: {exc!r}\n")


def serve(config: PoolConfig, control: Channel | None) -> int:
    """Be the manager process of ``config``: set up signals, run, return the
    exit status. Called in the manager process, forked from its owner or
    started as a fresh interpreter (:func:`main`)."""
    gc.disable()  # one thread, few objects: and no finalizer of an owner object runs here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)
    manager = Manager(config, control)

    def on_term(signum: int, frame: Any) -> None:
        manager.terminated = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(manager.wake_w, warn_on_full_buffer=False)
    return manager.run()


def main() -> None:
    """Entry point of a manager started as a fresh interpreter: ``python -c
    "from mqexecutor.manager.process import main; main()" FD``, FD being its
    end of the control connection. Its first message is the PoolConfig."""
    control = Channel(int(sys.argv[1]))
    config: PoolConfig = control.recv()
    sys.path[:] = list(config.sys_path)
    if config.mp_authkey is not None:  # the owner's multiprocessing proxies work here
        from multiprocessing import process
        process.current_process().authkey = config.mp_authkey
    code = serve(config, control)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)
