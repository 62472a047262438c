"""Swoole task packets (mqexecutor.swoole, docs/external.md): seed 000's PHP
SwooleTask posting to a pool served with --swoole-handler, Python-built
packets, and the tmpfile safety rules."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

import pytest
import sysv_ipc

from mqexecutor import deadletter, swoole
from mqexecutor.swoole import (
    SW_EVENT_TASK,
    SW_TASK_NONBLOCK,
    SW_TASK_SERIALIZE,
    SW_TASK_TMPFILE,
    pack_packet,
)

from . import helpers
from .test_external import EXAMPLES, json_pool, post, remove_key, require_php, served, worker_pids

SWOOLE_TASK_PHP = os.path.join(EXAMPLES, "php", "swoole_task.php")
HANDLER = "tests.test_swoole:record_task"
ENV_RECORD = "MQX_TEST_SWOOLE_RECORD_DIR"

try:
    import phpserialize  # noqa: F401
    HAVE_PHPSERIALIZE = True
except ImportError:
    HAVE_PHPSERIALIZE = False


# --------------------------------------------------------------------------
# the handler the pools call (module-level: workers import it by name)
# --------------------------------------------------------------------------

def _plain(value):
    """phpserialize's output as JSON-able data (dict keys become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    return value


def record_task(data, task_id, flags):
    """onTask for the tests: one JSON file per task in $MQX_TEST_SWOOLE_RECORD_DIR."""
    if data == b"raise":
        raise RuntimeError("handler failure on purpose")
    rec = {"task_id": task_id, "flags": flags, "type": type(data).__name__}
    if isinstance(data, bytes):
        rec.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   head=data[:40].decode("latin-1"))
    else:
        rec["value"] = _plain(data)
    directory = os.environ[ENV_RECORD]
    path = os.path.join(directory, f"task-{task_id}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(path + ".tmp", path)


def records(directory) -> dict[int, dict]:
    out = {}
    for path in glob.glob(os.path.join(str(directory), "task-*.json")):
        with open(path) as f:
            rec = json.load(f)
        out[rec["task_id"]] = rec
    return out


def wait_records(directory, n: int, timeout: float = 20.0) -> dict[int, dict]:
    helpers.wait_until(lambda: len(records(directory)) >= n, timeout)
    got = records(directory)
    assert len(got) >= n, f"{len(got)} of {n} tasks reached the handler: {sorted(got)}"
    return got


def swoole_tmpfiles() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "swoole.task*"))) | set(
        glob.glob("/tmp/swoole.task*"))


