"""Durable mode: nothing is lost when the whole process tree is SIGKILLed.

``MQExecutor(key, durable=True)`` writes each task to a spool file before it
enters the kernel queue (or the in-process backlog, when the queue is full) and
removes the file once the outcome is delivered. After ``os.killpg(SIGKILL)`` of
the executor and its workers at any moment, the next executor on the key runs
again every task that had not completed -- queued, running, or still waiting in
the dead process -- and returns their Futures from ``recovered()``. Delivery is
at least once: duplicates are allowed, losses are not.

The killed trees run under a small "reaper" parent (a child subreaper that
reaps orphans at once, as a real init does): on this machine PID 1 never reaps
orphaned workers, and their zombies would keep ``collect_garbage()`` from
reclaiming the dead producers' reply queues (see tests/test_reliability.py,
``test_gc_reclaims_queues_of_killed_workers_not_yet_reaped``).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import sysv_ipc

from mqexecutor import MQExecutor, ipcinfo, journal, persistence
from mqexecutor.protocol import unpack_header

from .helpers import (
    REPO,
    Gate,
    gated,
    kill_tree_groups,
    shutdown_or_fail,
    unused_key,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

#: Starts the script it is given in a new session (its own process group, which
#: the test kills), prints "OWNER <pid>", and reaps every child and orphan until
#: none is left, then exits.
REAPER = """
import ctypes, os, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
owner = subprocess.Popen([sys.executable] + sys.argv[1:], start_new_session=True)
print("OWNER", owner.pid, flush=True)
end = time.monotonic() + 120
while time.monotonic() < end:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if not pid:
        time.sleep(0.005)
"""

#: The task every durable test runs: append "<i>\\n" to ``log`` (O_APPEND).
TASKS = '''
import os, time


def append_id(log, i, delay=0.005):
    time.sleep(delay)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d\\n" % i)
    finally:
        os.close(fd)
    return i
'''


class Tree:
    """A script run under the reaper, in its own session."""

    def __init__(self, tmp_path, script: str, *args: str, name: str = "run"):
        reaper = tmp_path / "reaper.py"
        if not reaper.exists():
            reaper.write_text(REAPER)
        self.out = open(tmp_path / f"{name}.out", "w")
        self.err_path = tmp_path / f"{name}.err"
        self.err = open(self.err_path, "w")
        self.reaper = subprocess.Popen(
            [sys.executable, str(reaper), script, *map(str, args)],
            stdout=subprocess.PIPE, stderr=self.err, text=True,
            env=dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1"))
        line = self.reaper.stdout.readline()
        assert line.startswith("OWNER "), line + self.stderr()
        self.pid = int(line.split()[1])
        self.lines: list[str] = []

    def stderr(self) -> str:
        if not self.err.closed:
            self.err.flush()
        return self.err_path.read_text() if self.err_path.exists() else ""

    def readline(self) -> str:
        line = self.reaper.stdout.readline()
        self.lines.append(line)
        return line

    def kill(self) -> bool:
        """SIGKILL the whole tree (the script, its pool's manager and
        workers); True when it was still running."""
        killed = kill_tree_groups(self.pid)
        self.wait()
        return killed

    def wait(self, timeout: float = 30) -> int:
        try:
            rest, _ = self.reaper.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reaper.kill()
            self.reaper.communicate()
            raise AssertionError(f"the tree did not end within {timeout} s\n"
                                 + "".join(self.lines) + self.stderr()) from None
        self.lines.extend(rest.splitlines(keepends=True))
        self.out.close()
        self.err.close()
        return self.reaper.returncode


def logged(log: str) -> list[int]:
    try:
        with open(log) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def spool_len(key: int) -> int:
    return len(journal.Journal(journal.default_spool(key)))


def cleanup_key(key: int) -> None:
    persistence.collect_garbage()  # reply queues and p- directories of dead producers
    if ipcinfo.queue_info(key) is not None:
        persistence.remove_queue(key)  # also k-<key>: spool and dead letters


@pytest.fixture
def tasks_module(tmp_path, monkeypatch):
    """``dtasks``: importable here (workers forked from here) and in scripts."""
    (tmp_path / "dtasks.py").write_text(TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dtasks
    return dtasks


# --------------------------------------------------------------------------
# The spool itself
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_spool_records_each_task_until_its_outcome_is_delivered(tmp_path):
    key = unused_key()
    gate = Gate(tmp_path)
    try:
        ex = MQExecutor(key, 1, durable=True)
        try:
            assert spool_len(key) == 0
            blocker = ex.submit(gated, gate.path, gate.started_dir, "b", "blocker")
            gate.wait_started(1)
            futures = [ex.submit(divmod, i, 2 - i % 3) for i in range(300)]
            assert ex.stats().backlog > 0  # the kernel queue is full
            # every task is recorded, queued or in the backlog, with its message
            assert spool_len(key) == 301
            spool = journal.Journal(journal.default_spool(key))
            ids = set()
            for token, task_id, message in spool.entries():
                h = unpack_header(message)
                assert (h.token, h.task_id) == (token, task_id) == (ex.token,
                                                                    task_id)
                ids.add(task_id)
            assert ids == {blocker.task_id} | {f.task_id for f in futures}
            gate.open()
            assert blocker.result(timeout=20) == "blocker"
            for i, f in enumerate(futures):
                if i % 3 == 2:
                    assert isinstance(f.exception(timeout=20), ZeroDivisionError)
                else:
                    assert f.result(timeout=20) == divmod(i, 2 - i % 3)
            # forgotten once delivered, results and exceptions alike
            assert wait_until(lambda: spool_len(key) == 0, 10), spool_len(key)
        finally:
            gate.open()
            shutdown_or_fail(ex)
    finally:
        cleanup_key(key)


@pytest.mark.timeout(60)
def test_durable_needs_an_explicit_key():
    with pytest.raises(ValueError, match="explicit key"):
        MQExecutor(None, 1, durable=True)


# --------------------------------------------------------------------------
# SIGKILL of the whole tree
# --------------------------------------------------------------------------

OWNER = """
import json, os, sys, time
from mqexecutor import MQExecutor
from tests.helpers import gated
import dtasks

