"""Security: permissions of what mqexecutor creates, and authkey= (HMAC).

* Queues are created 0600 and spill directories 0700 (files 0600) unless a
  wider queue mode is asked for with ``queue_mode=``.
* Whoever can write to a queue can run code as the workers' user (a task is a
  pickle): a forged message that would create a file when run -- or merely when
  unpickled -- does so on a pool without authkey (the control), and never on a
  pool with ``authkey=``: a message whose HMAC is missing or wrong is refused
  unread, kept as a dead letter, and the real tasks still run.
* The producer side refuses results not signed with its key.
* authkey does not cover JSON tasks (``allow=`` decides what they may call).

Spill references outside the spill root and symbolic links are tested with
the other bad input in tests/test_fuzz.py.
"""
from __future__ import annotations

import os
import pickle
import random
import stat
import time

import cloudpickle
import pytest
import sysv_ipc

from mqexecutor import MQExecutor, codec, deadletter, ipcinfo, journal, persistence, spill
from mqexecutor.protocol import RESULT_MTYPE, Flag, Kind, Status, build, task_body

from .helpers import (
    Gate,
    gated_identity,
    pool,
    producer_subdir,
    shutdown_or_fail,
    square,
    touch_marker,
    unused_key,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

KEY = b"k" * 16 + os.urandom(16)
OTHER = os.urandom(32)


#: A reply key no queue has: forged messages name it.
NOWHERE = unused_key()


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def queue_perms(key: int) -> int:
    info = ipcinfo.queue_info(key)
    assert info is not None, f"no queue has key {key:#x}"
    return info.perms & 0o777


def post(key: int, raw: bytes, mtype: int = 1) -> None:
    q = sysv_ipc.MessageQueue(key)
    end = time.monotonic() + 20
    while True:
        try:
            q.send(raw, block=False, type=mtype)
            return
        except sysv_ipc.BusyError:
            assert time.monotonic() < end, "the task queue stayed full"
            time.sleep(0.005)


class CreatesFileWhenUnpickled:
    """Unpickling this calls open(path, 'w'): no need to even run the task."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def forged_task(path: str, on_load: str, *, authkey: bytes | None = None,
                flags: int = 0) -> bytes:
    """A TASK message with a valid header whose call is ``open(path, 'w')`` and
    whose unpickling alone opens ``on_load`` for writing."""
    body = cloudpickle.dumps((open, (path, "w"), {"closefd": _Truthy(on_load)}), protocol=5)
    return build(Kind.TASK, flags, 0, random.getrandbits(31), 0xBAD, NOWHERE, os.getpid(), -1,
                 task_body("builtins.open", body), authkey)


class _Truthy:
    """Pickles to ``bool(open(path, 'w'))`` -> True: unpickling creates ``path``,
    and the task's ``closefd=True`` stays valid."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (bool, (CreatesFileWhenUnpickled(self.path),))


def rendezvous(directory, n, tag):
    """Wait (at most 20 s) until ``n`` tasks tagged ``tag`` run at once."""
    with open(os.path.join(directory, f"{tag}-{os.getpid()}"), "w"):
        pass
    end = time.monotonic() + 20
    while len([f for f in os.listdir(directory) if f.startswith(tag + "-")]) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"rendezvous {tag}: a worker never came")
        time.sleep(0.002)
    return os.getpid()


def rendezvous_all(ex: MQExecutor, directory: str, tag: str) -> None:
    """Return once each of the pool's workers finished what it took before."""
    n = ex.max_workers
    futures = [ex.submit(rendezvous, directory, n, tag) for _ in range(n)]
    assert len({f.result(timeout=30) for f in futures}) == n


