"""Mode.TARGETED / Mode.PREEMPTIVE, submit_to, least-loaded placement,
max_tasks_per_child."""
from __future__ import annotations

import enum
import itertools

import pytest

import mqexecutor
from mqexecutor import Mode, QueueModeError

from .helpers import Gate, gated, getpid, length, pool, square, where

pytestmark = pytest.mark.timeout(60)


def test_mode_enum_values():
    assert issubclass(Mode, enum.IntEnum)
    assert Mode.TARGETED == 2
    assert Mode.PREEMPTIVE == 3
    assert Mode(2) is Mode.TARGETED
    assert Mode(3) is Mode.PREEMPTIVE


def test_default_mode_is_preemptive():
    with pool() as ex:
        assert ex.mode is Mode.PREEMPTIVE


def test_submit_to_runs_on_that_worker_with_a_stable_pid():
    with pool(max_workers=2, mode=Mode.TARGETED) as ex:
        for target in (0, 1):
            fs = [ex.submit_to(target, where) for _ in range(10)]
            assert all(f.worker_id == target for f in fs)
            results = [f.result(timeout=10) for f in fs]
            assert {wid for wid, _ in results} == {target}
            pids = {pid for _, pid in results}
            assert len(pids) == 1
            assert pids <= set(ex._processes)
        # the two workers are different processes
        assert ex.submit_to(0, getpid).result(timeout=10) != \
            ex.submit_to(1, getpid).result(timeout=10)


def test_submit_to_accepts_int_mode():
    with pool(max_workers=2, mode=2) as ex:
        assert ex.submit_to(1, where).result(timeout=10)[0] == 1


def test_submit_to_kwargs_and_positional_only():
    from .helpers import echo_kwargs
    with pool(max_workers=2, mode=Mode.TARGETED) as ex:
        args, kwargs = ex.submit_to(1, echo_kwargs, 1, worker_id=5, fn=6).result(timeout=10)
        assert args == (1,) and kwargs == {"worker_id": 5, "fn": 6}


def test_plain_submit_picks_least_loaded_worker(tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=2, mode=Mode.TARGETED) as ex:
        try:
            blocker = ex.submit_to(0, gated, gate.path, gate.started_dir, "b")
            gate.wait_started(1)
            for _ in range(5):
                f = ex.submit(where)
                assert f.worker_id == 1
                wid, _pid = f.result(timeout=10)
                assert wid == 1
        finally:
            gate.open()
        assert blocker.result(timeout=10)[0] == 0


def test_plain_submit_spreads_over_idle_workers(tmp_path):
    # Tasks that wait on a gate stay outstanding, so the least busy worker
    # alternates: 3 each, whatever the timing.
    gate = Gate(tmp_path)
    with pool(max_workers=2, mode=Mode.TARGETED) as ex:
        try:
            fs = [ex.submit(gated, gate.path, gate.started_dir, i, i) for i in range(6)]
            assert sorted(f.worker_id for f in fs) == [0, 0, 0, 1, 1, 1]
        finally:
            gate.open()
        assert [f.result(timeout=10) for f in fs] == list(range(6))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_size,size,per_message", [(1, 0, 1), (10, 0, 10), (200, 2000, 3)])
def test_plain_submit_gives_a_message_worth_to_one_worker_while_batching(
        tmp_path, batch_size, size, per_message):
    """With tasks packed batch_size to a message, plain submits go to one worker
    in runs of at least a message's worth, so its tasks lie together in the
    backlog; at every point the loads differ by at most one message's worth.
    With batch_size=1 that is the least busy worker each time (the one used
    last on a tie). A message's worth is fewer than batch_size tasks when
    fewer fit in one message (3 of 2000 bytes in 8 KB)."""
    gate = Gate(tmp_path)
    with pool(max_workers=2, mode=Mode.TARGETED, batch_size=batch_size) as ex:
        try:
            blockers = [ex.submit_to(w, gated, gate.path, gate.started_dir, f"b{w}")
                        for w in (0, 1)]
            gate.wait_started(2)
            fs = [ex.submit(length, b"x" * size) for _ in range(100)]
            ids = [f.worker_id for f in fs]
            runs = [len(list(g)) for _, g in itertools.groupby(ids)]
            if per_message > 1:  # (every run is a multiple of 1)
                assert all(r % per_message == 0 for r in runs[:-1]), runs
            assert max(runs) <= 2 * per_message, runs
            for n in range(1, len(ids) + 1):
                assert abs(ids[:n].count(0) - ids[:n].count(1)) <= per_message, ids[:n]
        finally:
            gate.open()
        assert [f.result(timeout=30) for f in fs] == [size] * 100
        assert [b.result(timeout=30)[0] for b in blockers] == [0, 1]


def test_plain_submit_prefers_the_worker_used_last_when_all_are_idle():
    # Sequential submit().result(): the worker that just answered is still
    # polling for its next task, so it gets it.
    with pool(max_workers=2, mode=Mode.TARGETED) as ex:
        fs = []
        for i in range(20):
            f = ex.submit(square, i)
            assert f.result(timeout=10) == i * i
            fs.append(f)
        assert len({f.worker_id for f in fs}) == 1


def test_preemptive_submit_to_is_refused():
    with pool(max_workers=2) as ex:
        with pytest.raises(QueueModeError) as info:
            ex.submit_to(0, square, 2)
        assert isinstance(info.value, ValueError)
        assert "Mode.TARGETED" in str(info.value)
        # the pool is unaffected
        f = ex.submit(square, 3)
        assert f.worker_id is None
        assert f.result(timeout=10) == 9


