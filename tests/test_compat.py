"""Drop-in behaviour of concurrent.futures: callbacks, wait, as_completed,
cancel, Future states, submit from many threads, callbacks that submit."""
from __future__ import annotations

import concurrent.futures as cf
import os
import queue
import threading

import pytest

from mqexecutor import MQExecutor as MQExecutor_
from mqexecutor import Mode

from .helpers import (
    Gate,
    gated,
    gated_identity,
    mul,
    pool,
    raise_value_error,
    square,
    touch_marker,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def test_add_done_callback_on_pending_and_done_futures(tmp_path):
    gate = Gate(tmp_path)
    calls = queue.Queue()
    with pool() as ex:
        try:
            f = ex.submit(gated_identity, gate.path, 5)
            f.add_done_callback(lambda fut: calls.put(("pending", fut, threading.get_ident())))
            assert calls.empty()
        finally:
            gate.open()
        name, fut, _ = calls.get(timeout=10)
        assert name == "pending" and fut is f and fut.result() == 5
        # on an already-done future the callback runs at once, in this thread
        seen = []
        f.add_done_callback(lambda fut: seen.append((fut, threading.get_ident())))
        assert seen == [(f, threading.get_ident())]
        # a failed future's callback sees the exception
        g = ex.submit(raise_value_error, "cb")
        got = queue.Queue()
        g.add_done_callback(lambda fut: got.put(fut.exception()))
        exc = got.get(timeout=10)
        assert isinstance(exc, ValueError) and str(exc) == "cb"
        assert calls.empty()


def test_callback_exceptions_do_not_break_the_pool(caplog):
    with pool() as ex:
        done = threading.Event()

        def bad_callback(fut):
            done.set()
            raise RuntimeError("callback failure")

        f = ex.submit(square, 2)
        f.add_done_callback(bad_callback)
        assert done.wait(10)
        assert f.result(timeout=10) == 4
        assert ex.submit(square, 3).result(timeout=10) == 9


def test_wait_first_completed(tmp_path):
    gate = Gate(tmp_path)
    with pool() as ex:
        try:
            slow = ex.submit(gated_identity, gate.path, "slow")
            fast = ex.submit(square, 3)
            done, not_done = cf.wait([slow, fast], timeout=20,
                                     return_when=cf.FIRST_COMPLETED)
            assert fast in done
            assert slow in not_done
        finally:
            gate.open()
        assert slow.result(timeout=10) == "slow"


def test_wait_first_exception(tmp_path):
    gate = Gate(tmp_path)
    with pool() as ex:
        try:
            slow = ex.submit(gated_identity, gate.path, "slow")
            ok = ex.submit(square, 3)
            bad = ex.submit(raise_value_error, "first")
            done, not_done = cf.wait([slow, ok, bad], timeout=20,
                                     return_when=cf.FIRST_EXCEPTION)
            assert bad in done
            assert slow in not_done
            assert isinstance(bad.exception(), ValueError)
        finally:
            gate.open()


def test_wait_all_completed_and_timeout(tmp_path):
    gate = Gate(tmp_path)
    with pool() as ex:
        try:
            fs = [ex.submit(gated_identity, gate.path, i) for i in range(4)]
            done, not_done = cf.wait(fs, timeout=0.3)
            assert not done and set(not_done) == set(fs)
        finally:
            gate.open()
        done, not_done = cf.wait(fs, timeout=20, return_when=cf.ALL_COMPLETED)
        assert set(done) == set(fs) and not not_done
        assert sorted(f.result() for f in fs) == [0, 1, 2, 3]


def test_as_completed():
    with pool() as ex:
        fs = {ex.submit(mul, i, 2): i for i in range(30)}
        seen = []
        for f in cf.as_completed(fs, timeout=30):
            assert f.result() == fs[f] * 2
            seen.append(f)
        assert set(seen) == set(fs) and len(seen) == 30


def test_as_completed_timeout(tmp_path):
    gate = Gate(tmp_path)
    with pool() as ex:
        try:
            fast = ex.submit(square, 2)
            assert fast.result(timeout=10) == 4
            slow = ex.submit(gated_identity, gate.path, 1)
            it = cf.as_completed([fast, slow], timeout=0.5)
            assert next(it) is fast
            with pytest.raises(cf.TimeoutError):
                next(it)
        finally:
            gate.open()
        assert slow.result(timeout=10) == 1


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_cancel_a_pending_future(tmp_path, mode):
    """Tasks already in the kernel queue are RUNNING (as in ProcessPoolExecutor's
    call queue); those waiting behind a full kernel queue are PENDING and can be
    cancelled. 4000-byte arguments: about 4 fit in the 16 KB queue."""
    gate = Gate(tmp_path)
    markers = tmp_path / "markers"
    markers.mkdir()
    pad = "x" * 4000
    with pool(max_workers=2, mode=mode) as ex:
        try:
            blockers = [ex.submit(gated, gate.path, gate.started_dir, i) for i in range(2)]
            gate.wait_started(2)
            fs = [ex.submit(_marker_after_gate, gate.path, str(markers), i, pad)
                  for i in range(12)]
            assert fs[0].running() and not fs[0].cancel()  # in the kernel queue
            last = fs[-1]
            assert not last.running() and not last.done()
            assert last.cancel()
            assert last.cancelled() and last.done()
            assert last.cancel()  # cancelling again is harmless
            with pytest.raises(cf.CancelledError):
                last.result(timeout=1)
            cancelled_cb = queue.Queue()
            fs[-2].add_done_callback(cancelled_cb.put)
            assert fs[-2].cancel()
            assert cancelled_cb.get(timeout=5) is fs[-2]
        finally:
            gate.open()
        done, not_done = cf.wait(fs, timeout=30)
        assert not not_done
        assert [f.result() for f in fs[:-2]] == list(range(10))
        assert all(b.result(timeout=10) for b in blockers)
        assert ex.submit(square, 7).result(timeout=10) == 49
    # the cancelled tasks never ran
    assert sorted(os.listdir(markers), key=int) == [str(i) for i in range(10)]


def _marker_after_gate(gate_path, directory, i, pad):
    gated_identity(gate_path, None)
    touch_marker(directory, i)
    return i


def test_future_states(tmp_path):
    gate = Gate(tmp_path)
    with pool() as ex:
        try:
            f = ex.submit(gated_identity, gate.path, 1)
            assert wait_until(f.running, 10)
            assert not f.done() and not f.cancelled()
            with pytest.raises(cf.TimeoutError):
                f.result(timeout=0.2)
        finally:
            gate.open()
        assert f.result(timeout=10) == 1
        assert f.done() and not f.running() and not f.cancelled()
        assert not f.cancel()
        assert "task_id" in repr(f)


@pytest.mark.timeout(90)
def test_submit_from_many_threads():
    nthreads, per_thread = 8, 250
    with pool() as ex:
        results: dict[int, list] = {}
        barrier = threading.Barrier(nthreads)

        def producer(t):
            barrier.wait()
            results[t] = [ex.submit(mul, t, i) for i in range(per_thread)]

        threads = [threading.Thread(target=producer, args=(t,)) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
            assert not th.is_alive()
        ids = set()
        for t, fs in results.items():
            assert [f.result(timeout=30) for f in fs] == [t * i for i in range(per_thread)]
            ids.update(f.task_id for f in fs)
        assert len(ids) == nthreads * per_thread


def test_done_callback_that_submits_another_task():
    with pool() as ex:
        chained = queue.Queue()

        def callback(fut):
            chained.put(ex.submit(square, fut.result()))

        ex.submit(square, 3).add_done_callback(callback)
        second = chained.get(timeout=10)
        assert second.result(timeout=10) == 81


def test_done_callback_chain_of_many_submits():
    with pool(mode=Mode.TARGETED) as ex:
        finished = threading.Event()
        values = []

        def step(fut):
            values.append(fut.result())
            if len(values) < 50:
                ex.submit(square, 1).add_done_callback(step)
            else:
                finished.set()

        ex.submit(square, 1).add_done_callback(step)
        assert finished.wait(30)
        assert values == [1] * 50


def test_exception_from_future_exception_method():
    with pool() as ex:
        f = ex.submit(raise_value_error, "x")
        assert isinstance(f.exception(timeout=10), ValueError)
        g = ex.submit(square, 2)
        assert g.exception(timeout=10) is None


class Adder:
    def __init__(self, base):
        self.base = base

    def add(self, x):
        return self.base + x

    def __call__(self, x):
        return self.base * x


def test_partials_bound_methods_and_callable_objects():
    import functools
    with pool() as ex:
        assert ex.submit(functools.partial(mul, 3), 4).result(timeout=10) == 12
        assert ex.submit(Adder(10).add, 5).result(timeout=10) == 15
        assert ex.submit(Adder(10), 5).result(timeout=10) == 50
        assert ex.submit(len, "abc").result(timeout=10) == 3
        assert list(ex.map(functools.partial(mul, 2), range(4))) == [0, 2, 4, 6]


def make_exception():
    return ValueError("returned, not raised")


def test_returned_exception_is_a_result_not_an_error():
    with pool() as ex:
        f = ex.submit(make_exception)
        value = f.result(timeout=10)
        assert isinstance(value, ValueError) and str(value) == "returned, not raised"
        assert f.exception() is None


def test_several_executors_at_once_keep_their_results_apart():
    from .helpers import where
    pools = [MQExecutor_(max_workers=1) for _ in range(4)]
    try:
        fs = []
        for round_ in range(50):
            for n, ex in enumerate(pools):
                fs.append((n, round_, ex.submit(mul, n, round_)))
        for n, round_, f in fs:
            assert f.result(timeout=30) == n * round_
        pids = [ex.submit(where).result(timeout=10)[1] for ex in pools]
        assert len(set(pids)) == 4
        for ex, pid in zip(pools, pids):
            assert pid in ex._processes
    finally:
        from .helpers import shutdown_or_fail
        for ex in pools:
            shutdown_or_fail(ex)


@pytest.mark.timeout(120)
def test_cancel_races_with_the_feeder(tmp_path):
    """Cancel every other task while the pool is draining a big backlog: each
    future ends up either cancelled (and its task never ran) or done (and its
    task ran exactly once)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    pad = "c" * 3000
    with pool(max_workers=2) as ex:
        fs = [ex.submit(_append_marker, str(markers), i, pad) for i in range(600)]
        cancelled = set()
        for i in range(1, 600, 2):
            if fs[i].cancel():
                cancelled.add(i)
        done, not_done = cf.wait(fs, timeout=90)
        assert not not_done
    ran = sorted(int(n) for n in os.listdir(markers))
    assert len(ran) == len(set(ran))
    assert set(ran) == set(range(600)) - cancelled
    for i, f in enumerate(fs):
        if i in cancelled:
            assert f.cancelled()
        else:
            assert f.result() == i
    assert len(cancelled) > 100  # most of the odd ones were still in the backlog


def _append_marker(directory, i, pad):
    path = os.path.join(directory, str(i))
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if run twice
    os.close(fd)
    return i
