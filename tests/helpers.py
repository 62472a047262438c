"""Helpers shared by the test modules.

Functions meant to run in task workers are module-level here, so they pickle by
reference (``tests.helpers.<name>``); the workers are forked from the pytest
process and have this module imported already.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import sysv_ipc

import mqexecutor
from mqexecutor import MQExecutor, persistence

# --------------------------------------------------------------------------
# Parent-side utilities
# --------------------------------------------------------------------------

#: How long the helpers wait for an executor to shut down before declaring it hung.
SHUTDOWN_TIMEOUT = 10.0


class ShutdownHung(AssertionError):
    pass


def shutdown_or_fail(ex: MQExecutor, timeout: float = SHUTDOWN_TIMEOUT, *,
                     cancel_futures: bool = False) -> None:
    """Call ``ex.shutdown(wait=True)`` and fail (instead of hanging the test run)
    when it does not return within ``timeout`` seconds.

    When it hangs, the executor is torn down with ``kill_workers()`` so that the
    rest of the run is not polluted, and ShutdownHung is raised.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ex.shutdown(wait=True, cancel_futures=cancel_futures)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=run, name="test-shutdown", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        stats = ex.stats()
        pending, backlog = stats.running + stats.backlog, stats.backlog
        # Unstick it so later tests start from a clean machine.
        with contextlib.suppress(BaseException):
            ex.kill_workers()
        t.join(10)
        raise ShutdownHung(
            f"MQExecutor.shutdown(wait=True) did not return within {timeout} s "
            f"(pending tasks still registered: {pending}, backlog: {backlog}, "
            f"unstuck afterwards: {not t.is_alive()})")
    if errors:
        raise errors[0]


@contextlib.contextmanager
def pool(*args, shutdown_timeout: float = SHUTDOWN_TIMEOUT, **kwargs):
    """``with pool(max_workers=2) as ex:`` -- an MQExecutor that is always shut
    down at the end, failing the test if the shutdown hangs."""
    kwargs.setdefault("max_workers", 2)
    ex = MQExecutor(*args, **kwargs)
    try:
        yield ex
    finally:
        shutdown_or_fail(ex, shutdown_timeout)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(interval)


#: The repository's root: on PYTHONPATH, child interpreters import this
#: checkout's mqexecutor and the tests' helpers.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def queue_exists(key: int) -> bool:
    try:
        sysv_ipc.MessageQueue(key)
    except sysv_ipc.ExistentialError:
        return False
    return True


#: True while ``pid`` exists and is not a zombie (the library's own check).
pid_alive = persistence.pid_alive


#: Explicit keys used by tests (the leak check attributes k-<key> spill dirs).
TEST_KEYS: set[int] = set()


def unused_key() -> int:
    """A random SysV key that no queue uses right now."""
    rng = random.SystemRandom()
    for _ in range(1000):
        key = rng.randrange(0x10000, 0x7FFFFFFF)
        if not queue_exists(key):
            TEST_KEYS.add(key)
            return key
    raise RuntimeError("no free SysV key found")


def remove_test_key(key: int) -> None:
    """Remove an explicit key's queue and its spill sub-directory ``k-<key>``
    once a test is done with them: both outlive the executor by design
    (Swoole's message_queue_key). Fails if spill files were left in it."""
    import shutil
    try:
        sysv_ipc.MessageQueue(key).remove()
    except sysv_ipc.ExistentialError:
        pass
    sub = mqexecutor.spill.key_subdir(key)
    leftovers = []
    for root in mqexecutor.spill.spill_roots():
        path = os.path.join(root, sub)
        if os.path.isdir(path):
            leftovers += [os.path.join(path, n) for n in os.listdir(path)
                          if n.endswith(".spill")]
            shutil.rmtree(path, ignore_errors=True)
    assert not leftovers, f"spill files left for key {key:#x}: {leftovers}"


def reply_key(ex: MQExecutor) -> int:
    """Key of the executor's private reply queue."""
    return ex.reply_key


def producer_subdir(ex: MQExecutor) -> str:
    """Name of the executor's spill sub-directory (``p-<pid>-<token>``)."""
    return mqexecutor.spill.producer_subdir(os.getpid(), ex.token)


def spill_entries(roots=None) -> set[str]:
    """Every file and directory below the spill roots (not the roots themselves)."""
    found = set()
    for root in roots if roots is not None else mqexecutor.spill.spill_roots():
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                found.add(os.path.join(dirpath, name))
    return found


def spill_files_of(ex: MQExecutor) -> list[str]:
    """Spill files (not the scoreboard) in this executor's own sub-directory."""
    return [p for p in mqexecutor.spill.list_files(producer_subdir(ex))
            if p.endswith(".spill")]


