"""MQExecutor under ProcessPoolExecutor's constructor, and its installation.

``MQProcessPoolExecutor`` only maps ProcessPoolExecutor's signature
``(max_workers=None, mp_context=None, initializer=None, initargs=(), *,
max_tasks_per_child=None)`` onto MQExecutor's, whose first positional parameter
is ``key``: CPython's tests call ``ProcessPoolExecutor(1, ...)`` and
``ProcessPoolExecutor(5)``, which given to MQExecutor as they are would open a
*named, persistent* queue with key 1 or 5. It adds read-only stand-ins for
two private attributes that CPython's tests read (``_mp_context``,
``_call_queue``; MQExecutor has ``_broken`` itself); it changes no behaviour.

``install()`` makes CPython's test package build its process pools with it.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any

from mqexecutor import MQExecutor

__all__ = ["MQProcessPoolExecutor", "install", "subprocess_bootstrap"]


class MQProcessPoolExecutor(MQExecutor):
    """MQExecutor with ProcessPoolExecutor's constructor signature."""

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Any = None, initargs: tuple = (), *,
                 max_tasks_per_child: int | None = None):
        super().__init__(max_workers=max_workers, mp_context=mp_context,
                         initializer=initializer, initargs=initargs,
                         max_tasks_per_child=max_tasks_per_child)
        self._given_context = mp_context

    @property
    def _mp_context(self) -> Any:
        # ProcessPoolExecutor._mp_context: the context workers start with
        # (here: how the manager process starts).
        import multiprocessing
        return self._given_context or multiprocessing.get_context()

    @property
    def _call_queue(self) -> _NoFeeder:
        # ProcessPoolExecutor._call_queue is a multiprocessing.Queue whose
        # feeder thread test_shutdown joins (call_queue.join_thread()) after
        # the shutdown. MQExecutor sends with msgsnd, from no feeder thread:
        # there is nothing to join.
        return _NO_FEEDER


class _NoFeeder:
    def join_thread(self) -> None:
        pass


_NO_FEEDER = _NoFeeder()


def install(util_module: Any = None) -> None:
    """Route every ProcessPoolExecutor of CPython's concurrent.futures tests to
    MQProcessPoolExecutor in this process.

    - ``concurrent.futures.ProcessPoolExecutor`` (tests that build a pool
      themselves, e.g. test_shutdown's test_context_manager_shutdown) and
      ``concurrent.futures.MQProcessPoolExecutor`` (the name that test_shutdown's
      child interpreters import: ``from concurrent.futures import
      {executor_type.__name__}``);
    - ``executor_type`` of the ProcessPool{Fork,Spawn,Forkserver}Mixin classes of
      ``test.test_concurrent_futures.util`` when ``util_module`` is given.

    ``concurrent.futures.process`` (BrokenProcessPool, _RemoteTraceback, the
    real ProcessPoolExecutor) is left alone.
    """
    concurrent.futures.ProcessPoolExecutor = MQProcessPoolExecutor  # type: ignore[misc]
    concurrent.futures.MQProcessPoolExecutor = MQProcessPoolExecutor  # type: ignore[attr-defined]
    if util_module is not None:
        for name in ("ProcessPoolForkMixin", "ProcessPoolSpawnMixin",
                     "ProcessPoolForkserverMixin"):
            getattr(util_module, name).executor_type = MQProcessPoolExecutor


def subprocess_bootstrap(root: str) -> str:
    """Python source that installs the shim in a child interpreter started with
    ``-I`` (no PYTHONPATH, no current directory on sys.path), whose project root
    is ``root``. Prefixed to the ``-c`` code of test_shutdown's child processes."""
    return (f"import sys; sys.path.insert(0, {root!r}); "
            "from tests.cpython_suite.shim import install as _mqx_install; "
            "_mqx_install(); del _mqx_install\n")
