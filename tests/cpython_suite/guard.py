"""Keeping one run of CPython's tests from hanging or leaking.

- :class:`Pools` records every MQExecutor pool (``_PoolState``) this process
  creates, so that pools a test left running (or half-built) can be found,
  reported and torn down: their workers killed and their queues removed.
- :class:`Watchdog` notices when one test, or what runs between two tests
  (class and module tear-down, the next set-up), lasts too long: it first
  kills what the test waits for, then aborts the run if that did not help.
- :func:`new_processes` finds descendants of this process that a test left
  behind.

All processes it kills are descendants of this process, by pid.
"""
from __future__ import annotations

import faulthandler
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

# Helper processes of multiprocessing that outlive single tests on purpose
# (they are stopped by test_concurrent_futures' module clean-up).
_LONG_LIVED = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def _proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (ppid, state)} of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int | None = None) -> set[int]:
    """Pids of the live (not zombie) descendants of ``root`` (this process)."""
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if table[child][1] != "Z":
                found.add(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def new_processes(before: set[int], grace: float) -> dict[int, str]:
    """Descendants not in ``before`` still alive after ``grace`` seconds,
    except multiprocessing's forkserver and resource tracker: {pid: cmdline}."""
    deadline = time.monotonic() + grace
    while True:
        left = {p for p in descendants() - before
                if not any(s in _cmdline(p) for s in _LONG_LIVED)}
        if not left or time.monotonic() >= deadline:
            return {p: _cmdline(p) for p in left}
        time.sleep(0.1)


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class Pools:
    """Every MQExecutor pool state made in this process, until it is closed
    (its resources released: queues removed, workers gone)."""

    def __init__(self) -> None:
        from mqexecutor.producer import state as state_module
        self.states: list = []
        init = state_module.PoolState.__init__
        states = self.states

        def recording_init(state, *args, **kwargs):
            states.append(state)
            init(state, *args, **kwargs)

        state_module.PoolState.__init__ = recording_init

    def mark(self) -> int:
        self.states[:] = [s for s in self.states if not s.res.closed]
        return len(self.states)

    def unclosed_since(self, mark: int, grace: float) -> list:
        """States made after ``mark`` that are still open after ``grace``
        seconds (garbage collection runs meanwhile: a dropped executor shuts
        itself down)."""
        deadline = time.monotonic() + grace
        while True:
            open_ = [s for s in self.states[mark:]
                     if not s.res.closed and s.pid == os.getpid()]
            if not open_ or time.monotonic() >= deadline:
                return open_
            gc.collect()
            time.sleep(0.1)

    @staticmethod
    def describe(state) -> str:
        alive = [p.pid for p in state.processes.values() if p.exitcode is None]
        threads = [t.name for t in (state.collector, state.monitor)
                   if t is not None and t.is_alive()]
        key = getattr(state.res.task_queue, "key", None)
        return (f"pool with task queue key {key if key is None else hex(key & 0xFFFFFFFF)}, "
                f"live workers {alive}, live threads {threads}")

    @staticmethod
    def kill_workers(states) -> None:
        """SIGKILL the workers of ``states``, and let no replacement start."""
        for state in states:
            state.flags.terminating = True
            if state.manager is not None:
                state.manager.send("signal", signal.SIGKILL)  # no replacement after it

    def open_states(self) -> list:
        return [s for s in self.states if not s.res.closed and s.pid == os.getpid()]

    @staticmethod
    def tear_down(states) -> None:
        """Kill the workers of ``states`` (no replacement), fail what they have
        pending, and let each pool's monitor thread remove its queues and spill
        files; for a pool whose monitor never started (its constructor
        failed), or does not finish within 10 s, remove them here."""
        Pools.kill_workers(states)
        for state in states:
            state.break_pool("torn down by the cpython_suite runner (left open by a test)")
        for state in states:
            monitor = state.monitor
            if monitor is not None and monitor.ident is not None:
                monitor.join(10)
            for p in list(state.processes.values()):
                p.join(2)
            if not state.res.closed:
                try:
                    state.res.release()
                except Exception as exc:  # noqa: BLE001 - best effort
                    print(f"could not release {state!r}: {exc!r}", file=sys.__stderr__)

    def tear_down_all(self) -> None:
        self.tear_down(self.open_states())


class Watchdog:
    """Watches that each test, and what runs after it until the next one starts
    (class and module tear-down, the next set-up), ends within ``timeout``
    seconds: it is re-armed at each test's start and end.

    When the deadline passes it dumps every thread's traceback and calls
    ``on_stuck(label)``, which should unblock the test (kill the processes it
    waits for); the test then gets ``grace`` more seconds. When that passes
    too, it calls ``on_abort(label)`` and ends the process with status 3.
    faulthandler backs it up 60 s later (exit status 1), in case the hang
    holds the GIL."""

    def __init__(self, timeout: float, grace: float, on_stuck: Callable[[str], None],
                 on_abort: Callable[[str], None]):
        self.timeout = timeout
        self.grace = grace
        self.on_stuck = on_stuck
        self.on_abort = on_abort
        self.label = ""
        self.stage = 0
        self.deadline: float | None = None
        self.cond = threading.Condition()
        threading.Thread(target=self._run, name="cpython-suite-watchdog", daemon=True).start()

    def arm(self, label: str) -> None:
        with self.cond:
            self.label = label
            self.stage = 0
            self.deadline = time.monotonic() + self.timeout
            self.cond.notify()
        faulthandler.dump_traceback_later(self.timeout + self.grace + 60, exit=True,
                                          file=sys.__stderr__)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self.cond:
            self.deadline = None
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.deadline is None or time.monotonic() < self.deadline:
                    self.cond.wait(None if self.deadline is None
                                   else self.deadline - time.monotonic())
                label, stage = self.label, self.stage
                self.stage += 1
                self.deadline = time.monotonic() + self.grace
            if stage == 0:
                print(f"\n\nTIMEOUT: {label}: still running after {self.timeout:.0f} s; "
                      "tracebacks of every thread:", file=sys.__stderr__, flush=True)
                faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
                print(f"TIMEOUT: killing the workers and processes {label} waits for",
                      file=sys.__stderr__, flush=True)
                try:
                    self.on_stuck(label)
                except Exception as exc:  # noqa: BLE001
                    print(f"on_stuck failed: {exc!r}", file=sys.__stderr__, flush=True)
                continue
            try:
                print(f"\n\nABORT: {label}: still stuck {self.grace:.0f} s later; "
                      "tracebacks of every thread:", file=sys.__stderr__, flush=True)
                faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
                self.on_abort(label)
            finally:
                sys.__stderr__.flush()
                sys.__stdout__.flush()
                os._exit(3)