class Gate:
    """A file-system flag tasks can wait on: workers poll for the file."""

    def __init__(self, directory: str, name: str = "gate"):
        self.path = os.path.join(str(directory), name)
        self.started_dir = os.path.join(str(directory), name + "-started")
        os.makedirs(self.started_dir, exist_ok=True)

    def open(self) -> None:
        with open(self.path, "w"):
            pass

    def started(self) -> list[str]:
        return sorted(os.listdir(self.started_dir))

    def wait_started(self, n: int, timeout: float = 15.0) -> None:
        if not wait_until(lambda: len(self.started()) >= n, timeout):
            raise AssertionError(f"only {len(self.started())} of {n} gated tasks started "
                                 f"within {timeout} s")


def run_script(code: str, tmp_path, *args: str, timeout: float = 45.0,
               env: dict | None = None, dash_c: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` as ``__main__`` of a fresh interpreter (from a file, or with
    ``python -c`` when ``dash_c``); kill it (only it, not its process group) and
    fail if it does not exit within ``timeout``."""
    if dash_c:
        command = [sys.executable, "-c", code, *args]
    else:
        script = os.path.join(str(tmp_path), "script_main.py")
        with open(script, "w") as f:
            f.write(code)
        command = [sys.executable, script, *args]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.Popen(command, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"script did not exit within {timeout} s (killed).\n"
                             f"stdout:\n{out}\nstderr:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --------------------------------------------------------------------------
# Functions run by task workers
# --------------------------------------------------------------------------

def identity(x):
    return x


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def mul(a, b):
    return a * b


def echo_kwargs(*args, **kwargs):
    return args, kwargs


def getpid(*_):
    return os.getpid()


def where(*_):
    """(worker_id(), pid) of the worker running the task."""
    return mqexecutor.worker_id(), os.getpid()


def task_id_of(*_):
    return mqexecutor.current_task_id()


def sleep_return(seconds, value=None):
    time.sleep(seconds)
    return value


def raise_value_error(message="boom"):
    raise ValueError(message)


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x * 10


def sha256_hex(data):
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def length(data):
    return len(data)


def make_bytes(n, seed):
    import numpy as np
    return np.random.default_rng(seed).bytes(n)


def wait_for_path(path, timeout=30.0):
    """Block until ``path`` exists (at most ``timeout`` s, so no worker is ever
    stuck for good). Returns True when it appeared."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def gated(gate_path, started_dir, tag, value=None):
    """Mark ``tag`` as started, then wait for the gate; returns ``value`` (or
    ``(worker_id, pid)`` when value is None)."""
    with open(os.path.join(started_dir, str(tag)), "w"):
        pass
    if not wait_for_path(gate_path):
        raise TimeoutError("gate never opened")
    return value if value is not None else (mqexecutor.worker_id(), os.getpid())


def gated_identity(gate_path, x):
    if not wait_for_path(gate_path):
        raise TimeoutError("gate never opened")
    return x


def touch_marker(directory, name, payload=None):
    with open(os.path.join(directory, str(name)), "w"):
        pass
    return name


def exit_now(code=1):
    os._exit(code)


def kill_self(signum=9):
    os.kill(os.getpid(), signum)
    time.sleep(10)


def no_core():
    """Forbid core dumps in this (worker) process before crashing it on purpose."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass


_GLOBAL = None


def set_global(*values):
    global _GLOBAL
    _GLOBAL = values


def get_global():
    return _GLOBAL


def threading_lock():
    """Something that cannot be pickled."""
    return threading.Lock()


def in_worker() -> bool:
    return mqexecutor.worker_id() is not None


class Heavy:
    """A result object whose lifetime the tests follow with a weak reference."""

    def __init__(self, n=0):
        self.n = n

    def method(self, x=0):
        return self.n + x


def make_heavy(n):
    return Heavy(n)


class ExitWhenFreed:
    """An argument whose destructor kills the task worker freeing it (never
    the test process): the worker dies after its task returned."""

    def __del__(self):
        if mqexecutor.worker_id() is not None:
            os._exit(3)


def return_then_die_freeing_arguments(obj):
    return "returned"


def kill_a_sibling(i):
    """SIGKILL a random task worker of this pool (the manager's children; this
    one too, when it is the only worker). Returns ``i`` if it survives."""
    import random
    import signal
    parent = os.getppid()
    siblings = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        siblings.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    if siblings:
        try:
            os.kill(random.choice(siblings), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return i


class FalsyError(Exception):
    """An exception that is false in a boolean context (CPython gh-132063)."""

    def __bool__(self):
        return False

    def __len__(self):
        return 0


def raise_falsy():
    raise FalsyError("falsy but raised")


def kill_tree_groups(pid: int) -> bool:
    """SIGKILL every process group in the tree of ``pid`` (its own, and its
    pool managers', which lead groups of their own that their workers join):
    the whole tree at once, as the OOM killer of a cgroup would. True when
    ``pid`` was still there."""
    groups = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            continue
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == p:
                            stack.append(int(name))
                except (OSError, ValueError, IndexError):
                    pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return bool(groups)
