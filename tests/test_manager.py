"""The manager process: task workers are forked by a process with one thread.

A pool's manager process forks, reaps and replaces its task workers; it is
forked from the owner only when the owner has a single thread, and is else a
fresh interpreter (mp_context chooses). These tests run real pools in scripts
started with ``-W error`` for fork's DeprecationWarning ("This process ... is
multi-threaded, use of fork() may lead to deadlocks"), so a fork from a
threaded process anywhere in the tree fails them.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mqexecutor import BrokenMQPool, MQExecutor

from .helpers import REPO, pid_alive, pool, run_script, shutdown_or_fail, square, wait_until

pytestmark = pytest.mark.timeout(60)

#: Turns fork()'s DeprecationWarning of Python 3.12+ into an error.
NO_FORK_FROM_THREADS = "error:This process:DeprecationWarning"


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _children(pid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.add(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found


LIFECYCLE = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    from mqexecutor import MQExecutor, TerminatedWorkerError
    from tests.helpers import kill_self, square, where

    if __name__ == "__main__":
        stop = threading.Event()
        if sys.argv[1] == "threaded":  # a thread of the user's own, as a web server has
            threading.Thread(target=stop.wait, daemon=True).start()
        ex = MQExecutor(max_workers=2)
        method = ex._state.manager.method
        manager = ex._state.manager.pid
        victim = next(iter(ex._processes))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while victim in ex._processes or len(ex._processes) < 2:
            assert time.monotonic() < deadline, ex._processes
            time.sleep(0.01)
        results = [ex.submit(square, i).result(timeout=30) for i in range(10)]
        try:
            ex.submit(kill_self, 9).result(timeout=30)
        except TerminatedWorkerError:
            pass
        pids = set(ex._processes)
        started = time.monotonic()
        ex.shutdown(wait=True)
        took = time.monotonic() - started
        with MQExecutor(max_workers=2, max_tasks_per_child=1) as recycling:
            seen = {recycling.submit(where).result(timeout=30)[1] for _ in range(40)}
        print(json.dumps({"method": method, "manager": manager, "pids": sorted(pids),
                          "results": results, "shutdown_s": took, "recycled": len(seen)}))
        stop.set()
""")


@pytest.mark.parametrize("owner", ["single-threaded", "threaded"])
def test_replacement_recycling_and_shutdown_without_fork_from_threads(tmp_path, owner):
    """A killed worker is replaced, max_tasks_per_child=1 recycles workers
    through 40 tasks, shutdown(wait=True) returns promptly and leaves no
    process; with no fork() from a threaded process anywhere (-W error)."""
    proc = run_script(LIFECYCLE, tmp_path, owner, env={
        "PYTHONPATH": REPO, "PYTHONWARNINGS": NO_FORK_FROM_THREADS})
    assert proc.returncode == 0, proc.stderr
    assert "DeprecationWarning" not in proc.stderr, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["method"] == ("fork" if owner == "single-threaded" else "exec")
    assert res["results"] == [i * i for i in range(10)]
    assert res["shutdown_s"] < 2.0, res
    assert res["recycled"] >= 39, res  # one process per task (the last may be reused)
    assert not pid_alive(res["manager"]) and not any(pid_alive(p) for p in res["pids"])


def test_the_manager_has_one_thread_and_forks_every_worker():
    """The workers are children of the manager process, which runs one thread
    (here the owner, pytest, has several: the manager is a fresh interpreter)."""
    with pool(max_workers=3) as ex:
        manager = ex._state.manager
        assert manager.method == "exec"
        assert _threads(manager.pid) == 1
        assert set(ex._processes) == _children(manager.pid)
        victim = next(iter(ex._processes))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: victim not in ex._processes and len(ex._processes) == 3, 10)
        assert set(ex._processes) == _children(manager.pid)
        assert _threads(manager.pid) == 1
        assert [f.result(timeout=30) for f in [ex.submit(square, i) for i in range(9)]] \
            == [i * i for i in range(9)]


