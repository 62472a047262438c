"""Several small tasks in one message (Flag.BATCH) when the backlog is long.

Each test makes a backlog for real: one worker is held on a gate while
hundreds of tasks are submitted, so the kernel queue fills and the rest waits
in the process; ``batch_size`` fixes how many go in one message once the gate
opens. The faults are real too: the worker runs ``os._exit`` mid-batch.

Results of a BATCH come back in RESULT BATCH messages and, until sent, sit in
the worker's outbox file (``mqexecutor.outbox``), which the owner delivers from
when the worker dies. A private queue holds at most 2 messages per worker (the
rest waits in the backlog); a queue on an explicit key takes all it can hold.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import struct
import threading
import time
import weakref
from collections.abc import Iterator

import pytest
import sysv_ipc

import mqexecutor
from mqexecutor import Mode, TerminatedWorkerError, ipcinfo, outbox
from mqexecutor.protocol import (
    F_BATCH,
    F_VALUES,
    HEADER_FORMAT,
    HEADER_SIZE,
    RESULT_MTYPE,
    Kind,
    ProtocolError,
    Status,
    build,
    join_batch,
    split_values,
    values_body,
)
from tests.helpers import (
    Gate,
    gated,
    gated_identity,
    pool,
    remove_test_key,
    square,
    unused_key,
    wait_until,
)

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
        ex._state.dispatch.feed()
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


# --------------------------------------------------------------------------
# RESULT BATCH: the results of a BATCH come back several to a message
# --------------------------------------------------------------------------

AUTHKEY = b"result-batch-test-key-0123456789"


def _count_results_per_message(ex) -> list[tuple[int, str]]:
    """Record, for every message the collector of ``ex`` handles, how many
    results it carried and its form: "values" (RESULT VALUES, F_VALUES),
    "batch" (RESULT BATCH, F_BATCH) or "single" (the collector's ``observe``
    seam)."""
    seen: list[tuple[int, str]] = []

    def observe(n, raw):
        flags = raw[4] if len(raw) >= HEADER_SIZE else 0
        seen.append((n, "values" if flags & F_VALUES else
                     "batch" if flags & F_BATCH else "single"))

    ex._state.collector.observe = observe
    return seen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("authkey", [None, AUTHKEY], ids=["plain", "authkey"])
def test_results_of_a_batch_come_back_together(tmp_path, authkey):
    """Plain return values (ints here) come back in RESULT VALUES messages: one
    pickle for all of them. With authkey=, each result carries its own HMAC, so
    they come in RESULT BATCH messages instead, whose outer header has none:
    the collector must check the inner ones only."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, batch_size=50, authkey=authkey) as ex:
        seen = _count_results_per_message(ex)
        blocker, futures = _backlog(ex, gate, die_on, -1)
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in futures] == list(range(N))
    packed = "values" if authkey is None else "batch"
    other = "batch" if authkey is None else "values"
    batches = [n for n, form in seen if form == packed]
    assert batches and max(batches) > 1, \
        f"no {packed} message carried more than one result: {seen[:20]}"
    assert not [n for n, form in seen if form == other], seen
    # Every result arrived exactly once, whatever the packing.
    assert sum(n for n, _ in seen) == N + 1, seen
    # Far fewer messages than results: they really were packed.
    assert len(seen) < (N + 1) // 2, f"{len(seen)} messages for {N + 1} results"


