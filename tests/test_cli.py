"""The ``mqexecutor`` command: serve, ls, stat, purge, rm, gc; keys; errors.

Every command runs as a real child process: ``python -m mqexecutor`` with
``sys.executable``, and the ``mqexecutor`` console script installed next to it.
Queues use random explicit keys and are removed at the end of each test
(``mqexecutor.persistence.remove_queue``) whatever the outcome. The test
infrastructure (Lab, Proc, the ``qh`` task module) is shared with
tests/test_persistence.py.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import sysv_ipc

from mqexecutor import MQExecutor, Mode, TaskTimeoutError, ipcinfo, persistence, spill
from mqexecutor.limits import msgmnb

from .test_persistence import (  # noqa: F401
    Lab,
    lines_of,
    producer_meta,
    qh,
    qh_dir,
    qnum,
    queue_exists,
    stop_executor,
    subdir_exists,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "mqexecutor")


@pytest.fixture
def lab(tmp_path, qh_dir, qh):  # noqa: F811 - qh_dir/qh are fixtures
    lab = Lab(tmp_path, qh_dir)
    try:
        yield lab
    finally:
        lab.close()


def cli(*args: str, script: bool = False, timeout: float = 60,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mqexecutor ARGS`` (or the console script) to completion."""
    cmd = [CONSOLE_SCRIPT] if script else [sys.executable, "-m", "mqexecutor"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_error_line(r: subprocess.CompletedProcess, code: int) -> str:
    """Check the command failed with ``code`` and one line on stderr; return it."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mqexecutor: error: "), lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def h(key: int) -> str:
    return f"0x{key & 0xFFFFFFFF:08x}"


def ls_row(out: str, key: int) -> dict[str, str]:
    lines = out.splitlines()
    header = lines[0].split()
    assert header == ["KEY", "MSQID", "PERMS", "MESSAGES", "BYTES", "CAPACITY", "LSPID",
                      "LRPID", "ROLE", "MODE"], lines[0]
    rows = [dict(zip(header, line.split())) for line in lines[1:]]
    found = [r for r in rows if r["KEY"] == h(key)]
    assert len(found) == 1, out
    return found[0]


def stat_fields(out: str) -> dict[str, str]:
    fields = {}
    for line in out.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def busy_pool(lab: Lab, qh, key: int, *, workers: int = 1, mode: int = 3) -> tuple:
    """MQExecutor(key) in this process whose workers are all blocked on a gate."""
    gate = lab.gate(f"gate-{key:x}")
    ex = lab.track(MQExecutor(key, workers, mode=mode))
    if mode == Mode.TARGETED:
        blockers = [ex.submit_to(w, qh.gate, gate, w) for w in range(workers)]
    else:
        blockers = [ex.submit(qh.gate, gate, w) for w in range(workers)]
    assert wait_until(lambda: qnum(key) == 0, 10)
    time.sleep(0.05)
    return ex, gate, blockers


def open_gate(path: str) -> None:
    with open(path, "a"):
        pass


def foreign_queue(lab: Lab) -> int:
    """A queue that is not mqexecutor's: one message b'hello', no metadata."""
    key = lab.key()
    q = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
    q.send(b"hello", type=1)
    return key


# --------------------------------------------------------------------------
# the command itself
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
def test_help_lists_every_command(script):
    if script:
        assert os.access(CONSOLE_SCRIPT, os.X_OK), "console script not installed"
    r = cli("--help", script=script)
    assert r.returncode == 0, r.stderr
    for command in ("serve", "ls", "stat", "purge", "rm", "gc"):
        assert command in r.stdout
    r = cli("serve", "--help", script=script)
    assert r.returncode == 0
    for option in ("--workers", "--mode", "--max-tasks-per-child"):
        assert option in r.stdout


@pytest.mark.timeout(60)
def test_no_command_is_usage_error():
    r = cli()
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].startswith("mqexecutor: error:")


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_closed_stdout_is_not_a_traceback(lab):
    """``mqexecutor ls --all | head -1``: the reader goes away; the command must
    not print a Python traceback (BrokenPipeError) on stderr."""
    keys = [foreign_queue(lab) for _ in range(3)]
    assert all(queue_exists(k) for k in keys)
    p = subprocess.Popen([sys.executable, "-m", "mqexecutor", "ls", "--all"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    p.wait(30)
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["stat", "purge", "rm"])
@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
def test_no_such_queue_is_one_line_and_exit_1(lab, command, script):
    key = lab.key()
    for spelled in (str(key), hex(key)):
        r = cli(command, spelled, script=script)
        line = one_error_line(r, 1)
        assert h(key) in line and "no message queue" in line
        assert r.stdout == ""
    assert not queue_exists(key)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["zz", "0", "0x1ffffffff", "12abc"])
