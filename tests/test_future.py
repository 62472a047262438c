"""MQFuture without a Condition of its own: ``result()``/``exception()``
sleep on a lock of their own (``_ResultWaiter``) registered in ``_waiters``,
``cancel()`` wakes them; ``concurrent.futures.wait``, ``as_completed``, done
callbacks and ``asyncio.wrap_future`` over thousands of Futures of one
executor, and concurrent ``wait()`` calls over Futures of two executors. Then
the workers' cached pidfd check that a producer lives before each result is
sent (``mqexecutor.worker._Liveness``): an attached producer SIGKILLed while
its tasks are still queued, and a new producer that gets a dead one's pid.

Everything runs real executors; a few assertions look at ``_waiters`` (white
box) to check that no waiter is left behind.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import sysv_ipc

from mqexecutor import MQExecutor, MQFuture, ipcinfo, persistence, spill

from .helpers import (
    REPO,
    Gate,
    gated,
    gated_identity,
    pid_alive,
    pool,
    queue_exists,
    raise_value_error,
    remove_test_key,
    run_script,
    shutdown_or_fail,
    square,
    unused_key,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

#: 4000-byte arguments: 3 such tasks fill the 16 KB kernel queue (kernel.msgmnb),
#: the next ones wait in the executor's backlog (PENDING).
PAD = "p" * 4000


# --------------------------------------------------------------------------
# Task functions (module level: pickled by reference as tests.test_future.*;
# the workers are forked from this process, the producer child imports them)
# --------------------------------------------------------------------------

def gated_raise(gate_path, message):
    """Wait for the gate, then raise ValueError(message)."""
    gated_identity(gate_path, None)
    raise ValueError(message)


def gated_bytes(gate_path, started_dir, tag, size):
    """Wait for the gate like ``gated``, then return ``size`` bytes: above
    msgmax (8 KB) the result is spilled into the producer's spill directory."""
    gated(gate_path, started_dir, tag, True)
    return b"r" * size


# --------------------------------------------------------------------------
# Utilities
# --------------------------------------------------------------------------

def _result_waiters(fut: MQFuture) -> int:
    """How many ``result()``/``exception()`` calls are registered on ``fut``."""
    with fut._condition:
        return sum(type(w).__name__ == "_ResultWaiter" for w in fut._waiters)


class _Blocked:
    """Runs ``call()`` in a thread and records what it returned or raised."""

    def __init__(self, call):
        self.outcome: tuple[str, object] | None = None
        self.finished_at: float | None = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call):
        try:
            self.outcome = ("value", call())
        except BaseException as exc:  # noqa: BLE001
            self.outcome = ("raised", exc)
        self.finished_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the waiting thread is still blocked"


def _fill_with_backlog(ex: MQExecutor, gate: Gate, n: int = 10) -> tuple[MQFuture, list]:
    """One worker busy on a gated task, then ``n`` gated tasks of 4000 bytes:
    the first few in the kernel queue (RUNNING), the rest in the backlog
    (PENDING). Returns (blocker, futures)."""
    blocker = ex.submit(gated, gate.path, gate.started_dir, "blocker")
    gate.wait_started(1)
    fs = [ex.submit(gated_identity, gate.path, (i, PAD)) for i in range(n)]
    return blocker, fs


# --------------------------------------------------------------------------
# result() / exception(): many waiters, timeouts, no spurious wake-up
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_many_threads_blocked_in_result_each_get_their_own_value(tmp_path):
    """8 threads each blocked in result() on a different Future (plus 4 more
    on some of the same Futures): every one wakes with its own Future's value
    once the tasks complete, and leaves no waiter behind."""
    gate = Gate(tmp_path)
    with pool(max_workers=2) as ex:
        try:
            fs = [ex.submit(gated_identity, gate.path, f"value-{i}") for i in range(8)]
            waiters = [(i, _Blocked(fs[i].result)) for i in range(8)]
            waiters += [(i, _Blocked(lambda i=i: fs[i].result(timeout=30))) for i in range(4)]
            expected = collections.Counter(i for i, _ in waiters)
            assert wait_until(lambda: all(_result_waiters(fs[i]) == expected[i]
                                          for i in range(8)), 10), \
                [_result_waiters(f) for f in fs]
            assert all(w.outcome is None for _, w in waiters)
        finally:
            gate.open()
        for i, w in waiters:
            w.join(20)
            assert w.outcome == ("value", f"value-{i}"), (i, w.outcome)
        assert all(f._waiters == [] for f in fs)


