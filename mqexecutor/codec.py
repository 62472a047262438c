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

import io
import marshal
import pickle
import sys
import types
from collections import ChainMap
from typing import Any

from . import spill
from .protocol import reference_text

__all__ = ["dumps", "dumps_plain_call", "loads", "PROTOCOL", "PLAIN_TYPES", "dumps_by_value",
           "by_value_registry", "refers_to_main"]

PROTOCOL = 5


_MAIN = b"__main__"


def _cloudpickle() -> Any:
    """The cloudpickle module, imported on first use (about 10 ms): calls and
    results the C pickler handles never need it."""
    import cloudpickle
    return cloudpickle


def _reduce_code(code: types.CodeType) -> tuple:
    """A code object as marshal writes it (as in a .pyc): its file name and
    line numbers travel with it, so tracebacks and faulthandler dumps in a
    worker name the function's file (or notebook cell) and line. cloudpickle
    3.1.3 names every code object it pickles ``<dynamic-code>``. An owner and
    its workers run the same interpreter (fork, or ``sys.executable``); a
    producer that attaches to a pool must run the same Python version to send
    functions by value (as cloudpickle's own format requires)."""
    return marshal.loads, (marshal.dumps(code),)


_BY_VALUE_PICKLER: Any = None


def _by_value_pickler() -> Any:
    """cloudpickle's Pickler with code objects reduced by :func:`_reduce_code`."""
    global _BY_VALUE_PICKLER
    if _BY_VALUE_PICKLER is None:
        base = _cloudpickle().Pickler

        class ByValuePickler(base):  # type: ignore[misc,valid-type]
            dispatch_table = ChainMap({types.CodeType: _reduce_code}, base.dispatch_table)

        _BY_VALUE_PICKLER = ByValuePickler
    return _BY_VALUE_PICKLER


def _cloud_dumps(obj: Any, buffer_callback: Any = None) -> bytes:
    """``cloudpickle.dumps(obj, protocol=5)``, with file names kept
    (:func:`_reduce_code`). Raises what pickling raises."""
    out = io.BytesIO()
    try:
        _by_value_pickler()(out, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    except RecursionError as exc:  # as cloudpickle.dumps
        raise pickle.PicklingError(f"Could not pickle object as excessively deep "
                                   f"recursion required: {exc}") from exc
    return out.getvalue()


#: cloudpickle's set of modules registered by value, once cloudpickle is imported.
_REGISTRY: Any = None


def by_value_registry() -> bool:
    """True when modules are registered with cloudpickle.register_pickle_by_value
    (never while cloudpickle is not imported: nothing can be registered then)."""
    global _REGISTRY
    if _REGISTRY is None:
        cp = sys.modules.get("cloudpickle")
        if cp is None:
            return False
        _REGISTRY = getattr(getattr(cp, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", None)
        if _REGISTRY is None:
            try:
                return bool(cp.list_registry_pickle_by_value())
            except AttributeError:  # cloudpickle < 2.0
                return False
    return bool(_REGISTRY)


def dumps_by_value(obj: Any) -> bytes:
    """``obj`` pickled with cloudpickle (protocol 5): functions of ``__main__``
    and lambdas by value. Raises what pickling raises."""
    return _cloud_dumps(obj)


def _pickle(obj: Any, buffers: list | None) -> bytes:
    """Pickle ``obj``; with ``buffers``, its contiguous PickleBuffers (protocol 5,
    e.g. numpy arrays) are appended to it out-of-band, as memoryviews (all of
    them in-band when one is not contiguous)."""
    if not by_value_registry():
        try:
            if buffers is None:
                data = pickle.dumps(obj, PROTOCOL)
            else:
                data = pickle.dumps(obj, PROTOCOL, buffer_callback=buffers.append)
                if buffers and not _raw(buffers):
                    data = pickle.dumps(obj, PROTOCOL)
        except Exception:  # noqa: BLE001 - cloudpickle gets its chance below
            data = None
        if data is not None and data.find(_MAIN) < 0:
            return data
        if buffers:
            buffers.clear()
    data = _cloud_dumps(obj, None if buffers is None else buffers.append)
    if buffers and not _raw(buffers):
        data = _cloud_dumps(obj)
    return data


def _raw(buffers: list) -> bool:
    """Turn the PickleBuffers in ``buffers`` into flat memoryviews. False (and
    ``buffers`` emptied) when one is not contiguous: pickle in-band then."""
    try:
        buffers[:] = [pb.raw() for pb in buffers]
        return True
    except BufferError:
        buffers.clear()
        return False


#: Types pickled by the C pickler alone: no buffers, no ``__main__`` reference.
#: Types whose pickle needs neither cloudpickle nor out-of-band buffers.
PLAIN_TYPES = frozenset((type(None), bool, int, float, complex, str, bytes))

def refers_to_main(data: bytes) -> bool:
    """Whether a pickle names the ``__main__`` module (it must then travel by
    value: the workers' ``__main__`` may not have what it names)."""
    return data.find(_MAIN) >= 0


def dumps_plain_call(reference: str, args: tuple, kwargs: dict, inline_max: int
                     ) -> bytes | None:
    """The task payload of ``(reference, args, kwargs)`` when every argument is
    of a plain type (``PLAIN_TYPES``) and the pickle fits in ``inline_max``
    bytes: what :func:`dumps` would make, in one step. None otherwise (the
    caller then uses :func:`dumps`)."""
    for a in args:
        if type(a) not in PLAIN_TYPES:
            return None
    if kwargs:
        for a in kwargs.values():
            if type(a) not in PLAIN_TYPES:
                return None
    data = pickle.dumps((reference, args, kwargs), PROTOCOL)
    return data if len(data) <= inline_max else None


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
    if type(obj) in PLAIN_TYPES:
        data = pickle.dumps(obj, protocol=PROTOCOL)
        if len(data) <= inline_max:
            return data, False
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
        return spill.load(reference_text(body), pickle.loads, unlink=not keep)
    return pickle.loads(body)