key, n, log, gate, started = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
ex = MQExecutor(key, 2, durable=True)
running = [ex.submit(gated, gate, started, w, ("gated", w)) for w in range(2)]
while len(os.listdir(started)) < 2:
    time.sleep(0.005)
futures = [ex.submit(dtasks.append_id, log, i, 0) for i in range(n)]
s = ex.stats()
print("STATE", json.dumps({"queued": s.queued_messages, "backlog": s.backlog,
                           "running": s.running, "ids": [f.task_id for f in futures]}),
      flush=True)
time.sleep(300)
"""


@pytest.mark.timeout(90)
def test_sigkill_of_the_tree_loses_no_task(tmp_path, tasks_module):
    """The tree is killed while 2 tasks run, some wait in the kernel queue and
    most wait in the process (the kernel queue is full): the next executor on
    the key recovers all of them, and each runs."""
    import json
    key = unused_key()
    gate = Gate(tmp_path)
    log = str(tmp_path / "log")
    n = 400
    (tmp_path / "owner.py").write_text(OWNER)
    tree = None
    try:
        tree = Tree(tmp_path, str(tmp_path / "owner.py"), key, n, log, gate.path,
                    gate.started_dir, name="owner")
        line = tree.readline()
        assert line.startswith("STATE "), line + tree.stderr()
        state = json.loads(line[6:])
        assert state["queued"] > 0 and state["backlog"] > 0, state
        assert state["backlog"] + state["queued"] >= n
        assert tree.kill()
        assert logged(log) == []  # the workers were held: nothing ran yet
        gate.open()
        ex = MQExecutor(key, 2, durable=True)
        try:
            rec = ex.recovered()
            assert len(rec) == n + 2, len(rec)
            results = [f.result(timeout=60) for f in rec]
            assert sorted(r for r in results if isinstance(r, int)) == list(range(n))
            assert sorted(r for r in results if isinstance(r, tuple)) == [("gated", 0),
                                                                          ("gated", 1)]
            assert {f.fn_name for f in rec} == {"tests.helpers.gated", "dtasks.append_id"}
            assert all(f.original_pid == tree.pid for f in rec)
            assert sorted(logged(log)) == list(range(n))  # each ran exactly once here
            assert wait_until(lambda: spool_len(key) == 0, 10)
        finally:
            shutdown_or_fail(ex)
        assert ipcinfo.queue_info(key).qnum == 0
    finally:
        gate.open()
        if tree is not None and tree.reaper.poll() is None:
            tree.kill()
        cleanup_key(key)


DRIVER = """
import os, sys
from mqexecutor import MQExecutor
import dtasks

key, n, log, progress = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]


