"""Bad input in the task queue: a worker never crashes or hangs on it.

Whatever another program (or a bug, or an attacker of the same uid) puts in the
queue -- random bytes, a truncated or unknown header, a wrong wire version, a
message longer or shorter than its header says, a spill reference outside the
spill root, a spill file that vanished or is a symbolic link, a corrupted
pickle, a BATCH message with garbage inside -- the worker counts it
(``stats().rejected``), logs it with its reason, keeps it as a dead letter
(``mqexecutor.deadletter``; ``mqexecutor dead KEY``) and goes on with the valid
tasks around it. The same worker processes (same pids) keep serving.

The first half tests each kind of bad message on its own, with its reason; the
second half is a property-based fuzz test (hypothesis) posting thousands of
random and mutated messages while real tasks run on one executor reused across
examples.

Forged messages name a reply queue that does not exist (``NOWHERE``) and this
process as producer: see ``test_forged_header_naming_a_dead_producer_*`` and
``test_forged_reply_key_zero_*`` at the end for what happens otherwise.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest
import sysv_ipc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mqexecutor
from mqexecutor import MQExecutor, codec, deadletter, ipcinfo, persistence, spill
from mqexecutor.protocol import (
    HEADER_FORMAT,
    HEADER_SIZE,
    MAGIC,
    WIRE_VERSION,
    Flag,
    Kind,
    build,
    task_body,
)

from .helpers import (
    identity,
    pid_alive,
    pool,
    producer_subdir,
    shutdown_or_fail,
    square,
    touch_marker,
    unused_key,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

_HEADER = struct.Struct(HEADER_FORMAT)
_LEN = struct.Struct("<I")


# --------------------------------------------------------------------------
# Task functions (run by workers forked from this process)
# --------------------------------------------------------------------------

def rendezvous(directory, n, tag):
    """Wait (at most 20 s) until ``n`` tasks tagged ``tag`` run at the same time.

    ``n`` tasks of one tag posted behind other messages can only all be running
    once every worker finished what it took before: a barrier for the pool."""
    with open(os.path.join(directory, f"{tag}-{os.getpid()}"), "w"):
        pass
    end = time.monotonic() + 20
    while len([f for f in os.listdir(directory) if f.startswith(tag + "-")]) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"rendezvous {tag}: a worker never came")
        time.sleep(0.002)
    return os.getpid()


# --------------------------------------------------------------------------
# Building messages
# --------------------------------------------------------------------------

#: A reply key no queue has: forged messages name it, so no outcome goes anywhere.
NOWHERE = unused_key()


def header(kind=Kind.TASK, flags=0, status=0, task_id=7, token=0xF00D, reply=None,
           pid=None, worker=-1, length=0, magic=MAGIC, version=WIRE_VERSION) -> bytes:
    return _HEADER.pack(magic, version, kind, flags, status, task_id, token,
                        NOWHERE if reply is None else reply,
                        os.getpid() if pid is None else pid, worker, length)


def payload(fn, *args) -> bytes:
    body, spilled = codec.dumps((fn, args, {}), 1 << 20, "unused")
    assert not spilled
    return body


def task(fn, *args, flags=0, task_id=7, reply=None, pid=None, authkey=None) -> bytes:
    """A valid TASK message, as a producer built by the library sends it."""
    return build(Kind.TASK, flags, 0, task_id, 0xF00D, NOWHERE if reply is None else reply,
                 os.getpid() if pid is None else pid, -1,
                 task_body(getattr(fn, "__qualname__", "fn"), payload(fn, *args)), authkey)


def spill_task(reference: str) -> bytes:
    """A TASK message whose body is the spill reference ``reference``."""
    return build(Kind.TASK, Flag.SPILL, 0, 7, 0xF00D, NOWHERE, os.getpid(), -1,
                 task_body("spilled", reference.encode()))


def batch(*inner: bytes, body_suffix: bytes = b"") -> bytes:
    body = b"".join(_LEN.pack(len(m)) + m for m in inner) + body_suffix
    return build(Kind.TASK, Flag.BATCH, 0, 7, 0xF00D, NOWHERE, os.getpid(), -1, body)


def post(key: int, raw: bytes, mtype: int = 1, timeout: float = 20.0) -> None:
    """msgsnd without blocking for good: fails the test when the queue stays
    full (the workers stopped taking messages)."""
    q = sysv_ipc.MessageQueue(key)
    end = time.monotonic() + timeout
    while True:
        try:
            q.send(raw, block=False, type=mtype)
            return
        except sysv_ipc.BusyError:
            if time.monotonic() > end:
                raise AssertionError(f"the task queue stayed full for {timeout} s: "
                                     "the workers stopped taking messages") from None
            time.sleep(0.002)


# --------------------------------------------------------------------------
# One pool for the whole module
# --------------------------------------------------------------------------

class Pool:
    """The shared executor, its dead-letter directory and a barrier."""

    def __init__(self, ex: MQExecutor, directory: str):
        self.ex = ex
        self.key = ex.key
        self.dir = directory
        self.pids = set(ex._processes)
        self.n = 0

    def settle(self) -> set[int]:
        """Return once every worker finished every message posted before."""
        self.n += 1
        tag = f"barrier{self.n}"
        futures = [self.ex.submit(rendezvous, self.dir, 2, tag) for _ in range(2)]
        pids = {f.result(timeout=30) for f in futures}
        assert len(pids) == 2
        return pids

    def check_workers(self) -> None:
        """The very same worker processes still serve: none died or was replaced."""
        assert set(self.ex._processes) == self.pids, \
            f"workers replaced: {self.pids} -> {set(self.ex._processes)}"
        assert all(pid_alive(p) for p in self.pids)

    def rejected(self) -> int:
        return self.ex.stats().rejected


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    key = unused_key()
    ex = MQExecutor(key, 2)
    # The dead-letter directory exists before any test, so the leak check only
    # sees the records each test makes (and purges).
    os.makedirs(os.path.join(spill.root_dir(0), spill.key_subdir(key), "dead"),
                mode=0o700, exist_ok=True)
    directory = str(tmp_path_factory.mktemp("fuzz"))
    try:
        yield Pool(ex, directory)
    finally:
        try:
            shutdown_or_fail(ex, cancel_futures=True)
        finally:
            persistence.remove_queue(key)


@pytest.fixture
def fp(shared):
    """The shared pool; dead letters of the test are removed at its end."""
    shared.check_workers()
    yield shared
    try:
        shared.settle()
    finally:
        deadletter.purge(shared.key)


# --------------------------------------------------------------------------
# Each kind of bad message, on its own
# --------------------------------------------------------------------------

def _outside_spill_file(tmp: str) -> str:
    """A valid spill file OUTSIDE the spill root whose task would create
    ``<tmp>/pwned``: if a worker ever followed a link to it, the file appears."""
    sub = f"fz-{os.getpid()}-{random.getrandbits(32):08x}"
    ref = spill.write(sub, payload(touch_marker, tmp, "pwned"))
    index, subdir, name = spill.parse_reference(ref)
    src = os.path.join(spill.root_dir(index), subdir, name)
    dst = os.path.join(tmp, "valid.spill")
    shutil.copyfile(src, dst)  # the spill root may be another file system (tmpfs)
    spill.remove_subdir(sub)
    return dst


def make_case(name: str, fp: Pool, tmp: str) -> tuple[bytes, str, int]:
    """(message, part of the rejection reason, number of rejections) of a case."""
    valid = task(identity, 1)
    subdir = producer_subdir(fp.ex)  # the pool's own spill directory (root 0)
    root0 = spill.root_dir(0)
    if name == "random-bytes":
        return b"\x00" + os.urandom(300), "bad magic", 1
    if name == "empty":
        return b"", "shorter than the 40-byte header", 1
    if name == "truncated-header":
        return valid[:25], "shorter than the 40-byte header", 1
    if name == "header-only-of-a-task":
        return valid[:HEADER_SIZE], "header says", 1
    if name == "bad-magic":
        return b"QM" + valid[2:], "bad magic", 1
    if name == "wrong-version":
        return valid[:2] + bytes([WIRE_VERSION + 6]) + valid[3:], "wire version 7", 1
    if name == "unknown-kind":
        return valid[:3] + bytes([9]) + valid[4:], "unknown message kind 9", 1
    if name == "longer-than-header-says":
        return valid + b"\x00" * 500, "header says", 1
    if name == "shorter-than-header-says":
        return valid[:-5], "header says", 1
    if name == "result-in-task-queue":
        return build(Kind.RESULT, 0, 0, 7, 0xF00D, 0, os.getpid(), 0,
                     payload(identity, 1)), "is not a task", 1
    if name == "name-length-past-body":
        body = struct.pack("<H", 60000) + b"abc"
        return header(length=len(body)) + body, "cannot hold", 1
    if name == "auth-flag-without-room-for-tag":
        body = b"\x00\x00" + b"x" * 10
        return header(flags=Flag.AUTH, length=len(body)) + body, "HMAC tag", 1
    if name == "corrupted-pickle":
        body = task_body("identity", b"\x80\x05garbage that is no pickle\x2e")
        return header(length=len(body)) + body, "could not be read", 1
    if name == "truncated-pickle":
        body = task_body("identity", payload(identity, 1)[:-4])
        return header(length=len(body)) + body, "could not be read", 1
    if name == "pickle-of-a-missing-function":
        # GLOBAL no_such_mod_x.fn, (), {} -> (fn, args, kwargs)
        body = task_body("no_such_mod_x.fn", b"\x80\x02cno_such_mod_x\nfn\n)}\x87.")
        return header(length=len(body)) + body, "ModuleNotFoundError", 1
    if name == "spill-dotdot":
        return spill_task("0:../../etc/passwd"), "refused spill reference", 1
    if name == "spill-absolute":
        return spill_task("/etc/passwd"), "refused spill reference", 1
    if name == "spill-root-out-of-range":
        return spill_task(f"9:{subdir}/x.spill"), "names root 9", 1
    if name == "spill-vanished":
        return spill_task(f"0:{subdir}/{os.urandom(12).hex()}.spill"), "No such file", 1
    if name == "spill-symlink-to-etc-passwd":
        link = os.path.join(root0, subdir, "evil.spill")
        os.symlink("/etc/passwd", link)
        return spill_task(f"0:{subdir}/evil.spill"), "is a symbolic link", 1
    if name == "spill-symlink-to-valid-file-outside":
        link = os.path.join(root0, subdir, "evil2.spill")
        os.symlink(_outside_spill_file(tmp), link)
        return spill_task(f"0:{subdir}/evil2.spill"), "is a symbolic link", 1
    if name == "spill-symlinked-directory":
        link = os.path.join(root0, f"fz-evil-{os.getpid()}")
        os.symlink("/etc", link)
        # O_DIRECTORY | O_NOFOLLOW on a link fails with ENOTDIR on Linux
        return spill_task(f"0:fz-evil-{os.getpid()}/passwd"), "passwd: Not a directory", 1
    if name == "spill-file-with-garbage":
        path = os.path.join(root0, subdir, "garbage.spill")
        with open(path, "wb") as f:
            f.write(os.urandom(200))
        return spill_task(f"0:{subdir}/garbage.spill"), "bad header", 1
    if name == "batch-length-past-end":
        return batch(body_suffix=_LEN.pack(5000) + b"x" * 50), "bad batch", 1
    if name == "batch-entry-shorter-than-header":
        return batch(body_suffix=_LEN.pack(10) + b"x" * 10), "bad batch", 1
    if name == "batch-with-garbage-inside":
        # two garbage entries of valid lengths: each is refused on its own, and
        # the valid task between them runs
        g1 = b"\x00" * 60
        g2 = header(length=999) + b"y" * 20
        ok = task(touch_marker, tmp, "batch-inner-ran")
        return batch(g1, ok, g2), "", 2
    if name == "targeted-task-in-preemptive-pool":
        return task(identity, 1, flags=Flag.TARGETED), "targeted mode", 1
    if name == "json-not-allowed":
        return (b'{"fn": "os:system", "args": ["touch ' + tmp.encode() + b'/pwned"]}',
                "not allowed", 1)
    if name == "json-garbage":
        return b"{\xff\xfe not json", "not UTF-8 JSON", 1
    raise KeyError(name)


CASES = [
    "random-bytes", "empty", "truncated-header", "header-only-of-a-task", "bad-magic",
    "wrong-version", "unknown-kind", "longer-than-header-says", "shorter-than-header-says",
    "result-in-task-queue", "name-length-past-body", "auth-flag-without-room-for-tag",
    "corrupted-pickle", "truncated-pickle", "pickle-of-a-missing-function",
    "spill-dotdot", "spill-absolute", "spill-root-out-of-range", "spill-vanished",
    "spill-symlink-to-etc-passwd", "spill-symlink-to-valid-file-outside",
    "spill-symlinked-directory", "spill-file-with-garbage", "batch-length-past-end",
    "batch-entry-shorter-than-header", "batch-with-garbage-inside",
    "targeted-task-in-preemptive-pool", "json-not-allowed", "json-garbage",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES)
def test_bad_message_is_counted_kept_and_skipped(fp, case, tmp_path):
    tmp = str(tmp_path)
    passwd = os.stat("/etc/passwd")
    try:
        raw, reason, rejections = make_case(case, fp, tmp)
        fp.settle()
        before = fp.rejected()
        first = [fp.ex.submit(square, i) for i in range(5)]
        post(fp.key, raw)
        then = [fp.ex.submit(square, i) for i in range(5, 10)]
        # valid tasks around the bad message run
        assert [f.result(timeout=20) for f in first + then] == [i * i for i in range(10)]
        fp.settle()
        # counted
        assert fp.rejected() - before == rejections
        # kept as dead letters with their reason
        records = deadletter.list_records(fp.key)
        assert len(records) == rejections, records
        for rec in records:
            assert reason in rec["reason"], (case, rec["reason"])
            assert rec["worker"] in (0, 1)
            assert rec["size"] >= 0
        if rejections == 1:
            assert records[0]["message"] == raw
            assert records[0]["size"] == len(raw)
        # the same workers serve: none crashed
        fp.check_workers()
        # nothing outside the spill root was read or run, and nothing touched
        assert not os.path.exists(os.path.join(tmp, "pwned"))
        after = os.stat("/etc/passwd")
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
            (passwd.st_ino, passwd.st_size, passwd.st_mtime_ns)
        if case == "batch-with-garbage-inside":
            assert os.path.exists(os.path.join(tmp, "batch-inner-ran"))
        link = {"spill-symlink-to-etc-passwd": "evil.spill",
                "spill-symlink-to-valid-file-outside": "evil2.spill"}.get(case)
        if link:
            # the link was refused, not consumed (a spill file is unlinked when read)
            assert os.path.islink(os.path.join(spill.root_dir(0), producer_subdir(fp.ex), link))
    finally:
        for name in ("evil.spill", "evil2.spill", "garbage.spill"):
            try:
                os.unlink(os.path.join(spill.root_dir(0), producer_subdir(fp.ex), name))
            except FileNotFoundError:
                pass
        try:
            os.unlink(os.path.join(spill.root_dir(0), f"fz-evil-{os.getpid()}"))
        except FileNotFoundError:
            pass


@pytest.mark.timeout(60)
def test_targeted_pool_sets_aside_bad_messages_of_every_type(tmp_path):
    """In targeted mode each worker reads only its own message type: bad input
    sent to worker 1's type is handled by worker 1 alone, the others go on."""
    key = unused_key()
    try:
        with pool(key, max_workers=3, mode=mqexecutor.Mode.TARGETED) as ex:
            pids = {wid: pid for wid, pid in
                    (ex.submit_to(w, _wid_pid).result(timeout=20) for w in range(3))}
            for w in range(3):
                for raw in (b"\x00" * 50, task(identity, 1)[:30], spill_task("/etc/passwd")):
                    post(key, raw, mtype=w + 1)
            futures = [ex.submit_to(i % 3, square, i) for i in range(30)]
            assert [f.result(timeout=20) for f in futures] == [i * i for i in range(30)]
            assert wait_until(lambda: ex.stats().rejected == 9, 10), ex.stats()
            workers = {r["worker"] for r in deadletter.list_records(key)}
            assert workers == {0, 1, 2}
            assert {w: ex.submit_to(w, _wid_pid).result(timeout=20)[1] for w in range(3)} \
                == pids
    finally:
        persistence.remove_queue(key)