@pytest.mark.timeout(60)
def test_waiting_on_a_slow_task_survives_many_other_completions(tmp_path):
    """Threads wait (no timeout, a long timeout, and in exception()) on a
    gated task while 3000 other Futures of the same executor complete: none
    may wake early with TimeoutError (a result() that waited on a Condition
    shared by the executor's Futures would be woken by every completion)."""
    gate = Gate(tmp_path)
    with pool(max_workers=2) as ex:
        try:
            slow = ex.submit(gated, gate.path, gate.started_dir, "slow", "slow-value")
            gate.wait_started(1)
            waiters = [_Blocked(slow.result), _Blocked(lambda: slow.result(timeout=45)),
                       _Blocked(lambda: slow.exception(timeout=45))]
            assert wait_until(lambda: _result_waiters(slow) == 3, 10)
            fast = [ex.submit(square, i) for i in range(3000)]
            assert [f.result(timeout=30) for f in fast] == [i * i for i in range(3000)]
            time.sleep(0.1)  # let any (wrongly) woken waiter report
            assert [w.outcome for w in waiters] == [None, None, None]
            assert not slow.done() and _result_waiters(slow) == 3
        finally:
            gate.open()
        for w in waiters:
            w.join(20)
        assert [w.outcome for w in waiters] == [("value", "slow-value"),
                                                ("value", "slow-value"), ("value", None)]
        assert slow._waiters == []


@pytest.mark.timeout(60)
def test_result_timeout_on_running_task_is_prompt_then_value(tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=2) as ex:
        try:
            f = ex.submit(gated, gate.path, gate.started_dir, 1, "late")
            gate.wait_started(1)
            assert f.running() and not f.done()
            t0 = time.monotonic()
            with pytest.raises(cf.TimeoutError):
                f.result(timeout=0.05)
            elapsed = time.monotonic() - t0
            assert 0.04 <= elapsed < 2.0, elapsed
            t0 = time.monotonic()
            for timeout in (0, -1):
                with pytest.raises(cf.TimeoutError):
                    f.result(timeout=timeout)
            assert time.monotonic() - t0 < 0.5
            # Many timed-out calls leave no waiter registered on the Future.
            for _ in range(50):
                with pytest.raises(cf.TimeoutError):
                    f.result(timeout=0.001)
            assert f._waiters == []
            assert not f.done()
        finally:
            gate.open()
        assert f.result() == "late"
        assert f.result(timeout=0) == "late"  # done: no waiting at all
        assert f._waiters == []


@pytest.mark.timeout(60)
def test_exception_returns_the_remote_exception_and_times_out(tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=2) as ex:
        failed = ex.submit(raise_value_error, "remote boom")
        exc = failed.exception(timeout=10)
        assert isinstance(exc, ValueError) and str(exc) == "remote boom"
        cause = exc.__cause__
        assert type(cause).__name__ == "RemoteTraceback"
        assert "raise_value_error" in str(cause)
        with pytest.raises(ValueError, match="remote boom"):
            failed.result(timeout=0)
        assert failed.exception(timeout=0) is exc
        try:
            running = ex.submit(gated_raise, gate.path, "after the gate")
            ok = ex.submit(gated_identity, gate.path, "fine")
            assert wait_until(running.running, 10)
            t0 = time.monotonic()
            with pytest.raises(cf.TimeoutError):
                running.exception(timeout=0.05)
            assert time.monotonic() - t0 < 2.0
            # A thread blocked in exception() gets the remote exception.
            blocked = _Blocked(running.exception)
            assert wait_until(lambda: _result_waiters(running) == 1, 10)
        finally:
            gate.open()
        blocked.join(20)
        kind, value = blocked.outcome
        assert kind == "value" and isinstance(value, ValueError)
        assert str(value) == "after the gate"
        assert ok.exception(timeout=10) is None and ok.result() == "fine"


