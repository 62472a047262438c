"""JSON tasks from other programs (mqexecutor.external, docs/external.md).

Real pools (``mqexecutor serve`` subprocesses or in-process MQExecutors on
random explicit keys, removed at the end), real producers: the PHP, C and
pure-Python examples, and hand-made messages, malformed on purpose.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import sysv_ipc

from mqexecutor import MQExecutor, Mode, deadletter, external, persistence
from mqexecutor.limits import msgmax

from . import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
PHP_EXAMPLE = os.path.join(EXAMPLES, "php", "external_task.php")
C_EXAMPLE = os.path.join(EXAMPLES, "c", "external_task.c")
PY_EXAMPLE = os.path.join(EXAMPLES, "external_python.py")
THIS = "tests.test_external"
ALLOW = ["math:*", f"{THIS}:*"]


# --------------------------------------------------------------------------
# functions JSON tasks call (module-level: workers import them by name)
# --------------------------------------------------------------------------

def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def returns_set():
    return {1, 2, 3}


def returns_bytes():
    return b"\x00\x01"


def returns_nan():
    return float("nan")


def big_result(n):
    return "x" * n


def raise_value_error(message):
    raise ValueError(message)


def touch(path):
    with open(path, "w"):
        pass
    return path


def pid():
    return os.getpid()


def _private():
    return "private"


# --------------------------------------------------------------------------
# utilities
# --------------------------------------------------------------------------

def php_status() -> str | None:
    """None when php with sysvmsg is usable; else why not."""
    php = shutil.which("php")
    if php is None:
        return "php is not installed (Debian: apt-get install -y php-cli)"
    r = subprocess.run([php, "-r", "exit(extension_loaded('sysvmsg') ? 0 : 1);"],
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        return "php lacks the sysvmsg extension (Debian's php-cli has it)"
    return None


def require_php() -> None:
    """Skip without php/sysvmsg, unless MQEXECUTOR_REQUIRE_PHP=1 (CI): then fail."""
    why = php_status()
    if why is None:
        return
    if os.environ.get("MQEXECUTOR_REQUIRE_PHP") == "1":
        pytest.fail(f"MQEXECUTOR_REQUIRE_PHP=1 but {why}")
    pytest.skip(why)


def new_reply_queue(size: int | None = None) -> sysv_ipc.MessageQueue:
    """A reply queue under a fresh random key (mode 0600); remove it yourself."""
    for _ in range(100):
        key = helpers.unused_key()
        try:
            return sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600,
                                         max_message_size=size or msgmax())
        except sysv_ipc.ExistentialError:
            continue
    raise RuntimeError("no free key")


def receive(queue: sysv_ipc.MessageQueue, timeout: float = 10.0, mtype: int = 0):
    """(message, type) from ``queue`` within ``timeout`` s, else None."""
    end = time.monotonic() + timeout
    while True:
        try:
            return queue.receive(block=False, type=mtype)
        except sysv_ipc.BusyError:
            if time.monotonic() > end:
                return None
            time.sleep(0.005)


def receive_json(queue, timeout: float = 10.0, mtype: int = 0) -> dict:
    got = receive(queue, timeout, mtype)
    assert got is not None, f"no reply within {timeout} s"
    return json.loads(got[0])


def post(key: int, message: bytes | dict, mtype: int = 1) -> None:
    if isinstance(message, dict):
        message = json.dumps(message).encode()
    sysv_ipc.MessageQueue(key, 0, max_message_size=msgmax()).send(message, type=mtype)


def remove_key(key: int) -> None:
    with contextlib.suppress(sysv_ipc.ExistentialError):
        persistence.remove_queue(key)


class Served:
    """``python -m mqexecutor serve KEY ...`` as a subprocess; stdout and stderr
    go to files in ``tmp_path``. Stopped with SIGTERM; the queue is removed."""

    def __init__(self, tmp_path, key: int, *args: str, env: dict | None = None):
        self.key = key
        self.out_path = os.path.join(str(tmp_path), f"serve-{key:x}.out")
        self.err_path = os.path.join(str(tmp_path), f"serve-{key:x}.err")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.out = open(self.out_path, "w")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqexecutor", "serve", str(key), *args],
            cwd=ROOT, stdout=self.out, stderr=self.err, env=full_env)

    def wait_ready(self, timeout: float = 30.0) -> None:
        ok = helpers.wait_until(lambda: "serving key" in self.stdout()
                                or self.proc.poll() is not None, timeout)
        if not ok or self.proc.poll() is not None:
            raise AssertionError(f"serve did not start:\n{self.stdout()}\n{self.stderr()}")

    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("serve did not stop within "
                                     f"{timeout} s of SIGTERM:\n{self.stderr()}")
        self.out.close()
        self.err.close()
        return self.proc.returncode


@contextlib.contextmanager
def served(tmp_path, *args: str, env: dict | None = None):
    """A served pool on a fresh random key; yields the Served."""
    key = helpers.unused_key()
    s = Served(tmp_path, key, *args, env=env)
    try:
        s.wait_ready()
        yield s
    finally:
        try:
            code = s.stop()
        finally:
            remove_key(key)
        assert code == 0, f"serve exited {code}:\n{s.stderr()}"


@contextlib.contextmanager
def json_pool(allow=ALLOW, workers: int = 2, **kwargs):
    """An in-process MQExecutor on a fresh random key; removed at the end."""
    key = helpers.unused_key()
    try:
        with helpers.pool(key, max_workers=workers, allow=allow, **kwargs) as ex:
            yield ex, key
    finally:
        remove_key(key)


def worker_pids(ex: MQExecutor) -> set[int]:
    return {p.pid for p in ex._processes.values()}


# --------------------------------------------------------------------------
# the examples, against `mqexecutor serve KEY --allow ...`
# --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_php_example_posts_a_task_and_reads_the_result(tmp_path):
    require_php()
    with served(tmp_path, "--workers", "2", "--allow", "math:*") as s:
        def php(*args):
            return subprocess.run(["php", PHP_EXAMPLE, f"0x{s.key:08x}", *args],
                                  capture_output=True, text=True, timeout=60)

        r = php("math:hypot", "[3, 4]")
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["ok"] is True and reply["result"] == 5.0 and reply["v"] == 1
        assert reply["id"].startswith("php-") and reply["worker"] in (0, 1)

        r = php("math:factorial", "[20]")  # a 64-bit int survives both JSON codecs
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["result"] == 2432902008176640000

        r = php("os:getcwd")  # not allowed: an error reply, exit status 1
        assert r.returncode == 1
        err = json.loads(r.stdout)["error"]
        assert err["code"] == "not_allowed" and err["type"] == "PermissionError"

        r = php("math:sqrt", "[-1]")  # the function raises
        assert r.returncode == 1
        err = json.loads(r.stdout)["error"]
        assert err["code"] == "raised" and err["type"] == "ValueError"
        try:
            math.sqrt(-1)
        except ValueError as exc:  # the wording changed in Python 3.14
            assert err["message"] == str(exc)
        assert "not allowed" in s.stderr()  # the refusal was logged by a worker


@pytest.mark.timeout(120)
def test_c_example_posts_a_task_and_reads_the_result(tmp_path):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc)")
    binary = os.path.join(str(tmp_path), "external_task")
    build = subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", binary,
                            C_EXAMPLE], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    with served(tmp_path, "--workers", "2", "--allow", "math:*") as s:
        def run(*args):
            return subprocess.run([binary, f"0x{s.key:08x}", *args], capture_output=True,
                                  text=True, timeout=60)

        r = run("math:hypot", "[3, 4]")
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["ok"] is True and reply["result"] == 5.0
        r = run("math:gcd", "[12, 18]")
        assert r.returncode == 0 and json.loads(r.stdout)["result"] == 6
        r = run("os:getcwd")
        assert r.returncode == 1
        assert json.loads(r.stdout)["error"]["code"] == "not_allowed"
        r = run("math:sqrt", '["x"]', "5")  # a wrong call: error reply, not a hang
        assert r.returncode == 1
        assert json.loads(r.stdout)["error"]["type"] == "TypeError"
        # no queue under the key: a clear error, exit status 2
        r = subprocess.run([binary, str(helpers.unused_key()), "math:hypot", "[3, 4]"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "no queue" in r.stderr


@pytest.mark.timeout(120)
def test_python_example_without_mqexecutor(tmp_path):
    with served(tmp_path, "--workers", "2", "--allow", "math:*") as s:
        def run(*args):
            return subprocess.run([sys.executable, PY_EXAMPLE, str(s.key), *args],
                                  capture_output=True, text=True, timeout=60)

        for _ in range(2):  # twice: a reply queue may come back under a used key
            r = run("math:hypot", "[3, 4]", "--call", "math:factorial", "[10]",
                    "--call", "math:fsum", "[[0.1, 0.2, 0.3]]")
            assert r.returncode == 0, r.stderr
            replies = [json.loads(line) for line in r.stdout.splitlines()]
            assert [x["result"] for x in replies] == [5.0, 3628800, 0.6]
            assert [x["id"] for x in replies] == [1, 2, 3]
        r = run("math:nope")
        assert r.returncode == 1
        assert json.loads(r.stdout)["error"]["code"] == "not_found"
    # the example imports only sysv_ipc and the standard library
    with open(PY_EXAMPLE) as f:
        assert "mqexecutor" not in "".join(line for line in f if "import" in line)


# --------------------------------------------------------------------------
# the reply protocol, against an in-process pool
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_results_errors_and_reply_fields():
    replies = new_reply_queue()
    try:
        with json_pool() as (ex, key):
            rk = replies.key

            def ask(fn, args=(), kwargs=None, **extra):
                msg = {"v": 1, "id": extra.pop("id", fn), "fn": fn, "args": list(args),
                       "reply": {"key": rk, "mtype": extra.pop("mtype", 1)}}
                if kwargs is not None:
                    msg["kwargs"] = kwargs
                msg.update(extra)
                post(key, msg)
                return receive_json(replies)

            r = ask(f"{THIS}:echo", [1, "two", [3]], {"k": {"n": None}},
                    id={"nested": [1, 2]})
            assert r["ok"] and r["result"] == {"args": [1, "two", [3]],
                                               "kwargs": {"k": {"n": None}}}
            assert r["id"] == {"nested": [1, 2]} and r["pid"] in worker_pids(ex)
            assert ask(f"{THIS}:echo", [], [])["result"] == {"args": [], "kwargs": {}}
            r = ask(f"{THIS}:raise_value_error", ["bad input"])
            assert not r["ok"] and r["error"]["code"] == "raised"
            assert r["error"]["type"] == "ValueError" and r["error"]["message"] == "bad input"
            assert "raise_value_error" in r["error"]["traceback"]
            for fn in ("returns_set", "returns_bytes", "returns_nan"):
                r = ask(f"{THIS}:{fn}")
                assert r["error"]["code"] == "bad_result", r
            r = ask(f"{THIS}:big_result", [msgmax()])
            assert r["error"]["code"] == "too_large" and str(msgmax()) in r["error"]["message"]
            assert ask(f"{THIS}:big_result", [100])["result"] == "x" * 100
            r = ask("math:pi")
            assert r["error"]["code"] == "not_found" and r["error"]["type"] == "TypeError"
            r = ask("math:nope")
            assert r["error"]["code"] == "not_found"
            # the reply type is the one asked for; the key may be given unsigned
            post(key, {"fn": "math:hypot", "args": [6, 8], "id": 9,
                       "reply": {"key": rk & 0xFFFFFFFF, "mtype": 7}})
            raw, mtype = receive(replies)
            assert mtype == 7 and json.loads(raw)["result"] == 10.0
            # no "v", no "id", no "args": defaults
            post(key, {"fn": f"{THIS}:pid", "reply": {"key": rk}})
            r = receive_json(replies)
            assert r["ok"] and r["id"] is None and r["result"] in worker_pids(ex)
            # trailing NULs (a C sender that sends sizeof(buffer)) are ignored
            post(key, json.dumps({"fn": "math:hypot", "args": [3, 4],
                                  "reply": {"key": rk}}).encode() + b"\0" * 20)
            assert receive_json(replies)["result"] == 5.0
    finally:
        replies.remove()


@pytest.mark.timeout(60)
def test_nothing_runs_unless_allowed(tmp_path):
    """Default allow=(): every JSON task is refused; refused names run no code,
    not even their module's import-time code; "_" names need an exact pattern."""
    marker_dir = str(tmp_path)
    module = f"mqx_sidefx_{random.getrandbits(32):08x}"
    with open(os.path.join(marker_dir, module + ".py"), "w") as f:
        f.write("import os\n"
                f"open(os.path.join({marker_dir!r}, 'imported'), 'w').close()\n"
                "def run():\n    return 'ran'\n")
    sys.path.insert(0, marker_dir)  # forked workers inherit it
    replies = new_reply_queue()
    try:
        def ask(key, fn, args=()):
            post(key, {"fn": fn, "args": list(args), "reply": {"key": replies.key}})
            return receive_json(replies)

        marker = os.path.join(marker_dir, "touched")
        with json_pool(allow=()) as (ex, key):
            assert ask(key, "math:hypot", [3, 4])["error"]["code"] == "not_allowed"
            assert ask(key, f"{THIS}:touch", [marker])["error"]["code"] == "not_allowed"
        with json_pool(allow=["math:*", f"{THIS}:_private"]) as (ex, key):
            assert ask(key, f"{module}:run")["error"]["code"] == "not_allowed"
            assert ask(key, "os:system", ["true"])["error"]["code"] == "not_allowed"
            assert ask(key, "math:__loader__.load_module")["error"]["code"] == "not_allowed"
            assert ask(key, "math:_private")["error"]["code"] == "not_allowed"
            assert ask(key, f"{THIS}:_private")["result"] == "private"  # exact name
            assert ask(key, "Math:hypot", [3, 4])["error"]["code"] == "not_allowed"
            records = deadletter.list_records(key)
            assert sum("not_allowed" in r["reason"] for r in records) == 5
        assert not os.path.exists(marker)
        assert not os.path.exists(os.path.join(marker_dir, "imported"))
        with json_pool(allow=[f"{module}:*"]) as (ex, key):  # allowed: it runs
            assert ask(key, f"{module}:run")["result"] == "ran"
        assert os.path.exists(os.path.join(marker_dir, "imported"))
    finally:
        sys.path.remove(marker_dir)
        sys.modules.pop(module, None)
        replies.remove()


