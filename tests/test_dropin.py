"""Behaviours a drop-in ProcessPoolExecutor must have, each found missing
once: CPython's bpo-14406 (map keeps no yielded result), bpo-16284 (no
reference kept to a done task's callable), gh-132063 (a falsy exception is
raised), a result is never lost to a worker crash after its task returned, and
workers killing each other during a map() neither hang it nor shutdown()."""
from __future__ import annotations

import gc
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import pytest

from mqexecutor import MQExecutor

from .helpers import (
    ExitWhenFreed,
    FalsyError,
    Heavy,
    kill_a_sibling,
    make_heavy,
    pool,
    raise_falsy,
    return_then_die_freeing_arguments,
    shutdown_or_fail,
    square,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_keeps_no_reference_to_a_yielded_result(chunksize):
    """bpo-14406: a result the caller dropped is freed while the map lives."""
    with pool(max_workers=2) as ex:
        it = ex.map(make_heavy, range(6), chunksize=chunksize)
        first = next(it)
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None, "map() still holds a result it yielded"
        assert [h.n for h in it] == [1, 2, 3, 4, 5]


def test_a_done_task_keeps_no_reference_to_its_callable():
    """bpo-16284: a bound method's object is freed once its task is done and
    its Future discarded (the executor caches nothing of it)."""
    with pool(max_workers=1) as ex:
        holder = Heavy(7)
        ref = weakref.ref(holder)
        assert ex.submit(holder.method, 1).result(timeout=30) == 8
        assert ex.submit(Heavy(1).method).result(timeout=30) == 1
        del holder
        gc.collect()
        assert ref() is None, "the executor keeps the submitted callable's object"


def test_a_function_sent_by_value_keeps_nothing_alive_once_done():
    """bpo-16284 for functions pickled once (mqexecutor.functions): a closure
    made for one call, and what it captured, are freed once its task is done."""
    with pool(max_workers=1) as ex:
        captured = Heavy(5)
        ref = weakref.ref(captured)

        def make(h):
            return lambda x: h.n + x

        fn = make(captured)
        fn_ref = weakref.ref(fn)
        assert ex.submit(fn, 1).result(timeout=30) == 6
        assert ex.submit(fn, 2).result(timeout=30) == 7  # its pickle made once
        del captured, fn
        gc.collect()
        assert fn_ref() is None and ref() is None, "a cache keeps the closure alive"


def test_falsy_exception_is_raised_not_returned():
    """gh-132063: result() raises an exception whose __bool__ is False."""
    with pool(max_workers=1) as ex:
        f = ex.submit(raise_falsy)
        with pytest.raises(FalsyError, match="falsy but raised"):
            f.result(timeout=30)
        assert isinstance(f.exception(), FalsyError)


def test_a_crash_after_the_task_returned_keeps_its_result():
    """The worker dies while freeing the call's arguments, after the function
    returned: the Future gets the result, the worker is replaced."""
    with pool(max_workers=1) as ex:
        pid = next(iter(ex._processes))
        f = ex.submit(return_then_die_freeing_arguments, ExitWhenFreed())
        assert f.result(timeout=30) == "returned"
        assert wait_until(lambda: pid not in ex._processes and len(ex._processes) == 1, 10)
        assert ex.submit(square, 3).result(timeout=30) == 9


def test_a_crash_after_a_batched_task_returned_keeps_its_result_and_the_rest(tmp_path):
    """As above, for a task inside a BATCH message: its result is delivered
    from the worker's outbox and the tasks after it in the batch run again."""
    from .helpers import Gate, gated
    gate = Gate(tmp_path)
    with pool(max_workers=1, batch_size=20) as ex:
        blocker = ex.submit(gated, gate.path, gate.started_dir, "blocker")
        gate.wait_started(1)
        futures = [ex.submit(square, i) for i in range(30)]
        crash = ex.submit(return_then_die_freeing_arguments, ExitWhenFreed())
        after = [ex.submit(square, i) for i in range(30, 60)]
        assert ex.stats().backlog > 0, "the test needs a backlog, sent in batches"
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(30)]
        assert crash.result(timeout=30) == "returned"
        assert [f.result(timeout=30) for f in after] == [i * i for i in range(30, 60)]


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_workers_killing_each_other_during_map_neither_hang_it_nor_shutdown(workers):
    """Tasks SIGKILL random workers of their pool while a map() runs: the map
    raises a BrokenProcessPool subclass (the killed task's error) within its
    timeout, and shutdown(wait=True) returns."""
    for _ in range(3):
        ex = MQExecutor(max_workers=workers)
        try:
            with pytest.raises(BrokenProcessPool):
                for _ in ex.map(kill_a_sibling, range(200), timeout=30):
                    pass
        finally:
            started = time.monotonic()
            shutdown_or_fail(ex, 20)
            assert time.monotonic() - started < 20