def plain_or_not(x):
    """A plain value for most ``x``; below 200, some of everything else a task
    can end with: an exception, a list (not a plain type), a value too large
    for a message (spilled), a value that cannot be pickled."""
    if x >= 200:
        return x if x % 2 else str(x)
    if x % 10 == 3:
        raise ValueError(f"raised for {x}")
    if x % 10 == 5:
        return [x]
    if x % 50 == 7:
        return b"%d" % x * 10_000
    if x % 50 == 9:
        return lambda: x  # noqa: E731 - cloudpickle sends it back by value
    if x % 50 == 11:
        return threading.Lock()
    return x if x % 2 else str(x)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_plain_values_and_other_outcomes_of_one_batch(tmp_path, mode):
    """Results of one batch that are not all plain values go in a RESULT BATCH
    (each entry on its own), those that are in RESULT VALUES: every Future gets
    its own outcome either way. Tasks 200 and up return plain values only, so
    their batches (of 40) come back as RESULT VALUES."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, mode=mode, batch_size=40) as ex:
        seen = _count_results_per_message(ex)
        blocker, futures = _backlog(ex, gate, plain_or_not)
        gate.open()
        blocker.result(timeout=30)
        for x, f in enumerate(futures):
            exc = f.exception(timeout=30)
            if x >= 200:
                assert exc is None and f.result() == (x if x % 2 else str(x))
            elif x % 10 == 3:
                assert isinstance(exc, ValueError) and str(exc) == f"raised for {x}"
            elif x % 10 == 5:
                assert exc is None and f.result() == [x]
            elif x % 50 == 7:
                assert exc is None and f.result() == b"%d" % x * 10_000
            elif x % 50 == 9:
                assert exc is None and f.result()() == x
            elif x % 50 == 11:
                assert isinstance(exc, TypeError) and "pickle" in str(exc), exc
            else:
                assert exc is None and f.result() == (x if x % 2 else str(x))
    forms = {form for _, form in seen}
    assert {"values", "batch"} <= forms, seen
    assert sum(n for n, _ in seen) == N + 1, seen


def _inject(ex, *messages: bytes) -> None:
    """Put ``messages`` on ``ex``'s reply queue, as a worker would."""
    reply = sysv_ipc.MessageQueue(ex.reply_key)
    for message in messages:
        reply.send(message, type=RESULT_MTYPE)


def _forged_result(token: int, task_id: int, value, status: int = Status.OK) -> bytes:
    """A forged RESULT message of ``value`` for ``task_id``."""
    return build(Kind.RESULT, 0, status, task_id, token, 0, 1, 0, pickle.dumps(value, 5))


def _serves_on_after_forged_results(ex, gate, mode, forged: int) -> None:
    """The real results, arriving after ``forged`` forged ones, are dropped (a
    task counts once) and the pool serves on; the forged outcomes count: in
    targeted mode worker 0 is free."""
    gate.open()
    assert ex.submit(square, 6).result(timeout=30) == 36
    assert ex.stats().completed == forged + 1
    if mode == Mode.TARGETED:
        assert ex._state.dispatch.loads() == [0]


def _result_values(token: int, ids: list[int], values: bytes, busy_us: int = 5,
                   body: bytes | None = None) -> bytes:
    """A forged RESULT VALUES message (of ``body`` when given)."""
    return build(Kind.RESULT, F_VALUES, 0, busy_us, token, 0, os.getpid(), 0,
                 values_body(ids, values) if body is None else body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_result_values_complete_the_futures_they_name(tmp_path, mode):
    """A RESULT VALUES message naming two pending tasks and one nobody waits
    for completes the two, in place of the worker; the real results, arriving
    later, are dropped, and the pool serves on."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, mode=mode) as ex:
        f, g = (ex.submit(gated_identity, gate.path, i) for i in range(2))
        assert wait_until(lambda: ex.stats().backlog == 0, 10)
        _inject(ex, _result_values(ex.token, [f.task_id, 10**9, g.task_id],
                                   pickle.dumps(["f", None, 2.5], 5)))
        assert f.result(timeout=10) == "f"
        assert g.result(timeout=10) == 2.5
        assert ex.stats().completed == 2
        _serves_on_after_forged_results(ex, gate, mode, 2)


@pytest.mark.timeout(60)
def test_result_values_that_cannot_be_read(tmp_path, capfd):
    """A RESULT VALUES message shorter than its count says is refused whole;
    one whose values do not unpickle, or are not as many as its task ids,
    fails the Futures it names with ResultUnpicklingError."""
    gate = Gate(tmp_path)
    with pool(max_workers=1) as ex:
        f, g, h = (ex.submit(gated_identity, gate.path, i) for i in range(3))
        token = ex.token
        whole = values_body([f.task_id, g.task_id], pickle.dumps([1, 2], 5))
        _inject(ex,
                _result_values(token, [], b"", body=whole[:4 + 8]),  # count 2, one task id
                _result_values(token, [f.task_id], b"\x80\x05not a pickle"),
                _result_values(token, [g.task_id, h.task_id], pickle.dumps([1], 5)))
        for fut in (f, g, h):
            exc = fut.exception(timeout=10)
            assert isinstance(exc, mqexecutor.ResultUnpicklingError), exc
        gate.open()
        assert ex.submit(square, 7).result(timeout=30) == 49
    err = capfd.readouterr().err
    assert "refused a message on the reply queue" in err and "task ids" in err


@pytest.mark.timeout(60)
def test_result_values_are_refused_by_a_pool_with_an_authkey(tmp_path, capfd):
    """RESULT VALUES carry no HMAC: a pool with an authkey never asks for them
    and refuses one (a forgery could complete its Futures); the real, signed
    results complete them."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, authkey=AUTHKEY) as ex:
        f = ex.submit(gated_identity, gate.path, 4)
        _inject(ex, _result_values(ex.token, [f.task_id], pickle.dumps(["forged"], 5)))
        assert wait_until(lambda: "refused a message" in capfd.readouterr().err, 10)
        assert not f.done()
        gate.open()
        assert f.result(timeout=30) == 4


def test_values_body_round_trip_and_bounds():
    ids = [1, 2**64 - 1, 12345]
    body = values_body(ids, pickle.dumps([None, "x", 3], 5))
    got_ids, pickled = split_values(body)
    assert list(got_ids) == ids and pickle.loads(pickled) == [None, "x", 3]
    for cut in (body[:2], body[:4 + 8 * 3], body[:4 + 8]):
        with pytest.raises(ProtocolError):
            split_values(cut)


# --------------------------------------------------------------------------
# The outbox: results held by a worker that dies are still delivered
# --------------------------------------------------------------------------

_HEADER = struct.Struct(HEADER_FORMAT)


def die_with_results_in_outbox(x, owner_dir, marker, least=3):
    """Return ``x``; but the first time this worker's outbox file holds at
    least ``least`` results of earlier tasks (sent by nobody yet), record them
    in ``marker`` (JSON: x, count, their task ids) and kill the worker."""
    if os.path.exists(marker):
        return x
    path = outbox.outbox_path(owner_dir, mqexecutor.worker_id())
    with open(path, "rb") as f:
        data = f.read()
    count, _used = struct.unpack_from("<II", data)
    if count < least:
        return x
    ids = []
    off = outbox.HEAD_SIZE
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, off)
        ids.append(_HEADER.unpack_from(data, off + 4)[5])  # the inner result's task_id
        off += 4 + n
    with open(marker + ".tmp", "w") as f:
        json.dump({"x": x, "count": count, "task_ids": ids, "pid": os.getpid()}, f)
    os.rename(marker + ".tmp", marker)
    os._exit(7)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("authkey", [None, AUTHKEY], ids=["plain", "authkey"])