# --------------------------------------------------------------------------
# cancel() wakes result() waiters
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_cancel_wakes_a_thread_blocked_on_a_pending_task(tmp_path):
    """A task waiting in the in-process backlog (behind a gated worker and a
    kernel queue full of 4000-byte tasks): a thread blocked in result() on it
    and another in exception() both get CancelledError as soon as another
    thread cancels the Future, not when the backlog moves again."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, batch_size=1) as ex:
        try:
            blocker, fs = _fill_with_backlog(ex, gate)
            pending = [f for f in fs if not f.running() and not f.done()]
            assert len(pending) >= 4, [f.running() for f in fs]
            target = pending[-1]
            in_result = _Blocked(target.result)
            in_exception = _Blocked(lambda: target.exception(timeout=40))
            assert wait_until(lambda: _result_waiters(target) == 2, 10)
            canceller = _Blocked(target.cancel)
            canceller.join(5)
            cancelled_at = time.monotonic()
            assert canceller.outcome == ("value", True)
            for w in (in_result, in_exception):
                w.join(5)
                kind, exc = w.outcome
                assert kind == "raised" and isinstance(exc, cf.CancelledError), w.outcome
                assert w.finished_at - cancelled_at < 2.0
            assert target.cancelled() and target.done() and not target.running()
            assert target._waiters == []
            assert not blocker.done()  # nothing moved: only cancel() woke them
        finally:
            gate.open()
        assert blocker.result(timeout=20) is not None
        assert [f.result(timeout=20)[0] for f in fs if f is not target] == \
            [i for i, f in enumerate(fs) if f is not target]


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_wakes_result_waiters(tmp_path):
    """shutdown(wait=False, cancel_futures=True) cancels the tasks of the
    backlog (PENDING) and takes back those in the kernel queue (RUNNING, no
    worker took them: the only worker is gated): every thread blocked in
    result() on them gets CancelledError while the gate is still shut."""
    gate = Gate(tmp_path)
    ex = MQExecutor(max_workers=1, batch_size=1)
    try:
        try:
            blocker, fs = _fill_with_backlog(ex, gate)
            states = [f.running() for f in fs]
            assert any(states) and not all(states), states  # both kinds present
            waiters = [_Blocked(f.result) for f in fs]
            assert wait_until(lambda: all(_result_waiters(f) == 1 for f in fs), 10)
            ex.shutdown(wait=False, cancel_futures=True)
            for w in waiters:
                w.join(5)
                kind, exc = w.outcome
                assert kind == "raised" and isinstance(exc, cf.CancelledError), w.outcome
            assert all(f.cancelled() for f in fs)
            assert not blocker.done()
        finally:
            gate.open()
        assert blocker.result(timeout=20) is not None
    finally:
        shutdown_or_fail(ex)


# --------------------------------------------------------------------------
# wait / as_completed / callbacks / asyncio over thousands of Futures
# --------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_wait_as_completed_and_callbacks_over_thousands_of_futures(tmp_path):
    n = 3000
    gate = Gate(tmp_path)
    calls: collections.Counter = collections.Counter()
    seen_values: dict[int, object] = {}
    lock = threading.Lock()

    def callback(fut):
        value = fut.result(timeout=0)  # done when called: never blocks
        with lock:
            calls[fut.task_id] += 1
            seen_values[fut.task_id] = value

    with pool(max_workers=2) as ex:
        try:
            slow = ex.submit(gated_identity, gate.path, "slow")
            fs = []
            for i in range(n):
                f = ex.submit(square, i)
                f.add_done_callback(callback)  # pending or done already: both paths
                fs.append(f)
            done, not_done = cf.wait([slow] + fs, timeout=30,
                                     return_when=cf.FIRST_COMPLETED)
            assert done and slow in not_done
            assert all(f.done() for f in done) and all(f in fs for f in done)
            done, not_done = cf.wait(fs, timeout=60, return_when=cf.ALL_COMPLETED)
            assert not not_done and len(done) == n
            assert [f.result(timeout=0) for f in fs] == [i * i for i in range(n)]
            # A wait() on the slow task alone times out while others complete.
            more = [ex.submit(square, i) for i in range(n)]
            t0 = time.monotonic()
            done, not_done = cf.wait([slow], timeout=0.3)
            assert not done and not_done == {slow}
            assert time.monotonic() - t0 >= 0.29
            # as_completed yields each Future once, with its value.
            yielded = list(cf.as_completed(more, timeout=60))
            assert len(yielded) == n and set(yielded) == set(more)
            assert sorted(f.result() for f in yielded) == sorted(i * i for i in range(n))
            assert not slow.done()
        finally:
            gate.open()
        assert slow.result(timeout=20) == "slow"
        assert next(cf.as_completed([slow], timeout=5)) is slow
        # Every callback ran exactly once (they may trail the results a little).
        ids = {f.task_id for f in fs}
        assert wait_until(lambda: len(calls) == n, 10), len(calls)
        with lock:
            assert set(calls) == ids and set(calls.values()) == {1}
            assert all(seen_values[f.task_id] == i * i for i, f in enumerate(fs))
        late = []
        fs[0].add_done_callback(late.append)  # done: runs now, in this thread, once
        assert late == [fs[0]]
        assert all(f._waiters == [] for f in fs + more + [slow])


@pytest.mark.timeout(60)
def test_asyncio_wrap_future_over_many_futures_and_cancel_through_it(tmp_path):
    """wrap_future over 2000 Futures; cancelling the asyncio side of a task
    still in the backlog cancels the MQFuture, which wakes a thread blocked in
    its result()."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, batch_size=1) as ex:
        try:
            blocker, fs = _fill_with_backlog(ex, gate, n=8)
            target = next(f for f in reversed(fs) if not f.running())
            blocked = _Blocked(target.result)
            assert wait_until(lambda: _result_waiters(target) == 1, 10)

            async def cancel_it():
                wrapped = asyncio.wrap_future(target)
                await asyncio.sleep(0.05)
                wrapped.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await wrapped

            asyncio.run(cancel_it())
            blocked.join(5)
            assert blocked.outcome[0] == "raised"
            assert isinstance(blocked.outcome[1], cf.CancelledError)
            assert target.cancelled()
        finally:
            gate.open()
        assert blocker.result(timeout=20) is not None

        async def gather_many():
            wrapped = [asyncio.wrap_future(ex.submit(square, i)) for i in range(2000)]
            return await asyncio.wait_for(asyncio.gather(*wrapped), 60)

        assert asyncio.run(gather_many()) == [i * i for i in range(2000)]