def test_a_killed_manager_breaks_the_pool_and_its_workers_stop():
    """The manager process SIGKILLed: pending Futures fail with BrokenMQPool
    naming it, later submits raise, the workers exit, shutdown returns."""
    with pool(max_workers=2) as ex:
        manager = ex._state.manager.pid
        workers = set(ex._processes)
        slow = ex.submit(time.sleep, 30)
        assert wait_until(lambda: slow.running(), 10)
        os.kill(manager, signal.SIGKILL)
        exc = slow.exception(timeout=20)
        assert isinstance(exc, BrokenMQPool) and "manager process" in str(exc), repr(exc)
        with pytest.raises(BrokenMQPool):
            ex.submit(square, 2)
    assert wait_until(lambda: not any(pid_alive(p) for p in workers), 40)


@pytest.mark.parametrize("context", [None, "fork", "forkserver", "spawn",
                                     multiprocessing.get_context("spawn"),
                                     multiprocessing.get_context("forkserver")],
                         ids=["none", "fork", "forkserver", "spawn", "ctx-spawn",
                              "ctx-forkserver"])
def test_mp_context_by_keyword_and_position(context):
    """mp_context is accepted as ProcessPoolExecutor accepts it, also in its
    position (after key here); in this threaded process every start method
    starts the manager as a fresh interpreter."""
    ex = MQExecutor(None, 2, context)
    try:
        assert ex._state.manager.method == "exec"
        assert ex.max_workers == 2
        assert ex.submit(square, 5).result(timeout=30) == 25
        assert ex.submit(lambda: 6).result(timeout=30) == 6
    finally:
        shutdown_or_fail(ex)
    ex = MQExecutor(max_workers=1, mp_context=context)
    shutdown_or_fail(ex)


def test_bad_mp_context_is_refused_before_anything_is_made():
    with pytest.raises(ValueError, match="start method 'threads'"):
        MQExecutor(max_workers=1, mp_context="threads")
    with pytest.raises(TypeError, match="mp_context"):
        MQExecutor(max_workers=1, mp_context=42)


INHERIT = textwrap.dedent("""
    import sys
    import types
    from mqexecutor import MQExecutor

    # A module made at run time: only a worker forked from this process has it.
    made = types.ModuleType("made_at_run_time")
    exec("def value():\\n    return 'inherited'\\n", made.__dict__)
    sys.modules["made_at_run_time"] = made

    if __name__ == "__main__":
        with MQExecutor(max_workers=1, mp_context=sys.argv[1]) as ex:
            print(ex._state.manager.method)
            try:
                print(ex.submit(made.value).result(timeout=30))
            except Exception as exc:
                print(type(exc).__name__)
""")


@pytest.mark.parametrize("method, fork", [("fork", True), ("forkserver", False),
                                          ("spawn", False)])
def test_start_methods_of_a_single_threaded_owner(tmp_path, method, fork):
    """In a process with one thread, "fork" forks the manager: its workers
    inherit the owner's modules; "forkserver" and "spawn" start a fresh
    interpreter, whose workers import by name."""
    proc = run_script(INHERIT, tmp_path, method, env={
        "PYTHONPATH": REPO, "PYTHONWARNINGS": NO_FORK_FROM_THREADS})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == ("fork" if fork else "exec")
    assert lines[1] == ("inherited" if fork else "TaskUnpicklingError")


def test_no_process_of_a_pool_outlives_an_owner_killed_with_sigkill(tmp_path):
    """The owner SIGKILLed: its manager stops the workers, removes the queues
    and exits (the manager was forked: the owner had one thread)."""
    script = textwrap.dedent("""
        import json, os, time
        from mqexecutor import MQExecutor
        ex = MQExecutor(max_workers=2)
        print(json.dumps({"manager": ex._state.manager.pid, "workers": list(ex._processes),
                          "keys": [ex.key, ex.reply_key]}), flush=True)
        time.sleep(60)
    """)
    path = tmp_path / "owner.py"
    path.write_text(script)
    owner = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": REPO})
    try:
        info = json.loads(owner.stdout.readline())
    finally:
        owner.kill()
        owner.wait()
    from .helpers import queue_exists
    pids = [info["manager"], *info["workers"]]
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 20), pids
    assert wait_until(lambda: not any(queue_exists(k) for k in info["keys"]), 10)
