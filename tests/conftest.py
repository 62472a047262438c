"""Leak checks for the whole suite: System V message queues and spill files.

* A session-scoped autouse fixture records ``ipcs -q`` (msqid and key of every
  queue) and every entry below the spill roots (``mqexecutor.spill.spill_roots()``)
  before the first test and after the last one, and FAILS the session when a
  queue or a spill file/directory of this run appeared and stayed (the roots
  themselves may exist): the error is reported at the teardown of the last
  test, ``pytest_sessionfinish`` sets the exit status to 1 and the terminal
  summary lists what leaked.
* A function-scoped autouse fixture does the same around every test, so a leak
  fails (in its teardown) the test that caused it.

Attribution. Other programs of this user may use SysV queues and the spill
roots at the same time as this run (another engineer's benchmark, a second
pytest session on the same machine). Only what this run made is counted:

* queues whose key this process created or opened through ``mqexecutor.queues``
  (a pass-through spy records the keys; it changes nothing else), or whose last
  sender/receiver (``lspid``/``lrpid`` in /proc/sysvipc/msg, thread ids) is
  this process, one of its descendants, or a descendant seen earlier in the run
  (a background thread records descendants and their threads every 0.1 s);
* spill sub-directories ``p-<pid>-<token>`` of such a pid, and ``k-<key>``
  directories of keys used by tests (``helpers.TEST_KEYS``) or recorded above;
* anything else new below the roots.

New queues and ``p-`` directories that cannot be attributed (never used, users
gone and never seen) are listed in the summary as "not counted", not failed.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time

import pytest

from mqexecutor import queues as mq_queues
from mqexecutor import spill

from . import helpers

ROOT_PID = os.getpid()

# Every Python process the tests start (scripts, managers started as fresh
# interpreters, Jupyter kernels) turns fork()'s "This process ... is
# multi-threaded" DeprecationWarning (Python 3.12+) into an error too.
_NO_FORK_FROM_THREADS = "error:This process:DeprecationWarning"
if _NO_FORK_FROM_THREADS not in os.environ.get("PYTHONWARNINGS", ""):
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), _NO_FORK_FROM_THREADS) if w)
_PRODUCER_RE = re.compile(r"p-(\d+)-")
_KEY_RE = re.compile(r"k-([0-9a-f]{8})$")
_SESSION_LEAKS: list[str] = []
_UNATTRIBUTED: dict[str, str] = {}  # what -> its description

#: pids and thread ids of this process and of every descendant seen in the run.
OUR_IDS: set[int] = {ROOT_PID}
#: keys of queues this process created or opened through mqexecutor.queues.
OUR_KEYS: set[int] = set()


# --------------------------------------------------------------------------
# recording what is ours
# --------------------------------------------------------------------------

def _ppid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _scan_descendants() -> None:
    """Record the pids and thread ids of every live descendant of this process."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for name in entries:
        if name.isdigit():
            ppid = _ppid(name)
            if ppid is not None:
                children.setdefault(ppid, []).append(int(name))
    stack = [ROOT_PID]
    while stack:
        pid = stack.pop()
        OUR_IDS.add(pid)
        try:
            OUR_IDS.update(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
        stack.extend(children.get(pid, ()))


def _scanner(stop: threading.Event) -> None:
    while not stop.wait(0.1):
        _scan_descendants()


def _spy(fn):
    def wrapper(*args, **kwargs):
        q = fn(*args, **kwargs)
        try:
            if q.key & 0xFFFFFFFF:  # never IPC_PRIVATE: key 0 names no queue
                OUR_KEYS.add(q.key & 0xFFFFFFFF)
        except Exception:  # noqa: BLE001
            pass
        return q
    wrapper.__wrapped__ = fn
    return wrapper


# --------------------------------------------------------------------------
# snapshots
# --------------------------------------------------------------------------

def ipcs_queues() -> set[tuple[int, int]]:
    """{(msqid, key)} of every message queue, parsed from ``ipcs -q``."""
    out = subprocess.run(["ipcs", "-q"], capture_output=True, text=True,
                         check=True).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("0x") and parts[1].isdigit():
            found.add((int(parts[1]), int(parts[0], 16)))
    return found


def proc_queues() -> set[tuple[int, int]]:
    """As :func:`ipcs_queues`, read from /proc/sysvipc/msg (cheaper: used
    around every test); falls back to ``ipcs -q``."""
    try:
        with open("/proc/sysvipc/msg") as f:
            next(f)
            return {(int(p[1]), int(p[0]) & 0xFFFFFFFF)
                    for p in (line.split() for line in f) if len(p) > 1}
    except (OSError, StopIteration, ValueError):
        return ipcs_queues()


def queue_details() -> dict[int, dict]:
    details = {}
    try:
        with open("/proc/sysvipc/msg") as f:
            next(f)
            for line in f:
                p = line.split()
                details[int(p[1])] = {"key": int(p[0]) & 0xFFFFFFFF, "qnum": int(p[4]),
                                      "lspid": int(p[5]), "lrpid": int(p[6])}
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return details


# --------------------------------------------------------------------------
# attribution
# --------------------------------------------------------------------------

def _tgid(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _is_ours(tid: int) -> bool:
    if tid <= 0:
        return False
    if tid in OUR_IDS:
        return True
    pid = _tgid(tid)
    for _ in range(128):  # walk up the parents
        if pid is None or pid <= 1:
            return False
        if pid in OUR_IDS:
            return True
        pid = _ppid(str(pid))
    return False


def _queue_leaks(before: set, note: bool, source=proc_queues, where: str = "") -> list[str]:
    new = {(msqid, key & 0xFFFFFFFF) for msqid, key in source()} - \
        {(msqid, key & 0xFFFFFFFF) for msqid, key in before}
    if not new:
        return []
    _scan_descendants()
    details = queue_details()
    leaks = []
    for msqid, key in sorted(new):
        d = details.get(msqid)
        if d is None:  # removed meanwhile
            continue
        text = (f"message queue msqid={msqid} key=0x{key & 0xFFFFFFFF:08x} "
                f"({d['qnum']} messages, last send by pid/tid {d['lspid']}, "
                f"last receive by {d['lrpid']})")
        if (d["key"] in OUR_KEYS or _is_ours(d["lspid"]) or _is_ours(d["lrpid"])):
            leaks.append(text)
        elif note:  # keyed by msqid: the first note (the test's, if any) stays
            _UNATTRIBUTED.setdefault(f"queue {msqid}",
                                     text + (f", new during {where}" if where else ""))
    return leaks


def _our_key(key: int) -> bool:
    key &= 0xFFFFFFFF
    return key in OUR_KEYS or key in {k & 0xFFFFFFFF for k in helpers.TEST_KEYS}


def _spill_leaks(before: set, roots: list[str], note: bool) -> list[str]:
    new = helpers.spill_entries(roots) - before
    leaks = []
    for path in sorted(new):
        top = ""
        for root in roots:
            if path.startswith(root + os.sep):
                top = path[len(root) + 1:].split(os.sep, 1)[0]
        m = _PRODUCER_RE.match(top)
        if (m and not _is_ours(int(m.group(1)))) or \
                (not m and _KEY_RE.match(top) and
                 not _our_key(int(_KEY_RE.match(top).group(1), 16))):
            if note:
                _UNATTRIBUTED.setdefault(f"spill entry {path}", f"spill entry {path}")
            continue
        leaks.append(f"spill entry {path}")
    return leaks


def find_leaks(q_before: set, s_before: set, roots: list[str],
               settle: float, note: bool = False, source=proc_queues,
               where: str = "") -> list[str]:
    """Leaks compared to the snapshots; waits up to ``settle`` seconds for
    asynchronous clean-up (a shutdown(wait=False), a garbage-collected
    executor) to finish first."""
    end = time.monotonic() + settle
    while True:
        leaks = _queue_leaks(q_before, False, source) + _spill_leaks(s_before, roots, False)
        if not leaks or time.monotonic() > end:
            if note:  # list what is new but not ours, once, at the end
                _queue_leaks(q_before, True, source, where)
                _spill_leaks(s_before, roots, True)
            return leaks
        time.sleep(0.05)


# --------------------------------------------------------------------------
# fixtures and hooks
# --------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def session_leak_check(request):
    mp = pytest.MonkeyPatch()
    # pass-through spies: record the keys of the queues this process makes
    for name in ("create_private", "open_queue"):
        mp.setattr(mq_queues, name, _spy(getattr(mq_queues, name)))
    stop = threading.Event()
    scanner = threading.Thread(target=_scanner, args=(stop,), daemon=True,
                               name="leak-check-scanner")
    scanner.start()
    roots = spill.spill_roots()
    q_before = ipcs_queues()
    s_before = helpers.spill_entries(roots)
    try:
        yield
        leaks = find_leaks(q_before, s_before, roots, settle=10.0, note=True,
                           source=ipcs_queues)
    finally:
        stop.set()
        scanner.join(5)
        mp.undo()
    if leaks:
        _SESSION_LEAKS.extend(leaks)
        # Raised here, the error is reported at the teardown of the last test.
        # When the run was stopped early (-x), this teardown runs inside
        # pytest_sessionfinish, where raising would be an internal error: the
        # exit status and the summary below report it instead.
        if not (request.session.shouldstop or request.session.shouldfail):
            raise AssertionError("the test session left behind:\n  "
                                 + "\n  ".join(leaks))


@pytest.fixture(autouse=True)
def per_test_leak_check(request, session_leak_check):
    roots = spill.spill_roots()
    q_before = proc_queues()
    s_before = helpers.spill_entries(roots)
    yield
    leaks = find_leaks(q_before, s_before, roots, settle=5.0, note=True,
                       where=request.node.nodeid)
    if leaks:
        pytest.fail(f"{request.node.nodeid} left behind:\n  " + "\n  ".join(leaks),
                    pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _SESSION_LEAKS and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SESSION_LEAKS:
        terminalreporter.section("mqexecutor leak check", sep="=", red=True, bold=True)
        terminalreporter.write_line("System V queues / spill files left behind by the "
                                    "test session:")
        for leak in _SESSION_LEAKS:
            terminalreporter.write_line("  " + leak)
    alive = {f"queue {msqid}" for msqid, _key in proc_queues()}
    for what in [w for w in _UNATTRIBUTED if w.startswith("queue ") and w not in alive]:
        del _UNATTRIBUTED[what]  # noted during a test, removed since
    if _UNATTRIBUTED:
        terminalreporter.section("mqexecutor leak check: not counted", sep="-")
        terminalreporter.write_line("New during the run but not attributable to it "
                                    "(another program's?):")
        shown = list(_UNATTRIBUTED.values())[:20]
        for text in shown:
            terminalreporter.write_line("  " + text)
        if len(_UNATTRIBUTED) > len(shown):
            terminalreporter.write_line(f"  ... and {len(_UNATTRIBUTED) - len(shown)} more")


class Collect(logging.Handler):
    """Keeps every record it is given (for ``collected``)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def collected():
    """The records that reach the root logger at WARNING and above during the test
    (relayed from tasks among them)."""
    handler = Collect()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
