"""shutdown(), the context manager, terminate_workers()/kill_workers(), and the
hygiene of queues, workers and spill files at shutdown, at interpreter exit,
at garbage collection and when the owner dies."""
from __future__ import annotations

import concurrent.futures as cf
import gc
import json
import os
import signal
import textwrap
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import mqexecutor
from mqexecutor import MQExecutor, Mode, spill

from .helpers import (
    Gate,
    gated,
    gated_identity,
    pid_alive,
    producer_subdir,
    queue_exists,
    reply_key,
    run_script,
    shutdown_or_fail,
    sleep_return,
    square,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def _resources(ex):
    return {"keys": (ex.key, reply_key(ex)), "pids": list(ex._processes),
            "subdir": producer_subdir(ex)}


def _assert_released(res, timeout=0.0):
    """Queues removed, workers gone, spill sub-directory removed (polling up to
    ``timeout`` seconds for asynchronous clean-up)."""
    def released():
        return (not any(queue_exists(k) for k in res["keys"])
                and not any(pid_alive(p) for p in res["pids"])
                and not any(os.path.exists(os.path.join(r, res["subdir"]))
                            for r in spill.spill_roots()))
    if not wait_until(released, timeout):
        raise AssertionError(
            "not released: queues " + str([hex(k) for k in res["keys"] if queue_exists(k)])
            + ", live workers " + str([p for p in res["pids"] if pid_alive(p)])
            + ", spill dirs " + str([os.path.join(r, res["subdir"])
                                     for r in spill.spill_roots()
                                     if os.path.exists(os.path.join(r, res["subdir"]))]))


# --------------------------------------------------------------------------
# shutdown(wait=True) and the context manager
# --------------------------------------------------------------------------

def test_shutdown_idle_pool_releases_everything():
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    assert ex.submit(square, 3).result(timeout=10) == 9
    shutdown_or_fail(ex)
    # workers are gone once shutdown(wait=True) returns: no polling
    _assert_released(res)


def test_shutdown_never_used_pool():
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    shutdown_or_fail(ex)
    _assert_released(res)


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_shutdown_wait_true_with_tasks_in_flight(mode):
    ex = MQExecutor(max_workers=2, mode=mode)
    res = _resources(ex)
    fs = [ex.submit(sleep_return, 0.2, i) for i in range(6)]
    shutdown_or_fail(ex)
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == list(range(6))
    _assert_released(res)


def test_shutdown_wait_true_with_a_backlog():
    """Tasks still waiting in this process (kernel queue full) are run too."""
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    pad = "y" * 4000
    fs = [ex.submit(sleep_return, 0.01, pad) for _ in range(30)]
    shutdown_or_fail(ex, 30)
    assert [f.result() for f in fs] == [pad] * 30
    _assert_released(res)


def test_context_manager_returns_executor_and_waits():
    with MQExecutor(max_workers=2) as ex:
        res = _resources(ex)
        fs = [ex.submit(sleep_return, 0.2, i) for i in range(4)]
        # __exit__ runs shutdown(wait=True): run it under a watchdog
        done = threading.Event()

        def watchdog():
            if not done.wait(15):
                ex.kill_workers()  # unstick a hung __exit__ so the test fails, not hangs

        threading.Thread(target=watchdog, daemon=True).start()
    done.set()
    assert [f.result(timeout=0) for f in fs] == list(range(4))
    _assert_released(res)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_submit_after_shutdown_raises_runtime_error_everywhere():
    ex = MQExecutor(max_workers=2, mode=Mode.TARGETED)
    shutdown_or_fail(ex)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)
    with pytest.raises(RuntimeError):
        ex.submit_to(0, square, 1)
    with pytest.raises(RuntimeError):
        list(ex.map(square, range(3)))


def test_shutdown_twice_is_harmless():
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    ex.submit(square, 2).result(timeout=10)
    shutdown_or_fail(ex)
    shutdown_or_fail(ex)
    ex.shutdown(wait=False)
    _assert_released(res)