def test_bad_key_is_usage_error(bad):
    r = cli("stat", bad)
    assert r.returncode == 2, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("mqexecutor stat: error: argument KEY"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(60)
def test_foreign_queue_needs_force(lab):
    """A queue holding a message that is not mqexecutor's (b'hello'): purge and
    rm refuse without --force (exit 4, one line) and leave it untouched."""
    key = foreign_queue(lab)
    for command in ("purge", "rm"):
        line = one_error_line(cli(command, hex(key)), 4)
        assert "not one of mqexecutor's" in line and "--force" in line
        assert qnum(key) == 1
    st = cli("stat", key)
    assert st.returncode == 0, st.stderr
    fields = stat_fields(st.stdout)
    assert fields["messages"] == "1"
    assert fields["other messages"].startswith("1")
    assert "pool" not in fields
    assert h(key) not in cli("ls").stdout.split()
    row = ls_row(cli("ls", "--all").stdout, key)
    assert row["MESSAGES"] == "1" and row["BYTES"] == "5" and row["ROLE"] == "-"
    r = cli("purge", "--force", hex(key))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"purged 1 message(s) and 0 spill file(s) from {h(key)}"
    assert qnum(key) == 0
    r = cli("rm", "--force", str(key))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"removed queue {h(key)} (msqid ")
    assert not queue_exists(key)


@pytest.mark.timeout(60)
def test_empty_foreign_queue_is_not_ours_either(lab):
    key = lab.key()
    sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
    one_error_line(cli("rm", hex(key)), 4)
    assert queue_exists(key)


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() == 0, reason="root is never denied access to a queue")
def test_permission_denied_is_one_line_and_exit_3(lab):
    key = lab.key()
    q = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
    try:
        q.send(b"MQ-looking? no")
        q.mode = 0o000
        for command in ("stat", "purge", "rm"):
            line = one_error_line(cli(command, hex(key)), 3)
            assert "permission denied" in line.lower()
    finally:
        q.mode = 0o600


# --------------------------------------------------------------------------
# ls and stat
# --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_ls_lists_pool_and_reply_queues(lab, qh):
    key = lab.key()
    ex, gate, _ = busy_pool(lab, qh, key, workers=1)
    futures = [ex.submit(qh.tag, "ls", i) for i in range(3)]
    info = ipcinfo.queue_info(key)
    r = cli("ls")
    assert r.returncode == 0, r.stderr
    row = ls_row(r.stdout, key)
    assert row == {"KEY": h(key), "MSQID": str(ex.msqid), "PERMS": "600",
                   "MESSAGES": "3", "BYTES": str(info.cbytes),
                   "CAPACITY": str(msgmnb()), "LSPID": str(info.lspid),
                   "LRPID": str(info.lrpid), "ROLE": "pool", "MODE": "preemptive"}
    reply = ls_row(r.stdout, ex.reply_key)
    assert reply["ROLE"] == "reply" and reply["MODE"] == "-"
    # The console script prints the same table.
    assert ls_row(cli("ls", script=True).stdout, key)["MSQID"] == str(ex.msqid)
    assert ls_row(cli("ls", "-a").stdout, key)["ROLE"] == "pool"
    open_gate(gate)
    assert [f.result(timeout=20)[1] for f in futures] == [0, 1, 2]