# --------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_queues_0600_and_spill_directories_0700_by_default(tmp_path):
    key = unused_key()
    gate = Gate(tmp_path)
    try:
        ex = MQExecutor(key, 1, durable=True)
        try:
            assert queue_perms(key) == 0o600
            assert queue_perms(ex.reply_key) == 0o600
            # root 0 has both sub-directories from the start (meta.json); the
            # other roots get theirs when something is written there
            made = 0
            for root in spill.spill_roots():
                if not os.path.exists(root):
                    continue
                assert mode_of(root) == 0o700, root
                for sub in (producer_subdir(ex), spill.key_subdir(key)):
                    if os.path.exists(os.path.join(root, sub)):
                        assert mode_of(os.path.join(root, sub)) == 0o700, (root, sub)
                        made += 1
            assert made >= 2
            spool = journal.default_spool(key)
            assert mode_of(spool) == 0o700
            scoreboard = os.path.join(spill.root_dir(0), producer_subdir(ex), "scoreboard")
            meta = os.path.join(spill.root_dir(0), producer_subdir(ex), "meta.json")
            assert mode_of(scoreboard) == 0o600 and mode_of(meta) == 0o600
            # while the worker is held, a spilled task waits with its spill file
            # and every task has its spool record
            blocker = ex.submit(gated_identity, gate.path, "b")
            big = ex.submit(len, b"x" * 100_000)

            def spilled_files():
                return [p for p in spill.list_files(spill.key_subdir(key))
                        if p.endswith(".spill")]
            assert wait_until(lambda: len(spilled_files()) == 1, 10)
            (spilled,) = spilled_files()
            assert mode_of(spilled) == 0o600
            assert mode_of(os.path.dirname(spilled)) == 0o700
            records = [os.path.join(spool, n) for n in os.listdir(spool)]
            assert len(records) == 2 and all(mode_of(r) == 0o600 for r in records)
            # a dead letter is 0600 in a 0700 directory
            post(key, b"\x00garbage")
            gate.open()
            assert blocker.result(timeout=20) == "b" and big.result(timeout=20) == 100_000
            assert wait_until(lambda: len(deadletter.list_records(key)) == 1, 10)
            (rec,) = deadletter.list_records(key)
            assert mode_of(rec["path"]) == 0o600
            assert mode_of(os.path.dirname(rec["path"])) == 0o700
        finally:
            gate.open()
            shutdown_or_fail(ex)
        private = MQExecutor(max_workers=1)
        try:
            assert queue_perms(private.key) == 0o600
            assert queue_perms(private.reply_key) == 0o600
        finally:
            shutdown_or_fail(private)
    finally:
        persistence.remove_queue(key)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue_mode", [0o660, 0o640])
def test_wider_queue_mode_only_when_asked(queue_mode):
    key = unused_key()
    try:
        with pool(key, max_workers=1, queue_mode=queue_mode) as ex:
            assert queue_perms(key) == queue_mode
            # the reply queue and the spill directories stay private
            assert queue_perms(ex.reply_key) == 0o600
            assert mode_of(os.path.join(spill.root_dir(0), spill.key_subdir(key))) == 0o700
            assert ex.submit(square, 3).result(timeout=20) == 9
        with pool(max_workers=1, queue_mode=queue_mode) as ex:
            assert queue_perms(ex.key) == queue_mode
    finally:
        persistence.remove_queue(key)


@pytest.mark.timeout(60)
def test_spill_root_of_wrong_mode_is_tightened_and_a_link_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "spillroot"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    monkeypatch.setenv(spill.ENV_SPILL_DIR, str(root))
    with pool(max_workers=1) as ex:
        assert ex.submit(len, b"y" * 50_000).result(timeout=20) == 50_000
        assert mode_of(str(root)) == 0o700
    link = tmp_path / "linkroot"
    link.symlink_to(root)
    monkeypatch.setenv(spill.ENV_SPILL_DIR, str(link))
    with pytest.raises(spill.SpillError, match="symbolic link"):
        MQExecutor(max_workers=1)