def test_worker_death_delivers_the_results_waiting_in_its_outbox(tmp_path, authkey):
    # The fatal task itself checks that results of earlier tasks of its batch
    # are in the outbox file (unsent) when the worker dies: so this test fails
    # if they are not kept there, and fails if the owner does not deliver them
    # (they would then fail with TerminatedWorkerError "ran, but its result
    # was lost", or hang).
    gate = Gate(tmp_path)
    marker = str(tmp_path / "died.json")
    with pool(max_workers=1, batch_size=50, authkey=authkey) as ex:
        owner_dir = ex._state.res.board_dir
        blocker, futures = _backlog(ex, gate, die_with_results_in_outbox,
                                    owner_dir, marker)
        gate.open()
        blocker.result(timeout=30)
        outcomes = {}
        for i, f in enumerate(futures):
            exc = f.exception(timeout=30)
            outcomes[i] = exc if exc is not None else f.result()
        assert os.path.exists(marker), \
            "no task ever saw 3 results waiting in its worker's outbox file"
        with open(marker) as fh:
            died = json.load(fh)
        assert died["count"] >= 3 and len(died["task_ids"]) == died["count"]
        failed = {i: o for i, o in outcomes.items() if isinstance(o, BaseException)}
        assert list(failed) == [died["x"]], f"failed: {failed}"
        err = failed[died["x"]]
        assert isinstance(err, TerminatedWorkerError)
        assert "exit code 7" in str(err) and "lost" not in str(err)
        assert err.task_id == futures[died["x"]].task_id
        # The results that were in the outbox at the death came back intact.
        by_id = {f.task_id: i for i, f in enumerate(futures)}
        held = [by_id[t] for t in died["task_ids"]]
        assert all(i < died["x"] for i in held), (held, died["x"])
        assert [outcomes[i] for i in held] == held
        assert all(outcomes[i] == i for i in outcomes if i != died["x"])
        # A new worker serves on.
        assert ex.submit(square, 7).result(timeout=30) == 49
        assert died["pid"] not in ex._processes


# outbox.py on its own -------------------------------------------------------

ROUTE = outbox.Route(reply=0x1234, pid=4242, token=0xDEADBEEFCAFEF00D)