def make_tmpfile(data: bytes, directory: str = "/tmp") -> str:
    """A payload file as PHP's tempnam('/tmp/', 'swoole.task') makes it (0600)."""
    fd, path = tempfile.mkstemp(prefix="swoole.task", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def tmpfile_packet(task_id: int, path: str, size: int, flags: int = SW_TASK_NONBLOCK) -> bytes:
    """Seed 000's tmpfile packet: pack('l', size) . path . "\\0"."""
    return pack_packet(task_id, struct.pack("=i", size) + path.encode() + b"\0",
                       flags | SW_TASK_TMPFILE)


@contextlib.contextmanager
def swoole_pool(record_dir, monkeypatch, workers: int = 2, **kwargs):
    """An in-process pool whose workers call record_task (env set before fork)."""
    monkeypatch.setenv(ENV_RECORD, str(record_dir))
    with json_pool(allow=(), workers=workers, swoole_handler=HANDLER, **kwargs) as (ex, key):
        yield ex, key


PHP_ARRAY = {"name": "Alice", "mobile": "13800000000", "ids": {"0": 1, "1": 2, "2": 3}}
PHP_ARRAY_SERIALIZED = (b'a:3:{s:4:"name";s:5:"Alice";s:6:"mobile";s:11:"13800000000";'
                        b's:3:"ids";a:3:{i:0;i:1;i:1;i:2;i:2;i:3;}}')


# --------------------------------------------------------------------------
# seed 000's PHP class against `mqexecutor serve KEY --swoole-handler ...`
# --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_php_swoole_task_class_posts_to_a_served_pool(tmp_path):
    require_php()
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    before = swoole_tmpfiles()
    with served(tmp_path, "--workers", "2", "--swoole-handler", HANDLER,
                env={ENV_RECORD: str(record_dir)}) as s:
        r = subprocess.run(["php", SWOOLE_TASK_PHP, f"0x{s.key:08x}", "1"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        sent = [json.loads(line) for line in r.stdout.splitlines()]
        assert [x["task_id"] for x in sent] == [1, 2, 3, 4]
        got = wait_records(record_dir, 4)
        assert s.stderr().count("refused") == 0, s.stderr()
    # 1: a plain string
    assert got[1]["type"] == "bytes" and got[1]["flags"] == SW_TASK_NONBLOCK
    assert got[1]["head"] == "Hello from PHP!" and got[1]["size"] == 15
    # 2: a PHP array, serialize()d
    assert got[2]["flags"] == SW_TASK_NONBLOCK | SW_TASK_SERIALIZE
    if HAVE_PHPSERIALIZE:
        assert got[2]["type"] == "dict" and got[2]["value"] == PHP_ARRAY
    else:
        assert got[2]["sha256"] == hashlib.sha256(PHP_ARRAY_SERIALIZED).hexdigest()
    # 3: 10000 bytes >= 8180: through a tmpfile, read in full
    assert got[3]["flags"] == SW_TASK_NONBLOCK | SW_TASK_TMPFILE
    assert got[3]["size"] == 10000 == sent[2]["bytes"]
    assert got[3]["sha256"] == hashlib.sha256(b"0123456789" * 1000).hexdigest()
    # 4: serialized and through a tmpfile
    assert got[4]["flags"] == SW_TASK_NONBLOCK | SW_TASK_SERIALIZE | SW_TASK_TMPFILE
    if HAVE_PHPSERIALIZE:
        assert got[4]["value"] == {str(i): "swoole" for i in range(1000)}
    else:
        assert got[4]["size"] == sent[3]["bytes"]
    # the receiver unlinked the tmpfiles, as Swoole's does
    assert swoole_tmpfiles() - before == set()


@pytest.mark.timeout(60)
def test_php_pack_matches_the_python_layout():
    """PHP's pack('lSsCCS', ...) and swoole.pack_packet agree byte for byte."""
    require_php()
    code = "echo bin2hex(pack('lSsCCS', 70001, 15, 3, 7, 0, 6) . 'Hello from PHP!');"
    r = subprocess.run(["php", "-r", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert bytes.fromhex(r.stdout) == pack_packet(70001, b"Hello from PHP!", 6, from_id=3)
    p = swoole.parse_packet(bytes.fromhex(r.stdout))
    assert (p.task_id, p.length, p.from_id, p.type, p.flags, p.data) == (
        70001, 15, 3, SW_EVENT_TASK, 6, b"Hello from PHP!")


# --------------------------------------------------------------------------
# Python-built packets (what the PHP class sends), in-process pool
# --------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_python_built_packets_reach_the_handler(tmp_path, monkeypatch):
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    big = os.urandom(20000)
    path = make_tmpfile(big)
    serialized_path = make_tmpfile(b"a:1:{i:0;s:9000:\"" + b"x" * 9000 + b"\";}")
    try:
        with swoole_pool(record_dir, monkeypatch) as (ex, key):
            pids = worker_pids(ex)
            post(key, pack_packet(1, b"Hello from Python!"), mtype=2)
            post(key, pack_packet(2, PHP_ARRAY_SERIALIZED,
                                  SW_TASK_NONBLOCK | SW_TASK_SERIALIZE), mtype=1)
            post(key, tmpfile_packet(3, path, len(big)), mtype=2)
            post(key, tmpfile_packet(4, serialized_path, os.path.getsize(serialized_path),
                                     SW_TASK_NONBLOCK | SW_TASK_SERIALIZE), mtype=5)
            post(key, pack_packet(5, b""), mtype=1)  # empty payload: still a task
            post(key, pack_packet(6, b"raise"), mtype=1)  # the handler raises
            post(key, pack_packet(7, b"after"), mtype=1)
            got = wait_records(record_dir, 6)
            assert worker_pids(ex) == pids
        assert got[1]["head"] == "Hello from Python!"
        if HAVE_PHPSERIALIZE:
            assert got[2]["value"] == PHP_ARRAY
            assert got[4]["value"] == {"0": "x" * 9000}
        else:
            assert got[2]["type"] == "bytes"
        assert got[3]["size"] == 20000 and got[3]["sha256"] == hashlib.sha256(big).hexdigest()
        assert got[5]["size"] == 0
        assert 6 not in got and got[7]["head"] == "after"
        assert not os.path.exists(path) and not os.path.exists(serialized_path)
    finally:
        for p in (path, serialized_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


@pytest.mark.timeout(90)
def test_bad_packets_are_refused_and_files_left_alone(tmp_path, monkeypatch):
    """Short, foreign and lying packets; tmpfile paths outside the rules: all
    refused with a reason (dead letters), other files untouched, the pool goes on."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    victim = tmp_path / "victim"  # a file a packet must not read nor delete
    victim.write_bytes(b"secret" * 2000)
    link = os.path.join("/tmp", f"swoole.task-link-{os.getpid()}")
    os.symlink(str(victim), link)
    hard = make_tmpfile(b"h" * 9000)
    hard2 = hard + "-2"
    os.link(hard, hard2)
    short = make_tmpfile(b"s" * 100)
    try:
        with swoole_pool(record_dir, monkeypatch) as (ex, key):
            pids = worker_pids(ex)
            bad = [
                b"",  # shorter than the header
                b"\x01\x02\x03",
                pack_packet(10, b"x", type=3),  # not SW_EVENT_TASK
                pack_packet(11, b"abc", length=500),  # len beyond the data
                pack_packet(12, b"\x05\x00", SW_TASK_TMPFILE),  # truncated reference
                tmpfile_packet(13, str(victim), 12000),  # outside the tmpfile dirs
                tmpfile_packet(14, "/etc/passwd", 10),
                tmpfile_packet(15, "/tmp/../etc/swoole.task1", 10),  # not normal
                tmpfile_packet(16, "swoole.task1", 10),  # relative
                tmpfile_packet(17, "/tmp/notswoole", 10),  # wrong name
                tmpfile_packet(18, link, 12000),  # a symbolic link
                tmpfile_packet(19, hard, 9000),  # two links
                tmpfile_packet(20, "/tmp/swoole.task-missing-xyz", 10),
                tmpfile_packet(21, short, 5000),  # shorter than announced
                tmpfile_packet(22, "/tmp/swoole.task1", -5),  # negative size
                pack_packet(23, b"\x00" * 4 + b"/tmp/swoole.taskX", SW_TASK_TMPFILE),  # no NUL
            ]
            if HAVE_PHPSERIALIZE:
                bad.append(pack_packet(24, b"a:9:{garbage", SW_TASK_SERIALIZE))
            for raw in bad:
                post(key, raw)
            post(key, pack_packet(99, b"still alive"))
            got = wait_records(record_dir, 1)
            assert helpers.wait_until(
                lambda: len(deadletter.list_records(key)) >= len(bad), 15)
            reasons = [r["reason"] for r in deadletter.list_records(key)]
            assert worker_pids(ex) == pids
        assert list(got) == [99] and got[99]["head"] == "still alive"
        assert all(r.startswith("Swoole packet refused") for r in reasons), reasons
        joined = "\n".join(reasons)
        for needle in ("12-byte header", "not a task", "announces 500", "not in an allowed",
                       "not absolute and normal", "does not start with", "symbolic link",
                       "2 links", "holds 100 bytes", "negative", "NUL-terminated"):
            assert needle in joined, needle
        assert victim.read_bytes() == b"secret" * 2000  # never read nor removed
        assert os.path.islink(link) and os.path.exists(hard) and os.path.exists(hard2)
        assert not os.path.exists(short)  # ours and opened: consumed even though short
    finally:
        for p in (link, hard, hard2, short):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


@pytest.mark.timeout(60)
def test_read_tmpfile_rules(tmp_path, monkeypatch):
    """read_tmpfile directly: the tmpfile directory setting, FIFOs (no hang),
    files of another user (as root), and the happy path (read, unlinked)."""
    monkeypatch.setenv(swoole.ENV_TMPDIR, str(tmp_path))
    assert swoole.tmpfile_dirs() == [str(tmp_path)]
    good = tmp_path / "swoole.task.abc123"
    good.write_bytes(b"0123456789")
    assert swoole.read_tmpfile(str(good), 4) == b"0123"  # the announced size only
    assert not good.exists()
    with pytest.raises(swoole.PacketRefused, match="not in an allowed"):
        swoole.read_tmpfile("/tmp/swoole.task1", 1)  # /tmp is not in the setting now
    fifo = tmp_path / "swoole.task.fifo"
    os.mkfifo(fifo)
    with pytest.raises(swoole.PacketRefused, match="not a regular file"):
        swoole.read_tmpfile(str(fifo), 1)
    assert fifo.exists()
    with pytest.raises(swoole.PacketRefused, match="does not start with"):
        swoole.read_tmpfile(str(tmp_path / "swoole.task$(id)"), 1)
    if os.geteuid() == 0:
        other = tmp_path / "swoole.task.other"
        other.write_bytes(b"x" * 10)
        os.chown(other, 65534, 65534)
        with pytest.raises(swoole.PacketRefused, match="belongs to uid 65534"):
            swoole.read_tmpfile(str(other), 10)
        assert other.exists()
    monkeypatch.delenv(swoole.ENV_TMPDIR)
    assert "/tmp" in swoole.tmpfile_dirs()


@pytest.mark.timeout(30)
def test_serialized_data_without_phpserialize_stays_bytes(monkeypatch):
    """Without the optional phpserialize package the handler gets the bytes."""
    monkeypatch.setitem(sys.modules, "phpserialize", None)  # import fails
    seen = []
    raw = pack_packet(5, PHP_ARRAY_SERIALIZED, SW_TASK_NONBLOCK | SW_TASK_SERIALIZE)
    assert swoole.handle_packet(raw, lambda d, task_id, flags: seen.append(
        (d, task_id, flags))) is None
    assert seen == [(PHP_ARRAY_SERIALIZED, 5, SW_TASK_NONBLOCK | SW_TASK_SERIALIZE)]


@pytest.mark.timeout(30)
def test_load_handler_checks_the_signature():
    assert swoole.load_handler(HANDLER) is record_task
    with pytest.raises(ValueError, match="module:function"):
        swoole.load_handler("no_colon")
    with pytest.raises(ImportError):
        swoole.load_handler("no_such_module_xyz:f")
    with pytest.raises(AttributeError):
        swoole.load_handler("tests.test_swoole:nope")
    with pytest.raises(ValueError, match="task_id"):
        swoole.load_handler("os.path:join")  # join(data, task_id=) does not bind
    with pytest.raises(ValueError, match="not callable"):
        swoole.load_handler("tests.test_swoole:HANDLER")


@pytest.mark.timeout(60)
def test_serve_refuses_a_handler_that_does_not_load(tmp_path):
    key = helpers.unused_key()
    try:
        r = subprocess.run([sys.executable, "-m", "mqexecutor", "serve", str(key),
                            "--swoole-handler", "no_such_module_xyz:on_task"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "--swoole-handler" in r.stderr, r.stderr
        assert not helpers.queue_exists(key)
    finally:
        remove_key(key)


@pytest.mark.timeout(60)
def test_packet_left_in_the_queue_runs_after_a_restart(tmp_path, monkeypatch):
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    key = helpers.unused_key()
    try:
        sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
        post(key, pack_packet(1, b"posted before the pool started"), mtype=2)
        monkeypatch.setenv(ENV_RECORD, str(record_dir))
        with helpers.pool(key, max_workers=1, swoole_handler=HANDLER):
            helpers.wait_until(lambda: records(record_dir), 5)
        assert 1 in records(record_dir), "the packet left in the queue was dropped"
    finally:
        remove_key(key)