def read_progress():
    try:
        with open(progress) as f:
            return int(f.read() or 0)
    except FileNotFoundError:
        return 0


def write_progress(k):
    with open(progress + ".tmp", "w") as f:
        f.write(str(k))
    os.replace(progress + ".tmp", progress)


ex = MQExecutor(key, 2, durable=True)
recovered = ex.recovered()
print("START", len(recovered), read_progress(), flush=True)
for f in recovered:
    f.result()
print("RECOVERED", flush=True)
futures = []
for i in range(read_progress(), n):
    futures.append(ex.submit(dtasks.append_id, log, i))
    write_progress(i + 1)
print("SUBMITTED", flush=True)
for f in futures:
    f.result()
ex.shutdown()
print("DONE", flush=True)
"""


@pytest.mark.timeout(150)
def test_chaos_kill_the_tree_20_times_then_finish(tmp_path, tasks_module):
    """A driver adopts what the last run left (waits for it), then submits the
    ids not yet submitted (its progress file is written after each submit).
    Its whole tree is SIGKILLed uniform(0.05, 0.6) s after each start, 20
    times in a row; then a last run finishes. Every id must have run at least
    once (duplicates allowed), and nothing is left in the spool or the queue.

    4000 tasks of 5 ms: enough work (10 s for 2 workers, and the 20 runs
    last 7 s on average) that every one of the 20 kills lands while tasks are
    still pending (with 2000, a quick machine ran out after 19)."""
    key = unused_key()
    queues_before = {q.msqid for q in ipcinfo.list_queues()}
    started = time.time()
    n, kills_wanted = 4000, 20
    log, progress = str(tmp_path / "log"), str(tmp_path / "progress")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    rng = random.Random()
    history = []
    tree = None
    drivers: set[int] = set()
    try:
        kills = attempts = 0
        while kills < kills_wanted:
            attempts += 1
            assert attempts <= kills_wanted + 2, f"the work ran out: {history}"
            tree = Tree(tmp_path, str(driver), key, n, log, progress, name=f"run{attempts}")
            drivers.add(tree.pid)
            delay = rng.uniform(0.05, 0.6)
            time.sleep(delay)
            killed = tree.kill()
            kills += killed
            # a run that ended by itself before the kill: why
            why = "" if killed else f"exit {tree.reaper.returncode}: {tree.stderr()[-2000:]}"
            history.append((round(delay, 3), killed,
                            [x.split()[0] for x in tree.lines if x.strip()],
                            len(logged(log)), spool_len(key), why))
            tree = None
        tree = Tree(tmp_path, str(driver), key, n, log, progress, name="final")
        assert tree.wait(90) == 0, "".join(tree.lines) + tree.stderr()
        assert "DONE\n" in tree.lines, "".join(tree.lines) + tree.stderr()
        tree = None
        ran = logged(log)
        missing = sorted(set(range(n)) - set(ran))
        assert not missing, f"lost tasks {missing[:20]}...; history {history}"
        assert set(ran) == set(range(n))
        assert spool_len(key) == 0
        assert ipcinfo.queue_info(key).qnum == 0
        # the kills landed in different phases: some before any submit, some
        # while submitting or recovering
        phases = {tuple(h[2]) for h in history if h[1]}
        assert len(phases) >= 2, history
    finally:
        if tree is not None:
            tree.kill()
        cleanup_key(key)
        _remove_orphans_of_kills(queues_before, started, drivers)


def _remove_orphans_of_kills(before: set, since: float, drivers: set[int]) -> None:
    """A driver killed inside its constructor leaves queues made during the
    test, never sent to nor received from, that only a gc would remove (their
    keys are in its meta.json). This crash test removes what it crashed: the
    queues named in the meta.json of its own drivers (pids ``drivers``) only,
    never those of another program of this user (another test run's pool whose
    reply queue has not been used yet looks the same in ``ipcs``)."""
    named = set()
    for subdir, meta in persistence.producer_metas():
        if subdir.startswith("p-") and meta.owner_pid in drivers:
            named.update({meta.key, meta.reply_key} if meta.private else {meta.reply_key})
    for q in ipcinfo.list_queues():
        if (q.key in named and q.msqid not in before and q.ctime >= int(since)
                and q.uid == os.getuid() and q.lspid == 0 and q.lrpid == 0 and q.qnum == 0):
            try:
                sysv_ipc.MessageQueue(q.key, 0).remove()
            except sysv_ipc.Error:
                pass