def _result(task_id: int, body: bytes = b"value") -> bytes:
    return build(Kind.RESULT, 0, 0, task_id, ROUTE.token, 0, 99, 0, body)


@contextlib.contextmanager
def _box(tmp_path, capacity=4096) -> Iterator[tuple[str, outbox.Outbox]]:
    """(path, Outbox) of a fresh outbox file, closed at the end."""
    path = outbox.outbox_path(str(tmp_path), 3)
    assert os.path.basename(path) == "outbox-3"
    outbox.create(path, capacity)
    box = outbox.Outbox(path)
    try:
        yield path, box
    finally:
        box.close()


def test_outbox_add_drain_round_trip(tmp_path):
    with _box(tmp_path) as (path, box):
        messages = [_result(i, b"x" * i) for i in range(1, 6)]
        for m in messages:
            assert box.fits(len(m))
            box.add(ROUTE, m)
        got = outbox.drain(path)
        assert got is not None
        route, drained = got
        assert route == ROUTE
        assert drained == messages


def test_outbox_drain_empties_the_file(tmp_path):
    with _box(tmp_path) as (path, box):
        box.add(ROUTE, _result(1))
        assert outbox.drain(path) is not None
        assert outbox.drain(path) is None  # taken once only
        with open(path, "rb") as f:
            assert f.read(outbox.HEAD_SIZE) == bytes(outbox.HEAD_SIZE)


def test_outbox_drain_of_empty_missing_or_odd_files(tmp_path):
    with _box(tmp_path) as (path, _unused):
        pass
    assert outbox.drain(path) is None  # created, never written
    assert outbox.drain(str(tmp_path / "outbox-99")) is None  # missing
    short = tmp_path / "short"
    short.write_bytes(b"\x01\x00")
    assert outbox.drain(str(short)) is None  # shorter than the header
    os.symlink(path, tmp_path / "link")
    assert outbox.drain(str(tmp_path / "link")) is None  # never follows a link


def test_outbox_clear_and_fits(tmp_path):
    with _box(tmp_path, capacity=200) as (path, box):
        m = _result(1, b"y" * 100)  # 140 bytes, 144 with its length
        assert box.fits(len(m))
        box.add(ROUTE, m)
        assert not box.fits(len(m))  # 288 > 200
        assert box.fits(200 - 144 - 4)
        box.clear()
        assert outbox.drain(path) is None
        assert box.fits(len(m))


def test_outbox_create_empties_an_old_file_and_refuses_small_files(tmp_path):
    with _box(tmp_path) as (path, box):
        box.add(ROUTE, _result(1))
    outbox.create(path, 4096)  # a new worker under the same id
    assert outbox.drain(path) is None
    small = tmp_path / "small"
    small.write_bytes(bytes(outbox.HEAD_SIZE))
    with pytest.raises(ValueError):
        outbox.Outbox(str(small))
    with pytest.raises(OSError):
        outbox.Outbox(str(tmp_path / "missing"))


