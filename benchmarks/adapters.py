"""One small adapter per executor kind, so the same measurement code runs for all.

Every adapter exposes:

* ``start(workers)``: build the pool (the constructor of the start-up figure);
* ``submit(fn, *args)`` -> handle, ``result(handle, timeout)``, ``wait_all(handles)``,
  ``value(handle)`` (the result of a handle known to be done);
* ``map(fn, iterable, chunksize)`` -> ordered lazy iterator of results;
* ``shutdown()``: release the pool and wait for its workers;
* ``queue_ids()``: SysV message queue ids the pool created (for leak clean-up).

``multiprocessing.Pool`` has no Future: ``submit`` is ``apply_async`` and
``result`` is ``AsyncResult.get``; ``map`` is ``Pool.imap`` (ordered and lazy
like ``Executor.map``); ``shutdown`` is ``close()`` + ``join()``.

The raw sysv_ipc ping-pong (kind ``sysv-raw``) is not an executor: it has no
adapter here, see pingpong.py.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

# Nothing heavy is imported at module level: each adapter imports its library in
# preload(), so the start-up figure can time that import on its own (import_s)
# and the peak RSS of a process holds only the library under test.

#: name -> (label for tables, short label for plots and the terminal)
KINDS: dict[str, tuple[str, str]] = {
    "mq-targeted": ("mqexecutor targeted (mode 2)", "mq T"),
    "mq-preemptive": ("mqexecutor preemptive (mode 3)", "mq P"),
    "ppe-forkserver": ("ProcessPoolExecutor, forkserver", "PPE fsrv"),
    "ppe-fork": ("ProcessPoolExecutor, fork", "PPE fork"),
    "loky": ("loky reusable executor", "loky"),
    "mp-pool": ("multiprocessing.Pool", "mp.Pool"),
    "sysv-raw": ("raw sysv_ipc ping-pong (transport limit)", "raw sysv"),
}
#: The ratio every target is measured against (Python 3.14's default start method).
BASELINE = "ppe-forkserver"
#: The second reference ratios are given against (Python < 3.14's default on Linux).
BASELINE2 = "ppe-fork"
MQ_KINDS = ("mq-targeted", "mq-preemptive")
#: Kinds that are not executors: they run only the measures pingpong.py knows.
RAW_KINDS = ("sysv-raw",)
#: The kinds of the notebook figure, and its baseline: ProcessPoolExecutor with
#: fork in the same kernel (with forkserver its workers cannot find a function
#: defined in a cell).
NOTEBOOK_KINDS = ("mq-targeted", "mq-preemptive", "ppe-fork", "ppe-forkserver")
NOTEBOOK_BASELINE = "ppe-fork"


class Adapter:
    name = ""

    def preload(self) -> None:
        """Import the library (kept out of the timed start-up)."""

    def start(self, workers: int) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.ex.submit(fn, *args)

    def result(self, handle: Any, timeout: float | None = None) -> Any:
        return handle.result(timeout)

    def value(self, handle: Any) -> Any:
        return handle.result(0)

    def wait_all(self, handles: list, timeout: float | None = None) -> None:
        import concurrent.futures as cf
        done, not_done = cf.wait(handles, timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} of {len(handles)} tasks not done")

    def errors(self, handles: list) -> int:
        """Number of handles whose task failed (after wait_all)."""
        return sum(1 for h in handles if h.exception() is not None)

    def map(self, fn: Callable, iterable: Iterable, chunksize: int) -> Iterator:
        return self.ex.map(fn, iterable, chunksize=chunksize)

    def shutdown(self) -> None:
        self.ex.shutdown(wait=True)

    def queue_ids(self) -> list[int]:
        return []

    def abort(self) -> None:
        """After a failure or a timeout: stop the workers without waiting for
        their tasks (best effort; the caller then exits with os._exit)."""
        ex = getattr(self, "ex", None)
        procs = getattr(ex, "_processes", None) or {}
        for p in list(procs.values()):
            try:
                p.kill()
            except Exception:  # noqa: BLE001
                pass

    def diagnostics(self) -> dict:
        """Internal state worth printing when a measurement hangs."""
        return {}

    def describe(self) -> dict:
        return {}


def _attr_path(obj: Any, *paths: str) -> Any:
    """The first of the dotted attribute paths that exists on ``obj``, else None
    (the library's internals move; the benchmark only needs them for clean-up
    and diagnostics)."""
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


class MQAdapter(Adapter):
    def __init__(self, mode: int):
        self.mode = mode
        self.name = "mq-targeted" if mode == 2 else "mq-preemptive"

    def preload(self) -> None:
        # What `from mqexecutor import MQExecutor` imports: the package loads
        # its modules on first use (PEP 562), so `import mqexecutor` alone
        # would leave the import inside the timed start-up.
        from mqexecutor import MQExecutor  # noqa: F401

    def start(self, workers: int) -> None:
        from mqexecutor import MQExecutor
        self.manager = self.manager_start()
        self.ex = MQExecutor(max_workers=workers, mode=self.mode)

    @staticmethod
    def manager_start() -> str:
        """How a pool made now would start its manager process: "forked" (this
        process has one thread) or "fresh interpreter" (it has others: a
        notebook kernel, a server, numpy's BLAS threads)."""
        try:
            from mqexecutor.manager import launch
            return "forked" if launch.start_method(None) == "fork" else "fresh interpreter"
        except Exception:  # noqa: BLE001 - the internals may change
            return "?"

    def queue_ids(self) -> list[int]:
        ids = []
        for q in (_attr_path(self.ex, "_state.res.task_queue", "_state.task_queue"),
                  _attr_path(self.ex, "_state.res.reply_queue", "_state.reply_queue")):
            try:
                if q is not None:
                    ids.append(q.id)
            except Exception:  # noqa: BLE001 - best effort, the internals may change
                pass
        return ids

    def abort(self) -> None:
        ex = getattr(self, "ex", None)
        if ex is None:
            return
        try:
            ex.kill_workers()
            manager = _attr_path(ex, "_state.manager")
            if manager is not None:
                manager.join(10)
        except Exception:  # noqa: BLE001
            pass

    def diagnostics(self) -> dict:
        state = getattr(getattr(self, "ex", None), "_state", None)
        if state is None:
            return {}
        out = {}
        for name in ("backlog", "pending"):
            obj = _attr_path(state, "dispatch." + name, name)
            try:
                out[name] = len(obj)
            except Exception:  # noqa: BLE001
                pass
        for name in ("broken", "shutdown_requested"):
            obj = _attr_path(state, "flags." + name, name)
            if obj is not None:
                out[name] = repr(obj)
        for qname in ("task_queue", "reply_queue"):
            q = _attr_path(state, "res." + qname, qname)
            try:
                if q is not None:
                    out[qname + "_messages"] = q.current_messages
            except Exception as exc:  # noqa: BLE001 - removed meanwhile
                out[qname + "_messages"] = repr(exc)
        return out

    def describe(self) -> dict:
        import mqexecutor
        return {"mode": self.mode, "version": mqexecutor.__version__,
                "start_method": "default (mp_context=None)",
                "manager": getattr(self, "manager", None) or self.manager_start()}


class PPEAdapter(Adapter):
    """ProcessPoolExecutor with an explicit start method (``fork`` or
    ``forkserver``), whatever the platform's default."""

    def __init__(self, method: str):
        self.method = method
        self.name = f"ppe-{method}"

    def preload(self) -> None:
        import concurrent.futures.process  # noqa: F401
        import multiprocessing
        multiprocessing.get_context(self.method)
        if self.method == "forkserver":
            import multiprocessing.forkserver  # noqa: F401

    def start(self, workers: int) -> None:
        import concurrent.futures as cf
        import multiprocessing
        if self.method == "fork":
            # Python 3.12+ warns about fork() in a process with threads (the
            # threaded start-up figure, a notebook kernel); the workers run
            # single-threaded code. Filtered for the whole process, once: a
            # catch_warnings() around each submit() would cost microseconds.
            import warnings
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    message=".*use of fork\\(\\) may lead to deadlocks")
        self.ex = cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context(self.method))

    def describe(self) -> dict:
        return {"start_method": self.method}