def _wid_pid():
    return mqexecutor.worker_id(), os.getpid()


@pytest.mark.timeout(60)
def test_rejections_are_logged_with_their_reason(capfd):
    """Each refused message is one line on the worker's stderr: worker id, pid,
    size, reason and the dead-letter file. (Own pool: its workers are forked
    while capfd captures fd 2.)"""
    with pool(max_workers=1) as ex:
        pid = ex.submit(os.getpid).result(timeout=20)
        bad = [b"\x00" * 50, spill_task("0:../../etc/passwd"), task(identity, 1)[:-1]]
        for raw in bad:
            post(ex.key, raw)
        assert ex.submit(square, 3).result(timeout=20) == 9
        records = deadletter.list_records(ex.key)
        assert len(records) == 3
        err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "set aside" in line]
    assert len(lines) == 3, err
    for line, raw, rec, reason in zip(lines, bad, records, (
            "bad magic", "refused spill reference", "header says")):
        assert line.startswith(f"mqexecutor worker 0 (pid {pid}): set aside a message "
                               f"of {len(raw)} bytes: "), line
        assert reason in line and rec["reason"] in line
        assert line.endswith(f"; kept in {rec['path']}"), line


@pytest.mark.timeout(60)
def test_cli_dead_lists_and_purges_dead_letters(fp):
    before = fp.rejected()
    post(fp.key, b"\x00not a message")
    post(fp.key, spill_task("0:../../etc/passwd"))
    post(fp.key, task(identity, 1)[:-3])
    fp.settle()
    assert fp.rejected() - before == 3
    cmd = [sys.executable, "-m", "mqexecutor", "dead", hex(fp.key)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    first = b"\x00not a message"
    # two workers: the records are in the order they were written, not posted
    by_reason = {}
    for reason in ("shorter than the 40-byte header", "refused spill reference",
                   "header says"):
        found = [line for line in lines if reason in line]
        assert len(found) == 1, (reason, r.stdout)
        by_reason[reason] = found[0]
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  worker [01]  \d+ bytes  ",
                         found[0]), found[0]
    line = by_reason["shorter than the 40-byte header"]
    assert f" {len(first)} bytes " in line
    assert line.endswith(f"[{first[:16].hex()}...]"), line
    r = subprocess.run(cmd + ["--purge"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "removed 3 dead letter(s)" in r.stdout, r.stdout + r.stderr
    assert deadletter.list_records(fp.key) == []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == f"no dead letters for 0x{fp.key:08x}"


@pytest.mark.timeout(60)
def test_dead_letters_are_capped_but_still_counted(fp, monkeypatch):
    """At most MAX_RECORDS dead letters are kept per key; later bad messages
    are still counted and logged (a flood cannot fill the disk)."""
    fp.settle()
    before = fp.rejected()
    n = deadletter.MAX_RECORDS + 40
    for i in range(n):
        post(fp.key, b"\x01" + i.to_bytes(4, "little"))
    fp.settle()
    assert fp.rejected() - before == n
    kept = len(deadletter.list_records(fp.key))
    assert kept == deadletter.MAX_RECORDS, kept
    fp.check_workers()


# --------------------------------------------------------------------------
# Property-based fuzzing
# --------------------------------------------------------------------------

def _base_messages() -> list[bytes]:
    """Real messages built by the library, to mutate."""
    return [
        task(abs, -3),
        task(identity, b"data" * 20),
        task(square, 12, authkey=b"k" * 32),  # AUTH flag; this pool has no key
        spill_task(f"0:p-1-{0:016x}/{'ab' * 12}.spill"),
        batch(task(abs, -1), task(abs, -2)),
        build(Kind.RESULT, 0, 0, 7, 0xF00D, 0, os.getpid(), 0, payload(abs, -1)),
    ]


BASES = _base_messages()


def _mutate(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(base)
    for pos, value in edits:
        data[pos % len(data)] ^= value
    return bytes(data)


def structurally_invalid(raw: bytes) -> bool:
    """True when the header itself is invalid (checked here independently of
    the library): such a message is always refused."""
    if raw[:1] == b"{":
        return True  # JSON task; this pool allows none
    if len(raw) < HEADER_SIZE:
        return True
    magic, version, kind, *_rest, length = _HEADER.unpack_from(raw)
    return (magic != MAGIC or version != WIRE_VERSION or kind not in (1, 2)
            or length != len(raw) - HEADER_SIZE)


_flip = st.tuples(st.integers(0, 1 << 16), st.integers(1, 255))
messages = st.one_of(
    st.binary(max_size=400),                                                 # random bytes
    st.builds(_mutate, st.sampled_from(BASES), st.lists(_flip, min_size=1, max_size=6)),
    st.builds(lambda b, n: b[:n], st.sampled_from(BASES), st.integers(0, 400)),  # truncate
    st.builds(lambda b, x: b + x, st.sampled_from(BASES), st.binary(min_size=1, max_size=200)),
    st.builds(lambda b, i, x: b[:i] + x + b[i:], st.sampled_from(BASES),     # insert
              st.integers(0, 400), st.binary(min_size=1, max_size=16)),
    st.builds(lambda flags, kind, body: header(kind=kind, flags=flags, length=len(body)) + body,
              st.integers(0, 0xFFFF), st.integers(0, 3), st.binary(max_size=200)),
    st.builds(lambda inner: batch(*inner),                                   # garbage batches
              st.lists(st.binary(min_size=HEADER_SIZE, max_size=120), min_size=1, max_size=4)),
)


class FuzzStats:
    posted = 0
    invalid = 0
    rejected_before: int | None = None


@pytest.fixture(scope="module")
def fuzz_stats():
    return FuzzStats()


@pytest.mark.timeout(150)
@settings(max_examples=70, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(batch_=st.lists(messages, min_size=20, max_size=60), seed=st.integers(0, 1 << 30))
def test_fuzz_workers_survive_anything_in_the_queue(fp, fuzz_stats, batch_, seed):
    """One executor for every example (``fp`` is deliberately not reset):
    random bytes, mutated, truncated, extended and spliced real messages,
    random headers and garbage batches, with real tasks submitted in between.
    Every real task completes with its value and the same workers serve."""
    shared = fp
    if fuzz_stats.rejected_before is None:
        shared.settle()
        fuzz_stats.rejected_before = shared.rejected()
    shared.check_workers()
    rng = random.Random(seed)
    futures = []
    for i, raw in enumerate(batch_):
        post(shared.key, raw)
        fuzz_stats.posted += 1
        fuzz_stats.invalid += structurally_invalid(raw)
        if rng.random() < 0.2:
            futures.append((i, shared.ex.submit(square, i)))
    futures.append((-1, shared.ex.submit(square, -1)))
    for i, f in futures:
        assert f.result(timeout=30) == i * i
    shared.check_workers()


@pytest.mark.timeout(60)
def test_fuzz_totals(fp, fuzz_stats):
    """Runs after the fuzz test (same module, file order): thousands of
    messages were posted, every structurally invalid one was counted, and the
    very same workers still serve."""
    if fuzz_stats.posted == 0:
        pytest.skip("the fuzz test did not run")
    fp.settle()
    assert fuzz_stats.posted >= 1000
    assert fuzz_stats.invalid > fuzz_stats.posted // 4
    assert fp.rejected() - fuzz_stats.rejected_before >= fuzz_stats.invalid
    fp.check_workers()
    assert [f.result(timeout=20) for f in [fp.ex.submit(square, i) for i in range(50)]] \
        == [i * i for i in range(50)]


# --------------------------------------------------------------------------
# Forged reply routes
# --------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.timeout(60)
def test_forged_header_naming_a_dead_producer_does_not_break_a_live_pool():
    with pool(max_workers=1) as ex:
        assert ex.submit(square, 2).result(timeout=20) == 4
        reply = ex.reply_key
        post(ex.key, task(abs, -2, reply=reply, pid=_dead_pid()))
        try:
            assert ex.submit(square, 3).result(timeout=5) == 9
        finally:
            if ipcinfo.queue_info(reply) is None:
                ex.kill_workers()  # the collector is gone: nothing would finish


@pytest.mark.timeout(60)
def test_forged_reply_key_zero_neither_leaks_a_queue_nor_hangs_the_worker():
    """Reply key 0 is IPC_PRIVATE: opening it by key would create a new queue
    nobody reads, which then fills and hangs the worker (fixed in e2d2a01).
    Such a task is a dead letter and no queue appears."""
    with pool(max_workers=1) as ex:
        worker = next(iter(ex._processes))
        msqids = {q.msqid for q in ipcinfo.list_queues()}
        n = 400  # 400 results of ~45 bytes would overflow a 16 KB queue
        try:
            for i in range(n):
                post(ex.key, task(abs, -i, task_id=i, reply=0))
            assert ex.submit(square, 3).result(timeout=20) == 9
            made = [q for q in ipcinfo.list_queues()
                    if q.msqid not in msqids and q.lspid == worker]
            assert made == [], f"the worker created queue(s) {made}"
            assert wait_until(lambda: ex.stats().rejected == n, 10), ex.stats()
            reasons = {r["reason"] for r in deadletter.list_records(ex.key)}
            assert len(reasons) == 1 and "reply key 0" in reasons.pop()
            assert set(ex._processes) == {worker}
        finally:
            # Had it regressed: unstick the worker without killing it (a busy
            # worker's death is reported to the reply key too) by removing the
            # queues it made (key 0, new, last written by it), nothing else.
            end = time.monotonic() + 30
            while time.monotonic() < end:
                made = [q for q in ipcinfo.list_queues()
                        if q.msqid not in msqids and q.lspid == worker and q.key == 0]
                for q in made:
                    try:
                        sysv_ipc.remove_message_queue(q.msqid)
                    except sysv_ipc.Error:
                        pass
                if not made and ipcinfo.queue_info(ex.key).qnum == 0:
                    break
                time.sleep(0.05)
