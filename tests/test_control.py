"""Per-task control: time limits, terminate(), a memory cap, logging records
relayed from tasks, and Ctrl-C, with real workers and real signals."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import CancelledError

import pytest

from mqexecutor import MQExecutor, Mode, TaskTimeoutError

from .helpers import (
    REPO,
    Gate,
    gated,
    pid_alive,
    pool,
    queue_exists,
    remove_test_key,
    sleep_return,
    square,
    touch_marker,
    unused_key,
    wait_until,
    where,
)

pytestmark = pytest.mark.timeout(60)


def sleep_then_mark(directory, name, seconds):
    """Write ``name``-started, sleep, write ``name``-done (markers in ``directory``)."""
    open(os.path.join(directory, f"{name}-started"), "w").close()
    time.sleep(seconds)
    open(os.path.join(directory, f"{name}-done"), "w").close()
    return name


def allocate(megabytes):
    """Keep ``megabytes`` MiB alive in this worker (a leak), return its pid."""
    global _KEPT
    _KEPT = bytearray(megabytes * 2**20)
    for i in range(0, len(_KEPT), 4096):  # touch every page: resident
        _KEPT[i] = 1
    return os.getpid()


def log_records(n, level=logging.WARNING):
    log = logging.getLogger("tests.control")
    for i in range(n):
        log.log(level, "record %d of %d", i, n)
    log.debug("below the level")
    return n


# --------------------------------------------------------------------------
# time limits
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_a_task_past_its_time_limit_fails_and_its_worker_is_replaced(tmp_path, mode):
    with pool(max_workers=1, mode=mode, retries=2) as ex:
        wid, pid = ex.submit(where).result(timeout=30)
        started = time.monotonic()
        f = ex.with_options(timeout=0.5).submit(sleep_then_mark, str(tmp_path), "slow", 10)
        behind = [ex.submit(square, i) for i in range(5)]  # queued behind it
        with pytest.raises(TaskTimeoutError) as info:
            f.result(timeout=30)
        took = time.monotonic() - started
        assert 0.5 <= took < 0.5 + 0.5, took  # honoured within 0.5 s
        err = info.value
        assert isinstance(err, TimeoutError)
        assert f"task {f.task_id}" in str(err) and "sleep_then_mark" in str(err)
        assert "0.5 s" in str(err) and err.limit == 0.5 and err.task_id == f.task_id
        # retries do not apply to a time limit: it ran once
        assert os.path.exists(tmp_path / "slow-started")
        assert not os.path.exists(tmp_path / "slow-done")
        assert [g.result(timeout=30) for g in behind] == [0, 1, 4, 9, 16]
        new_wid, new_pid = ex.submit(where).result(timeout=30)
        assert new_wid == wid and new_pid != pid
        assert ex.stats().recycles["timeout"] == 1


def test_the_executor_wide_time_limit_and_tasks_of_a_batch(tmp_path):
    """task_timeout= limits every task; a task of a BATCH message past it
    fails alone, the other tasks of the batch run."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, task_timeout=1.0, batch_size=20) as ex:
        blocker = ex.with_options(timeout=30).submit(gated, gate.path, gate.started_dir, "b")
        gate.wait_started(1)
        before = [ex.submit(square, i) for i in range(10)]
        slow = ex.submit(sleep_return, 10)
        after = [ex.submit(square, i) for i in range(10, 20)]
        assert ex.stats().backlog > 0, "the test needs a backlog, sent in batches"
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in before] == [i * i for i in range(10)]
        with pytest.raises(TaskTimeoutError):
            slow.result(timeout=30)
        assert [f.result(timeout=30) for f in after] == [i * i for i in range(10, 20)]


def test_a_time_limit_set_by_an_attached_producer_is_honoured(tmp_path):
    """A keyed pool watches deadlines from the start: a task an attach()
    producer sends with a limit fails there, though the owner set none."""
    key = unused_key()
    try:
        with pool(key, max_workers=1) as owner, MQExecutor.attach(key) as producer:
            started = time.monotonic()
            f = producer.with_options(timeout=0.3).submit(
                sleep_then_mark, str(tmp_path), "slow", 10)
            with pytest.raises(TaskTimeoutError):
                f.result(timeout=30)
            assert time.monotonic() - started < 2
            assert producer.submit(square, 6).result(timeout=30) == 36
            assert owner.stats().recycles["timeout"] == 1
            assert not os.path.exists(tmp_path / "slow-done")
    finally:
        remove_test_key(key)