def test_concurrent_shutdown_calls(tmp_path):
    gate = Gate(tmp_path)
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    fs = [ex.submit(gated_identity, gate.path, i) for i in range(4)]
    errors = []

    def stop():
        try:
            ex.shutdown(wait=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=stop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.open()
    for t in threads:
        t.join(20)
    if any(t.is_alive() for t in threads):
        ex.kill_workers()
        raise AssertionError("concurrent shutdown(wait=True) calls hung")
    assert not errors
    assert [f.result() for f in fs] == [0, 1, 2, 3]
    _assert_released(res)


def test_kill_and_terminate_after_shutdown_are_harmless():
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    assert ex.submit(square, 2).result(timeout=10) == 4
    shutdown_or_fail(ex)
    ex.terminate_workers()
    ex.kill_workers()
    _assert_released(res)


# --------------------------------------------------------------------------
# shutdown(wait=False), cancel_futures
# --------------------------------------------------------------------------

def test_shutdown_wait_false_returns_while_work_is_pending(tmp_path):
    gate = Gate(tmp_path)
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    try:
        fs = [ex.submit(gated_identity, gate.path, i) for i in range(6)]
        returned = threading.Event()
        t = threading.Thread(target=lambda: (ex.shutdown(wait=False), returned.set()),
                             daemon=True)
        t.start()
        # it must return while every task is still blocked on the gate
        assert returned.wait(10), "shutdown(wait=False) blocked"
        assert not any(f.done() for f in fs)
        with pytest.raises(RuntimeError):
            ex.submit(square, 1)
    finally:
        gate.open()
    # the pending work still completes
    assert [f.result(timeout=20) for f in fs] == list(range(6))
    # and everything is released once it has
    _assert_released(res, timeout=15)


def test_shutdown_wait_false_then_wait_true(tmp_path):
    gate = Gate(tmp_path)
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    try:
        fs = [ex.submit(gated_identity, gate.path, i) for i in range(3)]
        ex.shutdown(wait=False)
    finally:
        gate.open()
    shutdown_or_fail(ex)
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == [0, 1, 2]
    _assert_released(res)


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_shutdown_cancel_futures(mode):
    ex = MQExecutor(max_workers=2, mode=mode)
    res = _resources(ex)
    fs = [ex.submit(sleep_return, 0.1, i) for i in range(50)]
    time.sleep(0.15)
    shutdown_or_fail(ex, cancel_futures=True)
    assert all(f.done() for f in fs)
    cancelled = [f for f in fs if f.cancelled()]
    finished = [f for f in fs if not f.cancelled()]
    assert len(cancelled) > 20, len(cancelled)
    for f in finished:
        assert f.result() == fs.index(f)
    for f in cancelled:
        with pytest.raises(cf.CancelledError):
            f.result()
    _assert_released(res)


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_cancel_futures_on_a_pool_just_started_runs_one_task_per_worker(mode):
    """shutdown(cancel_futures=True) at once after the submits: the workers
    were still starting, yet those with a task in the kernel queue take it, as
    the tasks in ProcessPoolExecutor's call queue run (CPython's
    test_cancel_futures). Preemptive: each of the 5 workers takes one;
    targeted: a worker may have had none of its own in the queue."""
    for _ in range(3):
        ex = MQExecutor(max_workers=5, mode=mode)
        res = _resources(ex)
        fs = [ex.submit(sleep_return, 0.1, i) for i in range(50)]
        shutdown_or_fail(ex, cancel_futures=True)
        finished = [f for f in fs if not f.cancelled()]
        assert len(finished) >= (5 if mode == Mode.PREEMPTIVE else 1), len(finished)
        assert sum(f.cancelled() for f in fs) > 20
        assert all(f.result() == fs.index(f) for f in finished)
        _assert_released(res)


def test_cancel_futures_includes_the_backlog():
    ex = MQExecutor(max_workers=1)
    res = _resources(ex)
    pad = "z" * 4000
    fs = [ex.submit(sleep_return, 0.05, pad) for _ in range(40)]  # most in the backlog
    shutdown_or_fail(ex, cancel_futures=True)
    assert all(f.done() for f in fs)
    assert sum(f.cancelled() for f in fs) > 30
    assert all(f.result() == pad for f in fs if not f.cancelled())
    _assert_released(res)


def test_keyboard_interrupt_while_waiting_leaves_a_usable_pool(tmp_path):
    """Ctrl-C in the caller while it waits for a result: the pool keeps
    working and shuts down cleanly."""
    gate = Gate(tmp_path)
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    try:
        f = ex.submit(gated_identity, gate.path, "late")
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            f.result(timeout=20)
        timer.join()
        assert not f.done()
        assert ex.submit(square, 5).result(timeout=10) == 25
    finally:
        gate.open()
    assert f.result(timeout=20) == "late"
    shutdown_or_fail(ex)
    _assert_released(res)


# --------------------------------------------------------------------------
# terminate_workers / kill_workers (Python 3.14)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("method,signum", [("terminate_workers", signal.SIGTERM),
                                           ("kill_workers", signal.SIGKILL)])