@pytest.mark.timeout(90)
def test_malformed_messages_never_stop_the_pool(tmp_path):
    """Garbage of every kind: refused (error replies where a reply was asked
    for and could be read), the workers never crash or hang, and real tasks,
    JSON and pickled, still run afterwards."""
    replies = new_reply_queue()
    full = new_reply_queue(size=64)
    try:
        with json_pool() as (ex, key):
            pids = worker_pids(ex)
            rk = {"key": replies.key}
            size = msgmax()
            rng = random.Random(6)
            garbage_without_reply = [
                b"{", b"{not json", b"{}", b"{\"fn\": 5}", b"{\"fn\": \"math:hypot\"",
                b"{" + b"\xff\xfe" * 100, b"{" + b"\0" * (size - 1),
                b"{\"a\": " + b"[" * (size - 10),
                b"{\"a\": " + b"9" * (size - 10) + b"}",
                b"{" + bytes(rng.getrandbits(8) for _ in range(size - 1)),
                bytes(rng.getrandbits(8) for _ in range(size)),  # not JSON: handle_task refuses
                b"{\"ok\": true, \"id\": 1}",  # a reply posted to the task queue
                json.dumps({"fn": "math:hypot", "args": [3, 4],
                            "reply": {"key": 0}}).encode(),
                json.dumps({"fn": "math:hypot", "reply": "nope"}).encode(),
                json.dumps({"fn": "math:hypot", "args": [3, 4],
                            "reply": {"key": helpers.unused_key()}}).encode(),  # no such queue
                json.dumps({"fn": "os:system", "args": ["true"]}).encode(),  # no reply asked
            ]
            for raw in garbage_without_reply:
                post(key, raw)
            with_reply = {
                "v2": {"v": 2, "fn": "math:hypot", "reply": rk},
                "no fn": {"args": [1], "reply": rk},
                "fn int": {"fn": 12, "reply": rk},
                "fn shape": {"fn": "math.hypot", "reply": rk},
                "fn inject": {"fn": "math:hypot; rm -rf /", "reply": rk},
                "args obj": {"fn": "math:hypot", "args": {"a": 1}, "reply": rk},
                "kwargs list": {"fn": "math:hypot", "kwargs": [1], "reply": rk},
                "bad mtype": {"fn": "math:hypot", "reply": {"key": replies.key,
                                                            "mtype": 0}},
                "huge id": {"fn": "math:nope", "id": "i" * (size - 200), "reply": rk},
            }
            for name, msg in with_reply.items():
                msg.setdefault("id", name)
                post(key, msg)
            got = {}
            for _ in with_reply:
                r = receive_json(replies)
                assert r["ok"] is False and r["v"] == 1
                got[r["id"] if r["id"] in with_reply else "huge id"] = r["error"]["code"]
            assert got == {name: ("not_found" if name == "huge id" else "bad_message")
                           for name in with_reply}
            # a reply queue that stays full: the worker gives up, it does not hang
            full.max_size = 64
            full.send(b"x" * 60, type=1)
            t0 = time.monotonic()
            post(key, {"fn": "math:hypot", "args": [3, 4], "reply": {"key": full.key}})
            # real work still flows, on every worker: both answer again (the
            # one that met the full queue gave up on it after about a second)
            seen: set[int] = set()
            for i in range(400):
                post(key, {"fn": f"{THIS}:pid", "id": i, "reply": rk})
                seen.add(receive_json(replies, timeout=15)["result"])
                if seen == pids:
                    break
                time.sleep(0.02)
            assert seen == pids, f"only workers {seen} of {pids} answered"
            assert time.monotonic() - t0 < 15
            assert ex.submit(pow, 2, 10).result(timeout=15) == 1024
            assert list(ex.map(helpers.square, range(20), timeout=15)) == [
                i * i for i in range(20)]
            assert full.current_messages == 1  # the reply that did not fit was dropped
            assert worker_pids(ex) == pids, "a worker died"
            assert all(p.is_alive() for p in ex._processes.values())
            # every refusal was recorded as a dead letter
            refused = len(garbage_without_reply) - 1 + len(with_reply)
            assert helpers.wait_until(
                lambda: len(deadletter.list_records(key)) >= refused, 10), \
                len(deadletter.list_records(key))
    finally:
        replies.remove()
        full.remove()


