"""A thread waiting in result() takes replies off the reply queue itself
(producer/receiver.py): it gets its own result without waking the collector,
done callbacks still run and may wait, what it may not handle goes to the
collector in order, and an interrupt while it handles a reply loses no Future."""
from __future__ import annotations

import collections
import logging
import threading

import pytest

from mqexecutor.producer import collector as collector_module

from .helpers import pool, square, wait_until

pytestmark = pytest.mark.timeout(60)


def _handlers(ex) -> collections.Counter:
    """Count, per thread name, the replies of ``ex`` handled from now on."""
    seen: collections.Counter = collections.Counter()

    def observe(n, raw):
        seen[threading.current_thread().name] += 1

    ex._state.collector.observe = observe
    return seen


@pytest.mark.parametrize("mode", [2, 3], ids=["targeted", "preemptive"])
def test_the_thread_waiting_in_result_handles_its_own_reply(mode):
    with pool(max_workers=2, mode=mode) as ex:
        for i in range(50):  # warm up: cloudpickle, the workers' polling
            assert ex.submit(square, i).result() == i * i
        seen = _handlers(ex)
        for i in range(300):
            assert ex.submit(square, i).result(timeout=30) == i * i
        # a reply the waiting thread did not take in time goes to the collector
        assert seen["MainThread"] >= 150, seen
        assert sum(seen.values()) == 300


def test_a_done_callback_run_by_the_waiting_thread_may_wait_on_another_future():
    """The callbacks of a Future completed by a waiting thread run once it has
    stopped polling: one that waits on another Future does not deadlock. (A
    callback the collector runs must not wait: it is the thread that would
    complete the other Future, as in ProcessPoolExecutor.)"""
    main = threading.main_thread()
    with pool(max_workers=2) as ex:
        ex.submit(square, 1).result()
        got = []
        ran = collections.Counter()

        def chain(fut):
            ran[threading.current_thread().name] += 1
            if threading.current_thread() is main:
                got.append((fut.result(),
                            ex.submit(square, fut.result() + 1).result(timeout=20)))

        for i in range(200):
            f = ex.submit(square, i)
            f.add_done_callback(chain)
            assert f.result(timeout=20) == i * i
        assert wait_until(lambda: sum(ran.values()) == 200, 20), ran
        assert ran["MainThread"] >= 20, ran
        assert len(got) == ran["MainThread"]
        assert all(second == (first + 1) ** 2 for first, second in got), got


def log_then_square(x):
    logging.getLogger("tests.receiver").warning("record of %d", x)
    return x * x


def test_relayed_records_arrive_before_the_result_they_precede(collected):
    """A waiting thread hands a RELAY message to the collector and stops: the
    record is delivered, then the result, in the order they were sent."""
    with pool(max_workers=2) as ex:
        ex.submit(square, 1).result()
        for i in range(100):
            assert ex.submit(log_then_square, i).result(timeout=20) == i * i
            ours = [r.getMessage() for r in collected if r.name == "tests.receiver"]
            assert ours[-1:] == [f"record of {i}"], ours[-3:]


def test_threads_waiting_together_each_get_their_results():
    with pool(max_workers=2) as ex:
        errors = []

        def loop(base):
            try:
                for i in range(base, base + 200):
                    assert ex.submit(square, i).result(timeout=20) == i * i
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors


def test_an_interrupt_while_handling_a_reply_loses_no_future(monkeypatch):
    """KeyboardInterrupt in the waiting thread between taking a Future out of
    pending and completing it (injected: a real Ctrl-C cannot be aimed there):
    result() raises it, and the Future is completed all the same."""
    real = collector_module.Collector.set_value
    main = threading.main_thread()
    raised = []

    def interrupted(self, fut, data):
        if threading.current_thread() is main and not raised:
            raised.append(fut.task_id)
            raise KeyboardInterrupt
        return real(self, fut, data)

    with pool(max_workers=2) as ex:
        ex.submit(square, 1).result()
        monkeypatch.setattr(collector_module.Collector, "set_value", interrupted)
        futures = []
        for i in range(200):
            f = ex.submit(square, i)
            futures.append(f)
            try:
                assert f.result(timeout=20) == i * i
            except KeyboardInterrupt:
                assert raised == [f.task_id]
                assert f.result(timeout=20) == i * i  # the collector completed it
        assert raised, "no reply was handled by the waiting thread"
        assert [f.result(timeout=20) for f in futures] == [i * i for i in range(200)]
        assert not ex._state.dispatch.pending


_INTERRUPTED: list[int] = []


def _value_interrupting_main_once(value):
    """Unpickled in the owner: raise KeyboardInterrupt the first time the main
    thread unpickles it (a Ctrl-C that lands while the waiting thread reads
    the result), else give ``value``."""
    if threading.current_thread() is threading.main_thread() and not _INTERRUPTED:
        _INTERRUPTED.append(value)
        raise KeyboardInterrupt
    return value


class InterruptsWhenRead:
    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return _value_interrupting_main_once, (self.value,)


def interrupting_result(x):
    return InterruptsWhenRead(x)


def test_an_interrupt_while_unpickling_a_result_is_raised_and_the_result_kept():
    """A KeyboardInterrupt raised while the waiting thread unpickles a result
    is the user's, not the result's: result() raises it, and the Future then
    gets its value (the collector reads the reply again), not an unpickling
    error."""
    _INTERRUPTED.clear()
    with pool(max_workers=2) as ex:
        ex.submit(square, 1).result()
        for i in range(200):
            f = ex.submit(interrupting_result, i)
            try:
                assert f.result(timeout=20) == i
            except KeyboardInterrupt:
                assert _INTERRUPTED == [i]
                assert f.result(timeout=20) == i
                break
        assert _INTERRUPTED, "no result was read by the waiting thread"