def test_terminate_and_kill_workers(tmp_path, method, signum):
    gate = Gate(tmp_path)
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    try:
        running = [ex.submit(gated, gate.path, gate.started_dir, i) for i in range(2)]
        gate.wait_started(2)
        queued = [ex.submit(square, i) for i in range(20)]
        getattr(ex, method)()
        with pytest.raises(RuntimeError):
            ex.submit(square, 1)
        done, not_done = cf.wait(running + queued, timeout=20)
        assert not not_done, f"{len(not_done)} futures never completed"
        for f in running:
            assert isinstance(f.exception(), BrokenProcessPool)
            if isinstance(f.exception(), mqexecutor.TerminatedWorkerError):
                assert f.exception().exitcode == -signum
        for f in queued:
            assert f.cancelled() or isinstance(f.exception(), BrokenProcessPool)
    finally:
        gate.open()  # never needed unless the test failed
    _assert_released(res, timeout=15)
    # stopped, not recycled: no worker replaced, none counted as a crash
    assert not any(ex.stats().recycles.values()), ex.stats().recycles
    shutdown_or_fail(ex)  # harmless afterwards


def test_kill_workers_on_idle_pool():
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    assert ex.submit(square, 2).result(timeout=10) == 4
    ex.kill_workers()
    _assert_released(res, timeout=15)


# --------------------------------------------------------------------------
# hygiene: garbage collection, interpreter exit, owner death
# --------------------------------------------------------------------------

def test_garbage_collected_executor_releases_everything():
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    assert ex.submit(square, 3).result(timeout=10) == 9
    del ex
    gc.collect()
    _assert_released(res, timeout=10)


def test_garbage_collected_executor_with_pending_work_finishes_it():
    ex = MQExecutor(max_workers=2)
    res = _resources(ex)
    fs = [ex.submit(sleep_return, 0.1, i) for i in range(6)]
    del ex
    gc.collect()
    assert [f.result(timeout=20) for f in fs] == list(range(6))
    _assert_released(res, timeout=10)


EXIT_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import mqexecutor
    from mqexecutor import MQExecutor

    out = sys.argv[1]
    n = int(sys.argv[2])
    pad = "p" * int(sys.argv[3])

    def work(i, pad):
        time.sleep(0.05)
        with open(os.path.join(out, "done-%d" % i), "w") as f:
            f.write(str(i))
        return i

    ex = MQExecutor(max_workers=2, mode=int(sys.argv[4]))
    subdir = mqexecutor.spill.producer_subdir(os.getpid(), ex.token)
    print(json.dumps({"keys": [ex.key, ex.reply_key],
                      "pids": list(ex._processes), "subdir": subdir}),
          flush=True)
    for i in range(n):
        ex.submit(work, i, pad)
    # no shutdown: the interpreter exits with work pending
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("n,pad,mode,dash_c", [(6, 0, 3, True), (6, 0, 2, False),
                                              (40, 4000, 3, False)],
                         ids=["few-python-c", "targeted", "backlog"])
def test_interpreter_exit_with_pending_work_finishes_it(tmp_path, n, pad, mode, dash_c):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_script(EXIT_SCRIPT, tmp_path, str(out), str(n), str(pad), str(mode),
                      timeout=45, dash_c=dash_c)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[0])
    assert sorted(os.listdir(out)) == sorted(f"done-{i}" for i in range(n))
    _assert_released(res, timeout=10)


def test_interpreter_exit_after_shutdown_wait_false(tmp_path):
    script = textwrap.dedent("""
        import sys, os, time
        from mqexecutor import MQExecutor
        def work(path):
            time.sleep(0.2)
            open(path, "w").close()
        ex = MQExecutor(max_workers=2)
        ex.submit(work, sys.argv[1])
        ex.shutdown(wait=False)
    """)
    flag = tmp_path / "flag"
    proc = run_script(script, tmp_path, str(flag), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert flag.exists()


OWNER_DEATH_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    import mqexecutor
    from mqexecutor import MQExecutor, Mode

    ex = MQExecutor(max_workers=2, mode=Mode.TARGETED)
    subdir = mqexecutor.spill.producer_subdir(os.getpid(), ex.token)
    ex.submit_to(0, time.sleep, 1.0)               # worker 0 busy
    ex.submit_to(0, len, b"x" * (2 * 1024 * 1024))  # spilled, waits for worker 0
    ex.submit(abs, -1).result(timeout=10)          # worker 1 proven alive
    files = mqexecutor.spill.list_files(subdir)
    print(json.dumps({"keys": [ex.key, ex.reply_key],
                      "pids": list(ex._processes), "subdir": subdir,
                      "files": files}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.timeout(60)
def test_owner_killed_workers_clean_up(tmp_path):
    proc = run_script(OWNER_DEATH_SCRIPT, tmp_path, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    res = json.loads(proc.stdout.splitlines()[0])
    assert any(f.endswith(".spill") for f in res["files"])
    _assert_released(res, timeout=15)
