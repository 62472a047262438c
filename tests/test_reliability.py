"""Reliability: workers that die, retries, load, many producers, leftovers.

Complements tests/test_failures.py (os._exit and SIGKILL of a worker mid-task,
targeted tasks queued for a dead worker): here a worker dies of a segfault
(ctypes.string_at(0), faulthandler._sigsegv()) and of a simulated OOM kill,
faulthandler leaves a traceback naming the task function on the worker's
stderr, ``retries=`` re-runs a task whose worker died, 100k tasks go through
``map(buffersize=...)``, 16 producer processes share one pool, and
``mqexecutor gc`` reclaims what a SIGKILLed private executor left behind, and
a task taken by a worker killed before it wrote its slot is found.
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool

import pytest
import sysv_ipc

from mqexecutor import Mode, TerminatedWorkerError, ipcinfo, persistence, spill
from mqexecutor.protocol import (
    PREEMPTIVE_MTYPE,
    RESULT_MTYPE,
    DeathCause,
    Kind,
    Status,
    build,
    death_body,
    targeted_mtype,
    unpack_header,
)

from .helpers import (
    REPO,
    Gate,
    gated,
    identity,
    kill_tree_groups,
    no_core,
    pool,
    producer_subdir,
    run_script,
    square,
    unused_key,
    wait_until,
    where,
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# Task functions
# --------------------------------------------------------------------------

def segfault_string_at():
    """Dereference NULL through ctypes: SIGSEGV in C code."""
    no_core()
    ctypes.string_at(0)


def segfault_faulthandler():
    """faulthandler's own crash helper: SIGSEGV."""
    no_core()
    faulthandler._sigsegv()


def oom_killed(mib=200):
    """Simulates the OOM killer: allocate and touch ``mib`` MiB, then SIGKILL
    ourselves -- what the kernel's OOM killer does to the process with the
    largest badness, without pushing this machine into real memory pressure.
    (A task that lowers RLIMIT_AS and allocates gets a MemoryError instead and
    its worker survives: see test_memory_limit_is_an_ordinary_exception.)"""
    no_core()
    block = bytearray(mib << 20)
    block[::4096] = b"\x01" * len(block[::4096])
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def allocate_under_rlimit(limit_mib=256, alloc_mib=1024):
    """Lower RLIMIT_AS, allocate more than that (MemoryError), restore."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit_mib << 20, hard))
    try:
        block = bytearray(alloc_mib << 20)
        return len(block)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_count(directory, name):
    """Record one more run of ``name`` (a marker file per run); return the count."""
    n = 1
    while True:
        try:
            fd = os.open(os.path.join(directory, f"{name}.{n}"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            return n
        except FileExistsError:
            n += 1


def die_first(directory, name, deaths, value=None):
    """Die by SIGKILL on the first ``deaths`` runs, then return (value, runs)."""
    n = run_count(directory, name)
    if n <= deaths:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    return value, n


def runs(directory, name):
    return len([f for f in os.listdir(directory) if f.startswith(name + ".")])


# --------------------------------------------------------------------------
# Worker death: segfault and OOM
# --------------------------------------------------------------------------

CRASHES = [
    (segfault_string_at, signal.SIGSEGV),
    (segfault_faulthandler, signal.SIGSEGV),
    (oom_killed, signal.SIGKILL),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
@pytest.mark.parametrize("crash, signum", CRASHES, ids=["string_at", "sigsegv", "oom"])
def test_worker_crash_fails_only_its_task(mode, crash, signum):
    with pool(max_workers=2, mode=mode) as ex:
        ids = {wid: pid for wid, pid in (f.result(timeout=20) for f in (
            [ex.submit_to(w, where) for w in range(2)] if mode == Mode.TARGETED
            else []))}
        before = set(ex._processes)
        others = [ex.submit(square, i) for i in range(6)]
        f = ex.submit_to(0, crash) if mode == Mode.TARGETED else ex.submit(crash)
        # targeted: tasks queued behind the crash for the same worker id
        queued = [ex.submit_to(0, where) for _ in range(4)] if mode == Mode.TARGETED else []
        with pytest.raises(TerminatedWorkerError) as info:
            f.result(timeout=30)
        err = info.value
        assert isinstance(err, BrokenProcessPool)
        assert err.exitcode == -signum
        assert err.pid in before and err.task_id == f.task_id
        assert err.fn_name.endswith(crash.__name__)
        msg = str(err)
        for part in (f"worker {err.worker_id}", f"pid {err.pid}", signal.Signals(signum).name,
                     f"task {f.task_id}", crash.__name__):
            assert part in msg, (part, msg)
        if mode == Mode.TARGETED:
            assert err.worker_id == 0 and err.pid == ids[0]
            results = [q.result(timeout=20) for q in queued]
            assert {wid for wid, _ in results} == {0}
            assert all(pid != err.pid for _, pid in results)
        # only that Future failed; the pool keeps serving
        assert [o.result(timeout=20) for o in others] == [i * i for i in range(6)]
        assert list(ex.map(square, range(20))) == [i * i for i in range(20)]
        # replaced under the same id: two live workers, the dead pid gone
        assert wait_until(lambda: len(ex._processes) == 2 and err.pid not in ex._processes
                          and all(p.is_alive() for p in ex._processes.values()))
        if mode == Mode.TARGETED:
            assert ex.submit_to(0, where).result(timeout=20)[0] == 0
            assert ex.submit_to(1, where).result(timeout=20) == (1, ids[1])


@pytest.mark.timeout(60)
def test_memory_limit_is_an_ordinary_exception():
    """Unlike the OOM killer, an address-space limit (RLIMIT_AS) makes the
    allocation raise MemoryError: the task fails with it, the worker lives."""
    with pool(max_workers=1) as ex:
        pid = ex.submit(os.getpid).result(timeout=20)
        with pytest.raises(MemoryError):
            ex.submit(allocate_under_rlimit).result(timeout=30)
        assert ex.submit(os.getpid).result(timeout=20) == pid


FAULT_SCRIPT = """
import sys
from mqexecutor import MQExecutor, TerminatedWorkerError
from tests.helpers import no_core


