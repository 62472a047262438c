"""``Executor.map`` for MQExecutor: chunks of arguments, results in order,
lazily, with Python 3.14's ``buffersize`` (as ``concurrent.futures``)."""
from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .future import MQFuture

__all__ = ["map_results", "check_map_arguments"]


def check_map_arguments(chunksize: Any, buffersize: Any) -> None:
    """Raises ValueError (chunksize < 1, buffersize < 1) or TypeError
    (buffersize not an int: True counts as 1, as Python 3.14's check)."""
    if buffersize is not None:
        if not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")


def _process_chunk(fn: Callable, chunk: list[tuple]) -> list:
    """Run ``fn`` over a chunk of argument tuples (map with chunksize > 1)."""
    return [fn(*args) for args in chunk]


def _process_chunk1(fn: Callable, chunk: list) -> list:
    """Run ``fn`` over a chunk of single arguments (map of one iterable with
    chunksize > 1: the items travel as they are, not as 1-tuples)."""
    return [fn(arg) for arg in chunk]


def _chunks(iterator: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


def _result_or_cancel(fut: MQFuture, end: float | None) -> Any:
    """``fut.result()`` by the deadline ``end``; on any error (the task's, a
    timeout, KeyboardInterrupt) cancel it first. Holds no reference to the
    Future or its result afterwards (CPython bpo-14406)."""
    try:
        try:
            return fut.result(None if end is None else end - time.monotonic())
        finally:
            fut.cancel()
    finally:
        del fut


def map_results(submit: Callable[[Callable, tuple], MQFuture | None], fn: Callable,
                iterables: tuple[Iterable, ...], *, timeout: float | None, chunksize: int,
                buffersize: int | None) -> Iterator:
    """Submit ``fn`` over the zipped ``iterables`` and return the iterator of
    its results in order.

    Args:
        submit: ``submit(fn, args) -> MQFuture`` for one task; None once the
            executor is gone (garbage-collected): no more tasks are submitted.
        timeout (float | None): seconds from now after which the iterator
            raises TimeoutError (and cancels what is left).
        chunksize (int): argument tuples per task.
        buffersize (int | None): tasks submitted ahead of the result being
            read; None submits them all now.

    The iterator keeps no reference to a result it yielded (bpo-14406), and
    cancels the tasks left when it is closed or raises.
    """
    end = None if timeout is None else time.monotonic() + timeout
    args_iter: Iterator
    if chunksize > 1 and len(iterables) == 1:
        args_iter = ((fn, chunk) for chunk in _chunks(iter(iterables[0]), chunksize))
        task_fn: Callable = _process_chunk1
    elif chunksize > 1:
        args_iter = ((fn, chunk) for chunk in _chunks(zip(*iterables), chunksize))
        task_fn = _process_chunk
    else:
        args_iter = zip(*iterables)
        task_fn = fn
    first = itertools.islice(args_iter, buffersize) if buffersize else args_iter
    fs: collections.deque[MQFuture] = collections.deque()
    for a in first:
        fut = submit(task_fn, a)
        if fut is None:
            break
        fs.append(fut)

    def results() -> Iterator:
        try:
            while fs:
                if buffersize:
                    nxt = next(args_iter, None)
                    fut = None if nxt is None else submit(task_fn, nxt)
                    if fut is not None:
                        fs.append(fut)
                    del fut
                if chunksize > 1:
                    chunk = _result_or_cancel(fs.popleft(), end)
                    chunk.reverse()
                    while chunk:  # no reference kept to what was yielded
                        yield chunk.pop()
                else:
                    yield _result_or_cancel(fs.popleft(), end)
        finally:
            for f in fs:
                f.cancel()
    return results()
