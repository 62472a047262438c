"""Several small tasks in one message (Flag.BATCH) when the backlog is long.

Each test makes a backlog for real: one worker is held on a gate while
hundreds of tasks are submitted, so the kernel queue fills and the rest waits
in the process; ``batch_size`` fixes how many go in one message once the gate
opens. The faults are real too: the worker runs ``os._exit`` mid-batch.
"""
from __future__ import annotations

import os

import pytest

from mqexecutor import Mode, TerminatedWorkerError
from tests.helpers import Gate, gated, pool, wait_until

N = 400


def die_on(x, bad, marker_dir=None):
    """Return ``x``; on ``bad``, kill the worker (once, when ``marker_dir`` is
    given: the marker file makes the second run succeed)."""
    if x == bad:
        if marker_dir is None:
            os._exit(7)
        marker = os.path.join(marker_dir, f"died-{x}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(7)
    return x


def _backlog(ex, gate, fn, *extra, n=N):
    blocker = ex.submit(gated, gate.path, gate.started_dir, "blocker")
    gate.wait_started(1)
    futures = [ex.submit(fn, i, *extra) for i in range(n)]
    assert ex.stats().backlog > 0, "the test needs tasks waiting in the backlog"
    return blocker, futures


def _batches_seen(ex) -> int:
    return len(ex._state.batch_of)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_batched_tasks_all_complete_in_order(tmp_path, mode):
    gate = Gate(tmp_path)
    with pool(max_workers=1, mode=mode, batch_size=50) as ex:
        blocker, futures = _backlog(ex, gate, die_on, -1)
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in futures] == list(range(N))


@pytest.mark.timeout(60)
def test_worker_death_mid_batch_fails_only_that_task(tmp_path):
    gate = Gate(tmp_path)
    bad = N - 20  # far enough to be in the backlog, so it travels in a batch
    with pool(max_workers=1, batch_size=50) as ex:
        blocker, futures = _backlog(ex, gate, die_on, bad)
        gate.open()
        blocker.result(timeout=30)
        for i, f in enumerate(futures):
            if i == bad:
                with pytest.raises(TerminatedWorkerError) as info:
                    f.result(timeout=30)
                assert "exit code 7" in str(info.value)
            else:
                assert f.result(timeout=30) == i
        assert ex.submit(abs, -5).result(timeout=30) == 5


@pytest.mark.timeout(60)
def test_retry_of_a_task_that_killed_its_worker_mid_batch(tmp_path):
    gate = Gate(tmp_path)
    bad = N - 30
    with pool(max_workers=1, batch_size=40, retries=1) as ex:
        blocker, futures = _backlog(ex, gate, die_on, bad, str(tmp_path))
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in futures] == list(range(N))
        assert os.path.exists(tmp_path / f"died-{bad}")


@pytest.mark.timeout(60)
def test_max_tasks_per_child_splits_batches(tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=1, batch_size=30, max_tasks_per_child=7,
              mode=Mode.TARGETED) as ex:
        blocker, futures = _backlog(ex, gate, die_on, -1, n=200)
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in futures] == list(range(200))
        # every worker ran at most 7 tasks: 201 tasks need at least 29 workers
        assert wait_until(lambda: all(p.is_alive() for p in ex._processes.values()))


@pytest.mark.timeout(60)
def test_cancel_futures_withdraws_batched_tasks(tmp_path):
    gate = Gate(tmp_path)
    ex_ctx = pool(max_workers=1, batch_size=50)
    with ex_ctx as ex:
        blocker, futures = _backlog(ex, gate, die_on, -1)
        # move much of the backlog into the kernel queue as batches
        ex._state.feed()
        ex.shutdown(wait=False, cancel_futures=True)
        gate.open()
        blocker.result(timeout=30)
        cancelled = sum(f.cancelled() for f in futures)
        done = [f for f in futures if not f.cancelled()]
        assert cancelled > N // 2
        for f in done:
            f.result(timeout=30)


def test_batch_size_is_validated():
    from mqexecutor import MQExecutor
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="batch_size"):
            MQExecutor(max_workers=1, batch_size=bad)
