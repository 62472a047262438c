"""The monitor thread: the owner's link to its manager process, the backlog's
poller while the kernel queue stays full, and the pool's teardown.

It waits on the manager's control connection and a wake-up pipe (with a 5..50
ms timeout while the backlog is not empty, to feed it), records the workers
the manager starts and the exits it reports (``MQExecutor._processes``), and
breaks the pool when the manager says it cannot go on or dies itself. At
shutdown, once nothing is pending (at once for ``terminate_workers`` and an
abandoned explicit key), it tears the pool down: the manager stops the
workers, the collector takes the last results, what is left is cancelled and
the queues and spill directory are removed.
"""
from __future__ import annotations

import select
import threading

import sysv_ipc

from .. import spill
from ..manager import process as manager_process
from ..protocol import CONTROL_MTYPE
from .pool import WorkerProcess
from .state import PoolState

__all__ = ["Monitor", "apply_event", "RECYCLE_CAUSES"]

#: The causes of a worker's exit that ``stats().recycles`` counts.
RECYCLE_CAUSES = tuple(c for c in manager_process.CAUSES if c != "stopped")


def apply_event(state: PoolState, event: tuple) -> None:
    """Apply a message of the manager process to the pool's view of it."""
    kind = event[0]
    if kind == manager_process.STARTED:
        _, wid, pid = event
        state.processes[wid] = WorkerProcess(wid, pid)
    elif kind == manager_process.EXITED:
        _, wid, pid, exitcode, cause, unreported = event
        state.exits[cause] += 1
        proc = state.processes.get(wid)
        if proc is not None and proc.pid == pid:
            proc._set_exit(exitcode)
        if unreported:  # it may have taken a task without saying so
            state.lost_tasks.worker_died(wid, pid, exitcode)
    elif kind == manager_process.READY:
        state.ready.set()
    elif kind == manager_process.BROKEN:
        state.break_pool(event[1])


class Monitor(threading.Thread):
    """The thread ``mqexecutor-monitor`` of one pool (not for ``attach()``:
    such a producer has no manager, and its monitor only feeds the backlog).

    Args:
        state (PoolState): the pool (the monitor holds no executor).
    """

    def __init__(self, state: PoolState):
        super().__init__(name="mqexecutor-monitor", daemon=True)
        self.state = state
        self.manager = state.manager
        self.manager_gone = False

    def run(self) -> None:
        state = self.state
        flags = state.flags
        dispatch = state.dispatch
        res = state.res
        delay = 0.005
        try:
            while True:
                backlog = bool(dispatch.backlog)
                fds = [res.wake_r]
                manager = None if self.manager_gone else self.manager
                if manager is not None:
                    fds.append(manager.conn.fileno())
                ready = select.select(fds, [], [], delay if backlog else None)[0]
                if res.wake_r in ready:
                    res.drain_wake()
                if manager is not None and manager.conn.fileno() in ready:
                    self.read_manager()
                if backlog:
                    delay = 0.005 if dispatch.feed() else min(delay * 2, 0.05)
                if flags.broken is not None or flags.abandon:
                    break
                if flags.shutdown_requested:
                    with dispatch.lock:
                        idle = not dispatch.pending
                    if idle:
                        break
                    if flags.terminating and self.workers_gone():
                        state.break_pool("the task workers were terminated")
                        break
        finally:
            self.teardown()

    def read_manager(self) -> None:
        """Apply what the manager sent; break the pool if it died."""
        assert self.manager is not None
        try:
            for event in self.manager.receive():
                apply_event(self.state, event)
        except (EOFError, OSError):
            self.manager_gone = True
            code = self.manager.join()
            if self.state.flags.broken is None:
                when = ("before it started the task workers" if not self.state.ready.is_set()
                        else "the pool cannot replace its task workers any more")
                self.state.break_pool(
                    f"the manager process (pid {self.manager.pid}) died with "
                    f"{manager_process.describe_exit(code)}: {when}")

    def workers_gone(self) -> bool:
        return all(p.exitcode is not None for p in self.state.processes.values())

    def stop_manager(self) -> None:
        """Have the manager stop the workers (after their current task) and
        exit; read what it reports meanwhile."""
        manager = self.manager
        if manager is None:
            return
        if not self.manager_gone:
            manager.send(manager_process.STOP)
            try:
                while True:
                    if manager.conn.poll(None):
                        event = manager.conn.recv()
                        if event[0] == manager_process.STOPPED:
                            break
                        apply_event(self.state, event)
            except (EOFError, OSError):
                pass
        manager.join()
        manager.close()
        for proc in self.state.processes.values():
            if proc.exitcode is None:
                proc._set_exit(0)

    def teardown(self) -> None:
        """Stop workers, let the collector take the last results, cancel what is
        left (tasks left in a persistent queue stay there), release resources."""
        state = self.state
        res = state.res
        dispatch = state.dispatch
        self.stop_manager()
        collector = state.collector
        if collector is not None and collector.is_alive() and res.reply_queue is not None:
            try:  # behind every result already sent: the collector handles those first
                res.reply_queue.send(b"stop", block=True, type=CONTROL_MTYPE)
            except sysv_ipc.Error:
                pass
            if collector is not threading.current_thread():
                collector.join()
        with dispatch.lock:
            items = list(dispatch.pending.values())
            dispatch.pending.clear()
            dispatch.backlog.clear()
        durable = res.journal.durable
        for fut in items:
            if fut.done():
                continue
            if fut.running():  # still in the kernel queue: it stays there
                fut._withdraw()
                continue
            fut._cancel_pending()
            if fut._spill_ref and not durable:
                spill.discard(fut._spill_ref)  # durable: the next owner runs it
        res.release()
