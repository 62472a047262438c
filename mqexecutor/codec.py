"""Serialization of calls and outcomes: cloudpickle in, plain pickle out.

A task body is ``cloudpickle.dumps((fn, args, kwargs), protocol=5)`` so lambdas,
closures and functions defined in ``__main__``, a REPL or a notebook travel by
value (ProcessPoolExecutor's pickle cannot send them). Results are pickled the
same way. A body larger than fits in one message is spilled to a file
(:mod:`mqexecutor.spill`) with its out-of-band buffers (pickle protocol 5)
written straight into the file, and the message body becomes the reference.
"""
from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from . import spill

__all__ = ["dumps", "loads", "PROTOCOL"]

PROTOCOL = 5


def _pickle(obj: Any, buffers: list | None) -> bytes:
    if buffers is None:
        return cloudpickle.dumps(obj, protocol=PROTOCOL)

    def keep(pb: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(pb.raw())
        except BufferError:  # not contiguous: pickle it in-band
            return True
        return False

    return cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep)


def dumps(obj: Any, inline_max: int, subdir: str) -> tuple[bytes, bool]:
    """Pickle ``obj`` for one message.

    Args:
        obj: anything cloudpickle can pickle.
        inline_max: the largest body (bytes) that fits in a message.
        subdir: spill sub-directory to use when it does not fit.

    Returns:
        (body, spilled): the pickle itself, or the UTF-8 reference of the spill
        file holding it when ``spilled`` is True.

    Raises:
        Whatever pickling raises (e.g. ``pickle.PicklingError``, ``TypeError``),
        and ``OSError`` when a spill file cannot be written.
    """
    buffers: list = []
    data = _pickle(obj, buffers)
    if not buffers and len(data) <= inline_max:
        return data, False
    if buffers and len(data) + sum(b.nbytes for b in buffers) <= inline_max:
        data = _pickle(obj, None)
        buffers = []
        if len(data) <= inline_max:
            return data, False
    return spill.write(subdir, data, buffers).encode("ascii"), True


def loads(body: bytes | memoryview, spilled: bool) -> Any:
    """Inverse of :func:`dumps`: unpickle ``body`` or the spill file it names
    (the file is unlinked once open).

    Raises:
        spill.SpillError: the reference is bad or the file is missing.
        Any exception raised while unpickling.
    """
    if spilled:
        reference = bytes(body).decode("ascii", "replace")
        return spill.load(reference, pickle.loads)
    return pickle.loads(body)