class LokyAdapter(Adapter):
    name = "loky"

    def preload(self) -> None:
        import loky  # noqa: F401

    def start(self, workers: int) -> None:
        import loky
        self.ex = loky.get_reusable_executor(max_workers=workers)

    def describe(self) -> dict:
        import loky
        return {"version": loky.__version__, "start_method": "loky (default)"}


class PoolAdapter(Adapter):
    name = "mp-pool"

    def preload(self) -> None:
        import multiprocessing.pool  # noqa: F401

    def start(self, workers: int) -> None:
        import multiprocessing
        self.ex = multiprocessing.Pool(workers)

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.ex.apply_async(fn, args)

    def result(self, handle: Any, timeout: float | None = None) -> Any:
        return handle.get(timeout)

    def value(self, handle: Any) -> Any:
        return handle.get(0)

    def wait_all(self, handles: list, timeout: float | None = None) -> None:
        import time
        end = None if timeout is None else time.monotonic() + timeout
        for h in handles:
            h.wait(None if end is None else max(0.0, end - time.monotonic()))
            if not h.ready():
                raise TimeoutError("tasks not done")

    def errors(self, handles: list) -> int:
        return sum(1 for h in handles if not h.successful())

    def map(self, fn: Callable, iterable: Iterable, chunksize: int) -> Iterator:
        return self.ex.imap(fn, iterable, chunksize=chunksize)

    def shutdown(self) -> None:
        self.ex.close()
        self.ex.join()

    def abort(self) -> None:
        try:
            self.ex.terminate()
        except Exception:  # noqa: BLE001
            pass

    def describe(self) -> dict:
        import multiprocessing
        return {"start_method": multiprocessing.get_start_method()}


def make(kind: str) -> Adapter:
    if kind == "mq-targeted":
        return MQAdapter(2)
    if kind == "mq-preemptive":
        return MQAdapter(3)
    if kind in ("ppe-forkserver", "ppe-fork"):
        return PPEAdapter(kind.split("-", 1)[1])
    if kind == "loky":
        return LokyAdapter()
    if kind == "mp-pool":
        return PoolAdapter()
    raise ValueError(f"unknown executor kind {kind!r}; known: "
                     f"{', '.join(k for k in KINDS if k not in RAW_KINDS)}")