def crash_in_task_fn():
    no_core()
    import ctypes
    ctypes.string_at(0)


def raise_in_task_fn():
    raise KeyError("from the task")


if __name__ == "__main__":
    with MQExecutor(max_workers=1) as ex:
        try:
            ex.submit(crash_in_task_fn).result(timeout=30)
        except TerminatedWorkerError as exc:
            print("TERMINATED", exc, flush=True)
        print("AFTER", ex.submit(sum, [1, 2, 3]).result(timeout=30), flush=True)
        try:
            ex.submit(raise_in_task_fn).result(timeout=30)
        except KeyError as exc:
            print("REMOTE", exc.__cause__, flush=True)
"""


@pytest.mark.timeout(60)
def test_faulthandler_traceback_names_the_task_function(tmp_path):
    """Workers start with faulthandler enabled: a segfault leaves "Fatal Python
    error: Segmentation fault" and the Python stack, with the task function,
    on the worker's stderr (the executor's own stderr). The functions are in
    ``__main__``: they travel by value, and keep their file name and lines."""
    r = run_script(FAULT_SCRIPT, tmp_path, env={"PYTHONPATH": REPO}, timeout=50)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^TERMINATED task worker 0 \(pid \d+\) died with signal SIGSEGV "
                     r"while running task 1 \(__main__\.crash_in_task_fn\)$", r.stdout, re.M), \
        r.stdout
    assert "AFTER 6" in r.stdout
    assert "Fatal Python error: Segmentation fault" in r.stderr, r.stderr
    assert re.search(r'File ".*script_main\.py", line \d+ in crash_in_task_fn', r.stderr), \
        r.stderr
    assert re.search(r'File ".*ctypes.*", line \d+ in string_at', r.stderr), r.stderr
    # the worker's traceback of a __main__ function (sent by value) names its
    # file and line too, whatever cloudpickle names its code objects
    line = FAULT_SCRIPT.split("\n").index('    raise KeyError("from the task")') + 1
    assert re.search(rf'File ".*script_main\.py", line {line}, in raise_in_task_fn', r.stdout), \
        r.stdout


# --------------------------------------------------------------------------
# retries=
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_executor_wide_retries(tmp_path):
    d = str(tmp_path)
    with pool(max_workers=2, retries=2) as ex:
        # dies twice, then succeeds on its third run
        assert ex.submit(die_first, d, "twice", 2, "ok").result(timeout=30) == ("ok", 3)
        # dies every time: 1 run + 2 retries, then the Future fails
        f = ex.submit(die_first, d, "always", 99)
        with pytest.raises(TerminatedWorkerError) as info:
            f.result(timeout=30)
        assert runs(d, "always") == 3
        assert "SIGKILL" in str(info.value) and "(attempt 3)" in str(info.value)
        # tasks that do not die run once
        assert ex.submit(die_first, d, "never", 0, 1).result(timeout=20) == (1, 1)
        # with_options(retries=0) overrides the executor's value
        with pytest.raises(TerminatedWorkerError):
            ex.with_options(retries=0).submit(die_first, d, "no-retry", 99).result(timeout=30)
        assert runs(d, "no-retry") == 1
        assert ex.submit(square, 7).result(timeout=20) == 49


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_per_task_retries(tmp_path, mode):
    d = str(tmp_path)
    with pool(max_workers=2, mode=mode) as ex:  # retries=0 by default
        with pytest.raises(TerminatedWorkerError):
            ex.submit(die_first, d, "default", 1).result(timeout=30)
        assert runs(d, "default") == 1
        opts = ex.with_options(retries=3)
        assert opts.submit(die_first, d, "r3", 3, "x").result(timeout=30) == ("x", 4)
        with pytest.raises(TerminatedWorkerError):
            ex.with_options(retries=1).submit(die_first, d, "r1", 99).result(timeout=30)
        assert runs(d, "r1") == 2
        if mode == Mode.TARGETED:
            got = opts.submit_to(1, die_first, d, "to1", 1, "y").result(timeout=30)
            assert got == ("y", 2)
        # map with options: every item dies once and then succeeds
        out = list(ex.with_options(retries=1).map(die_first, [d] * 6,
                                                  [f"m{i}" for i in range(6)], [1] * 6,
                                                  range(6)))
        assert out == [(i, 2) for i in range(6)]
        # the last death's notice can beat the replacement worker's start
        assert wait_until(lambda: ex.stats().workers == 2, 10)


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_100k_tasks_through_map_with_buffersize_in_order():
    n = 100_000
    with pool(max_workers=2) as ex:
        subdir = producer_subdir(ex)
        task_key, reply_key = ex.key, ex.reply_key
        it = ex.map(identity, range(n), buffersize=1000)
        for expected, got in enumerate(it):
            if got != expected:
                raise AssertionError(f"item {expected}: got {got}")
            if expected % 20_000 == 0:
                # never more than buffersize tasks in flight
                assert len(ex._state.dispatch.pending) <= 1000
        assert expected == n - 1
        assert ex.stats().completed == n
    # nothing of it remains
    assert ipcinfo.queue_info(task_key) is None and ipcinfo.queue_info(reply_key) is None
    assert not any(os.path.exists(os.path.join(root, subdir)) for root in spill.spill_roots())


PRODUCER = """
import json, os, sys, time
from mqexecutor import MQExecutor