def _corrupt(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_outbox_drain_ignores_truncated_or_corrupt_entries(tmp_path):
    with _box(tmp_path) as (path, box):
        messages = [_result(i) for i in range(1, 4)]
        for m in messages:
            box.add(ROUTE, m)
        third = outbox.HEAD_SIZE + 2 * (4 + len(messages[0]))
        # the third entry's length runs past what the header says is used
        _corrupt(path, third, struct.pack("<I", 10_000))
        assert outbox.drain(path) == (ROUTE, messages[:2])

        box.clear()  # fresh entries; `count` says more than there are
        for m in messages:
            box.add(ROUTE, m)
        _corrupt(path, 0, struct.pack("<I", 50))
        assert outbox.drain(path) == (ROUTE, messages)

        box.clear()  # `used` runs past the end of the file: clamped to it
        for m in messages:
            box.add(ROUTE, m)
        _corrupt(path, 4, struct.pack("<I", 0xFFFFFFF0))
        assert outbox.drain(path) == (ROUTE, messages)

        box.clear()  # the very first entry is corrupt: nothing to deliver
        box.add(ROUTE, messages[0])
        _corrupt(path, outbox.HEAD_SIZE, struct.pack("<I", 0xFFFFFFFF))
        assert outbox.drain(path) is None


def test_outbox_drain_stops_at_an_entry_shorter_than_a_header(tmp_path):
    # count and used both damaged: zero-length entries are no messages, and
    # forwarding them would make the collector refuse the whole batch.
    with _box(tmp_path) as (path, box):
        box.add(ROUTE, _result(1))
        _corrupt(path, 0, struct.pack("<II", 5, 4096))
        assert outbox.drain(path) == (ROUTE, [_result(1)])


def gated_value(x, gate_path=None):
    """``x``; when ``gate_path`` is given, first wait for that file."""
    if gate_path is not None:
        from tests.helpers import wait_for_path
        if not wait_for_path(gate_path, 30):
            raise TimeoutError("gate never opened")
    return x


@pytest.mark.timeout(60)
def test_a_long_task_does_not_hold_back_the_results_before_it_in_its_batch(tmp_path):
    """Ten quick tasks and a long one in one BATCH: the quick ones' results
    arrive while the long one still runs (the worker's outbox thread sends
    them once the oldest is FLUSH_AGE old), not when the batch ends."""
    gate = Gate(tmp_path)
    slow_gate = os.path.join(str(tmp_path), "slow-gate")
    with pool(max_workers=1, batch_size=50) as ex:
        blocker = ex.submit(gated, gate.path, gate.started_dir, "blocker")
        gate.wait_started(1)
        # hold-back keeps these in the backlog: they leave as one BATCH
        quick = [ex.submit(gated_value, i) for i in range(10)]
        slow = ex.submit(gated_value, "slow", slow_gate)
        assert ex.stats().backlog >= 5
        gate.open()
        blocker.result(timeout=30)
        try:
            assert wait_until(lambda: all(f.done() for f in quick), 10), \
                "the quick results waited for the long task of their batch"
            assert not slow.done()
            assert [f.result() for f in quick] == list(range(10))
            assert len(slow._batch or []) > 1
        finally:
            open(slow_gate, "w").close()
        assert slow.result(timeout=30) == "slow"


def test_outbox_entry_not_yet_counted_is_not_delivered(tmp_path):
    # `count` is written last: an entry whose bytes are there but which the
    # header does not count yet (a worker killed while adding it) is ignored.
    with _box(tmp_path) as (path, box):
        messages = [_result(i) for i in range(1, 3)]
        for m in messages:
            box.add(ROUTE, m)
        _corrupt(path, 0, struct.pack("<I", 1))
        assert outbox.drain(path) == (ROUTE, messages[:1])


# --------------------------------------------------------------------------
# Hold-back: a private queue holds at most 2 messages per worker
# --------------------------------------------------------------------------

HELD = 100  # small tasks: all of them would fit in a 16 KB queue


def _held(ex, gate):
    """The worker held on ``gate``, then HELD small tasks submitted behind it."""
    blocker = ex.submit(gated, gate.path, gate.started_dir, "blocker")
    gate.wait_started(1)
    return blocker, [ex.submit(square, i) for i in range(HELD)]


def _queued(ex) -> int:
    info = ipcinfo.queue_info(ex.key)
    assert info is not None
    return info.qnum


@pytest.mark.timeout(60)
def test_private_queue_holds_back_tasks_in_the_backlog(tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=1) as ex:
        blocker, futures = _held(ex, gate)
        try:
            queued = _queued(ex)
            backlog = len(ex._state.dispatch.backlog)
            assert queued <= 2 * ex.max_workers, queued
            assert backlog >= HELD - 2 * ex.max_workers, backlog
            assert ex.stats().queued_messages == queued
            assert ex.stats().backlog == backlog
        finally:
            gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(HELD)]


@pytest.mark.timeout(60)
def test_queue_on_an_explicit_key_takes_all_it_can_hold(tmp_path):
    gate = Gate(tmp_path)
    key = unused_key()
    try:
        with pool(key=key, max_workers=1) as ex:
            blocker, futures = _held(ex, gate)
            try:
                queued = _queued(ex)
                backlog = len(ex._state.dispatch.backlog)
                assert queued + backlog == HELD
                # A private queue would stop at 2: this one holds far more.
                assert queued >= HELD // 2, (queued, backlog, ex.stats())
            finally:
                gate.open()
            blocker.result(timeout=30)
            assert [f.result(timeout=30) for f in futures] == [i * i for i in range(HELD)]
    finally:
        remove_test_key(key)


# --------------------------------------------------------------------------
# The collector reads RESULT BATCH entries in place
# --------------------------------------------------------------------------