def test_time_limit_arguments_are_checked():
    with pytest.raises(ValueError, match="task_timeout"):
        MQExecutor(max_workers=1, task_timeout=0)
    with pytest.raises(TypeError, match="task_timeout"):
        MQExecutor(max_workers=1, task_timeout="1")
    with pool(max_workers=1) as ex:
        with pytest.raises(ValueError, match="timeout"):
            ex.with_options(timeout=-1)


# --------------------------------------------------------------------------
# terminate()
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_terminate_a_running_a_queued_and_a_finished_task(tmp_path, mode):
    d = str(tmp_path)
    with pool(max_workers=1, mode=mode) as ex:
        pid = ex.submit(os.getpid).result(timeout=30)
        done = ex.submit(square, 3)
        assert done.result(timeout=30) == 9
        assert done.terminate() is False  # finished
        running = ex.submit(sleep_then_mark, d, "running", 30)
        queued = ex.submit(touch_marker, d, "queued")  # in the kernel queue behind it
        assert wait_until(lambda: os.path.exists(tmp_path / "running-started"), 10)
        assert queued.running()  # RUNNING: handed to the kernel queue
        assert queued.terminate() is True
        assert queued.cancelled()
        started = time.monotonic()
        assert running.terminate() is True
        assert running.cancelled() and time.monotonic() - started < 1
        with pytest.raises(CancelledError):
            running.result(timeout=0)
        # the worker was stopped and replaced; the queued task never ran
        assert ex.submit(os.getpid).result(timeout=30) != pid
        assert ex.submit(square, 4).result(timeout=30) == 16
        assert not os.path.exists(tmp_path / "running-done")
        assert not os.path.exists(tmp_path / "queued")
        assert ex.stats().recycles["terminate"] == 1


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_every_worker_skips_terminated_queued_tasks(tmp_path, mode):
    """With several workers, each reads the terminated tasks (not only the
    last worker): queued tasks terminated while both workers are busy never
    run, whichever worker takes them."""
    gate = Gate(tmp_path)
    d = str(tmp_path)
    with pool(max_workers=2, mode=mode, batch_size=1) as ex:
        try:
            blockers = [ex.submit(gated, gate.path, gate.started_dir, f"b{i}")
                        for i in range(2)]
            gate.wait_started(2)
            queued = [ex.submit(touch_marker, d, f"q{i}") for i in range(8)]
            sent = [f for f in queued if f.running()]  # in the kernel queue
            assert len(sent) >= 4, "the test needs tasks in the kernel queue"
            victims = sent[::2]
            assert all(f.terminate() for f in victims)
        finally:
            gate.open()
        assert len({f.result(timeout=30) for f in blockers}) == 2
        kept = [f for f in queued if f not in victims]
        assert all(f.result(timeout=30) for f in kept)
        assert ex.submit(square, 2).result(timeout=30) == 4
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("q")) \
            == sorted(f.result() for f in kept)
        assert ex.stats().recycles["terminate"] == 0


def test_terminate_a_pending_task_cancels_it(tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=1) as ex:
        blocker = ex.submit(gated, gate.path, gate.started_dir, "b")
        gate.wait_started(1)
        waiting = [ex.submit(touch_marker, str(tmp_path), f"w{i}") for i in range(50)]
        last = waiting[-1]
        assert not last.running(), "the test needs the task in the backlog"
        assert last.terminate() is True and last.cancelled()
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in waiting[:-1]] == [f"w{i}" for i in range(49)]
        assert not os.path.exists(tmp_path / "w49")


def test_terminate_a_task_of_a_batch_keeps_the_others(tmp_path):
    """A task in a BATCH message, terminated while a task before it runs: it
    does not run, the others of the batch do, and no worker is replaced."""
    gate = Gate(tmp_path)
    d = str(tmp_path)
    with pool(max_workers=1, batch_size=30) as ex:
        blocker = ex.submit(gated, gate.path, gate.started_dir, "b")
        gate.wait_started(1)
        tasks = [ex.submit(touch_marker, d, f"t{i}") for i in range(40)]
        slow = ex.submit(sleep_then_mark, d, "slow", 2)
        more = [ex.submit(touch_marker, d, f"m{i}") for i in range(10)]
        gate.open()
        blocker.result(timeout=30)
        assert wait_until(lambda: os.path.exists(tmp_path / "slow-started"), 20)
        victim = more[3]
        assert victim.running(), "the test needs the task sent, in the batch running"
        assert victim.terminate() is True
        assert [f.result(timeout=30) for f in tasks] == [f"t{i}" for i in range(40)]
        assert [f.result(timeout=30) for f in more if f is not victim] \
            == [f"m{i}" for i in range(10) if i != 3]
        assert slow.result(timeout=30) == "slow"
        assert not os.path.exists(tmp_path / "m3")
        assert ex.stats().recycles["terminate"] == 0