# --------------------------------------------------------------------------
# repr and states
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_repr_and_states_through_a_futures_life(tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=1, batch_size=1) as ex:
        try:
            blocker, fs = _fill_with_backlog(ex, gate, n=8)
            queued = fs[0]
            pending = next(f for f in reversed(fs) if not f.running())
            assert queued.running() and not queued.done() and not queued.cancelled()
            assert "state=running" in repr(queued)
            assert repr(queued).endswith(f" task_id={queued.task_id}>")
            assert not pending.running() and not pending.done() and not pending.cancelled()
            assert "state=pending" in repr(pending) and f"task_id={pending.task_id}" \
                in repr(pending)
            assert not queued.cancel()  # in the kernel queue: too late
            assert pending.cancel() and pending.cancel()  # again: still True
            assert pending.cancelled() and pending.done() and not pending.running()
            assert "state=cancelled" in repr(pending)
            with pytest.raises(cf.CancelledError):
                pending.exception(timeout=0)
        finally:
            gate.open()
        assert queued.result(timeout=20) == (0, PAD)
        assert queued.done() and not queued.running() and not queued.cancelled()
        assert not queued.cancel()
        assert "state=finished returned tuple" in repr(queued)
        failed = ex.submit(raise_value_error)
        failed.exception(timeout=10)
        assert "state=finished raised ValueError" in repr(failed)
        assert f"task_id={failed.task_id}" in repr(failed)
        blocker.result(timeout=10)


@pytest.mark.timeout(30)
def test_standalone_mqfuture_is_a_plain_future():
    """An MQFuture made without an executor has a Condition of its own and
    behaves as concurrent.futures.Future."""
    f = MQFuture()
    assert f.task_id == 0 and "state=pending task_id=0>" in repr(f)
    blocked = _Blocked(lambda: f.result(timeout=20))
    assert wait_until(lambda: _result_waiters(f) == 1, 10)
    assert f.set_running_or_notify_cancel() is True
    assert f.running() and not f.cancel()
    f.set_result(41)
    blocked.join(5)
    assert blocked.outcome == ("value", 41)
    g = MQFuture(7, "fn")
    waiting = _Blocked(g.exception)
    assert wait_until(lambda: _result_waiters(g) == 1, 10)
    assert g.cancel()
    waiting.join(5)
    assert waiting.outcome[0] == "raised" and isinstance(waiting.outcome[1],
                                                         cf.CancelledError)
    assert g._condition is not f._condition


