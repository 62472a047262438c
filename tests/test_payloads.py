"""Payloads larger than one message: spill files, their permissions, their
clean-up, MQEXECUTOR_SPILL_DIR."""
from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest

import mqexecutor
from mqexecutor import Mode, spill

from .helpers import (
    Gate,
    gated,
    gated_identity,
    identity,
    length,
    make_bytes,
    pool,
    producer_subdir,
    raise_value_error,
    remove_test_key,
    sha256_hex,
    shutdown_or_fail,
    spill_entries,
    spill_files_of,
    unused_key,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024


def test_msgmax_is_read_from_the_kernel():
    with open("/proc/sys/kernel/msgmax") as f:
        assert mqexecutor.msgmax() == int(f.read())
    with open("/proc/sys/kernel/msgmnb") as f:
        assert mqexecutor.msgmnb() == int(f.read())


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_sizes_around_one_message(mode):
    """Arguments and results whose pickles are just below, at and above the
    largest message (msgmax minus the 40-byte header)."""
    inline_max = mqexecutor.msgmax() - 40
    sizes = list(range(inline_max - 160, inline_max + 40)) + \
        [0, 1, 2 * inline_max, 3 * mqexecutor.msgmax() + 1]
    with pool(mode=mode) as ex:
        payloads = [bytes([n % 251]) * n for n in sizes]
        fs = [ex.submit(identity, p) for p in payloads]
        for p, f in zip(payloads, fs):
            assert f.result(timeout=30) == p
        assert spill_files_of(ex) == []


def test_sizes_around_one_message_with_long_function_names():
    """The task header carries the function's name (up to 255 bytes): a long
    name must not push a message over msgmax."""
    inline_max = mqexecutor.msgmax() - 40
    with pool() as ex:
        for name in ("f", "n" * 100, "long" * 100, "\u00e9" * 200):
            fn = lambda x: x  # noqa: E731
            fn.__qualname__ = fn.__name__ = name
            payloads = [b"q" * n for n in range(inline_max - 400, inline_max + 20, 3)]
            fs = [ex.submit(fn, p) for p in payloads]
            for p, f in zip(payloads, fs):
                assert f.result(timeout=30) == p
        assert ex.submit(len, b"ok").result(timeout=10) == 2


@pytest.mark.timeout(180)
def test_200mb_bytes_round_trip():
    n = 200 * MB
    payload = np.random.default_rng(1).bytes(n)
    digest = hashlib.sha256(payload).hexdigest()
    with pool() as ex:
        # as an argument (checked in the worker)
        assert ex.submit(sha256_hex, payload).result(timeout=120) == digest
        # as a result (made in the worker)
        made = ex.submit(make_bytes, n, 1).result(timeout=120)
        assert len(made) == n and made == payload
        del made
        # both ways
        back = ex.submit(identity, payload).result(timeout=120)
        assert type(back) is bytes and len(back) == n and back == payload
        del back
        assert spill_files_of(ex) == []
        subdir = producer_subdir(ex)
    assert spill.list_files(subdir) == []


@pytest.mark.timeout(120)
def test_numpy_arrays_round_trip():
    rng = np.random.default_rng(2)
    big = rng.standard_normal(10 * MB)  # 80 MB float64, contiguous
    strided = big[::3]  # not contiguous: pickled in-band
    fortran = np.asfortranarray(rng.integers(0, 1000, size=(1500, 1300), dtype=np.int32))
    small = np.arange(10, dtype=np.uint8)
    structured = np.zeros(200_000, dtype=[("a", "i4"), ("b", "f8"), ("c", "S3")])
    structured["a"] = np.arange(200_000)
    with pool() as ex:
        for arr in (big, strided, fortran, small, structured):
            res = ex.submit(identity, arr).result(timeout=60)
            assert isinstance(res, np.ndarray)
            assert res.dtype == arr.dtype and res.shape == arr.shape
            np.testing.assert_array_equal(res, arr)
        made = ex.submit(np.arange, 12 * MB, dtype=np.int64).result(timeout=60)
        np.testing.assert_array_equal(made, np.arange(12 * MB, dtype=np.int64))
        # ProcessPoolExecutor hands back ordinary, writable arrays
        assert made.flags.writeable
        made[0] = -1
        assert made[0] == -1
        assert spill_files_of(ex) == []


def test_other_buffer_types_and_dtypes():
    rng = np.random.default_rng(3)
    ba = bytearray(rng.bytes(5 * MB))
    arrays = [
        np.zeros(0, dtype=np.float64),
        np.array(3.5),
        rng.standard_normal(MB).astype(">f8"),  # big-endian
        np.array([{"a": 1}, None, "s", 2.5] * 1000, dtype=object),
        rng.integers(0, 2, size=3 * MB, dtype=np.bool_),
        np.arange(2 * MB, dtype=np.complex128).reshape(1024, -1),
    ]
    readonly = rng.standard_normal(MB)
    readonly.flags.writeable = False
    arrays.append(readonly)
    with pool() as ex:
        back = ex.submit(identity, ba).result(timeout=30)
        assert type(back) is bytearray and back == ba
        for arr in arrays:
            res = ex.submit(identity, arr).result(timeout=30)
            assert res.dtype == arr.dtype and res.shape == arr.shape
            np.testing.assert_array_equal(res, arr)
        nested = {"x": [arrays[2], {"y": ba}], "z": (readonly, b"b" * MB)}
        res = ex.submit(identity, nested).result(timeout=30)
        np.testing.assert_array_equal(res["x"][0], arrays[2])
        assert res["x"][1]["y"] == ba
        np.testing.assert_array_equal(res["z"][0], readonly)
        assert res["z"][1] == b"b" * MB
        assert spill_files_of(ex) == []


def test_large_kwargs_and_many_arguments():
    a = b"a" * (3 * MB)
    b = np.ones(MB, dtype=np.float32)
    with pool(mode=Mode.TARGETED) as ex:
        f = ex.submit_to(1, lambda x, y=None, z=None: (len(x), float(y.sum()), z), a,
                         y=b, z="z" * 20000)
        assert f.result(timeout=30) == (3 * MB, float(MB), "z" * 20000)


def test_spill_file_is_0600_in_a_0700_directory(tmp_path):
    gate = Gate(tmp_path)
    payload = os.urandom(2 * MB)
    with pool(mode=Mode.TARGETED) as ex:
        try:
            ex.submit_to(0, gated, gate.path, gate.started_dir, "b")
            gate.wait_started(1)
            f = ex.submit_to(0, length, payload)  # waits in the queue for worker 0
            files = spill_files_of(ex)
            assert len(files) == 1, files
            path = files[0]
            st = os.lstat(path)
            assert stat.S_ISREG(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()
            assert st.st_size >= len(payload)
            directory = os.path.dirname(path)
            assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
            root = os.path.dirname(directory)
            assert root in spill.spill_roots()
            assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700
        finally:
            gate.open()
        assert f.result(timeout=30) == len(payload)
        # the worker unlinked the file when it read it
        assert spill_files_of(ex) == []


def test_spill_dir_env_variable(tmp_path, monkeypatch):
    spill_dir = tmp_path / "spill-here"
    monkeypatch.setenv("MQEXECUTOR_SPILL_DIR", str(spill_dir))
    assert spill.spill_roots() == [str(spill_dir)]
    gate = Gate(tmp_path)
    payload = os.urandom(MB)
    with pool(mode=Mode.TARGETED) as ex:
        subdir = producer_subdir(ex)
        try:
            ex.submit_to(0, gated, gate.path, gate.started_dir, "b")
            gate.wait_started(1)
            f = ex.submit_to(0, identity, payload)
            files = [p for p in spill_entries([str(spill_dir)]) if p.endswith(".spill")]
            assert len(files) == 1, files
            assert files[0].startswith(os.path.join(str(spill_dir), subdir) + os.sep)
            assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600
        finally:
            gate.open()
        assert f.result(timeout=30) == payload
        # the result's spill file went there too, and is gone once read
        assert ex.submit(make_bytes, MB, 5).result(timeout=30) == \
            np.random.default_rng(5).bytes(MB)
        # nothing of this executor went to the default roots
        for root in _default_roots():
            assert not os.path.exists(os.path.join(root, subdir))
    assert stat.S_IMODE(os.stat(spill_dir).st_mode) == 0o700
    assert os.listdir(spill_dir) == []


def _empty_root_left(root):
    """Whether ``root`` exists and holds nothing: what no pool may leave. (A
    root holding something is another producer's of this user, e.g. a test run
    beside this one; this run's own leftovers are the leak check's business.)"""
    try:
        return os.listdir(root) == []
    except FileNotFoundError:
        return False


def test_default_roots_are_removed_once_empty():
    roots = spill.spill_roots()
    with pool() as ex:
        assert ex.submit(length, os.urandom(MB)).result(timeout=30) == MB
        assert os.path.isdir(roots[0])
    for root in roots:
        assert not _empty_root_left(root), f"empty spill root {root} left behind"
    # a root that still holds somebody's sub-directory stays until that goes
    mine = f"x-roots-{os.getpid()}"
    try:
        spill.ensure_subdir(0, mine)
        with pool() as ex:
            assert ex.submit(length, os.urandom(MB)).result(timeout=30) == MB
        assert os.path.isdir(os.path.join(roots[0], mine))
    finally:
        spill.remove_subdir(mine)
    assert not _empty_root_left(roots[0])


def _make_and_remove(name, seconds, errors):
    import time
    end = time.monotonic() + seconds
    rounds = absent = 0
    root = spill.root_dir(0, create=False)
    while time.monotonic() < end:
        absent += not os.path.isdir(root)
        try:
            spill.ensure_subdir(0, name)
        except OSError as exc:
            errors.put(repr(exc))
            return
        spill.remove_subdir(name)
        rounds += 1
    errors.put((rounds, absent))


def test_root_removed_by_another_producer_is_made_again():
    """Two processes make and remove their own sub-directory in a loop for 2 s:
    the empty root disappears and comes back under them, and neither may fail
    to make its directory. (Only while no other producer of this user keeps a
    directory there: on a machine shared with other runs, the root cannot go
    away, and the test says so.)"""
    import multiprocessing
    root = spill.root_dir(0, create=False)
    others = os.listdir(root) if os.path.isdir(root) else []
    if others:
        pytest.skip(f"the default spill root {root} holds other producers' directories "
                    f"({len(others)}), so it cannot be emptied: {sorted(others)[:3]}")
    ctx = multiprocessing.get_context("spawn")  # never fork() a process with threads
    errors = ctx.Queue()
    procs = [ctx.Process(target=_make_and_remove, args=(f"x-race-{os.getpid()}-{i}", 2.0, errors))
             for i in range(2)]
    for p in procs:
        p.start()
    outcomes = [errors.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert all(isinstance(o, tuple) and o[0] > 100 for o in outcomes), outcomes
    assert sum(absent for _, absent in outcomes) > 0, \
        f"the root never went away under them: {outcomes}"


def test_spill_root_with_loose_permissions_is_tightened(tmp_path, monkeypatch):
    root = tmp_path / "loose"
    root.mkdir()
    os.chmod(root, 0o755)
    monkeypatch.setenv("MQEXECUTOR_SPILL_DIR", str(root))
    with pool() as ex:
        payload = os.urandom(MB)
        assert ex.submit(identity, payload).result(timeout=30) == payload
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(root / producer_subdir(ex)).st_mode) == 0o700
    assert os.listdir(root) == []


def test_spill_root_that_is_a_symlink_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    monkeypatch.setenv("MQEXECUTOR_SPILL_DIR", str(link))
    try:
        ex = mqexecutor.MQExecutor(max_workers=1)
    except OSError:
        pass  # refused up front
    else:
        try:
            f = ex.submit(identity, os.urandom(MB))
            with pytest.raises(OSError):
                f.result(timeout=30)
        finally:
            shutdown_or_fail(ex)
    assert os.listdir(target) == []


def _default_roots():
    uid = os.getuid()
    import tempfile
    roots = []
    if os.path.isdir("/dev/shm"):
        roots.append(f"/dev/shm/mqexecutor-{uid}")
    roots.append(os.path.join(tempfile.gettempdir(), f"mqexecutor-{uid}"))
    return roots


def test_no_spill_file_left_when_task_raises():
    big = b"x" * (2 * MB)
    with pool() as ex:
        f = ex.submit(raise_value_error, big)  # spilled argument, spilled exception
        with pytest.raises(ValueError) as info:
            f.result(timeout=30)
        assert info.value.args[0] == big
        assert spill_files_of(ex) == []
        subdir = producer_subdir(ex)
    assert spill.list_files(subdir) == []


def test_no_spill_file_left_when_future_cancelled(tmp_path):
    """A spilled task cancelled while it waits in the in-process backlog."""
    gate = Gate(tmp_path)
    pad = "p" * 4000  # ~4 such messages fill the 16 KB kernel queue
    with pool(max_workers=2) as ex:
        try:
            for i in range(2):
                ex.submit(gated, gate.path, gate.started_dir, i)
            gate.wait_started(2)
            fillers = [ex.submit(gated_identity, gate.path, pad) for _ in range(8)]
            big = [ex.submit(length, os.urandom(MB)) for _ in range(3)]
            assert all(not b.running() for b in big)
            assert all(b.cancel() for b in big)
            assert len(spill_files_of(ex)) <= 3
        finally:
            gate.open()
        assert [f.result(timeout=30) for f in fillers] == [pad] * 8
        assert all(b.cancelled() for b in big)
        assert wait_until(lambda: spill_files_of(ex) == [], 10), spill_files_of(ex)
        subdir = producer_subdir(ex)
    assert spill.list_files(subdir) == []


def test_no_spill_file_left_after_cancel_futures(tmp_path):
    """Spilled tasks still in the kernel queue when shutdown(cancel_futures=True)
    takes them back."""
    gate = Gate(tmp_path)
    ex = mqexecutor.MQExecutor(max_workers=1, mode=Mode.TARGETED)
    try:
        blocker = ex.submit_to(0, gated, gate.path, gate.started_dir, "b")
        gate.wait_started(1)
        queued = [ex.submit_to(0, length, os.urandom(MB)) for _ in range(3)]
        assert len(spill_files_of(ex)) == 3
        subdir = producer_subdir(ex)
        ex.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
    finally:
        gate.open()
        shutdown_or_fail(ex)
    assert blocker.result(timeout=10)[0] == 0
    assert spill.list_files(subdir) == []


def test_explicit_key_spill_files_cleaned():
    key = unused_key()
    try:
        with pool(key) as ex:
            payload = os.urandom(3 * MB)
            assert ex.submit(identity, payload).result(timeout=30) == payload
        assert [p for p in spill.list_files(spill.key_subdir(key))
                if p.endswith(".spill")] == []
    finally:
        remove_test_key(key)