@pytest.mark.timeout(60)
def test_stat_targeted_shows_tasks_per_worker_and_spill_files(lab, qh):
    key = lab.key()
    ex, gate, _ = busy_pool(lab, qh, key, workers=3, mode=Mode.TARGETED)
    futures = [ex.submit_to(0, qh.tag, "s", i) for i in range(3)]
    futures += [ex.submit_to(2, qh.gate, gate, b"x" * 20000)]  # spilled: > msgmax
    futures += [ex.submit_to(2, qh.getpid)]
    assert wait_until(lambda: qnum(key) == 5, 5)
    info = ipcinfo.queue_info(key)
    for spelled in (hex(key), str(key), hex(key).upper().replace("0X", "0x")):
        r = cli("stat", spelled)
        assert r.returncode == 0, r.stderr
        fields = stat_fields(r.stdout)
        assert fields["key"] == f"{h(key)} ({key})"
        assert fields["msqid"] == str(ex.msqid)
        assert fields["permissions"].startswith("600")
        assert fields["messages"] == "5"
        assert fields["bytes"] == str(info.cbytes)
        assert fields["capacity"] == f"{msgmnb()} bytes (msg_qbytes)"
        assert fields["last sender"] == f"pid {os.getpid()}"
        assert fields["pool"].startswith("targeted mode, 3 workers")
        assert f"last owner pid {os.getpid()} (alive)" in fields["pool"]
        assert fields["waiting for worker 0"] == "3"
        assert "waiting for worker 1" not in fields
        assert fields["waiting for worker 2"] == "2"
        assert fields["spill files"] == "1 referenced"
        functions = re.findall(r"^function:\s+(\S+) x(\d+)$", r.stdout, re.M)
        assert sorted(functions) == [("qh.gate", "1"), ("qh.getpid", "1"), ("qh.tag", "3")]
    open_gate(gate)
    assert [f.result(timeout=20)[1] for f in futures[:3]] == [0, 1, 2]
    assert futures[3].result(timeout=20) == b"x" * 20000


@pytest.mark.timeout(60)
def test_stat_preemptive_counts_any_worker(lab, qh):
    key = lab.key()
    ex, gate, _ = busy_pool(lab, qh, key, workers=1)
    futures = [ex.submit(qh.tag, "p", i) for i in range(4)]
    r = cli("stat", hex(key))
    assert r.returncode == 0, r.stderr
    fields = stat_fields(r.stdout)
    assert fields["waiting for any worker"] == "4"
    assert fields["pool"].startswith("preemptive mode, 1 workers")
    assert fields["spill files"] == "0 referenced"
    open_gate(gate)
    assert [f.result(timeout=20)[1] for f in futures] == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_keys_above_0x7fffffff_in_hex_and_decimal(lab, qh):
    """ipcs prints keys as unsigned hex; key_t is signed. Both spellings work."""
    unsigned = 0x80000000 + (lab.key() & 0x7FFFFFF0)
    signed = unsigned - (1 << 32)
    lab.adopt_key(signed)
    ex = lab.track(MQExecutor(unsigned, 1))
    assert ex.key == signed
    assert ex.submit(qh.tag, "neg", 1).result(timeout=20)[:2] == ("neg", 1)
    for spelled in (hex(unsigned), str(unsigned)):
        r = cli("stat", spelled)
        assert r.returncode == 0, r.stderr
        assert stat_fields(r.stdout)["key"] == f"{h(unsigned)} ({signed})"
    assert ls_row(cli("ls").stdout, signed)["MSQID"] == str(ex.msqid)
    stop_executor(ex)
    r = cli("rm", hex(unsigned))
    assert r.returncode == 0, r.stderr
    assert not queue_exists(signed)


# --------------------------------------------------------------------------
# purge and rm
# --------------------------------------------------------------------------

def _leave_queued_tasks(lab: Lab, qh, key: int) -> list[str]:
    """Leave 3 tasks (one spilled) in the key's queue; return the spill files."""
    ex, gate, _ = busy_pool(lab, qh, key, workers=1)
    ex.submit(qh.tag, "left", 0)
    ex.submit(qh.tag, "left", 1)
    ex.submit(qh.gate, gate, b"y" * 30000)  # spilled into k-<key>
    assert wait_until(lambda: qnum(key) == 3, 5)
    ex.shutdown(wait=False)
    time.sleep(0.5)  # the stop request reaches the worker before its task ends
    open_gate(gate)
    ex._executor_manager_thread.join(20)
    assert not ex._executor_manager_thread.is_alive()
    assert qnum(key) == 3
    files = [p for p in spill.list_files(spill.key_subdir(key))
             if os.path.basename(p) != persistence.META]
    assert len(files) == 1, files
    return files