def _result_batch(token: int, entries: list[bytes], busy_us: int = 5,
                  body: bytes | None = None) -> bytes:
    """A forged RESULT BATCH message of ``entries`` (or of ``body`` when given)."""
    return build(Kind.RESULT, F_BATCH, 0, busy_us, token, 0, os.getpid(), 0,
                 join_batch(entries) if body is None else body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_result_batch_with_mixed_entries_completes_each_future(tmp_path, mode):
    """A RESULT BATCH whose entries are a plain value, an exception, a value
    for a task id nobody waits for, and another plain value: each entry is
    handled on its own, in order, and the stale one completes nothing. The
    pool serves on (the real results, arriving later, are dropped)."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, mode=mode) as ex:
        f, g, h = (ex.submit(gated_identity, gate.path, i) for i in range(3))
        assert wait_until(lambda: ex.stats().backlog == 0, 10)  # all three sent
        token = ex.token
        err = ValueError("raised in a forged result")
        entries = [
            _forged_result(token, f.task_id, "f"),
            _forged_result(token, g.task_id, (err, "Traceback: forged\n"), Status.RAISED),
            _forged_result(token, 10**9, "x"),
            _forged_result(token, h.task_id, ["h"]),
        ]
        _inject(ex, _result_batch(token, entries))
        assert f.result(timeout=10) == "f"
        assert isinstance(g.exception(timeout=10), ValueError)
        assert h.result(timeout=10) == ["h"]
        assert ex.stats().completed == 3
        _serves_on_after_forged_results(ex, gate, mode, 3)


@pytest.mark.timeout(60)
def test_result_batch_with_an_entry_past_its_end_is_refused_from_there(tmp_path, capfd):
    gate = Gate(tmp_path)
    with pool(max_workers=1) as ex:
        f, g = (ex.submit(gated_identity, gate.path, i) for i in range(2))
        token = ex.token
        body = join_batch([_forged_result(token, f.task_id, "f"),
                           _forged_result(token, g.task_id, "g")])
        body = body[:-3]  # the last entry runs past the end
        _inject(ex, _result_batch(token, [], body=body))
        assert f.result(timeout=10) == "f"
        time.sleep(0.2)
        assert not g.done(), "an entry cut short completed its Future"
        gate.open()
        assert g.result(timeout=30) == 1  # the real result
    assert "refused a message on the reply queue" in capfd.readouterr().err


def _gc_collect_until(predicate, tries: int = 20) -> bool:
    for _ in range(tries):
        gc.collect()
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("retries", [0, 1])
def test_a_kept_future_does_not_keep_its_batch_alive(tmp_path, retries):
    """A caller that keeps one Future of a batch keeps neither the other
    Futures sent with it nor (with retries=, which keeps the task message until
    the outcome) its message."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, batch_size=50, retries=retries) as ex:
        seen = _count_results_per_message(ex)
        blocker, futures = _backlog(ex, gate, square, n=200)
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(200)]
        assert max(n for n, _ in seen) > 1, f"no batch was sent: {seen[:20]}"
        kept = futures[100]  # in the backlog behind 100 others: sent in a batch
        refs = [weakref.ref(f) for f in futures if f is not kept]
        del futures, blocker
        assert _gc_collect_until(lambda: all(r() is None for r in refs)), \
            f"{sum(r() is not None for r in refs)} Futures the caller dropped are still alive"
        assert kept._message == b"" and kept._batch is None


@pytest.mark.timeout(60)
def test_a_task_completed_while_in_the_backlog_is_not_sent(tmp_path):
    """A result for a task still waiting in the backlog (a duplicate: it can
    only come from a copy sent earlier) completes its Future; the task is then
    not sent, and its Future stays completed with that result."""
    gate = Gate(tmp_path)
    with pool(max_workers=1) as ex:
        blocker = ex.submit(gated, gate.path, gate.started_dir, "blocker")
        gate.wait_started(1)
        others = [ex.submit(gated_identity, gate.path, i) for i in range(4)]
        late = others[-1]
        assert late in ex._state.dispatch.backlog, "the test needs the task in the backlog"
        _inject(ex, _forged_result(ex.token, late.task_id, "duplicate"))
        assert late.result(timeout=10) == "duplicate"
        gate.open()
        blocker.result(timeout=30)
        assert [f.result(timeout=30) for f in others[:-1]] == [0, 1, 2]
        assert wait_until(lambda: ex.stats().backlog == ex.stats().running == 0, 10)
        assert late.done() and late.result(timeout=0) == "duplicate"
        assert late._attempts == 0, "the completed task was sent anyway"