@pytest.mark.timeout(60)
def test_targeted_pool_routes_json_by_message_type():
    """Mode 2 (Swoole task_ipc_mode 2): message type i + 1 reaches worker i."""
    replies = new_reply_queue()
    try:
        with json_pool(workers=2, mode=Mode.TARGETED) as (ex, key):
            for wid in (1, 0, 1):
                post(key, {"fn": "math:hypot", "args": [3, 4], "id": wid,
                           "reply": {"key": replies.key}}, mtype=wid + 1)
                r = receive_json(replies)
                assert r["ok"] and r["worker"] == wid == r["id"]
    finally:
        replies.remove()


@pytest.mark.timeout(60)
def test_reply_queue_recreated_under_the_same_key():
    """A producer removes its reply queue; the next one gets the same key (as
    sysv_ipc's MessageQueue(None) keys do): its reply must still arrive."""
    with json_pool(workers=1) as (ex, key):
        rkey = helpers.unused_key()
        for round_ in range(3):
            replies = sysv_ipc.MessageQueue(rkey, sysv_ipc.IPC_CREX, mode=0o600,
                                            max_message_size=msgmax())
            try:
                post(key, {"fn": "math:hypot", "args": [3, 4], "id": round_,
                           "reply": {"key": rkey}})
                r = receive_json(replies)
                assert r["id"] == round_ and r["result"] == 5.0
            finally:
                replies.remove()
        assert ex.submit(pow, 2, 5).result(10) == 32