@pytest.mark.timeout(60)
def test_purge_drops_tasks_and_spill_files_keeps_queue(lab, qh):
    key = lab.key()
    files = _leave_queued_tasks(lab, qh, key)
    msqid = ipcinfo.queue_info(key).msqid
    r = cli("purge", str(key))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"purged 3 message(s) and 1 spill file(s) from {h(key)}"
    info = ipcinfo.queue_info(key)
    assert info is not None and info.msqid == msqid and info.qnum == 0
    assert not any(os.path.exists(p) for p in files)
    assert persistence.read_meta(spill.key_subdir(key)) is not None
    # purging an empty queue of ours is fine
    r = cli("purge", hex(key))
    assert r.returncode == 0 and r.stdout.startswith("purged 0 message(s)")


@pytest.mark.timeout(90)
def test_purge_counts_only_its_own_spill_files_while_others_work(lab, qh):
    """purge reports the spill files of the purged tasks, not files that other
    producers create and consume meanwhile in the same spill root."""
    import threading
    key = lab.key()
    ex, gate, _ = busy_pool(lab, qh, key, workers=1)
    n = 20
    for i in range(n):
        ex.submit(qh.gate, gate, bytes([i]) * 20000)  # each one spilled
    assert wait_until(lambda: qnum(key) == n, 10)
    ex.shutdown(wait=False)
    time.sleep(0.5)
    open_gate(gate)
    ex._executor_manager_thread.join(20)
    assert qnum(key) == n
    # Another "producer" of this process churns spill files in its own directory.
    other = f"p-{os.getpid()}-00000000c0ffee00"
    directory = spill.ensure_subdir(0, other)
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            path = os.path.join(directory, f"churn-{i % 8}.spill")
            with open(path, "wb") as f:
                f.write(b"x")
            os.unlink(path)
            i += 1

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        r = cli("purge", hex(key))
    finally:
        stop.set()
        t.join(10)
        spill.remove_subdir(other)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"purged {n} message(s) and {n} spill file(s) from {h(key)}"


@pytest.mark.timeout(60)
def test_rm_removes_queue_tasks_spill_files_and_metadata(lab, qh):
    key = lab.key()
    files = _leave_queued_tasks(lab, qh, key)
    msqid = ipcinfo.queue_info(key).msqid
    r = cli("rm", hex(key), script=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"removed queue {h(key)} (msqid {msqid}) with 3 message(s) "
                                "and 1 spill file(s)")
    assert not queue_exists(key)
    assert not any(os.path.exists(p) for p in files)
    assert not subdir_exists(spill.key_subdir(key))
    one_error_line(cli("rm", hex(key)), 1)


# --------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_serve_sigterm_finishes_running_keeps_queued_and_restart_runs_them(lab, qh):
    """SIGTERM: running tasks complete, queued ones stay in the queue (qnum > 0);
    a new serve on the key runs the leftovers, each exactly once, and the
    attached producer (still alive) gets every result."""
    key = lab.key()
    record = lab.dir("record")
    server = lab.serve(key, workers=2, mode=3)
    producer = lab.track(MQExecutor.attach(key))
    futures = [producer.submit(qh.mark, record, i, 1.0) for i in range(8)]
    assert wait_until(lambda: len(os.listdir(record)) == 2, 20)
    running = set(os.listdir(record))
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.transcript()
    assert any("stopping" in line for line in server.out)
    assert server.out[-1] == "mqexecutor: stopped; 6 task(s) left in the queue", \
        server.transcript()
    assert qnum(key) == 6
    assert set(os.listdir(record)) == running, "a task started after the stop request"
    assert wait_until(lambda: sum(f.done() for f in futures) >= 2, 10)
    done = [f for f in futures if f.done()]
    assert sorted(str(f.result()) for f in done) == sorted(running), \
        "the running tasks did not complete"
    assert all(not f.done() for f in futures if f not in done)

    server2 = lab.serve(key, workers=3, mode=3)
    # The producer lives: its tasks are not adopted, they run for it.
    assert "0 inherited task(s)" in server2.out[0]
    assert sorted(f.result(timeout=30) for f in futures) == list(range(8))
    assert lines_of(record) == {str(i): 1 for i in range(8)}
    assert qnum(key) == 0
    stop_executor(producer)
    server2.signal(signal.SIGTERM)
    assert server2.wait(30) == 0, server2.transcript()
    assert server2.out[-1] == "mqexecutor: stopped; 0 task(s) left in the queue"
    assert not any("Traceback" in line for line in server.err + server2.err)


