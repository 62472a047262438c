"""Construction, keys, submit basics, the never-blocking submit, __main__ code."""
from __future__ import annotations

import concurrent.futures
import os
import textwrap
import time

import pytest
import sysv_ipc

import mqexecutor
from mqexecutor import MQExecutor, MQFuture, Mode

from .helpers import (
    TEST_KEYS,
    Gate,
    add,
    echo_kwargs,
    gated,
    get_global,
    pool,
    queue_exists,
    remove_test_key,
    reply_key,
    run_script,
    set_global,
    shutdown_or_fail,
    square,
    unused_key,
    where,
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------

def test_is_an_executor_and_submit_returns_mqfuture():
    with pool() as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        f = ex.submit(square, 7)
        assert isinstance(f, MQFuture)
        assert isinstance(f, concurrent.futures.Future)
        assert isinstance(f.task_id, int)
        assert f.result(timeout=10) == 49
        g = ex.submit(square, 8)
        assert g.task_id != f.task_id
        assert g.result(timeout=10) == 64


def test_max_workers_none_uses_usable_cpus():
    expected = len(os.sched_getaffinity(0))
    with pool(max_workers=None) as ex:
        assert ex.max_workers == expected
        assert len(ex._processes) == expected
        assert ex.submit(square, 3).result(timeout=10) == 9


@pytest.mark.parametrize("bad", [0, -1, -8])
def test_max_workers_not_positive_is_value_error(bad):
    with pytest.raises(ValueError):
        MQExecutor(max_workers=bad)


@pytest.mark.parametrize("bad", [0, 1, 4, 99, "targeted", None])
def test_bad_mode_is_value_error(bad):
    with pytest.raises(ValueError):
        MQExecutor(max_workers=1, mode=bad)


@pytest.mark.parametrize("bad", [5, "not callable", object()])
def test_bad_initializer_is_type_error(bad):
    with pytest.raises(TypeError):
        MQExecutor(max_workers=1, initializer=bad)


def test_constructor_errors_leave_nothing_behind():
    # The per-test leak check of conftest fails this test if a rejected
    # constructor call created a queue or a spill directory.
    for kwargs in ({"max_workers": 0}, {"mode": 7}, {"initializer": 3},
                   {"max_tasks_per_child": 0}):
        with pytest.raises((ValueError, TypeError)):
            MQExecutor(**kwargs)


@pytest.mark.parametrize("mode", [Mode.TARGETED, Mode.PREEMPTIVE, 2, 3])
def test_mode_accepts_enum_or_int(mode):
    with pool(mode=mode) as ex:
        assert ex.mode == mode
        assert isinstance(ex.mode, Mode)
        assert ex.submit(add, 2, 3).result(timeout=10) == 5


def test_private_queues_are_0600_and_removed_at_shutdown():
    ex = MQExecutor(max_workers=2)
    try:
        keys = (ex.key, reply_key(ex))
        for key in keys:
            assert sysv_ipc.MessageQueue(key).mode & 0o777 == 0o600
        assert sysv_ipc.MessageQueue(ex.key).id == ex.msqid
        assert ex.submit(square, 2).result(timeout=10) == 4
    finally:
        shutdown_or_fail(ex)
    for key in keys:
        assert not queue_exists(key)


def test_explicit_key_created_0600_and_kept_after_shutdown():
    key = unused_key()
    try:
        with pool(key) as ex:
            assert ex.key == key
            q = sysv_ipc.MessageQueue(key)
            assert q.mode & 0o777 == 0o600
            assert ex.submit(square, 5).result(timeout=10) == 25
        # The queue of an explicit key outlives the executor (Swoole's
        # message_queue_key); the test owns it and removes it.
        assert queue_exists(key)
    finally:
        remove_test_key(key)


def test_explicit_key_uses_existing_queue():
    key = unused_key()
    q = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
    try:
        with pool(key) as ex:
            assert ex.msqid == q.id
            assert [f.result(timeout=10) for f in [ex.submit(square, i) for i in range(20)]] \
                == [i * i for i in range(20)]
    finally:
        remove_test_key(key)


def test_two_executors_on_one_key_get_their_own_results():
    """Two pools serving one explicit key (Swoole's message_queue_key shared by
    two servers): every result goes back to the executor that submitted it
    (Swoole #282: two servers on one key got each other's results)."""
    key = unused_key()
    try:
        with pool(key) as a, pool(key) as b:
            fa = [a.submit(add, 1000, i) for i in range(200)]
            fb = [b.submit(add, 2000, i) for i in range(200)]
            assert [f.result(timeout=30) for f in fa] == [1000 + i for i in range(200)]
            assert [f.result(timeout=30) for f in fb] == [2000 + i for i in range(200)]
    finally:
        remove_test_key(key)


@pytest.mark.parametrize("bad", [0, 1.5, "123", True])
def test_bad_key(bad):
    with pytest.raises((TypeError, ValueError)):
        MQExecutor(bad, max_workers=1)


def test_ftok(tmp_path):
    path = tmp_path / "keyfile"
    path.write_text("x")
    k1 = mqexecutor.ftok(str(path))
    assert isinstance(k1, int)
    assert k1 == mqexecutor.ftok(str(path), 1)
    assert k1 == sysv_ipc.ftok(str(path), 1, silence_warning=True)
    assert mqexecutor.ftok(str(path), 2) != k1
    with pytest.raises(FileNotFoundError):
        mqexecutor.ftok(str(tmp_path / "missing"))
    for bad in (0, 256):
        with pytest.raises(ValueError):
            mqexecutor.ftok(str(path), bad)


def test_ftok_key_drives_an_executor(tmp_path):
    path = tmp_path / "keyfile"
    path.write_text("x")
    key = mqexecutor.ftok(str(path), 7)
    TEST_KEYS.add(key)
    if queue_exists(key):
        pytest.skip("ftok key collides with an existing queue")
    try:
        with pool(key) as ex:
            assert ex.key == key
            assert ex.submit(add, 1, 2).result(timeout=10) == 3
    finally:
        remove_test_key(key)


# --------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------

def test_submit_args_and_kwargs_positional_only_fn():
    with pool() as ex:
        assert ex.submit(add, 1, b=2).result(timeout=10) == 3
        # fn is positional-only: "fn" and "self" are free for the task's kwargs
        args, kwargs = ex.submit(echo_kwargs, 1, fn=2, self=3).result(timeout=10)
        assert args == (1,) and kwargs == {"fn": 2, "self": 3}


def test_submit_not_callable_raises_type_error():
    with pool() as ex:
        with pytest.raises(TypeError):
            ex.submit(42)
        assert ex.submit(square, 2).result(timeout=10) == 4


def test_worker_id_is_none_outside_a_worker():
    assert mqexecutor.worker_id() is None
    assert mqexecutor.current_task_id() is None
    with pool() as ex:
        wid, pid = ex.submit(where).result(timeout=10)
        assert wid in (0, 1)
        assert pid in ex._processes
        assert pid != os.getpid()
    assert mqexecutor.worker_id() is None


def test_current_task_id_matches_future():
    from .helpers import task_id_of
    with pool() as ex:
        fs = [ex.submit(task_id_of) for _ in range(5)]
        assert [f.result(timeout=10) for f in fs] == [f.task_id for f in fs]


def test_lambdas_and_closures_from_a_test():
    k = 5

    def closure(x):
        return x + k

    with pool() as ex:
        assert ex.submit(lambda x: x * 3, 4).result(timeout=10) == 12
        assert ex.submit(closure, 1).result(timeout=10) == 6


@pytest.mark.timeout(90)
def test_submit_never_blocks_on_a_full_kernel_queue(tmp_path):
    """5000 tasks while both workers are blocked: the default 16 KB kernel queue
    holds ~200, the rest must wait in-process without blocking the caller."""
    gate = Gate(tmp_path)
    with pool(max_workers=2) as ex:
        try:
            blockers = [ex.submit(gated, gate.path, gate.started_dir, i) for i in range(2)]
            gate.wait_started(2)
            t0 = time.monotonic()
            fs = [ex.submit(square, i) for i in range(5000)]
            elapsed = time.monotonic() - t0
            assert elapsed < 10, f"submitting 5000 tasks took {elapsed:.1f} s"
            assert not any(f.done() for f in fs)  # the workers really were blocked
        finally:
            gate.open()
        assert [f.result(timeout=60) for f in fs] == [i * i for i in range(5000)]
        assert all(b.result(timeout=10) for b in blockers)


def test_submit_after_shutdown_raises_runtime_error():
    ex = MQExecutor(max_workers=1)
    shutdown_or_fail(ex)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


# --------------------------------------------------------------------------
# initializer
# --------------------------------------------------------------------------

def test_initializer_with_initargs_sets_a_global():
    with pool(initializer=set_global, initargs=("a", 2)) as ex:
        assert [f.result(timeout=10) for f in [ex.submit(get_global) for _ in range(6)]] \
            == [("a", 2)] * 6
    assert get_global() is None  # ran in the workers, not here


def test_initializer_runs_again_in_replacement_workers():
    with pool(initializer=set_global, initargs=(42,), max_tasks_per_child=1) as ex:
        results = [ex.submit(get_global).result(timeout=10) for _ in range(4)]
        assert results == [(42,)] * 4


# --------------------------------------------------------------------------
# code defined in __main__
# --------------------------------------------------------------------------

MAIN_SCRIPT = textwrap.dedent("""
    import os, sys
    import mqexecutor
    from mqexecutor import MQExecutor

    def top_level(x):
        return ("top", x, mqexecutor.worker_id() is not None)

    def main():
        k = 10

        class Local:
            def __init__(self, v):
                self.v = v
            def doubled(self):
                return self.v * 2

        def closure(x):
            return x + k

        with MQExecutor(max_workers=2) as ex:
            # defined after the workers were forked: the worker's __main__ does
            # not have it, so it must travel by value
            def late(x):
                return x * 100
            assert ex.submit(top_level, 1).result(timeout=20) == ("top", 1, True)
            assert ex.submit(lambda x: x * 3, 4).result(timeout=20) == 12
            assert ex.submit(closure, 1).result(timeout=20) == 11
            assert ex.submit(late, 2).result(timeout=20) == 200
            obj = ex.submit(lambda: Local(21)).result(timeout=20)
            assert obj.doubled() == 42
            assert ex.submit(lambda o: o.doubled(), Local(4)).result(timeout=20) == 8
            assert list(ex.map(lambda a, b: a - b, [5, 6], [1, 2])) == [4, 4]
        print("OK")

    if __name__ == "__main__":
        main()
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dash_c", [False, True], ids=["script", "python-c"])
def test_functions_lambdas_closures_classes_defined_in_main(tmp_path, dash_c):
    res = run_script(MAIN_SCRIPT, tmp_path, dash_c=dash_c)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK", (res.stdout, res.stderr)


SPAWN_SCRIPT = textwrap.dedent("""
    import multiprocessing, os
    import mqexecutor
    from mqexecutor import MQExecutor

    def f(x):
        return x + 1, mqexecutor.worker_id() is not None

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("spawn")
        with MQExecutor(max_workers=2, mp_context=ctx) as ex:
            assert ex.submit(f, 1).result(timeout=30) == (2, True)
            assert ex.submit(lambda: 7).result(timeout=30) == 7
        print("OK")
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dash_c", [False, True], ids=["script", "python-c"])
def test_spawn_context_runs_main_functions(tmp_path, dash_c):
    res = run_script(SPAWN_SCRIPT, tmp_path, dash_c=dash_c)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK", (res.stdout, res.stderr)
