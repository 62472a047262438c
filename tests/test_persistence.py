"""Queues that outlive their executor: restarts, recovered tasks, stranded tasks,
many producers on one pool (``MQExecutor.attach``), capacity and ``stats()``.

Everything here is real: real System V queues under random explicit keys, real
processes (``subprocess`` children, ``mqexecutor serve``), real SIGKILL. Every
explicit key is removed at the end of its test with
``mqexecutor.persistence.remove_queue`` (which also removes its ``k-<key>`` spill
directory), whatever the outcome.

Task functions live in a tiny module ``qh`` written into a temporary directory
(see ``QH_SOURCE``): it is put on ``sys.path`` here and on ``PYTHONPATH`` for
child processes, so every process pickles the functions *by reference* (a task
message is then ~77 bytes, and 200 of them fit in the kernel's 16 KB queue).
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import sysv_ipc

import mqexecutor
from mqexecutor import MQExecutor, Mode, QueueModeError, ipcinfo, persistence, spill
from mqexecutor.executor import CapacityWarning
from mqexecutor.limits import msgmnb

from . import helpers
from .helpers import pid_alive, wait_until

try:  # the conftest leak check treats k-<key> directories of these keys as ours
    from .helpers import TEST_KEYS as _SHARED_TEST_KEYS
except Exception:  # noqa: BLE001 - the check is only stricter with it
    _SHARED_TEST_KEYS = set()

pytestmark = pytest.mark.timeout(120)

# --------------------------------------------------------------------------
# Task functions, importable by name in every process
# --------------------------------------------------------------------------

QH_SOURCE = '''\
"""Task functions of tests/test_persistence.py (short names: small messages)."""
import multiprocessing
import os
import time


def r(i):
    """Append "<i>\\n" to $QH_DIR/<i> (O_APPEND), then sleep $QH_SLEEP s."""
    fd = os.open(os.path.join(os.environ["QH_DIR"], str(i)),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d\\n" % i)
    finally:
        os.close(fd)
    time.sleep(float(os.environ.get("QH_SLEEP", "0") or 0))
    return i


def tag(producer, i, delay=0.0):
    """(producer, i, worker pid), computed by the worker from its arguments."""
    if delay:
        time.sleep(delay)
    return (producer, i, os.getpid())


def mark(directory, name, delay=0.0):
    """Append a line to <directory>/<name> (one line per run), sleep, return name."""
    fd = os.open(os.path.join(directory, str(name)),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"run\\n")
    finally:
        os.close(fd)
    if delay:
        time.sleep(delay)
    return name


def gate(path, value=None, timeout=60.0):
    """Block until `path` exists (at most `timeout` s), then return value."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError("gate never opened: " + path)
        time.sleep(0.005)
    return value


def getpid():
    return os.getpid()