@pytest.mark.timeout(60)
def test_json_task_left_in_the_queue_runs_after_a_restart():
    """Swoole runs the tasks left in its queue after a restart (seed 003); a
    JSON task posted while no pool serves the key runs once one does."""
    key = helpers.unused_key()
    replies = new_reply_queue()
    try:
        helpers.shutdown_or_fail(MQExecutor(key, 1, allow=ALLOW))  # the queue stays
        post(key, {"fn": "math:hypot", "args": [3, 4], "id": "early",
                   "reply": {"key": replies.key}})
        with helpers.pool(key, max_workers=1, allow=ALLOW):
            got = receive(replies, timeout=5)
        assert got is not None, "the task left in the queue was dropped"
        assert json.loads(got[0])["result"] == 5.0
    finally:
        replies.remove()
        remove_key(key)


# --------------------------------------------------------------------------
# handle_json itself (no pool): parsing and matching rules
# --------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_allow_patterns():
    allowed = external.is_allowed
    assert not allowed("math:hypot", ())
    assert allowed("math:hypot", ["math:*"])
    assert allowed("os.path:join", ["os.path:*"])
    assert not allowed("os:path.join", ["os.path:*"])
    assert not allowed("math:hypot", ["MATH:*"])  # case-sensitive
    assert not allowed("math:_x", ["math:*"]) and allowed("math:_x", ["math:_x"])
    assert not allowed("m:a.__class__", ["m:*"])
    assert not allowed("m:a.__class__", ["m:a.__class_?"])
    assert allowed("pkg.mod:Cls.method", ["pkg.*:Cls.*"])