@pytest.mark.timeout(90)
def test_serve_sigint_and_max_tasks_per_child(lab, qh):
    key = lab.key()
    server = lab.serve(key, 1, 3, "--max-tasks-per-child", "2")
    producer = lab.track(MQExecutor.attach(key))
    pids = [producer.submit(qh.getpid).result(timeout=20) for _ in range(6)]
    assert len(set(pids)) == 3, pids  # a fresh worker every 2 tasks
    stop_executor(producer)
    server.signal(signal.SIGINT)
    assert server.wait(30) == 0, server.transcript()
    assert server.out[-1] == "mqexecutor: stopped; 0 task(s) left in the queue"
    assert queue_exists(key), "serve must keep the queue"


@pytest.mark.timeout(90)
def test_serve_task_timeout_and_memory_cap(lab, qh, tmp_path):
    """``serve --task-timeout`` limits every task (an attached producer sees
    TaskTimeoutError, the task is stopped); ``--max-memory-per-child`` is
    taken in MiB."""
    key = lab.key()
    server = lab.serve(key, 1, 3, "--task-timeout", "0.5", "--max-memory-per-child", "512")
    producer = lab.track(MQExecutor.attach(key))
    slow = producer.submit(qh.mark, str(tmp_path), "slow", 10)
    with pytest.raises(TaskTimeoutError) as info:
        slow.result(timeout=20)
    assert info.value.limit == 0.5 and "time limit of 0.5 s" in str(info.value)
    assert (tmp_path / "slow").read_text() == "run\n"  # ran once, stopped
    assert producer.submit(qh.tag, "p", 1).result(timeout=20)[:2] == ("p", 1)
    stop_executor(producer)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.transcript()
    r = cli("serve", hex(key), "--task-timeout", "-1")
    assert "task_timeout" in one_error_line(r, 2)


PRODUCER_LEAVES = """
    import sys
    import qh
    from mqexecutor import MQExecutor
    key = int(sys.argv[1])
    ex = MQExecutor.attach(key)
    futures = [ex.submit(qh.tag, "dead", i, 0.5) for i in range(6)]
    print("IDS", *[f.task_id for f in futures], flush=True)
    futures[0].result(timeout=60)
    print("STARTED", flush=True)
    import time
    time.sleep(300)
"""


@pytest.mark.timeout(90)
def test_serve_adopts_and_reports_tasks_of_a_dead_producer(lab):
    key = lab.key()
    server = lab.serve(key, workers=1, mode=3)
    producer = lab.script("producer_leaves.py", PRODUCER_LEAVES, key)
    ids = [int(x) for x in producer.expect("IDS").split()[1:]]
    producer.expect("STARTED", timeout=30)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.transcript()
    left = qnum(key)
    assert 0 < left < 6
    found = producer_meta(producer.pid)
    producer.p.send_signal(signal.SIGKILL)
    producer.p.wait(10)

    server2 = lab.serve(key, workers=2, mode=3)
    assert f"; {left} inherited task(s)" in server2.out[0], server2.out[0]
    reports = [server2.expect("mqexecutor: inherited task", timeout=30) for _ in range(left)]
    pattern = re.compile(rf"mqexecutor: inherited task (\d+) of pid {producer.pid} "
                         r"\(qh\.tag\): ok$")
    reported = []
    for line in reports:
        m = pattern.match(line)
        assert m, line
        reported.append(int(m.group(1)))
    assert sorted(reported) == ids[-left:]
    assert wait_until(lambda: qnum(key) == 0, 10)
    server2.signal(signal.SIGTERM)
    assert server2.wait(30) == 0, server2.transcript()
    # Nothing of the dead attached producer survives a gc.
    persistence.collect_garbage()
    if found is not None:
        subdir, meta = found
        assert not queue_exists(meta.reply_key)
        assert not subdir_exists(subdir)


@pytest.mark.timeout(60)
def test_serve_usage_errors(lab, qh):
    key = lab.key()
    line = one_error_line(cli("serve", hex(key), "--workers", "0"), 2)
    assert "--workers" in line
    r = cli("serve", hex(key), "--mode", "4")
    assert r.returncode == 2 and "invalid choice" in r.stderr.splitlines()[-1]
    assert not queue_exists(key), "a refused serve created the queue"
    # A queue holding tasks of the other mode: one line, exit 2, queue untouched.
    ex, gate, _ = busy_pool(lab, qh, key, workers=1, mode=Mode.TARGETED)
    ex.submit_to(0, qh.tag, "t", 1)
    ex.shutdown(wait=False)
    time.sleep(0.5)
    open_gate(gate)
    ex._executor_manager_thread.join(20)
    assert qnum(key) == 1
    line = one_error_line(cli("serve", hex(key), "--mode", "3"), 2)
    assert "TARGETED" in line
    assert qnum(key) == 1