def test_submit_to_bad_worker_id():
    with pool(max_workers=2, mode=Mode.TARGETED) as ex:
        for bad in (-1, 2, 100):
            with pytest.raises(ValueError):
                ex.submit_to(bad, square, 2)
        for bad in (True, 1.0, "0", None):
            with pytest.raises((TypeError, ValueError)):
                ex.submit_to(bad, square, 2)
        assert ex.submit_to(1, square, 2).result(timeout=10) == 4


def test_preemptive_workers_all_take_tasks(tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=2) as ex:
        try:
            fs = [ex.submit(gated, gate.path, gate.started_dir, i) for i in range(2)]
            gate.wait_started(2)  # two tasks running at once: both workers took one
        finally:
            gate.open()
        assert {f.result(timeout=10)[0] for f in fs} == {0, 1}


# --------------------------------------------------------------------------
# max_tasks_per_child
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1])
def test_max_tasks_per_child_must_be_positive(bad):
    with pytest.raises(ValueError):
        mqexecutor.MQExecutor(max_workers=1, max_tasks_per_child=bad)


def test_max_tasks_per_child_targeted_keeps_worker_id():
    with pool(max_workers=2, mode=Mode.TARGETED, max_tasks_per_child=3) as ex:
        fs = [ex.submit_to(0, where) for _ in range(10)]
        results = [f.result(timeout=20) for f in fs]
        assert all(wid == 0 for wid, _ in results)
        pids = [pid for _, pid in results]
        assert len(set(pids)) >= 4
        # consecutive runs of at most 3 tasks per process
        for pid in set(pids):
            assert pids.count(pid) <= 3
        # worker 1 untouched
        assert ex.submit_to(1, where).result(timeout=10)[0] == 1


def test_max_tasks_per_child_preemptive():
    with pool(max_workers=2, max_tasks_per_child=2) as ex:
        results = [f.result(timeout=20) for f in [ex.submit(where) for _ in range(20)]]
        assert {wid for wid, _ in results} <= {0, 1}
        pids = [pid for _, pid in results]
        assert len(set(pids)) >= 10
        assert all(pids.count(p) <= 2 for p in set(pids))
        assert len(ex._processes) == 2


def test_max_tasks_per_child_replaced_processes_are_reaped():
    import os
    with pool(max_workers=1, max_tasks_per_child=1) as ex:
        pids = [ex.submit(getpid).result(timeout=10) for _ in range(5)]
        assert len(set(pids)) == 5
        current = set(ex._processes)
    from .helpers import pid_alive, wait_until
    old = set(pids) - current
    assert wait_until(lambda: not any(pid_alive(p) for p in old), 10), \
        [p for p in old if pid_alive(p)]
    assert not any(pid_alive(p) for p in current)
    assert os.getpid() not in pids


def test_processes_readable_while_workers_are_replaced():
    """``ex._processes`` ({pid: Process}) can be read at any time, also while a
    worker is being replaced after max_tasks_per_child tasks."""
    import threading
    with pool(max_workers=2, max_tasks_per_child=1) as ex:
        errors = []
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    procs = ex._processes
                    assert all(isinstance(pid, int) for pid in procs)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
                    return

        t = threading.Thread(target=reader)
        t.start()
        try:
            pids = [f.result(timeout=20) for f in [ex.submit(getpid) for _ in range(150)]]
        finally:
            stop.set()
            t.join(10)
        assert len(set(pids)) == 150
        assert not errors, repr(errors[0])


def test_max_tasks_per_child_one_keeps_the_pool_full():
    with pool(max_workers=2, max_tasks_per_child=1) as ex:
        pids = [f.result(timeout=20) for f in [ex.submit(getpid) for _ in range(100)]]
        assert len(set(pids)) == 100
        from .helpers import wait_until
        assert wait_until(lambda: len(ex._processes) == 2 and
                          all(p.is_alive() for p in ex._processes.values()), 10)


def test_targeted_more_workers_than_cpus():
    with pool(max_workers=6, mode=Mode.TARGETED) as ex:
        fs = {w: [ex.submit_to(w, where) for _ in range(5)] for w in range(6)}
        pids = {}
        for w, futures in fs.items():
            results = [f.result(timeout=20) for f in futures]
            assert {wid for wid, _ in results} == {w}
            assert len({pid for _, pid in results}) == 1
            pids[w] = results[0][1]
        assert len(set(pids.values())) == 6
        assert set(pids.values()) == set(ex._processes)


def _raise_in_task():
    raise KeyError("x")


def test_least_loaded_accounting_survives_failures(tmp_path):
    """Tasks of worker 0 that fail in every way must not stay counted as
    outstanding: afterwards, with worker 1 blocked, plain submits go to 0."""
    from concurrent.futures.process import BrokenProcessPool

    from .helpers import exit_now, identity, threading_lock
    from .test_failures import ErrorAtResultUnpickle, ErrorAtUnpickle, return_instance
    gate = Gate(tmp_path)
    with pool(max_workers=2, mode=Mode.TARGETED) as ex:
        failing = [
            ex.submit_to(0, exit_now, 1),
            ex.submit_to(0, identity, ErrorAtUnpickle()),
            ex.submit_to(0, return_instance, ErrorAtResultUnpickle),
            ex.submit_to(0, _raise_in_task),
            ex.submit_to(0, identity, threading_lock()),  # fails to pickle
            ex.submit_to(0, exit_now, 2),
        ]
        for f in failing:
            assert f.exception(timeout=20) is not None
        assert isinstance(failing[0].exception(), BrokenProcessPool)
        try:
            blocker = ex.submit_to(1, gated, gate.path, gate.started_dir, "b")
            gate.wait_started(1)
            for _ in range(5):
                f = ex.submit(where)
                assert f.worker_id == 0
                assert f.result(timeout=10)[0] == 0
        finally:
            gate.open()
        assert blocker.result(timeout=10)[0] == 1