# --------------------------------------------------------------------------
# the pidfd liveness check: an attached producer SIGKILLed with tasks queued
# --------------------------------------------------------------------------

PRODUCER = textwrap.dedent("""
    import json, os, sys, time
    import mqexecutor
    from mqexecutor import MQExecutor
    from tests.helpers import gated
    from tests.test_future import gated_bytes

    key, warm_gate, warm_started, gate, started, n, warm, size = sys.argv[1:9]
    ex = MQExecutor.attach(int(key))
    subdir = mqexecutor.spill.producer_subdir(os.getpid(), ex.token)
    if warm == "1":
        # Both workers answer this producer once (each runs one of the two gated
        # tasks): each then holds a cached pidfd for this process.
        warmed = [ex.submit(gated, warm_gate, warm_started, i) for i in range(2)]
        print("WARM", json.dumps(sorted(f.result(timeout=30)[0] for f in warmed)), flush=True)
    fs = [ex.submit(gated_bytes, gate, started, i, int(size)) for i in range(int(n))]
    print("QUEUED", json.dumps({"reply_key": ex.reply_key,
                                "subdir": subdir}), flush=True)
    time.sleep(300)
""")


class _Child:
    """A subprocess whose stdout lines are read by a thread."""

    def __init__(self, args, env):
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=REPO)
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > end:
                raise AssertionError(f"no {prefix!r} line from the producer "
                                     f"(exit {self.p.poll()}):\n" + "".join(self.err))
            if line.startswith(prefix):
                return line[len(prefix):].strip()


def _subdir_exists(subdir: str) -> bool:
    return any(os.path.exists(os.path.join(root, subdir)) for root in spill.spill_roots())


def _kill_producer_with_queued_tasks(tmp_path, monkeypatch, *, warm: bool, reap: bool,
                                     size: int, check) -> None:
    """An attached producer submits 8 tasks (each returns ``size`` bytes) to a
    pool this process owns (2 workers, explicit key) and is SIGKILLed while 2
    run (gated) and 6 wait in the kernel queue; the owner has 3 gated tasks of
    its own queued behind them. Then the gate opens and ``check(ex, info)``
    runs while the pool still lives (info: reply_key, subdir, gate, mine,
    workers, child)."""
    n = 8
    # A spill root of this test's own: no other process's collect_garbage()
    # (any executor starting on this machine runs one) reclaims what the
    # workers must remove themselves.
    monkeypatch.setenv(spill.ENV_SPILL_DIR, str(tmp_path / "spill"))
    key = unused_key()
    warm_gate = Gate(tmp_path, "warm")
    gate = Gate(tmp_path, "gate")
    child = None
    subdir = reply_key = None
    try:
        with pool(key, max_workers=2) as ex:
            workers = set(ex._processes)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
            child = _Child([sys.executable, "-c", PRODUCER, str(key), warm_gate.path,
                            warm_gate.started_dir, gate.path, gate.started_dir, str(n),
                            "1" if warm else "0", str(size)], env)
            if warm:
                warm_gate.wait_started(2)
                warm_gate.open()
                assert json.loads(child.expect("WARM")) == [0, 1]
            info = json.loads(child.expect("QUEUED"))
            subdir, reply_key = info["subdir"], info["reply_key"]
            assert subdir.startswith(f"p-{child.p.pid}-")
            assert queue_exists(info["reply_key"]) and _subdir_exists(subdir)
            gate.wait_started(2)  # both workers hold one of the producer's tasks
            assert wait_until(lambda: ex.stats().queued_messages == n - 2, 10), ex.stats()
            mine = [ex.submit(gated_identity, gate.path, i) for i in range(3)]

            child.p.send_signal(signal.SIGKILL)
            if reap:
                assert child.p.wait(10) == -signal.SIGKILL
            else:
                # Exited but not reaped: a zombie. Wait for our own pidfd of it
                # to turn readable: /proc shows the leader as a zombie a few ms
                # earlier, while its last thread still tears the process down,
                # and the workers' pidfds only say "exited" after that.
                fd = os.pidfd_open(child.p.pid)
                try:
                    poller = select.poll()
                    poller.register(fd, select.POLLIN)
                    assert poller.poll(10_000), "the killed producer did not exit"
                finally:
                    os.close(fd)
                assert not pid_alive(child.p.pid)
                os.kill(child.p.pid, 0)  # still there: a zombie
            gate.open()
            assert wait_until(lambda: len(gate.started()) == n, 15), gate.started()
            info.update(gate=gate, mine=mine, workers=workers, child=child, n=n)
            check(ex, info)
    finally:
        gate.open()
        warm_gate.open()
        if child is not None and child.p.poll() is None:
            child.p.kill()
            child.p.wait(10)
        # What the workers failed to remove when the test failed.
        if reply_key is not None and queue_exists(reply_key):
            sysv_ipc.MessageQueue(reply_key).remove()
        if subdir is not None:
            spill.remove_subdir(subdir)
        remove_test_key(key)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("warm,reap", [(True, False), (True, True), (False, False), (False, True)],
                         ids=["cached-pidfd-zombie", "cached-pidfd-reaped", "first-look-zombie",
                              "first-look-reaped"])
