"""Serialization of calls and outcomes: the C pickler, cloudpickle when needed.

A task body pickles ``(fn, args, kwargs)`` with protocol 5. The C pickler is
tried first (it is several times faster than cloudpickle); cloudpickle is used
whenever the C pickler fails (lambdas, closures, dynamic modules), whenever the
stream refers to ``__main__`` (a REPL or notebook function must travel by value:
the worker's ``__main__`` may not have it), and whenever modules are registered
with ``cloudpickle.register_pickle_by_value``. Results are pickled the same way.
A body larger than fits in one message is spilled to a file
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


_MAIN = b"__main__"


_REGISTRY = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", None)


def _by_value_registry() -> bool:
    """True when modules are registered with cloudpickle.register_pickle_by_value."""
    if _REGISTRY is not None:
        return bool(_REGISTRY)
    try:
        return bool(cloudpickle.list_registry_pickle_by_value())
    except AttributeError:  # cloudpickle < 2.0
        return False


def _pickle(obj: Any, buffers: list | None) -> bytes:
    keep = None
    if buffers is not None:
        def keep(pb: pickle.PickleBuffer) -> bool:
            try:
                buffers.append(pb.raw())
            except BufferError:  # not contiguous: pickle it in-band
                return True
            return False

    if not _by_value_registry():
        try:
            data = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep)
        except Exception:  # noqa: BLE001 - cloudpickle gets its chance below
            data = None
        if data is not None and _MAIN not in data:
            return data
        if buffers:
            buffers.clear()
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


def loads(body: bytes | memoryview, spilled: bool, keep: bool = False) -> Any:
    """Inverse of :func:`dumps`: unpickle ``body`` or the spill file it names
    (the file is unlinked once open, unless ``keep``).

    Raises:
        spill.SpillError: the reference is bad or the file is missing.
        Any exception raised while unpickling.
    """
    if spilled:
        reference = bytes(body).decode("ascii", "replace")
        return spill.load(reference, pickle.loads, unlink=not keep)
    return pickle.loads(body)