# --------------------------------------------------------------------------
# memory cap
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_a_worker_above_its_memory_cap_is_recycled_under_the_same_id(mode):
    with pool(max_workers=1, mode=mode, max_memory_per_child=200 * 2**20) as ex:
        wid, pid = ex.submit(where).result(timeout=30)
        assert ex.submit(allocate, 10).result(timeout=30) == pid  # under the cap
        assert ex.submit(where).result(timeout=30) == (wid, pid)
        big = ex.submit(allocate, 300)
        behind = [ex.submit(where) for _ in range(3)]
        assert big.result(timeout=30) == pid  # the task itself completes
        after = [f.result(timeout=30) for f in behind]
        assert all(w == wid for w, _ in after) and all(p != pid for _, p in after)
        assert ex.stats().recycles["memory"] == 1
        assert ex.stats().recycles["died"] == 0


# --------------------------------------------------------------------------
# logging records
# --------------------------------------------------------------------------

def test_records_of_a_task_reach_this_process_handlers(collected):
    with pool(max_workers=2) as ex:
        f = ex.submit(log_records, 3)
        assert f.result(timeout=30) == 3
        ours = [r for r in collected if r.name == "tests.control"]
        # sent before the result: here when result() returns
        assert [r.getMessage() for r in ours] == [f"record {i} of 3" for i in range(3)]
        assert all(r.task_id == f.task_id and r.worker_id in (0, 1) for r in ours)
        assert all(r.levelno == logging.WARNING and r.process != os.getpid() for r in ours)
        # below the root logger's level: not relayed
        ex.submit(log_records, 2, logging.INFO).result(timeout=30)
        assert len([r for r in collected if r.name == "tests.control"]) == 3


class _Uncomparable:
    """A value whose ``==`` raises, as a numpy array's truth value does."""

    def __eq__(self, other):
        raise ValueError("truth value of an array is ambiguous")

    __hash__ = object.__hash__


def test_submits_share_a_context_only_while_its_variables_are_equal():
    """What a notebook's submits keep on their Futures (relay.shared_context):
    one Context while the variables and values stay the same, a new one when
    they change, whatever the Context kept before holds; a value whose
    comparison raises never reaches the caller."""
    import contextvars

    from mqexecutor.relay import shared_context
    var = contextvars.ContextVar("cell")

    def body():
        var.set("cell 1")
        first = shared_context(None)
        assert first[var] == "cell 1"
        assert shared_context(first) is first  # the same cell: one object
        var.set("cell 2")
        second = shared_context(first)  # `first` kept by another submit
        assert second is not first and second[var] == "cell 2"
        var.set(_Uncomparable())
        third = shared_context(second)
        var.set(_Uncomparable())  # another value that cannot be compared
        fourth = shared_context(third)
        assert fourth is not third and fourth[var] is var.get()
        assert shared_context(fourth) is fourth  # the same object: equal

    contextvars.Context().run(body)


def test_relay_logs_false_relays_nothing(collected):
    with pool(max_workers=1, relay_logs=False) as ex:
        assert ex.submit(log_records, 3).result(timeout=30) == 3
        time.sleep(0.3)
    assert not [r for r in collected if r.name == "tests.control"]


def log_long(text, extra_bytes=0):
    extra = {"blob": b"b" * extra_bytes} if extra_bytes else None
    logging.getLogger("tests.control").warning("%s", text, extra=extra)
    logging.getLogger("tests.control").warning("after")
    return len(text)


@pytest.mark.parametrize("char", ["x", "\u00e9"])
def test_a_record_longer_than_a_message_arrives_cut_and_says_so(collected, char):
    text = "start " + char * 30_000 + " end"
    with pool(max_workers=1) as ex:
        assert ex.submit(log_long, text).result(timeout=30) == len(text)
        ours = [r.getMessage() for r in collected if r.name == "tests.control"]
        assert len(ours) == 2 and ours[1] == "after"
        assert ours[0].startswith("start " + char * 100) and ours[0].endswith(char * 100 + " end")
        assert "characters cut: a relayed record holds one message" in ours[0]
        assert ex.stats().relay_dropped == 0