def test_attached_producer_killed_with_queued_tasks(tmp_path, monkeypatch, warm, reap):
    """The workers must find the killed producer dead before sending each
    result (through the pidfd cached when they answered it before, also while
    it is a zombie, or on a first look), drop its results and remove its reply
    queue and spill directory themselves (no ``mqexecutor gc`` here). The
    owner's tasks complete and the pool keeps serving with the same workers.
    (tests/test_persistence.py::test_producer_killed_mid_stream_does_not_disturb_others
    covers a served pool, and lets collect_garbage() reclaim the reply queue.)"""

    def check(ex, info):
        assert wait_until(lambda: not queue_exists(info["reply_key"]), 15), \
            ("the workers did not remove the dead producer's reply queue: "
             f"{ipcinfo.queue_info(info['reply_key'])}, workers {sorted(ex._processes)}, "
             f"meta {persistence.read_meta(info['subdir'])}")
        assert [f.result(timeout=20) for f in info["mine"]] == [0, 1, 2]
        assert wait_until(lambda: ex.stats().queued_messages == 0, 15)
        assert wait_until(lambda: not _subdir_exists(info["subdir"]), 15), \
            f"spill directory of the dead producer left: {spill.list_files(info['subdir'])}"
        assert set(ex._processes) == info["workers"], "a worker died or was replaced"
        assert ex.submit(square, 9).result(timeout=10) == 81
        assert list(ex.map(square, range(200))) == [i * i for i in range(200)]
        if not reap:
            assert info["child"].p.poll() == -signal.SIGKILL  # reaped only now
        assert not queue_exists(info["reply_key"]) and not _subdir_exists(info["subdir"])

    _kill_producer_with_queued_tasks(tmp_path, monkeypatch, warm=warm, reap=reap, size=10,
                                     check=check)


@pytest.mark.timeout(60)
def test_dead_producers_spilled_results_leave_no_directory(tmp_path, monkeypatch):
    """As above with results of 20 KB (above msgmax: spilled). A worker
    pickles such a result into the producer's spill directory before it finds
    the producer dead, re-creating the directory the first burial removed: it
    must remove it again, not only the file (an empty p-<pid>-<token>
    directory stayed behind until a gc before d9c885c)."""

    def check(ex, info):
        assert wait_until(lambda: not queue_exists(info["reply_key"]), 15)
        assert [f.result(timeout=20) for f in info["mine"]] == [0, 1, 2]
        assert wait_until(lambda: ex.stats().queued_messages == 0, 15)
        assert wait_until(lambda: spill.list_files(info["subdir"]) == [], 10)
        assert wait_until(lambda: not _subdir_exists(info["subdir"]), 3), \
            "an empty spill directory of the dead producer was left behind"

    _kill_producer_with_queued_tasks(tmp_path, monkeypatch, warm=True, reap=True, size=20000,
                                     check=check)


