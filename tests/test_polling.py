"""Polling ends: an idle pool burns no CPU.

After a message, a task worker polls its queue for 200 us (IPC_NOWAIT and
sched_yield), the collector polls the reply queue as long while a few tasks
are out, and ``MQFuture.result()`` polls the Future's state before it sleeps.
Each of these polls must end: once the tasks are done (or while the only task
out runs for long), the worker processes and this process's threads sleep in
the kernel. A poll that never ended would use a whole core, about 1 s of CPU
time per second measured here.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from mqexecutor import Mode

from .helpers import Gate, gated, pool, square

#: CPU seconds allowed over the 1 s measured: an idle process or thread uses
#: almost none; a polling one close to 1.
LIMIT = 0.05
IDLE = 1.0

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds of a thread of this process."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _leak_scanner() -> threading.Thread | None:
    # conftest's leak check scans /proc every 0.1 s in this process: not ours
    return next((t for t in threading.enumerate() if t.name == "leak-check-scanner"), None)


def measure_idle(ex, skip_workers=(), wait=lambda: time.sleep(IDLE)) -> dict[str, float]:
    """CPU seconds used during ``wait()`` (IDLE seconds of sleep) by each worker
    process (but those in ``skip_workers``), the manager process, the collector
    and monitor threads, the calling thread, and this whole process (less the
    leak-check scanner thread)."""
    state = ex._state
    workers = {f"worker {p.worker_id}": pid for pid, p in ex._processes.items()
               if p.worker_id not in skip_workers}
    workers["manager process"] = state.manager.pid
    threads = {"collector": state.collector, "monitor": ex._executor_manager_thread}
    scanner = _leak_scanner()
    w0 = {name: process_cpu(pid) for name, pid in workers.items()}
    t0 = {name: thread_cpu(t) for name, t in threads.items()}
    s0 = thread_cpu(scanner) if scanner is not None else 0.0
    p0 = time.process_time()
    c0 = time.thread_time()
    wait()
    c1 = time.thread_time()
    p1 = time.process_time()
    s1 = thread_cpu(scanner) if scanner is not None else 0.0
    used = {name: process_cpu(pid) - w0[name] for name, pid in workers.items()}
    used.update({name: thread_cpu(t) - t0[name] for name, t in threads.items()})
    used["calling thread"] = c1 - c0
    used["this process"] = (p1 - p0) - (s1 - s0)
    return used


def _burst(ex) -> None:
    """Every polling path: batched results (map), and one task at a time
    (submit().result(): result() and the collector poll, the worker polls)."""
    assert list(ex.map(square, range(2000))) == [i * i for i in range(2000)]
    for i in range(50):
        assert ex.submit(square, i).result(timeout=30) == i * i
    fs = [ex.submit(square, i) for i in range(200)]
    assert [f.result(timeout=30) for f in fs] == [i * i for i in range(200)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_idle_pool_after_a_burst_uses_no_cpu(mode):
    with pool(max_workers=2, mode=mode) as ex:
        _burst(ex)
        time.sleep(0.05)  # far longer than any poll (200 us)
        used = measure_idle(ex)
        assert len(used) == 7
        hot = {name: round(s, 3) for name, s in used.items() if s >= LIMIT}
        assert not hot, f"still polling while idle (CPU s over {IDLE} s): {used}"
        # and the pool still answers at once after its sleep
        assert ex.submit(square, 9).result(timeout=30) == 81


@pytest.mark.timeout(60)
def test_no_polling_while_the_only_task_out_runs_long(tmp_path):
    # One task out, the case where the collector polls after a result: a
    # quick task's result arrives while the long one runs, so the collector
    # polls (pending 1 <= max_workers), then must block. Meanwhile this thread
    # waits on the long task's result() (polls 200 us, then sleeps) and worker
    # 1 is idle. Worker 0 checks the gate every 5 ms and is not measured.
    gate = Gate(tmp_path)
    with pool(max_workers=2, mode=Mode.TARGETED) as ex:
        try:
            _burst(ex)
            blocker = ex.submit_to(0, gated, gate.path, gate.started_dir, "long")
            gate.wait_started(1)
            assert ex.submit_to(1, square, 4).result(timeout=30) == 16
            assert len(ex._state.dispatch.pending) == 1
            timed_out = []

            def wait_on_the_long_task():
                try:
                    blocker.result(timeout=IDLE)
                except TimeoutError:
                    timed_out.append(True)

            used = measure_idle(ex, skip_workers=(0,), wait=wait_on_the_long_task)
            assert timed_out, "the gated task ended before the gate opened"
        finally:
            gate.open()
        assert blocker.result(timeout=30)[0] == 0
        hot = {name: round(s, 3) for name, s in used.items() if s >= LIMIT}
        assert not hot, f"polling while one long task runs (CPU s over {IDLE} s): {used}"