# --------------------------------------------------------------------------
# gc
# --------------------------------------------------------------------------

ATTACHED_IDLE = """
    import sys, time
    from mqexecutor import MQExecutor
    ex = MQExecutor.attach(int(sys.argv[1]))
    print("ATTACHED", flush=True)
    time.sleep(300)
"""


@pytest.mark.timeout(60)
def test_gc_reclaims_reply_queue_and_spill_dir_of_dead_producer(lab):
    """An attached producer (no workers of its own to clean up after it) dies
    by SIGKILL: its reply queue and spill directory stay until ``gc``."""
    key = lab.key()
    sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600)
    persistence.write_meta(spill.key_subdir(key), persistence.QueueMeta(
        key=key, mode=3, workers=1, wire=1, owner_pid=os.getpid()))
    producer = lab.script("attached_idle.py", ATTACHED_IDLE, key)
    producer.expect("ATTACHED")
    found = producer_meta(producer.pid)
    assert found is not None
    subdir, meta = found
    assert queue_exists(meta.reply_key)
    producer.p.send_signal(signal.SIGKILL)
    producer.p.wait(10)
    r = cli("gc")
    assert r.returncode == 0, r.stderr
    assert not queue_exists(meta.reply_key)
    assert not subdir_exists(subdir)
    if f"of dead pid {producer.pid}" not in r.stdout:
        # Another process's collect_garbage() may have been quicker; then it is gone.
        assert not queue_exists(meta.reply_key)
    else:
        assert f"removed queue 0x{meta.reply_key & 0xFFFFFFFF:08x}" in r.stdout
        assert re.search(rf"removed spill directory \S+/{re.escape(subdir)}$", r.stdout, re.M)
    # The persistent key is never touched by gc.
    assert queue_exists(key)
    assert persistence.read_meta(spill.key_subdir(key)) is not None
    r = cli("gc", script=True)
    assert r.returncode == 0 and f"of dead pid {producer.pid}" not in r.stdout


@pytest.mark.timeout(60)
def test_gc_removes_stale_key_metadata_but_keeps_what_still_matters():
    """A k-<key> directory whose queue is gone and that holds only an old
    meta.json is stale: gc removes it. One that still holds a durable spool
    record is kept (the next executor on the key recovers from it), and so is a
    fresh meta.json (an owner writes it just after creating its queue, which a
    concurrent gc may not have seen)."""
    from mqexecutor import spill as spill_mod
    from mqexecutor.persistence import QueueMeta, write_meta
    from tests.helpers import unused_key
    stale, kept, fresh = unused_key(), unused_key(), unused_key()
    for key in (stale, kept, fresh):
        write_meta(spill_mod.key_subdir(key), QueueMeta(key=key, mode=3, workers=1, wire=1,
                                                        owner_pid=1))
    hour_ago = time.time() - 3600
    for key in (stale, kept):
        meta = os.path.join(spill_mod.root_dir(0), spill_mod.key_subdir(key), "meta.json")
        os.utime(meta, (hour_ago, hour_ago))
    kept_dir = os.path.join(spill_mod.root_dir(0), spill_mod.key_subdir(kept))
    fresh_dir = os.path.join(spill_mod.root_dir(0), spill_mod.key_subdir(fresh))
    os.makedirs(os.path.join(kept_dir, "spool"))
    try:
        r = subprocess.run([sys.executable, "-m", "mqexecutor", "gc"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert spill_mod.key_subdir(stale) in r.stdout
        assert not os.path.exists(os.path.join(spill_mod.root_dir(0),
                                               spill_mod.key_subdir(stale)))
        assert os.path.exists(os.path.join(kept_dir, "meta.json"))
        assert os.path.exists(os.path.join(fresh_dir, "meta.json"))
    finally:
        for key in (stale, kept, fresh):
            spill_mod.remove_subdir(spill_mod.key_subdir(key))