WAIT_ACROSS_EXECUTORS = textwrap.dedent("""
    import concurrent.futures as cf, os, sys, threading, time
    from mqexecutor import MQExecutor
    from tests.helpers import gated_identity

    gate = os.path.join(sys.argv[1], "gate")
    sys.setswitchinterval(1e-6)
    a, b = MQExecutor(max_workers=1), MQExecutor(max_workers=1)
    fa, fb = [], []
    for i in range(50):
        fa.append(a.submit(gated_identity, gate, i))
        fb.append(b.submit(gated_identity, gate, i))
    # a1 < b1 < a2 by id(): wait() orders its lock acquisitions by id()
    ordered = sorted(fa + fb, key=id)
    a1 = next(f for f in ordered if f in fa)
    b1 = next(f for f in ordered if f in fb and id(f) > id(a1))
    a2 = next(f for f in ordered if f in fa and id(f) > id(b1))
    count = [0, 0]
    end = time.monotonic() + 3.0

    def loop(fs, n):
        while time.monotonic() < end:
            cf.wait(fs, timeout=0)
            count[n] += 1

    threads = [threading.Thread(target=loop, args=([a1, b1], 0), daemon=True),
               threading.Thread(target=loop, args=([b1, a2], 1), daemon=True)]
    for t in threads:
        t.start()
    last = None
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        if list(count) == last:  # no progress for 0.5 s: both stuck
            open(gate, "w").close()
            print("DEADLOCK", count, flush=True)
            os._exit(3)  # the workers clean up after a dead owner
        last = list(count)
    open(gate, "w").close()
    a.shutdown()
    b.shutdown()
    print("OK", count, flush=True)
""")


@pytest.mark.timeout(60)
def test_concurrent_waits_across_two_executors_do_not_deadlock(tmp_path):
    """concurrent.futures.wait() and as_completed() take the ``_condition`` of
    every Future in id() order (_AcquireFutures) so that no two calls take two
    locks in opposite orders. A lock shared by the Futures of one executor
    breaks that: two threads waiting on {a1, b1} and {b1, a2} (a1 < b1 < a2 by
    id) take A's and B's locks in opposite orders and deadlock (they did in
    about a second at 96e22ea). Runs in a child process, which gives up (exit
    3) when neither thread makes progress."""
    proc = run_script(WAIT_ACROSS_EXECUTORS, tmp_path, str(tmp_path), timeout=45,
                      env={"PYTHONPATH": REPO})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


PID_REUSE = textwrap.dedent("""
    import os, subprocess, sys, textwrap
    from mqexecutor import MQExecutor, persistence

    key = int(sys.argv[1])
    owner = MQExecutor(key, max_workers=1)
    child = textwrap.dedent('''
        import os, sys, concurrent.futures as cf
        from mqexecutor import MQExecutor
        ex = MQExecutor.attach(int(sys.argv[1]))
        try:
            print(os.getpid(), "result", ex.submit(abs, -5).result(timeout=2), flush=True)
        except cf.TimeoutError:
            print(os.getpid(), "timeout", flush=True)
        ex.shutdown(wait=False, cancel_futures=True)
    ''')

    def producer():
        out = subprocess.run([sys.executable, "-c", child, str(key)], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.split()

    first = producer()      # the worker caches a pidfd for this pid; it exits
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(int(first[0]) - 1))
    second = producer()     # a live producer with the same pid
    owner.shutdown()
    persistence.remove_queue(key)
    print("FIRST", *first)
    print("SECOND", *second)
""")


def _can_make_pid_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "--ipc", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.timeout(90)
@pytest.mark.skipif(not _can_make_pid_namespaces(),
                    reason="needs root and unshare (a private pid namespace to reuse a pid)")
def test_a_new_producer_reusing_a_dead_producers_pid_gets_its_result(tmp_path):
    """A producer gets a result (the worker caches a pidfd for its pid) and
    exits; a new producer started with the same pid (ns_last_pid, in a private
    pid namespace) must get its result too. At 96e22ea the worker trusted the
    stale pidfd: it dropped the result and removed the live producer's reply
    queue and spill directory."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    script = tmp_path / "pid_reuse.py"
    script.write_text(PID_REUSE)
    env = dict(os.environ, PYTHONPATH=REPO, **{spill.ENV_SPILL_DIR: str(spill_dir)})
    # A private pid namespace (pids can be chosen through ns_last_pid) and a
    # private IPC namespace (its queues vanish with it).
    proc = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "--ipc",
                           sys.executable, str(script), str(0x5EED0001)],
                          capture_output=True, text=True, timeout=75, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    first, second = lines["FIRST"].split(), lines["SECOND"].split()
    assert first[1:] == ["result", "5"]
    if first[0] != second[0]:
        pytest.skip("the pid was not reused")
    assert second[1:] == ["result", "5"], proc.stdout
