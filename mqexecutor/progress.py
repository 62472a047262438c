"""Progress bars for futures: :func:`progress` and :func:`progress_map`.

Both draw a ``tqdm.auto`` bar: a text bar in a terminal, a widget in Jupyter
(when ipywidgets is installed). tqdm is an optional dependency::

    pip install 'mqexecutor[progress]'

Both work with any ``concurrent.futures`` executor and its futures
(MQExecutor, ProcessPoolExecutor, ThreadPoolExecutor, dask.distributed's
``Client.get_executor()``). The bar is always updated from the thread that
iterates, never from an executor's callback thread.

Example::

    from mqexecutor import MQExecutor, progress, progress_map

    with MQExecutor() as ex:
        futures = [ex.submit(work, x) for x in items]
        for fut in progress(futures, desc="work"):
            print(fut.result())
        squares = list(progress_map(ex, pow, range(1000), [2] * 1000, chunksize=50))
"""
from __future__ import annotations

import concurrent.futures
import itertools
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar, cast

__all__ = ["progress", "progress_map"]

T = TypeVar("T")
F = TypeVar("F", bound="Future[Any]")

_INSTALL_HINT = ("mqexecutor.progress needs tqdm, an optional dependency: "
                 "pip install mqexecutor[progress]")


def _tqdm_class() -> Any:
    """``tqdm.auto.tqdm``, or ImportError naming the extra that installs it."""
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return tqdm


def progress(futures: Iterable[F], *, total: int | None = None, desc: str | None = None,
             timeout: float | None = None, **tqdm_kwargs: Any) -> Iterator[F]:
    """Yield ``futures`` as they complete (as ``concurrent.futures.as_completed``)
    while a tqdm bar counts them.

    Args:
        futures (iterable of concurrent.futures.Future): the futures to watch;
            read whole at the call (duplicates are yielded once). Futures of any
            executor work.
        total (int | None): the bar's total; default: the number of distinct
            futures.
        desc (str | None): the bar's label.
        timeout (float | None): seconds, counted from this call, after which
            iterating raises ``TimeoutError`` (as ``as_completed``); None waits
            forever.
        **tqdm_kwargs: passed to ``tqdm.auto.tqdm`` (``unit``, ``file``,
            ``leave``, ``disable``, ``position``, ...).

    Returns:
        An iterator of the futures, each yielded once, in completion order. A
        future that failed or was cancelled is yielded too; call ``result()``
        to get its value or exception. The bar is closed when the iterator is
        exhausted, raises or is closed/garbage-collected.

    Raises:
        ImportError: tqdm is not installed (``pip install mqexecutor[progress]``);
            raised by this call, before anything is iterated.
        TimeoutError: when iterating, ``timeout`` seconds passed before every
            future completed.
    """
    tqdm = _tqdm_class()
    fs = list(dict.fromkeys(futures))
    end = None if timeout is None else time.monotonic() + timeout

    def run() -> Iterator[F]:
        # The bar appears when iteration starts, and is closed however it ends.
        bar = tqdm(total=len(fs) if total is None else total, desc=desc, **tqdm_kwargs)
        try:
            left = None if end is None else max(end - time.monotonic(), 0.0)
            for fut in concurrent.futures.as_completed(fs, timeout=left):
                bar.update(1)
                yield cast(F, fut)
        finally:
            bar.close()

    return run()


def _run_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[T]:
    """Task body of :func:`progress_map` with ``chunksize`` > 1."""
    return [fn(*args) for args in chunk]


def progress_map(executor: Executor, fn: Callable[..., T], *iterables: Iterable[Any],
                 chunksize: int = 1, timeout: float | None = None,
                 **tqdm_kwargs: Any) -> Iterator[T]:
    """``executor.map(fn, *iterables)`` with a tqdm bar that advances as items
    complete, in any order, while results are yielded in input order.

    Every item is submitted by this call (like ``Executor.map`` without
    ``buffersize``); the results are then read lazily.

    Args:
        executor (concurrent.futures.Executor): any executor with ``submit``
            (MQExecutor, ProcessPoolExecutor, dask's ``Client.get_executor()``).
        fn (callable): called as ``fn(*args)`` with one item of each iterable
            (``zip`` semantics: the shortest iterable ends the map).
        *iterables: the arguments.
        chunksize (int): items sent per task (>= 1); the bar still counts items.
        timeout (float | None): seconds, counted from this call, after which the
            iterator raises ``TimeoutError`` and cancels what is left; None waits
            forever.
        **tqdm_kwargs: passed to ``tqdm.auto.tqdm`` (``desc``, ``unit``,
            ``file``, ``total``, ``disable``, ...). The default ``total`` is the
            number of items.

    Returns:
        An iterator of ``fn``'s results, in the order of the arguments.

    Raises:
        ImportError: tqdm is not installed (``pip install mqexecutor[progress]``).
        ValueError: ``chunksize`` < 1.
        RuntimeError: the executor is shut down (from ``executor.submit``).
        When iterating: the exception raised by ``fn`` for an item, when that
        item is reached (the tasks not started yet are then cancelled);
        ``TimeoutError`` after ``timeout``.
    """
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"chunksize must be an int, not {chunksize!r}")
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1")
    tqdm = _tqdm_class()
    end = None if timeout is None else time.monotonic() + timeout

    # Completion notices: done callbacks may run in any thread (an executor's
    # collector thread, or this one when the future is already done); they only
    # put the future here, and the iterating thread moves the bar.
    done: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
    sizes: dict[Future[Any], int] = {}
    fs: list[Future[Any]] = []
    args_iter: Iterator[tuple[Any, ...]] = zip(*iterables)
    try:
        while True:
            chunk = list(itertools.islice(args_iter, chunksize))
            if not chunk:
                break
            fut: Future[Any]
            if chunksize == 1:
                fut = executor.submit(fn, *chunk[0])
            else:
                fut = executor.submit(_run_chunk, fn, chunk)
            sizes[fut] = len(chunk)
            fs.append(fut)
            fut.add_done_callback(done.put)
    except BaseException:
        for f in fs:
            f.cancel()
        raise
    tqdm_kwargs.setdefault("total", sum(sizes.values()))

    def results() -> Iterator[T]:
        # The bar appears when iteration starts (it then catches up with the
        # items done meanwhile), and is closed however the iteration ends.
        bar = tqdm(**tqdm_kwargs)
        seen = 0  # completion notices read

        def read_notice(block: bool, deadline: float | None = end) -> None:
            """Read one completion notice and move the bar; queue.Empty when
            ``block`` is False and none is there, TimeoutError past ``deadline``."""
            nonlocal seen
            if not block:
                f = done.get_nowait()
            elif deadline is None:
                f = done.get()
            else:
                try:
                    f = done.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    raise TimeoutError(f"progress_map: {timeout} s passed with "
                                       f"{len(fs) - seen} tasks not done") from None
            seen += 1
            if not f.cancelled():
                bar.update(sizes[f])

        try:
            for fut in fs:
                while not fut.done():
                    read_notice(True)
                while True:  # also count what completed meanwhile, without waiting
                    try:
                        read_notice(False)
                    except queue.Empty:
                        break
                value = fut.result()
                if chunksize == 1:
                    yield value
                else:
                    yield from value
            while seen < len(fs):  # every future is done: its callback is imminent
                read_notice(True, None)
        finally:
            for f in fs:
                f.cancel()
            bar.close()

    return results()