def test_a_record_too_big_to_relay_is_dropped_and_counted(collected):
    with pool(max_workers=1) as ex:
        assert ex.submit(log_long, "short", 50_000).result(timeout=30) == 5
        assert [r.getMessage() for r in collected if r.name == "tests.control"] == ["after"]
        assert ex.stats().relay_dropped == 1


def test_a_burst_of_records_neither_blocks_the_worker_nor_grows_without_bound(collected):
    """100k records in one task: the task ends at its own pace (beyond the
    relay's buffer, records are dropped and counted), all of the records are
    accounted for, and the pool goes on."""
    n = 100_000
    with pool(max_workers=1) as ex:
        started = time.monotonic()
        assert ex.submit(log_records, n).result(timeout=60) == n
        took = time.monotonic() - started
        assert wait_until(
            lambda: len([r for r in collected if r.name == "tests.control"])
            + ex.stats().relay_dropped == n, 30), ex.stats()
        assert ex.stats().relay_dropped > 0  # more than relay.BUFFER waited
        assert ex.submit(square, 5).result(timeout=30) == 25
    assert took < 30


# --------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------

CTRL_C = textwrap.dedent("""
    import json, os, sys, time
    import concurrent.futures as cf
    from mqexecutor import MQExecutor

    def nap(seconds):
        time.sleep(seconds)
        return seconds

    if __name__ == "__main__":
        kind, wait = sys.argv[1], sys.argv[2]
        make = (lambda: MQExecutor(max_workers=2)) if kind == "mq" else (
            lambda: cf.ProcessPoolExecutor(2))
        info = {}
        try:
            with make() as ex:
                if kind == "mq":
                    info = {"manager": ex._state.manager.pid, "workers": list(ex._processes),
                            "keys": [ex.key, ex.reply_key]}
                fs = [ex.submit(nap, 2) for _ in range(8)]
                time.sleep(0.3)  # the first two run
                print("READY", json.dumps(info), flush=True)
                if wait == "result":
                    fs[-1].result()
                elif wait == "map":
                    list(ex.map(nap, [2] * 8))
                else:
                    list(cf.as_completed(fs))
        except KeyboardInterrupt:
            print("INTERRUPTED", time.monotonic(), flush=True)
        print("EXITED", time.monotonic(), flush=True)
""")


def _interrupt(tmp_path, kind, wait, may_hang=False):
    """Run CTRL_C in its own process group, Ctrl-C it once READY; returns
    (seconds from SIGINT to KeyboardInterrupt, to leaving the with block, info).
    With ``may_hang``, a script still running 30 s later is killed and
    (None, None, {}) returned: ProcessPoolExecutor sometimes hangs there when
    its workers got the SIGINT too."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    proc = subprocess.Popen([sys.executable, str(script), kind, wait], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": REPO})
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), (line, proc.stderr.read())
        info = json.loads(line.split(" ", 1)[1])
        # Ctrl-C while the main thread waits, not while it sets up the wait:
        # CPython's Condition.wait and as_completed() are not safe against a
        # KeyboardInterrupt in their first lines (a lock left released or held)
        time.sleep(0.3)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: the whole group
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            if not may_hang:
                raise
            return None, None, {}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert "INTERRUPTED" in lines, (out, err)
    return float(lines["INTERRUPTED"]) - sent, float(lines["EXITED"]) - sent, info


@pytest.mark.parametrize("wait", ["result", "map", "as_completed"])
def test_ctrl_c_interrupts_at_once_and_leaving_with_stops_everything(tmp_path, wait):
    interrupted, exited, info = _interrupt(tmp_path, "mq", wait)
    assert interrupted < 0.5, interrupted
    ppe_exited = _interrupt(tmp_path, "ppe", wait, may_hang=True)[1]
    # no slower than ProcessPoolExecutor, and well before the tasks' 2 s
    # when ProcessPoolExecutor hung
    bound = max(ppe_exited if ppe_exited is not None else 1.0, 0.5) + 0.2
    assert exited <= bound, (exited, ppe_exited)
    pids = [info["manager"], *info["workers"]]
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10)
    assert not any(queue_exists(k) for k in info["keys"])