key, me, n, go, log = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]


def tag(producer, i, log):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, b"%d:%d\\n" % (producer, i))
    os.close(fd)
    return (producer, i)


ex = MQExecutor.attach(key)
print("ATTACHED", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
futures = [ex.submit(tag, me, i, log) for i in range(n)]
results = [f.result(timeout=100) for f in futures]
ex.shutdown()
print("RESULTS", json.dumps(results), flush=True)
"""


@pytest.mark.timeout(150)
def test_16_producer_processes_on_one_pool(tmp_path):
    """16 processes attach to one pool (MQExecutor(key) here) and submit 500
    tasks each at once: each gets exactly its own results, in order, and every
    task ran exactly once (a log line per run)."""
    key = unused_key()
    nproc, n = 16, 500
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    go, log = str(tmp_path / "go"), str(tmp_path / "runs.log")
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = []
    try:
        with pool(key, max_workers=2) as ex:
            for me in range(nproc):
                procs.append(subprocess.Popen(
                    [sys.executable, str(script), str(key), str(me), str(n), go, log],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
            for p in procs:
                assert p.stdout.readline().strip() == "ATTACHED", p.stderr.read()
            with open(go, "w"):
                pass
            for me, p in enumerate(procs):
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
                line = [x for x in out.splitlines() if x.startswith("RESULTS ")]
                assert line, out + err
                results = [tuple(r) for r in json.loads(line[0][len("RESULTS "):])]
                assert results == [(me, i) for i in range(n)], f"producer {me}"
            assert ex.stats().workers == 2
        with open(log) as f:
            lines = f.read().split()
        assert len(lines) == nproc * n, "a task ran twice or never"
        assert sorted(lines) == sorted(f"{me}:{i}" for me in range(nproc) for i in range(n))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        persistence.remove_queue(key)


# --------------------------------------------------------------------------
# Leftovers of crashed executors
# --------------------------------------------------------------------------

CRASHING_OWNER = """
import json, os, sys, time
import mqexecutor
from mqexecutor import MQExecutor
from tests.helpers import gated

ex = MQExecutor(max_workers=2)
subdir = mqexecutor.spill.producer_subdir(os.getpid(), ex.token)
gate, started = sys.argv[1], sys.argv[2]
busy = [ex.submit(gated, gate, started, i) for i in range(2)]
# spilled tasks waiting in the kernel queue: their spill files are on disk
waiting = [ex.submit(len, bytes(20_000)) for _ in range(3)]
print("STATE", json.dumps({"pid": os.getpid(), "task_key": ex.key,
                           "reply_key": ex.reply_key, "manager": ex._state.manager.pid,
                           "subdir": subdir, "workers": sorted(ex._processes)}),
      flush=True)
time.sleep(300)
"""


def kill_the_tree(state) -> None:
    """SIGKILL the owner, its manager and its workers at once."""
    kill_tree_groups(state["pid"])

# A stand-in for init: a child subreaper that starts the owner in its own
# session and reaps every orphan once `reap` exists ("-": at once). On this
# machine PID 1 never reaps orphans, so without it killed workers stay zombies.
REAPER = """
import ctypes, os, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
reap = sys.argv[1]
owner = subprocess.Popen([sys.executable] + sys.argv[2:], start_new_session=True)
end = time.monotonic() + 120
while time.monotonic() < end:
    if reap == "-" or os.path.exists(reap):
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break  # every child and orphan reaped
        if pid:
            continue
    time.sleep(0.01)
"""


def start_crashing_owner(tmp_path, gate: Gate, reap: str):
    (tmp_path / "owner.py").write_text(CRASHING_OWNER)
    (tmp_path / "reaper.py").write_text(REAPER)
    reaper = subprocess.Popen(
        [sys.executable, str(tmp_path / "reaper.py"), reap, str(tmp_path / "owner.py"),
         gate.path, gate.started_dir],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=REPO))
    line = reaper.stdout.readline()
    if not line.startswith("STATE "):
        reaper.kill()
        raise AssertionError(line + reaper.communicate()[1])
    state = json.loads(line[6:])
    gate.wait_started(2)
    assert len([f for f in spill.list_files(state["subdir"]) if f.endswith(".spill")]) == 3
    return reaper, state


def process_state(pid: int) -> str:
    """'R', 'S', 'Z'... from /proc, or '' once the process is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def stop_crashing_owner(reaper, state, gate: Gate, reap: str) -> None:
    gate.open()
    if reap != "-":
        with open(reap, "a"):
            pass
    if state is not None and process_state(state["pid"]) not in ("", "Z"):
        kill_the_tree(state)
    try:
        reaper.wait(30)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()
    if state is not None:
        persistence.collect_garbage()
        for k in (state["task_key"], state["reply_key"]):  # whatever gc could not
            if ipcinfo.queue_info(k) is not None:
                persistence.remove_queue(k)
        spill.remove_subdir(state["subdir"])


@pytest.mark.timeout(60)
def test_gc_reclaims_a_sigkilled_private_executor(tmp_path):
    """A private executor, its manager and its workers all SIGKILLed at once:
    nobody cleans up, so its task queue, reply queue and spill directory (with
    the spill files of queued tasks) stay until ``mqexecutor gc`` removes them."""
    gate, state = Gate(tmp_path), None
    reaper, state = start_crashing_owner(tmp_path, gate, "-")
    try:
        kill_the_tree(state)
        procs = [state["pid"], state["manager"]] + state["workers"]
        assert wait_until(lambda: not any(process_state(p) for p in procs), 10), \
            [process_state(p) for p in procs]
        keys = (state["task_key"], state["reply_key"])
        still = [k for k in keys if ipcinfo.queue_info(k) is not None]
        r = subprocess.run([sys.executable, "-m", "mqexecutor", "gc"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        for k in keys:
            assert ipcinfo.queue_info(k) is None, f"queue {k:#x} not reclaimed:\n{r.stdout}"
        for root in spill.spill_roots():
            assert not os.path.exists(os.path.join(root, state["subdir"]))
        # Another process's collect_garbage() may have been quicker than ours;
        # what ours found, it names.
        if still and f"dead pid {state['pid']}" in r.stdout:
            for k in still:
                assert f"queue 0x{k & 0xFFFFFFFF:08x}" in r.stdout, r.stdout
    finally:
        stop_crashing_owner(reaper, state, gate, "-")


@pytest.mark.timeout(60)
def test_gc_reclaims_queues_of_killed_workers_not_yet_reaped(tmp_path):
    gate, state, reap = Gate(tmp_path), None, str(tmp_path / "reap")
    reaper, state = start_crashing_owner(tmp_path, gate, reap)
    try:
        kill_the_tree(state)
        # The owner stays a zombie (the reaper waits), its manager and workers
        # too, unless their parent reaped them in the microseconds before its
        # own SIGKILL: a worker by its manager (seen once on 3.13), the manager
        # by its owner's monitor when the manager's group was killed first
        # (seen once in 25 runs on 3.11).
        assert wait_until(lambda: process_state(state["pid"]) == "Z"
                          and all(process_state(p) in ("Z", "")
                                  for p in [state["manager"]] + state["workers"]), 10), \
            {p: process_state(p) for p in [state["pid"], state["manager"]] + state["workers"]}
        persistence.collect_garbage()
        for k in (state["task_key"], state["reply_key"]):
            assert ipcinfo.queue_info(k) is None, f"queue {k:#x} not reclaimed"
    finally:
        stop_crashing_owner(reaper, state, gate, reap)


LS_IN_OWN_NAMESPACE = """
import sysv_ipc
from mqexecutor import cli, ipcinfo
sysv_ipc.MessageQueue(sysv_ipc.IPC_PRIVATE, sysv_ipc.IPC_CREAT)  # one IPC_PRIVATE queue
before = len(ipcinfo.list_queues())
for _ in range(3):
    cli.main(["ls", "--all"])
print("QUEUES", before, len(ipcinfo.list_queues()))
"""


def _can_unshare_ipc() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--ipc", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.skipif(not _can_unshare_ipc(), reason="needs unshare --ipc (root)")
def test_ls_all_creates_no_queue(tmp_path):
    """`mqexecutor ls --all` used to open every listed queue by key; for an
    IPC_PRIVATE queue (key 0) that creates a new queue, doubling them at each
    run (fixed in e2d2a01). Run in a new IPC namespace (unshare --ipc), so any
    queue it made would vanish with it."""
    script = tmp_path / "ls.py"
    script.write_text(LS_IN_OWN_NAMESPACE)
    r = subprocess.run(["unshare", "--ipc", sys.executable, str(script)], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    before, after = map(int, r.stdout.split("QUEUES")[1].split())
    assert after == before, f"`mqexecutor ls --all` x3 made {after - before} queue(s)"


FULL_REPLY_QUEUE = """
import pickle, subprocess, sys
import sysv_ipc
from mqexecutor import MQExecutor, persistence
from mqexecutor.protocol import Kind, build, task_body
from mqexecutor.worker.replies import Replier
from tests.helpers import square

# This process has one thread: the manager process is forked from it, and the
# workers it forks see this.
Replier.FULL_PATIENCE = 0.5
key = int(sys.argv[1])
full = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
try:
    while True:  # fill the reply queue
        try:
            full.send(b"x" * 1024, block=False)
        except sysv_ipc.BusyError:
            break
    with MQExecutor(key, max_workers=1) as ex:
        assert ex._state.manager.method == "fork"
        body = task_body("builtins.abs", pickle.dumps((abs, (-3,), {}), protocol=5))
        sysv_ipc.MessageQueue(key).send(
            build(Kind.TASK, 0, 0, 1, 0x5EED, full.key, sleeper.pid, -1, body), type=1)
        print("RESULT", ex.submit(square, 4).result(timeout=20))
finally:
    sleeper.kill()
    sleeper.wait()
    full.remove()
    persistence.remove_queue(key)
"""


@pytest.mark.timeout(60)
def test_full_reply_queue_of_a_producer_whose_pid_moved_on_is_given_up(tmp_path):
    """A task whose header names a live pid but a producer (pid, token) with no
    metadata, and a reply queue that stays full (nobody reads it): the pid went
    to another process. The worker gives the result up after FULL_PATIENCE
    seconds (0.5 here, set in a script whose workers inherit it) instead of
    retrying for ever, and takes the next task."""
    key = unused_key()
    proc = run_script(FULL_REPLY_QUEUE, tmp_path, str(key), env={"PYTHONPATH": REPO})
    assert proc.returncode == 0 and "RESULT 16" in proc.stdout, proc.stderr


def _sleep_then_crash(delay):
    time.sleep(delay)
    no_core()
    faulthandler._sigsegv()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["reply_queue", "task_queue"])
def test_queue_removed_by_hand_breaks_the_pool(which, monkeypatch):
    """``ipcrm`` of a running pool's reply or task queue: every pending Future
    fails with BrokenMQPool naming the queue, no thread of the pool dies of it
    (a worker death reported meanwhile found the reply queue gone: its msgsnd
    fails with EINVAL), and shutdown returns."""
    from mqexecutor import BrokenMQPool
    thread_errors = []
    monkeypatch.setattr("threading.excepthook", lambda args: thread_errors.append(args))
    with pool(max_workers=2) as ex:
        running = ex.submit(time.sleep, 2)
        crashing = ex.submit(_sleep_then_crash, 0.3)
        assert wait_until(lambda: running.running() and crashing.running(), 10)
        time.sleep(0.1)  # both taken by a worker
        msqid = ex.msqid if which == "task_queue" else sysv_ipc.MessageQueue(ex.reply_key).id
        sysv_ipc.remove_message_queue(msqid)
        name = which.replace("_", " ")
        exc = running.exception(timeout=20)
        assert isinstance(exc, BrokenMQPool) and name in str(exc), repr(exc)
        exc = crashing.exception(timeout=20)
        if which == "reply_queue":  # no outcome can come back
            assert isinstance(exc, BrokenMQPool) and name in str(exc), repr(exc)
        else:  # its death may be reported before the pool breaks
            assert (isinstance(exc, TerminatedWorkerError)
                    or isinstance(exc, BrokenMQPool) and name in str(exc)), repr(exc)
        with pytest.raises(BrokenMQPool):
            ex.submit(square, 2)
    assert thread_errors == [], [(e.thread.name, e.exc_value) for e in thread_errors]


# --------------------------------------------------------------------------
# A task taken by a worker that died before it wrote its slot
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
@pytest.mark.parametrize("retries", [0, 1])
def test_a_task_taken_by_a_worker_killed_before_it_said_so_is_not_left_waiting(
        tmp_path, mode, retries):
    """A worker killed between the msgrcv that takes a task and the write of
    its scoreboard slot takes the message with it, and the manager reports no
    task. Here the test takes the message from the pool's real queue itself,
    as such a worker does, and SIGKILLs an idle (stopped) worker: the owner
    finds the task neither queued nor running and sends it again when it kept
    its message (retries=1), else fails it, at once rather than never."""
    gate = Gate(tmp_path)
    with pool(max_workers=2, mode=mode, retries=retries, batch_size=1) as ex:
        pids = {p.worker_id: pid for pid, p in ex._processes.items()}
        os.kill(pids[1], signal.SIGSTOP)  # worker 1 takes nothing now
        try:
            if mode == Mode.TARGETED:
                blocker = ex.submit_to(0, gated, gate.path, gate.started_dir, "b")
            else:
                blocker = ex.submit(gated, gate.path, gate.started_dir, "b")
            gate.wait_started(1)
            f = (ex.submit_to(1, square, 7) if mode == Mode.TARGETED
                 else ex.submit(square, 7))
            assert f.running()  # in the kernel queue
            queue = sysv_ipc.MessageQueue(ex.key)
            mtype = targeted_mtype(1) if mode == Mode.TARGETED else PREEMPTIVE_MTYPE
            stolen = []

            def steal():
                try:
                    stolen.append(queue.receive(block=False, type=mtype)[0])
                except sysv_ipc.BusyError:
                    return False
                return True
            assert wait_until(steal, 10)
            assert unpack_header(stolen[0]).task_id == f.task_id
            os.kill(pids[1], signal.SIGKILL)  # died "after taking it"
            if retries:
                assert f.result(timeout=20) == 49  # sent again: it never started
            else:
                with pytest.raises(TerminatedWorkerError, match="was lost") as info:
                    f.result(timeout=20)
                assert info.value.task_id == f.task_id and info.value.pid == pids[1]
        finally:
            gate.open()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[1], signal.SIGCONT)
        assert blocker.result(timeout=20)[0] == 0
        assert ex.submit(square, 3).result(timeout=20) == 9
        assert ex.stats().recycles["died"] == 1


def test_a_lost_notice_about_an_earlier_send_is_ignored(tmp_path):
    """A LOST notice carries how many times its task had been sent when it
    was found lost; the collector ignores one about an earlier send (two
    searches after two deaths, or a task sent again since). Here a notice
    about send 0 of a task running in its first send arrives on the pool's
    real reply queue: the task finishes as if nothing came."""
    gate = Gate(tmp_path)
    with pool(max_workers=1, batch_size=1) as ex:
        f = ex.submit(gated, gate.path, gate.started_dir, "t")
        try:
            gate.wait_started(1)
            stale = build(Kind.RESULT, 0, Status.WORKER_DIED, f.task_id, ex.token, 0, 1, 0,
                          death_body(0, 1, -9, f.task_id, DeathCause.LOST, 0))
            sysv_ipc.MessageQueue(ex.reply_key).send(stale, type=RESULT_MTYPE)
            time.sleep(0.3)  # the collector has read it
            assert not f.done()
        finally:
            gate.open()
        assert f.result(timeout=20)[0] == 0