# --------------------------------------------------------------------------
# authkey: forged tasks never run
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_forged_task_runs_on_a_pool_without_authkey(tmp_path):
    """The control: whoever can write to the queue runs code as the workers'
    user. The forged message below creates two files, one merely by being
    unpickled, one when called."""
    ran, loaded = str(tmp_path / "ran"), str(tmp_path / "loaded")
    with pool(max_workers=1) as ex:
        post(ex.key, forged_task(ran, loaded))
        assert ex.submit(square, 2).result(timeout=20) == 4
        assert wait_until(lambda: os.path.exists(ran) and os.path.exists(loaded), 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("forgery", ["no-hmac", "wrong-key", "garbage-tag", "tag-stripped",
                                     "inside-a-batch", "spill-reference"])
def test_forged_task_never_runs_on_a_pool_with_authkey(tmp_path, forgery):
    ran, loaded = str(tmp_path / "ran"), str(tmp_path / "loaded")
    key = unused_key()
    kept_file = None
    try:
        with pool(key, max_workers=2, authkey=KEY) as ex:
            if forgery == "no-hmac":
                raw, reason = forged_task(ran, loaded), "carries no HMAC"
            elif forgery == "wrong-key":
                raw, reason = forged_task(ran, loaded, authkey=OTHER), "HMAC does not match"
            elif forgery == "garbage-tag":
                raw = forged_task(ran, loaded, authkey=OTHER)
                raw, reason = raw[:-32] + os.urandom(32), "HMAC does not match"
            elif forgery == "tag-stripped":
                # a real signed message whose tag was cut off, AUTH flag cleared
                signed = forged_task(ran, loaded, authkey=KEY)
                body = signed[40:-32]
                raw = build(Kind.TASK, 0, 0, 1, 0xBAD, NOWHERE, os.getpid(), -1, body)
                reason = "carries no HMAC"
            elif forgery == "inside-a-batch":
                # the outer header of a BATCH carries no HMAC: each inner one must
                inner = forged_task(ran, loaded)
                signed_ok = build(Kind.TASK, 0, 0, 2, 0xBAD, NOWHERE, os.getpid(), -1,
                                  task_body("touch_marker", codec.dumps(
                                      (touch_marker, (str(tmp_path), "signed-ran"), {}),
                                      1 << 20, "x")[0]), KEY)
                body = b"".join(len(m).to_bytes(4, "little") + m for m in (inner, signed_ok))
                raw = build(Kind.TASK, Flag.BATCH, 0, 1, 0xBAD, NOWHERE, os.getpid(), -1,
                            body)
                reason = "carries no HMAC"
            else:  # a forged reference to a real spill file: refused before it is opened
                ref = spill.write(spill.key_subdir(key), cloudpickle.dumps(
                    (open, (ran, "w"), {}), protocol=5))
                idx, sub, name = spill.parse_reference(ref)
                kept_file = os.path.join(spill.root_dir(idx), sub, name)
                raw = build(Kind.TASK, Flag.SPILL, 0, 1, 0xBAD, NOWHERE, os.getpid(), -1,
                            task_body("builtins.open", ref.encode()))
                reason = "carries no HMAC"
            before = ex.stats().rejected
            first = [ex.submit(square, i) for i in range(5)]
            post(key, raw)
            then = [ex.submit(square, i) for i in range(5, 10)]
            assert [f.result(timeout=20) for f in first + then] == [i * i for i in range(10)]
            rendezvous_all(ex, str(tmp_path), "sync")
            assert not os.path.exists(ran), "the forged task ran"
            assert not os.path.exists(loaded), "the forged task was unpickled"
            assert ex.stats().rejected - before == 1
            (rec,) = deadletter.list_records(key)
            assert reason in rec["reason"] and "refused unread" in rec["reason"]
            if forgery == "inside-a-batch":
                assert os.path.exists(tmp_path / "signed-ran")
            else:
                assert rec["message"] == raw
            if kept_file:
                assert os.path.exists(kept_file), "the spill file was opened (unlinked)"
    finally:
        if kept_file and os.path.exists(kept_file):
            os.unlink(kept_file)
        persistence.remove_queue(key)


@pytest.mark.timeout(60)
def test_producer_refuses_results_not_signed_with_its_key(tmp_path, capfd):
    """A result forged into the producer's reply queue completes nothing unless
    it carries the producer's HMAC; the real result is delivered."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, authkey=KEY) as ex:
        f = ex.submit(gated_identity, gate.path, "real")
        g = ex.submit(gated_identity, gate.path, "real too")
        reply = sysv_ipc.MessageQueue(ex.reply_key)
        forged = pickle.dumps("forged", protocol=5)
        for authkey in (None, OTHER):
            reply.send(build(Kind.RESULT, 0, Status.OK, f.task_id, ex.token, 0,
                             os.getpid(), 0, forged, authkey), type=RESULT_MTYPE)
        time.sleep(0.3)
        assert not f.done(), "a result without the right HMAC completed a Future"
        # the control: the same forgery signed with the right key is taken
        reply.send(build(Kind.RESULT, 0, Status.OK, g.task_id, ex.token, 0,
                         os.getpid(), 0, forged, KEY), type=RESULT_MTYPE)
        assert g.result(timeout=10) == "forged"
        gate.open()
        assert f.result(timeout=20) == "real"
    err = capfd.readouterr().err
    assert err.count("refused a message on the reply queue") == 2, err


@pytest.mark.timeout(60)
def test_attached_producer_with_another_key_runs_nothing(tmp_path):
    """A producer with the wrong key: the pool's workers refuse its tasks unread
    (dead letters); the producer is not told (an unauthenticated message names
    no reply queue worth trusting), so its Futures stay pending."""
    key = unused_key()
    try:
        with pool(key, max_workers=1, authkey=KEY) as ex:
            wrong = MQExecutor.attach(key, authkey=OTHER)
            nokey = MQExecutor.attach(key)
            try:
                futures = [wrong.submit(touch_marker, str(tmp_path), "wrong"),
                           nokey.submit(touch_marker, str(tmp_path), "nokey")]
                assert wait_until(lambda: len(deadletter.list_records(key)) == 2, 10)
                reasons = sorted(r["reason"] for r in deadletter.list_records(key))
                assert "carries no HMAC" in reasons[0] or "carries no HMAC" in reasons[1]
                assert any("HMAC does not match" in r for r in reasons)
                assert not any(f.done() for f in futures)
                assert os.listdir(tmp_path) == []
            finally:
                for p in (wrong, nokey):
                    p.shutdown(wait=False, cancel_futures=True)
                    p._executor_manager_thread.join(20)
            right = MQExecutor.attach(key, authkey=KEY)
            try:
                assert right.submit(touch_marker, str(tmp_path), "right").result(
                    timeout=20) == "right"
            finally:
                shutdown_or_fail(right)
            assert ex.submit(square, 5).result(timeout=20) == 25
            assert ex.stats().rejected == 2
    finally:
        persistence.remove_queue(key)


@pytest.mark.timeout(60)
def test_authkey_is_checked():
    with pytest.raises(TypeError, match="bytes"):
        MQExecutor(max_workers=1, authkey="a string secret of enough length")
    with pytest.raises(ValueError, match="16 bytes"):
        MQExecutor(max_workers=1, authkey=b"short")


@pytest.mark.timeout(60)
def test_authkey_pool_round_trip_including_spilled_payloads():
    with pool(max_workers=2, authkey=KEY) as ex:
        data = os.urandom(200_000)
        assert ex.submit(len, data).result(timeout=20) == len(data)
        assert ex.submit(bytes, 100_000).result(timeout=20) == bytes(100_000)
        assert list(ex.map(square, range(300))) == [i * i for i in range(300)]
        assert ex.stats().rejected == 0


@pytest.mark.timeout(60)
def test_authkey_does_not_cover_json_tasks(tmp_path):
    """JSON tasks carry no HMAC: with authkey they are refused only because no
    allow= pattern lets them call anything; with allow= they run unsigned."""
    doc = b'{"v": 1, "fn": "tests.helpers:touch_marker", "args": ["%s", "json"]}' % \
        str(tmp_path).encode()
    with pool(max_workers=1, authkey=KEY) as ex:
        post(ex.key, doc)
        assert wait_until(lambda: ex.stats().rejected == 1, 10)
        assert not os.path.exists(tmp_path / "json")
    with pool(max_workers=1, authkey=KEY, allow=["tests.helpers:touch_marker"]) as ex:
        post(ex.key, doc)
        assert wait_until(lambda: os.path.exists(tmp_path / "json"), 10)
        assert ex.stats().rejected == 0