'''


@pytest.fixture(scope="session")
def qh_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qh")
    (directory / "qh.py").write_text(QH_SOURCE)
    return str(directory)


@pytest.fixture
def qh(qh_dir, monkeypatch):
    """The ``qh`` module, importable here and in workers forked from here."""
    monkeypatch.syspath_prepend(qh_dir)
    import qh as module  # noqa: PLC0415
    with open(module.__file__) as f:
        assert f.read() == QH_SOURCE
    return module


# --------------------------------------------------------------------------
# Utilities
# --------------------------------------------------------------------------

def fresh_key() -> int:
    """A random key no queue uses now (0x10000000..0x7fffffff)."""
    rng = random.SystemRandom()
    for _ in range(1000):
        key = rng.randrange(0x10000000, 0x7FFFFFFF)
        if ipcinfo.queue_info(key) is None:
            return key
    raise RuntimeError("no free SysV key")


def remove_key(key: int) -> None:
    """Remove the key's queue and its k-<key> spill directory, if present."""
    try:
        persistence.remove_queue(key)
    except sysv_ipc.ExistentialError:
        spill.remove_subdir(spill.key_subdir(key))


def qnum(key: int) -> int | None:
    info = ipcinfo.queue_info(key)
    return None if info is None else info.qnum


def queue_exists(key: int) -> bool:
    return ipcinfo.queue_info(key) is not None


def producer_meta(pid: int) -> tuple[str, persistence.QueueMeta] | None:
    """(subdir, meta) of the executor that process ``pid`` runs, from its p- dir."""
    for subdir, meta in persistence.producer_metas():
        if subdir.startswith(f"p-{pid}-"):
            return subdir, meta
    return None


def subdir_exists(subdir: str) -> bool:
    return any(os.path.exists(os.path.join(root, subdir)) for root in spill.spill_roots())


def stop_executor(ex: MQExecutor, timeout: float = 20.0) -> None:
    """Shut ``ex`` down (cancel what no worker took); fail instead of hanging."""
    ex.shutdown(wait=False, cancel_futures=True)
    manager = getattr(ex, "_executor_manager_thread", None)
    if manager is None:
        return
    manager.join(timeout)
    if manager.is_alive():
        ex.kill_workers()
        manager.join(10)
        raise AssertionError(f"executor on key {ex.key:#x} did not shut down within "
                             f"{timeout} s (killed its workers)")


def join_manager(ex: MQExecutor, timeout: float = 20.0) -> None:
    """Wait for the executor's manager thread (end of a shutdown(wait=False))."""
    ex._executor_manager_thread.join(timeout)
    assert not ex._executor_manager_thread.is_alive(), "shutdown did not complete"


class Proc:
    """A child process whose stdout/stderr lines are collected by threads."""

    def __init__(self, args: list[str], env: dict, cwd: str):
        self.args = args
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=cwd, bufsize=1)
        self.pid = self.p.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.p.stdout, self.out, True),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.p.stderr, self.err, False),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink, is_stdout):
        for line in stream:
            line = line.rstrip("\n")
            sink.append(line)
            if is_stdout:
                self.lines.put(line)
        if is_stdout:
            self.lines.put(None)

    def transcript(self) -> str:
        return ("$ " + " ".join(self.args) + "\n--- stdout\n" + "\n".join(self.out)
                + "\n--- stderr\n" + "\n".join(self.err))

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The next stdout line starting with ``prefix`` (earlier lines skipped)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line {prefix!r} within {timeout} s\n"
                                     + self.transcript())
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.p.wait(5)
                raise AssertionError(f"process exited ({self.p.returncode}) before "
                                     f"printing {prefix!r}\n" + self.transcript())
            if line.startswith(prefix):
                return line

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"process did not exit within {timeout} s\n"
                                 + self.transcript()) from None
        for t in self._threads:
            t.join(5)
        return code

    def signal(self, signum: int) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signum)


class Lab:
    """Keys, child processes and executors of one test; all released at the end:
    gates opened, children stopped (serve gracefully, others SIGKILL),
    executors shut down, then every key's queue and k- directory removed."""

    def __init__(self, tmp_path, qh_dir):
        self.tmp = str(tmp_path)
        self.qh_dir = qh_dir
        self.keys: list[int] = []
        self.procs: list[Proc] = []
        self.executors: list[MQExecutor] = []
        self.gates: list[str] = []

    def key(self) -> int:
        key = fresh_key()
        self.keys.append(key)
        _SHARED_TEST_KEYS.add(key)
        return key

    def adopt_key(self, key: int) -> int:
        """Remove ``key`` at the end of the test too."""
        self.keys.append(key)
        _SHARED_TEST_KEYS.add(key)
        return key

    def gate(self, name: str = "gate") -> str:
        path = os.path.join(self.tmp, name)
        self.gates.append(path)
        return path

    def dir(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        os.makedirs(path, exist_ok=True)
        return path

    def env(self, **extra: str) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (self.qh_dir, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def spawn(self, args: list[str], **env: str) -> Proc:
        proc = Proc(args, self.env(**env), self.tmp)
        self.procs.append(proc)
        return proc

    def script(self, name: str, code: str, *args: str, **env: str) -> Proc:
        path = os.path.join(self.tmp, name)
        code = textwrap.dedent(code)
        if not os.path.exists(path):  # never rewrite a script a child may be reading
            with open(path + ".tmp", "w") as f:
                f.write(code)
            os.replace(path + ".tmp", path)
        with open(path) as f:
            assert f.read() == code, f"two different scripts named {name}"
        return self.spawn([sys.executable, path, *map(str, args)], **env)

    def serve(self, key: int, workers: int = 2, mode: int = 3, *extra: str) -> Proc:
        proc = self.spawn([sys.executable, "-m", "mqexecutor", "serve", hex(key),
                           "--workers", str(workers), "--mode", str(mode), *extra])
        proc.expect("mqexecutor: serving", timeout=30)
        return proc

    def track(self, ex: MQExecutor) -> MQExecutor:
        self.executors.append(ex)
        return ex

    def close(self) -> None:
        errors = []
        for path in self.gates:
            with open(path, "a"):
                pass
        for proc in self.procs:
            if proc.p.poll() is None:
                is_serve = "serve" in proc.args
                proc.signal(signal.SIGTERM if is_serve else signal.SIGKILL)
                try:
                    proc.p.wait(20)
                except subprocess.TimeoutExpired:
                    proc.p.kill()
                    proc.p.wait()
                    errors.append(f"had to SIGKILL {proc.args}")
        for ex in self.executors:
            try:
                stop_executor(ex)
            except Exception as exc:  # noqa: BLE001
                errors.append(str(exc))
        for key in self.keys:
            remove_key(key)
        if errors:
            raise AssertionError("; ".join(errors))


@pytest.fixture
def lab(tmp_path, qh_dir, qh):
    lab = Lab(tmp_path, qh_dir)
    try:
        yield lab
    finally:
        lab.close()


def lines_of(directory: str) -> dict[str, int]:
    """{file name: number of lines} of every file in ``directory``."""
    out = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read().count(b"\n")
    return out


def leave_tasks(lab: Lab, qh, key: int, *, workers: int = 1, mode: int = 3,
                n: int = 5, targets: list[int] | None = None,
                fn=None, args=None) -> tuple[list, list]:
    """Start MQExecutor(key) in this process, keep its workers busy on gated tasks,
    queue ``n`` tasks (or one per ``targets`` entry, submit_to), then
    shutdown(wait=False), open the gate and wait until the executor is gone.

    Returns (gated futures, queued futures). The queued tasks stay in the queue.
    """
    gate = lab.gate(f"gate-{key:x}")
    ex = MQExecutor(key, workers, mode=mode)
    try:
        if mode == Mode.TARGETED:
            blockers = [ex.submit_to(w, qh.gate, gate, ("blocker", w)) for w in range(workers)]
        else:
            blockers = [ex.submit(qh.gate, gate, ("blocker", w)) for w in range(workers)]
        assert wait_until(lambda: qnum(key) == 0, 10), "workers did not take the blockers"
        time.sleep(0.05)
        fn = fn or qh.tag
        if targets is not None:
            queued = [ex.submit_to(w, fn, *(args(i) if args else ("old", i)))
                      for i, w in enumerate(targets)]
        else:
            queued = [ex.submit(fn, *(args(i) if args else ("old", i))) for i in range(n)]
        count = len(queued)
        assert wait_until(lambda: qnum(key) == count, 5)
        ex.shutdown(wait=False)
        # shutdown(wait=False) returns at once; the manager thread then tells
        # the workers to stop after their current task. Give that request time
        # to arrive before the blockers end, or a worker takes one more task.
        time.sleep(0.5)
    finally:
        with open(gate, "a"):
            pass
    join_manager(ex)
    assert qnum(key) == count, "a worker took a task after the stop request"
    return blockers, queued


# --------------------------------------------------------------------------
# Restarts
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_explicit_key_queue_outlives_executor(lab, qh):
    key = lab.key()
    with MQExecutor(key, 2) as ex:
        assert ex.key == key
        msqid = ex.msqid
        assert ex.submit(qh.tag, "p", 1).result(timeout=20)[:2] == ("p", 1)
    info = ipcinfo.queue_info(key)
    assert info is not None, "the queue of an explicit key was removed at shutdown"
    assert info.msqid == msqid and info.qnum == 0
    meta = persistence.read_meta(spill.key_subdir(key))
    assert meta is not None and meta.key == key and meta.mode == 3 and meta.workers == 2
    # remove_queue (what the fixture uses) removes the queue and the k- directory.
    assert persistence.remove_queue(key) == (0, 0)
    assert not queue_exists(key)
    assert persistence.read_meta(spill.key_subdir(key)) is None
    assert not subdir_exists(spill.key_subdir(key))


@pytest.mark.timeout(60)
def test_shutdown_wait_false_leaves_queued_tasks_for_next_executor(lab, qh):
    """shutdown(wait=False): the running task finishes, the queued ones stay in
    the kernel queue (their Futures here are cancelled) and the next executor on
    the key runs them, handing their outcomes over as recovered() Futures."""
    key = lab.key()
    blockers, queued = leave_tasks(lab, qh, key, workers=1, n=6)
    assert [f.result(timeout=5) for f in blockers] == [("blocker", 0)]
    assert all(f.cancelled() for f in queued), [f._state for f in queued]
    assert qnum(key) == 6, "queued tasks did not stay in the queue"

    ex = lab.track(MQExecutor(key, 2))
    assert ex.inherited == 6
    assert ex.stats().inherited == 6
    assert ex.stranded() == []
    rec = ex.recovered()
    assert len(rec) == 6
    assert rec is not ex.recovered(), "recovered() must return a new list"
    assert sorted(f.original_task_id for f in rec) == sorted(f.task_id for f in queued)
    by_old = {f.task_id: f for f in queued}
    for f in rec:
        assert isinstance(f, mqexecutor.MQFuture)
        assert f.original_pid == os.getpid()
        assert f.fn_name == "qh.tag" == by_old[f.original_task_id].fn_name
        old_i = queued.index(by_old[f.original_task_id])
        producer, i, pid = f.result(timeout=20)
        assert (producer, i) == ("old", old_i)
        assert pid in ex._processes
    assert len({f.task_id for f in rec}) == 6
    # New submissions get ids that do not collide with the adopted ones.
    g = ex.submit(qh.tag, "new", 1)
    assert g.task_id not in {f.task_id for f in rec}
    assert g.result(timeout=20)[:2] == ("new", 1)
    assert qnum(key) == 0
    stop_executor(ex)


@pytest.mark.timeout(60)
def test_restart_in_another_process_after_clean_exit(lab, qh):
    """A child submits, calls shutdown(wait=False) and exits normally; this
    process's executor on the key runs what the child left queued."""
    key = lab.key()
    marks = os.path.join(lab.tmp, "marks")
    os.mkdir(marks)
    child = lab.script("child_exit.py", """
        import os, sys, time
        import qh
        from mqexecutor import MQExecutor
        key, marks = int(sys.argv[1]), sys.argv[2]
        ex = MQExecutor(key, 1)
        first = ex.submit(qh.mark, marks, "first", 1.0)  # keeps the worker busy 1 s
        # until the task has started: a message merely received when the stop
        # request comes goes back on the queue, by design
        while not os.path.exists(os.path.join(marks, "first")):
            time.sleep(0.005)
        rest = [ex.submit(qh.tag, "child", i) for i in range(5)]
        print("IDS", *[f.task_id for f in rest], flush=True)
        ex.shutdown(wait=False)
        print("RESULT", first.result(timeout=30), flush=True)
    """, key, marks)
    ids = [int(x) for x in child.expect("IDS").split()[1:]]
    assert child.wait(60) == 0, child.transcript()
    assert "first" in child.expect("RESULT", 5)
    assert qnum(key) == 5, child.transcript()

    ex = lab.track(MQExecutor(key, 2))
    assert ex.inherited == 5
    rec = ex.recovered()
    assert sorted(f.original_task_id for f in rec) == sorted(ids)
    assert {f.original_pid for f in rec} == {child.pid}
    assert sorted(f.result(timeout=20)[1] for f in rec) == list(range(5))
    stop_executor(ex)


ATTACHED_WAITS = """
    import sys
    import qh
    from mqexecutor import MQExecutor
    ex = MQExecutor.attach(int(sys.argv[1]))
    futures = [ex.submit(qh.tag, "attached", i) for i in range(3)]
    print("IDS", *[f.task_id for f in futures], flush=True)
    print("RESULTS", *[f.result(timeout=60)[1] for f in futures], flush=True)
    ex.shutdown()
"""


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_takes_back_only_its_own_tasks(lab, qh):
    """shutdown(cancel_futures=True) on a pool with an explicit key cancels the
    pool's own queued tasks (taken out of the queue) and leaves those of an
    attached producer, which the next pool runs for that (live) producer."""
    key = lab.key()
    gate = lab.gate()
    pool = lab.track(MQExecutor(key, 1))
    blocker = pool.submit(qh.gate, gate, "blocker")
    assert wait_until(lambda: qnum(key) == 0, 10)
    producer = lab.script("attached_waits.py", ATTACHED_WAITS, key)
    producer.expect("IDS")
    own = [pool.submit(qh.tag, "own", i) for i in range(3)]
    assert wait_until(lambda: qnum(key) == 6, 10)
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in own)
    time.sleep(0.5)  # the stop request reaches the worker before its task ends
    with open(gate, "w"):
        pass
    join_manager(pool)
    assert blocker.result(timeout=5) == "blocker"
    assert qnum(key) == 3
    waiting = ipcinfo.peek(ipcinfo.queue_info(key).msqid)
    if waiting is not None:
        from mqexecutor.protocol import unpack_header
        assert {unpack_header(raw).pid for _, raw in waiting} == {producer.pid}
    pool2 = lab.track(MQExecutor(key, 1))
    assert pool2.inherited == 0 and pool2.recovered() == []
    assert producer.expect("RESULTS", timeout=30).split()[1:] == ["0", "1", "2"]
    assert producer.wait(30) == 0, producer.transcript()
    stop_executor(pool2)


@pytest.mark.timeout(60)
def test_new_pool_does_not_adopt_tasks_of_live_attached_producer_in_same_process(lab, qh):
    """Tasks queued by a live attached producer of *this* process are not
    orphans: a new pool started in this process must leave them to it (as it
    does for live producers of other processes) instead of adopting them into
    its recovered() list, which would leave the producer's Futures pending
    for ever."""
    key = lab.key()
    gate = lab.gate()
    pool = lab.track(MQExecutor(key, 1))
    pool.submit(qh.gate, gate, "blocker")
    assert wait_until(lambda: qnum(key) == 0, 10)
    producer = lab.track(MQExecutor.attach(key))
    futures = [producer.submit(qh.tag, "attached", i) for i in range(3)]
    assert wait_until(lambda: qnum(key) == 3, 10)
    pool.shutdown(wait=False)
    time.sleep(0.5)
    with open(gate, "w"):
        pass
    join_manager(pool)
    assert qnum(key) == 3
    pool2 = lab.track(MQExecutor(key, 1))
    assert pool2.recovered() == [], "the live producer's tasks were adopted"
    assert [f.result(timeout=20)[1] for f in futures] == [0, 1, 2]
    stop_executor(pool2)


CHILD_200 = """
    import os, sys, time
    import qh
    from mqexecutor import MQExecutor, ipcinfo
    key, n = int(sys.argv[1]), int(sys.argv[2])
    ex = MQExecutor(key, 1)
    futures = [ex.submit(qh.r, i) for i in range(n)]
    end = time.monotonic() + 30
    while ex.stats().backlog:
        if time.monotonic() > end:
            print("BACKLOG", ex.stats(), flush=True)
            sys.exit(1)
        time.sleep(0.005)
    info = ipcinfo.queue_info(key)
    print("QUEUE", info.qnum, info.cbytes, flush=True)
    print("WORKERS", *sorted(ex._processes), flush=True)
    print("READY", flush=True)
    time.sleep(300)
"""


@pytest.mark.timeout(120)
def test_sigkill_of_owner_leftovers_run_exactly_once(lab, qh, monkeypatch):
    """The issue's main scenario.

    A child process (an MQExecutor on an explicit key, 1 worker) submits 200
    tasks ``qh.r(i)``. Each appends "<i>\\n" to the file QH_DIR/<i> when it
    starts, then sleeps 0.2 s. Messages are ~77 bytes, so all 200 fit in the
    16 KB kernel queue: the child prints READY once its in-process backlog is
    empty (the backlog would die with the child by design; durable mode is a
    later issue). The parent waits a little and SIGKILLs the child.

    Then:
    * the child's worker stops (its pid disappears within seconds), after
      finishing at most the task it was running: it takes no other task;
    * the child's private reply queue and spill directory are removed by that
      worker when it notices the owner died;
    * every task not started is still in the kernel queue (qnum);
    * a new MQExecutor on the key, in this process, adopts them (inherited,
      recovered() with original_task_id/original_pid/fn_name) and runs them.

    Because an id is recorded when its task *starts*, the task in flight at the
    kill has recorded its id already: in the end every one of the 200 ids must
    have been recorded exactly once. (The issue allows ids in flight at the
    kill to be missing; with start-recording none may be, and none may run twice.)
    """
    n = 200
    key = lab.key()
    record = lab.dir("record")
    child = lab.script("child_200.py", CHILD_200, key, n, QH_DIR=record, QH_SLEEP="0.2")
    _, queued, nbytes = child.expect("QUEUE").split()
    worker_pids = [int(x) for x in child.expect("WORKERS").split()[1:]]
    child.expect("READY")
    assert len(worker_pids) == 1
    assert int(nbytes) / int(queued) * n <= msgmnb(), "messages larger than planned"
    found = producer_meta(child.pid)
    assert found is not None, "the child executor wrote no metadata"
    child_subdir, child_meta = found
    assert queue_exists(child_meta.reply_key)

    time.sleep(0.5)  # a few tasks run; most are still queued
    started_before_kill = len(os.listdir(record))
    child.p.send_signal(signal.SIGKILL)
    child.p.wait(10)

    assert wait_until(lambda: not any(pid_alive(p) for p in worker_pids), 10), \
        "the dead owner's workers are still running"
    started = set(os.listdir(record))
    left = qnum(key)
    # A worker stops before taking another task: at most the task it was running
    # (plus one that may have started between our count and the kill).
    assert len(started) - started_before_kill <= 2, (started_before_kill, len(started))
    assert left == n - len(started), (left, len(started))
    assert left > 0
    time.sleep(0.5)
    assert set(os.listdir(record)) == started and qnum(key) == left, \
        "something kept taking tasks after the owner died"
    # The workers clean up after their dead owner.
    assert wait_until(lambda: not queue_exists(child_meta.reply_key), 10), \
        "the dead owner's reply queue was not removed"
    assert wait_until(lambda: not subdir_exists(child_subdir), 10), \
        "the dead owner's spill directory was not removed"

    monkeypatch.setenv("QH_DIR", record)
    monkeypatch.delenv("QH_SLEEP", raising=False)
    ex = lab.track(MQExecutor(key, 2))
    assert ex.inherited == left
    rec = ex.recovered()
    assert len(rec) == left
    results = [f.result(timeout=60) for f in rec]
    not_started = set(range(n)) - {int(s) for s in started}
    assert sorted(results) == sorted(not_started)
    for f, i in zip(rec, results):
        assert f.original_pid == child.pid
        assert f.original_task_id == i + 1  # the child's task ids start at 1
        assert f.fn_name == "qh.r"
    counts = lines_of(record)
    assert sorted(int(k) for k in counts) == list(range(n)), "some ids never ran"
    twice = {k: v for k, v in counts.items() if v != 1}
    assert not twice, f"ids run more than once: {twice}"
    assert qnum(key) == 0
    stop_executor(ex)
    persistence.collect_garbage()


@pytest.mark.timeout(60)
def test_queue_of_other_mode_is_refused_and_left_intact(lab, qh):
    key = lab.key()
    _, queued = leave_tasks(lab, qh, key, workers=2, mode=Mode.TARGETED,
                            targets=[0, 1, 0])
    before = ipcinfo.peek(ipcinfo.queue_info(key).msqid)
    children_before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(QueueModeError) as info:
        MQExecutor(key, 2, mode=Mode.PREEMPTIVE)
    assert isinstance(info.value, ValueError)
    assert "TARGETED" in str(info.value)
    assert qnum(key) == 3, "the refused queue was changed"
    if before is not None:
        after = ipcinfo.peek(ipcinfo.queue_info(key).msqid)
        assert sorted(after) == sorted(before)
    now = {p.pid for p in multiprocessing.active_children()}
    assert now <= children_before, "a refused executor left worker processes"
    # The right mode takes them.
    ex = lab.track(MQExecutor(key, 2, mode=Mode.TARGETED))
    rec = ex.recovered()
    assert sorted(f.result(timeout=20)[1] for f in rec) == [0, 1, 2]
    assert sorted((f.original_task_id, f.worker_id) for f in rec) == \
        sorted((f.task_id, f.worker_id) for f in queued)
    stop_executor(ex)


@pytest.mark.timeout(60)
def test_live_pool_of_other_mode_refuses_executor_and_attach(lab, qh):
    key = lab.key()
    lab.serve(key, workers=1, mode=3)
    with pytest.raises(QueueModeError):
        MQExecutor(key, 1, mode=Mode.TARGETED)
    with pytest.raises(QueueModeError):
        MQExecutor.attach(key, mode=Mode.TARGETED)
    p = lab.track(MQExecutor.attach(key, mode=Mode.PREEMPTIVE))
    assert p.submit(qh.tag, "x", 1).result(timeout=20)[:2] == ("x", 1)
    stop_executor(p)


@pytest.mark.timeout(60)
def test_live_pool_of_other_mode_in_same_process_is_refused(lab, qh):
    """Two live pools of different modes on one key steal each other's tasks
    (a preemptive worker receives every message type; targeted worker 0 receives
    type 1, the type of preemptive tasks) and refuse them. The second pool must
    be refused, also when it is created in the same process as the first."""
    key = lab.key()
    first = lab.track(MQExecutor(key, 1, mode=Mode.PREEMPTIVE))
    try:
        second = lab.track(MQExecutor(key, 1, mode=Mode.TARGETED))
    except QueueModeError:
        second = None
    if second is not None:
        outcomes = []
        for f in [second.submit_to(0, qh.getpid) for _ in range(10)] + \
                 [first.submit(qh.getpid) for _ in range(10)]:
            exc = f.exception(timeout=20)
            outcomes.append(type(exc).__name__ if exc else "ok")
        stop_executor(second)
        pytest.fail("a targeted pool was accepted on a key served by a live "
                    f"preemptive pool of this process; outcomes of 20 tasks: {outcomes}")
    assert first.submit(qh.tag, "first", 1).result(timeout=20)[:2] == ("first", 1)
    meta = persistence.read_meta(spill.key_subdir(key))
    assert meta.mode == int(Mode.PREEMPTIVE), "the refused pool overwrote the metadata"
    stop_executor(first)


@pytest.mark.timeout(60)
def test_tasks_for_missing_worker_ids_are_stranded(lab, qh):
    """Targeted tasks for worker ids 2 and 3 cannot run in a pool of 2: they are
    reported (stranded() and one RuntimeWarning) and stay in the queue, where a
    pool of 4 finds them later."""
    key = lab.key()
    targets = [0, 1, 2, 3, 3, 2, 0]
    _, queued = leave_tasks(lab, qh, key, workers=4, mode=Mode.TARGETED, targets=targets)
    assert qnum(key) == len(targets)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = lab.track(MQExecutor(key, 2, mode=Mode.TARGETED))
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "stranded" in str(runtime[0].message) or "stay" in str(runtime[0].message)
    stranded = ex.stranded()
    assert sorted((s.worker_id, s.task_id) for s in stranded) == sorted(
        (f.worker_id, f.task_id) for f in queued if f.worker_id >= 2)
    for s in stranded:
        assert s.fn_name == "qh.tag"
        assert s.producer_pid == os.getpid()
    assert ex.inherited == len(targets)
    rec = ex.recovered()
    assert sorted(f.result(timeout=20)[1] for f in rec) == [0, 1, 6]
    assert qnum(key) == 4, "stranded tasks must stay in the queue"
    stop_executor(ex)
    assert qnum(key) == 4

    ex4 = lab.track(MQExecutor(key, 4, mode=Mode.TARGETED))
    assert ex4.stranded() == []
    assert sorted(f.result(timeout=20)[1] for f in ex4.recovered()) == [2, 3, 4, 5]
    assert qnum(key) == 0
    stop_executor(ex4)


# --------------------------------------------------------------------------
# Many producers, one pool
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_attach_in_process_starts_no_workers_and_gets_its_results(lab, qh):
    key = lab.key()
    pool = lab.track(MQExecutor(key, 2))
    pool_pids = set(pool._processes)
    producer = lab.track(MQExecutor.attach(key))
    assert producer.key == key and producer.msqid == pool.msqid
    assert producer._processes == {}
    assert producer.stats().workers == 0
    assert producer.mode == Mode.PREEMPTIVE
    assert producer.max_workers == 2  # read from the pool's metadata
    f = producer.submit(qh.tag, "attached", 7)
    assert isinstance(f, mqexecutor.MQFuture)
    got = f.result(timeout=20)
    assert got[:2] == ("attached", 7) and got[2] in pool_pids
    assert [r[:2] for r in producer.map(qh.tag, ["m"] * 20, range(20))] == \
        [("m", i) for i in range(20)]
    assert [r[:2] for r in producer.map(qh.tag, ["c"] * 20, range(20), chunksize=6)] == \
        [("c", i) for i in range(20)]
    done = []
    g = producer.submit(qh.tag, "cb", 1)
    g.add_done_callback(done.append)
    g.result(timeout=20)
    assert wait_until(lambda: done == [g], 5)
    with pytest.raises(ZeroDivisionError):
        producer.submit(divmod, 1, 0).result(timeout=20)
    # The pool's own submissions are unaffected.
    assert pool.submit(qh.tag, "pool", 1).result(timeout=20)[:2] == ("pool", 1)
    assert pool.stats().completed == 1, "the pool completed another producer's task"
    producer.shutdown(wait=True)
    assert queue_exists(key)
    with pytest.raises(RuntimeError):
        producer.submit(qh.tag, "late", 0)
    stop_executor(pool)


@pytest.mark.timeout(30)
def test_attach_to_missing_queue_raises_and_creates_nothing(lab):
    key = lab.key()
    before = {q.key for q in ipcinfo.list_queues()}
    with pytest.raises(sysv_ipc.ExistentialError):
        MQExecutor.attach(key)
    assert not queue_exists(key), "attach() created the queue"
    assert {q.key for q in ipcinfo.list_queues()} - before == set()
    assert not subdir_exists(spill.key_subdir(key)), \
        "attach() to a missing queue left its k-<key> spill directory behind"


PRODUCER = """
    import os, sys, time
    import qh
    from mqexecutor import MQExecutor
    key, me, n, mode = (int(a) for a in sys.argv[1:5])
    go = sys.argv[5]
    ex = MQExecutor.attach(key, mode=mode)
    print("ATTACHED", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)
    futures = [ex.submit(qh.tag, me, i) for i in range(n)]
    bad = []
    for i, f in enumerate(futures):
        got = f.result(timeout=60)
        if got[:2] != (me, i):
            bad.append((i, got))
    mapped = list(ex.map(qh.tag, [me] * n, range(n), chunksize=3))
    for i, got in enumerate(mapped):
        if got[:2] != (me, i):
            bad.append(("map", i, got))
    pids = sorted({got[2] for got in mapped} | {f.result()[2] for f in futures})
    ex.shutdown()
    print("BAD" if bad else "OK", me, len(futures) + len(mapped), bad[:5], flush=True)
    print("PIDS", *pids, flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", [3, 2])
def test_many_producers_one_served_pool(lab, mode):
    """8 producer processes attach to one ``mqexecutor serve`` pool and submit
    at the same time; each gets exactly its own results (the worker computes
    (producer, i) from the arguments) and never another producer's."""
    key = lab.key()
    server = lab.serve(key, workers=2, mode=mode)
    go = lab.gate("go")
    n = 60
    producers = [lab.script("producer.py", PRODUCER, key, me, n, mode, go)
                 for me in range(8)]
    for p in producers:
        p.expect("ATTACHED")
    with open(go, "w"):
        pass
    pool_pids = set()
    for me, p in enumerate(producers):
        line = p.expect("OK", timeout=90)
        assert line.split()[1:3] == [str(me), str(2 * n)], p.transcript()
        pool_pids |= {int(x) for x in p.expect("PIDS").split()[1:]}
        assert p.wait(30) == 0, p.transcript()
    assert 1 <= len(pool_pids) <= 2 + 2  # the served pool's workers (maybe replaced)
    assert server.p.poll() is None, "the pool died"
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.transcript()
    assert not any("Traceback" in line for line in server.err), server.transcript()
    assert qnum(key) == 0


VICTIM = """
    import sys
    import qh
    from mqexecutor import MQExecutor
    key = int(sys.argv[1])
    ex = MQExecutor.attach(key)
    futures = [ex.submit(qh.tag, "victim", i, 0.02) for i in range(300)]
    futures[5].result(timeout=60)
    print("GOING", flush=True)
    futures[-1].result(timeout=600)
"""


@pytest.mark.timeout(120)
def test_producer_killed_mid_stream_does_not_disturb_others(lab, qh):
    """A producer SIGKILLed while its tasks run and wait in the pool's queue:
    the pool keeps serving, the other producers get exactly their own results
    (never one of the victim's) and the victim's reply queue and spill
    directory are reclaimed (by the workers or by collect_garbage())."""
    key = lab.key()
    server = lab.serve(key, workers=2, mode=3)
    go = lab.gate("go")
    producers = [lab.script("producer.py", PRODUCER, key, me, 150, 3, go)
                 for me in range(4)]
    for p in producers:
        p.expect("ATTACHED")
    victim = lab.script("victim.py", VICTIM, key)
    victim.expect("GOING")
    with open(go, "w"):
        pass
    found = producer_meta(victim.pid)
    assert found is not None
    victim_subdir, victim_meta = found
    time.sleep(0.2)
    victim.p.send_signal(signal.SIGKILL)
    victim.p.wait(10)
    for me, p in enumerate(producers):
        line = p.expect("OK", timeout=90)
        assert line.split()[1] == str(me), p.transcript()
        assert p.wait(30) == 0, p.transcript()
    # The pool still serves a new producer.
    fresh = lab.track(MQExecutor.attach(key))
    assert [r[:2] for r in fresh.map(qh.tag, ["fresh"] * 10, range(10))] == \
        [("fresh", i) for i in range(10)]
    stop_executor(fresh)
    # The victim's leftovers run (outcomes discarded); its reply queue goes away.
    assert wait_until(lambda: qnum(key) == 0, 30)
    # Workers remove the reply queue of a dead producer when they answer it;
    # collect_garbage() reclaims whatever is left (mqexecutor gc).
    wait_until(lambda: not queue_exists(victim_meta.reply_key), 10)
    persistence.collect_garbage()
    assert not queue_exists(victim_meta.reply_key)
    assert not subdir_exists(victim_subdir)
    assert server.p.poll() is None
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.transcript()
    assert not any("Traceback" in line for line in server.err), server.transcript()


# --------------------------------------------------------------------------
# capacity and stats
# --------------------------------------------------------------------------

def _can_raise_msg_qbytes(nbytes: int) -> bool:
    q = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX)
    try:
        q.max_size = nbytes
        return q.max_size == nbytes
    except (sysv_ipc.Error, OSError, ValueError):
        return False
    finally:
        q.remove()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("explicit", [False, True], ids=["private", "explicit-key"])
def test_capacity_raised_or_one_clear_warning(lab, qh, explicit):
    want = msgmnb() * 4
    can = _can_raise_msg_qbytes(want)
    key = lab.key() if explicit else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = lab.track(MQExecutor(key, 2, capacity=want))
    cap = [w for w in caught if issubclass(w.category, CapacityWarning)]
    if can:
        assert cap == [], [str(w.message) for w in cap]
        assert ex.stats().capacity_bytes == want
    else:
        assert len(cap) == 1, [str(w.message) for w in caught]
        assert issubclass(CapacityWarning, RuntimeWarning)
        text = str(cap[0].message)
        assert str(want) in text and str(msgmnb()) in text, text
        assert "CAP_SYS_RESOURCE" in text
        assert cap[0].filename == __file__, "the warning should point at the caller"
        assert ex.stats().capacity_bytes == msgmnb()
    futures = [ex.submit(qh.tag, "cap", i) for i in range(1000)]
    assert [f.result(timeout=60)[1] for f in futures] == list(range(1000))
    assert ex.stats().completed == 1000
    stop_executor(ex)


@pytest.mark.timeout(60)
def test_capacity_below_msgmax_still_runs_large_tasks(lab, qh):
    """capacity lower than the default is always allowed; a task whose message
    would not fit in such a queue must still run (e.g. through a spill file)
    instead of waiting in the backlog for ever."""
    ex = lab.track(MQExecutor(None, 1, capacity=4096))
    assert ex.stats().capacity_bytes == 4096
    assert ex.submit(len, b"x" * 6000).result(timeout=20) == 6000
    assert ex.submit(len, b"y" * 100).result(timeout=20) == 100
    stop_executor(ex)


@pytest.mark.timeout(60)
def test_stats_reports_kernel_queue_backlog_running_completed_workers(lab, qh):
    key = lab.key()
    gate = lab.gate()
    ex = lab.track(MQExecutor(key, 1))
    s = ex.stats()
    assert (s.key, s.msqid) == (key, ex.msqid)
    assert (s.queued_messages, s.queued_bytes, s.backlog, s.running, s.completed,
            s.workers, s.inherited) == (0, 0, 0, 0, 0, 1, 0)
    assert s.capacity_bytes == msgmnb()
    blocker = ex.submit(qh.gate, gate, "blocker")
    assert wait_until(lambda: qnum(key) == 0 and ex.stats().running == 1, 10)
    payload = b"p" * 3000  # ~3.1 KB per message: 5 fit in 16 KB
    n = 12
    futures = [ex.submit(qh.gate, gate, payload) for _ in range(n)]
    time.sleep(0.2)
    s = ex.stats()
    info = ipcinfo.queue_info(key)
    assert s.queued_messages == info.qnum and s.queued_bytes == info.cbytes
    assert 0 < s.queued_messages < n
    assert s.queued_bytes <= s.capacity_bytes
    assert s.backlog == n - s.queued_messages
    assert s.running == s.queued_messages + 1  # in the kernel queue + in the worker
    assert s.completed == 0 and s.workers == 1
    assert sum(not f.running() and not f.done() for f in futures) == s.backlog
    with open(gate, "w"):
        pass
    assert [f.result(timeout=30) for f in futures] == [payload] * n
    blocker.result(timeout=5)
    s = ex.stats()
    assert (s.queued_messages, s.queued_bytes, s.backlog, s.running, s.completed,
            s.workers) == (0, 0, 0, 0, n + 1, 1)
    stop_executor(ex)


FIRST_POOL = textwrap.dedent("""
    import os, sys, time
    import sysv_ipc
    from mqexecutor import MQExecutor, spill
    reply_key, subdir = int(sys.argv[1]), sys.argv[2]

    def reclaimed():
        try:
            sysv_ipc.MessageQueue(reply_key)
            return False
        except sysv_ipc.ExistentialError:
            return not os.path.exists(os.path.join(spill.root_dir(0, create=False), subdir))

    with MQExecutor(max_workers=1) as ex:
        print("RESULT", ex.submit(abs, -3).result(timeout=30), flush=True)
        end = time.monotonic() + 20  # the sweep runs shortly after start
        while not reclaimed() and time.monotonic() < end:
            time.sleep(0.01)
""")


@pytest.mark.timeout(60)
def test_the_first_pool_of_a_process_reclaims_dead_producers_leftovers(tmp_path):
    """The leftovers of a producer killed without workers to clean after it (an
    attached one): its reply queue and spill directory. The first MQExecutor of
    a fresh process reclaims them: its first worker does, shortly after start."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    token = random.getrandbits(63) | 1
    reply = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    subdir = spill.producer_subdir(dead.pid, token)
    try:
        persistence.write_meta(subdir, persistence.QueueMeta(
            key=0, mode=3, workers=0, wire=1, owner_pid=dead.pid, owner_token=token,
            reply_key=reply.key))
        assert queue_exists(reply.key) and subdir_exists(subdir)
        proc = helpers.run_script(FIRST_POOL, tmp_path, str(reply.key), subdir,
                                  env={"PYTHONPATH": helpers.REPO})
        assert proc.returncode == 0 and "RESULT 3" in proc.stdout, proc.stdout + proc.stderr
        assert not queue_exists(reply.key), "the dead producer's reply queue is left"
        assert not subdir_exists(subdir), "the dead producer's spill directory is left"
    finally:
        try:
            reply.remove()
        except sysv_ipc.ExistentialError:
            pass
        spill.remove_subdir(subdir)


KILLED_IN_CONSTRUCTOR = textwrap.dedent("""
    import os, sys
    from mqexecutor import MQExecutor, queues
    real = queues.create_private
    made = []

    def create_private(mode=0o600, key=None):
        # the fault: SIGKILL-like death just before the second msgget (the
        # private task queue), after the reply queue was made
        if made:
            print("DYING", key, flush=True)
            os._exit(9)
        q = real(mode, key)
        made.append(q.key)
        print("MADE", q.key, flush=True)
        return q

    queues.create_private = create_private
    MQExecutor(max_workers=1)
""")


@pytest.mark.timeout(60)
def test_producer_killed_between_naming_and_making_its_queues_leaves_nothing(tmp_path):
    """A producer killed inside its constructor, between two msgget calls, has
    named both keys in meta.json beforehand: gc removes the queue it made and
    its directory. A queue made later under the key it never got belongs to
    someone else: gc leaves it (its ctime is after the producer's last word)."""
    proc = helpers.run_script(KILLED_IN_CONSTRUCTOR, tmp_path, env={"PYTHONPATH": helpers.REPO})
    assert proc.returncode == 9, proc.stdout + proc.stderr
    made = int(proc.stdout.split("MADE")[1].split()[0])
    never = int(proc.stdout.split("DYING")[1].split()[0])
    other = None
    subdir = None
    try:  # a crash test removes what it crashed, even when it fails
        found = [(d, m) for d, m in persistence.producer_metas() if m.reply_key == made]
        assert len(found) == 1, "the reply queue's key was not named before msgget"
        subdir, meta = found[0]
        assert meta.key == never and meta.private
        assert queue_exists(made)
        time.sleep(1.1)  # ctime has a 1 s resolution
        other = sysv_ipc.MessageQueue(never, sysv_ipc.IPC_CREX, mode=0o600)
        slack = persistence.CTIME_SLACK
        persistence.CTIME_SLACK = 0  # "later" without waiting 10 s
        try:
            persistence.collect_garbage()
        finally:
            persistence.CTIME_SLACK = slack
        assert not queue_exists(made), "the dead producer's reply queue is left"
        assert not subdir_exists(subdir), "the dead producer's directory is left"
        assert queue_exists(never), "gc removed a queue made later by another process"
    finally:
        if other is not None:
            other.remove()
        if queue_exists(made):
            sysv_ipc.MessageQueue(made).remove()
        if subdir is not None:
            spill.remove_subdir(subdir)
