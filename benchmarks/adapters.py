"""One small adapter per executor kind, so the same measurement code runs for all.

Every adapter exposes:

* ``start(workers)``: build the pool (the constructor of the start-up figure);
* ``submit(fn, *args)`` -> handle, ``result(handle, timeout)``, ``wait_all(handles)``;
* ``map(fn, iterable, chunksize)`` -> ordered lazy iterator of results;
* ``shutdown()``: release the pool and wait for its workers;
* ``queue_ids()``: SysV message queue ids the pool created (for leak clean-up).

``multiprocessing.Pool`` has no Future: ``submit`` is ``apply_async`` and
``result`` is ``AsyncResult.get``; ``map`` is ``Pool.imap`` (ordered and lazy
like ``Executor.map``); ``shutdown`` is ``close()`` + ``join()``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

# Nothing heavy is imported at module level: each adapter imports its library in
# preload(), so the start-up figure can time that import on its own (import_s)
# and the peak RSS of a process holds only the library under test.

#: name -> (label for tables, short label for plots)
KINDS: dict[str, tuple[str, str]] = {
    "mq-targeted": ("mqexecutor targeted (mode 2)", "mq T"),
    "mq-preemptive": ("mqexecutor preemptive (mode 3)", "mq P"),
    "ppe": ("ProcessPoolExecutor", "PPE"),
    "loky": ("loky reusable executor", "loky"),
    "mp-pool": ("multiprocessing.Pool", "mp.Pool"),
}
BASELINE = "ppe"


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


class MQAdapter(Adapter):
    def __init__(self, mode: int):
        self.mode = mode
        self.name = "mq-targeted" if mode == 2 else "mq-preemptive"

    def preload(self) -> None:
        import mqexecutor  # noqa: F401

    def start(self, workers: int) -> None:
        import mqexecutor
        self.ex = mqexecutor.MQExecutor(max_workers=workers, mode=self.mode)

    def queue_ids(self) -> list[int]:
        ids = []
        try:
            ids.append(self.ex.msqid)
        except Exception:  # noqa: BLE001 - best effort, the API may change
            pass
        state = getattr(self.ex, "_state", None)
        reply = getattr(state, "reply_queue", None)
        if reply is not None:
            try:
                ids.append(reply.id)
            except Exception:  # noqa: BLE001
                pass
        return ids

    def abort(self) -> None:
        ex = getattr(self, "ex", None)
        if ex is None:
            return
        try:
            ex.kill_workers()
            manager = getattr(getattr(ex, "_state", None), "manager", None)
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
            try:
                out[name] = len(getattr(state, name))
            except Exception:  # noqa: BLE001
                pass
        for name in ("outstanding", "broken", "shutdown_requested"):
            if hasattr(state, name):
                out[name] = repr(getattr(state, name))
        for qname in ("task_queue", "reply_queue"):
            q = getattr(state, qname, None)
            try:
                if q is not None:
                    out[qname + "_messages"] = q.current_messages
            except Exception as exc:  # noqa: BLE001 - removed meanwhile
                out[qname + "_messages"] = repr(exc)
        return out

    def describe(self) -> dict:
        import mqexecutor
        return {"mode": self.mode, "version": mqexecutor.__version__,
                "start_method": "fork (mqexecutor default)"}


class PPEAdapter(Adapter):
    name = "ppe"

    def preload(self) -> None:
        import concurrent.futures.process  # noqa: F401

    def start(self, workers: int) -> None:
        import concurrent.futures as cf
        self.ex = cf.ProcessPoolExecutor(max_workers=workers)

    def describe(self) -> dict:
        import multiprocessing
        return {"start_method": multiprocessing.get_start_method()}


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

    def describe(self) -> dict:
        import multiprocessing
        return {"start_method": multiprocessing.get_start_method()}


def make(kind: str) -> Adapter:
    if kind == "mq-targeted":
        return MQAdapter(2)
    if kind == "mq-preemptive":
        return MQAdapter(3)
    if kind == "ppe":
        return PPEAdapter()
    if kind == "loky":
        return LokyAdapter()
    if kind == "mp-pool":
        return PoolAdapter()
    raise ValueError(f"unknown executor kind {kind!r}; known: {', '.join(KINDS)}")