@pytest.mark.timeout(60)
def test_handle_json_never_raises_on_random_input():
    """Random and mutated messages: handle_json returns None or a reason, never
    raises, and only sends well-formed JSON replies that fit in a message."""
    rng = random.Random(20140710)
    sent: list[tuple[int, int, bytes]] = []

    def send(key, mtype, body):
        sent.append((key, mtype, body))
        return rng.random() < 0.8

    seed = json.dumps({"v": 1, "id": 1, "fn": "math:hypot", "args": [3, 4],
                       "kwargs": {}, "reply": {"key": 77, "mtype": 2}}).encode()
    for i in range(3000):
        if i % 3 == 0:
            raw = b"{" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(200)))
        else:
            raw = bytearray(seed)
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(len(raw))
                raw[pos] = rng.choice(b'{}[]":,0123456789abc\\ \x00\xff')
            raw = bytes(raw)
        result = external.handle_json(raw, ["math:*"], send)
        assert result is None or isinstance(result, str)
    assert sent
    for _key, mtype, body in sent:
        assert mtype >= 1 and len(body) <= msgmax()
        reply = json.loads(body)
        assert reply["v"] == 1 and isinstance(reply["ok"], bool)


@pytest.mark.timeout(30)
def test_handle_json_return_values():
    calls = []

    def send(key, mtype, body):
        calls.append((key, mtype, json.loads(body)))
        return True

    ok = json.dumps({"fn": "math:hypot", "args": [3, 4], "reply": {"key": 5}}).encode()
    assert external.handle_json(ok, ["math:*"], send) is None
    assert calls[-1][2]["result"] == 5.0
    raised = json.dumps({"fn": "math:sqrt", "args": [-1], "reply": {"key": 5}}).encode()
    assert external.handle_json(raised, ["math:*"], send) is None  # handled: error reply
    assert calls[-1][2]["error"]["code"] == "raised"
    refused = external.handle_json(ok, [], send)
    assert "not_allowed" in refused and calls[-1][2]["error"]["code"] == "not_allowed"
    n = len(calls)
    assert "bad_message" in external.handle_json(b"{oops", ["math:*"], send)
    assert len(calls) == n  # nothing to answer to
    no_reply = json.dumps({"fn": "math:hypot", "args": [3, 4]}).encode()
    assert external.handle_json(no_reply, ["math:*"], send) is None and len(calls) == n

    def broken_send(key, mtype, body):
        raise OSError(22, "Invalid argument")

    assert external.handle_json(ok, ["math:*"], broken_send) is None
