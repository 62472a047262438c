"""How a function travels to the workers: as a reference, or by value, once.

* A module-level function (or builtin, or class) that pickle sends by
  reference travels as ``"module:qualname"`` (:func:`function_reference`),
  made once per function; the worker imports the module and looks the name up
  once (:func:`load_function`).
* A function that must travel by value (defined in ``__main__``, a notebook
  cell, a lambda, a closure) is pickled with cloudpickle once, while what it
  refers to stays the same (:class:`ByValue`): the same objects bound to the
  global names its code uses (and those of the by-value functions it calls),
  the same closure cells' contents, defaults, attributes and code. A pool
  keeps its pickle in a file, once per content (``Dispatcher.by_value``), and
  its tasks carry the file's reference; a worker unpickles the function once
  per file and keeps it. A name rebound since (``x = 2`` in the next cell, a
  function redefined) makes a new pickle; an object changed in place (a list
  appended to) is not seen: the workers keep the copy they got.
"""
from __future__ import annotations

import importlib
import pickle
import sys
import types
import weakref
from typing import Any

from . import codec, spill
from .codec import PROTOCOL
from .protocol import task_body

__all__ = ["FnInfo", "fn_info", "fn_name", "function_reference", "holder", "load_function",
           "ByValue", "BY_VALUE_PREFIX", "by_value_file", "load_by_value"]


#: Callables that pickle as a reference (module and qualified name), never state.
_BY_REFERENCE = frozenset((types.FunctionType, types.BuiltinFunctionType, type))


def _resolve(module: str, qualname: str, load: bool = True) -> tuple[Any, str, Any]:
    """(owner, name, object) of ``module:qualname``: the module or class that
    holds the object under that name, and the object."""
    owner = importlib.import_module(module) if load else sys.modules[module]
    parts = qualname.split(".")
    for part in parts[:-1]:
        if part == "<locals>":
            raise AttributeError(f"{module}:{qualname} is local to a function")
        owner = getattr(owner, part)
    return owner, parts[-1], getattr(owner, parts[-1])


def holder(reference: str) -> tuple[Any, str]:
    """(owner, name) where the function of ``reference`` (made by
    :func:`function_reference` in this process) is found: the producer checks
    ``getattr(owner, name) is fn`` before it sends a cached reference, so a
    name rebound since travels by value.

    Raises:
        KeyError, AttributeError: the module or a part of the name is gone.
    """
    module, _, qualname = reference.partition(":")
    owner, name, _obj = _resolve(module, qualname, load=False)
    return owner, name


def function_reference(fn: Any) -> str | None:
    """``"module:qualname"`` of ``fn`` when it travels as a reference that stays
    valid for as long as ``fn`` exists (a module-level function, builtin or
    class that the C pickler pickles by reference), for the producer to make
    once and reuse; None for anything that travels by value (lambdas, closures,
    ``__main__`` functions, callable objects, modules registered with
    ``cloudpickle.register_pickle_by_value``)."""
    if type(fn) not in _BY_REFERENCE or codec.by_value_registry():
        return None
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__":
        return None
    try:
        if _resolve(module, qualname, load=False)[2] is not fn:
            return None
        data = pickle.dumps(fn, protocol=PROTOCOL)  # as the C pickler would send it
    except Exception:  # noqa: BLE001 - travels by value (cloudpickle)
        return None
    return None if codec.refers_to_main(data) else f"{module}:{qualname}"


def fn_name(fn: Any) -> str:
    """The name a task of ``fn`` carries (its message, ``MQFuture.fn_name``):
    ``module.qualname``, ``partial(...)``, or the callable's type name."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        inner = getattr(fn, "func", None)
        if inner is not None:
            return f"partial({fn_name(inner)})"
        return type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


class ByValue:
    """A function's pickle by value, with what it depends on.

    Attributes:
        data (bytes): the pickle (cloudpickle; code objects as marshal writes them).
        digest (str): a hex digest of ``data``.

    :meth:`current` is True while every global name its code (and the code of
    the by-value functions it refers to) uses is bound to the same object as
    when it was pickled, its closure cells hold the same objects, and its
    code, defaults and attributes are the same objects.

    Raises:
        Whatever pickling raises (the caller then pickles the call as before).
    """

    __slots__ = ("data", "digest", "own", "attributes", "names", "cells")

    def __init__(self, fn: types.FunctionType):
        #: (attribute, object) of the function itself (it is not kept here:
        #: a cache of it must not keep it alive), (function, attribute,
        #: object) of the functions it refers to, (namespace, name, object),
        #: (cell, object): what the pickle depends on, compared by identity.
        self.own: list[tuple[str, Any]] = []
        self.attributes: list[tuple[Any, str, Any]] = []
        self.names: list[tuple[dict, str, Any]] = []
        self.cells: list[tuple[Any, Any]] = []
        _dependencies(fn, self, set(), root=True)
        self.data = codec.dumps_by_value(fn)
        self.digest = _blake2b(self.data, digest_size=16).hexdigest()

    def current(self, fn: types.FunctionType) -> bool:
        """Whether the pickle still is what pickling ``fn`` would give (as far
        as object identities tell)."""
        for attr, value in self.own:
            if getattr(fn, attr) is not value:
                return False
        for holder_, attr, value in self.attributes:
            if getattr(holder_, attr) is not value:
                return False
        for namespace, name, value in self.names:
            if namespace.get(name, _MISSING) is not value:
                return False
        for cell, value in self.cells:
            try:
                if cell.cell_contents is not value:
                    return False
            except ValueError:  # emptied
                return False
        return True


_MISSING = object()


def _blake2b(data: bytes, digest_size: int) -> Any:
    """hashlib's blake2b, taken from CPython's ``_blake2`` module where there is
    one: importing hashlib (and OpenSSL's ``_hashlib``) costs 4 ms on the first
    submit of a by-value function, ``_blake2`` 0.3 ms."""
    try:
        from _blake2 import blake2b
    except ImportError:  # another implementation of Python
        from hashlib import blake2b
    return blake2b(data, digest_size=digest_size)


def _code_names(code: types.CodeType, names: set[str]) -> None:
    """The global (and attribute) names ``code`` and its nested code objects use."""
    names.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_names(const, names)


def _by_value(obj: Any) -> bool:
    """A plain function that travels by value (not as a reference)."""
    return type(obj) is types.FunctionType and function_reference(obj) is None


def _dependencies(fn: types.FunctionType, value: ByValue, seen: set[int],
                  root: bool = False) -> None:
    """Record in ``value`` what the pickle of ``fn`` depends on (see ByValue)."""
    if id(fn) in seen:
        return
    seen.add(id(fn))
    for attr in ("__code__", "__defaults__", "__kwdefaults__", "__dict__"):
        if root:
            value.own.append((attr, getattr(fn, attr)))
        else:
            value.attributes.append((fn, attr, getattr(fn, attr)))
    for key, obj in fn.__dict__.items():  # attributes set on the function
        value.names.append((fn.__dict__, key, obj))
    names: set[str] = set()
    _code_names(fn.__code__, names)
    globals_ = fn.__globals__
    for name in sorted(names):
        obj = globals_.get(name, _MISSING)
        value.names.append((globals_, name, obj))
        if _by_value(obj):
            _dependencies(obj, value, seen)
    for cell in fn.__closure__ or ():
        try:
            obj = cell.cell_contents
        except ValueError:  # not filled yet
            obj = _MISSING
        value.cells.append((cell, obj))
        if _by_value(obj):
            _dependencies(obj, value, seen)


class FnInfo:
    """What submit() needs to know of a function, made once (:func:`fn_info`).

    Attributes:
        name (str): :func:`fn_name`.
        prefix (bytes): the start of a task body: the name (protocol.task_body).
        reference (str | None): ``"module:qualname"`` when the function may
            travel as a reference; valid while ``getattr(owner, attr) is fn``.
        bare_call (bytes): the payload of a call without arguments, by
            reference: the same bytes every time, pickled once (b"" if none).
        by_value (bool): a plain function that travels by value, whose pickle
            may be made once (:meth:`value`).
    """

    __slots__ = ("name", "prefix", "reference", "owner", "attr", "bare_call", "by_value",
                 "_value", "rebuilt", "__weakref__")

    #: A function whose pickle had to be made again this many times is
    #: pickled with each call instead: what it refers to keeps changing.
    MAX_REBUILDS = 8

    def __init__(self, fn: Any):
        self.name = fn_name(fn)
        self.prefix = task_body(self.name, b"")
        self.reference = function_reference(fn)
        self.owner: Any = None
        self.attr = ""
        self.bare_call = b""
        self.by_value = self.reference is None and type(fn) is types.FunctionType
        self._value: ByValue | None = None
        self.rebuilt = 0
        if self.reference is not None:
            try:
                self.owner, self.attr = holder(self.reference)
                self.bare_call = pickle.dumps((self.reference, (), {}), PROTOCOL)
            except (KeyError, AttributeError):
                self.reference = None

    def value(self, fn: types.FunctionType) -> ByValue | None:
        """The current pickle of ``fn`` by value, made again when what it
        depends on changed; None once that happened ``MAX_REBUILDS`` times.

        Raises:
            Whatever pickling raises.
        """
        value = self._value
        if value is not None and value.current(fn):
            return value
        if self.rebuilt >= self.MAX_REBUILDS:
            return None
        if value is not None:
            self.rebuilt += 1
        self._value = value = ByValue(fn)
        return value


_INFOS: dict[Any, FnInfo] = {}
_VALUE_INFOS: weakref.WeakKeyDictionary[Any, FnInfo] = weakref.WeakKeyDictionary()


def fn_info(fn: Any) -> FnInfo:
    """The :class:`FnInfo` of ``fn``. Kept for functions that travel as a
    reference (at most 1024; their module keeps them alive anyway), and, by a
    weak reference, for plain functions that travel by value. Never keeps a
    callable alive: not a bound method's instance, nor a closure's cells, once
    its tasks are done (CPython bpo-16284)."""
    try:
        info = _INFOS.get(fn)
    except TypeError:  # unhashable
        info = None
    if info is not None:
        return info
    if type(fn) is types.FunctionType:
        info = _VALUE_INFOS.get(fn)
        if info is not None:
            return info
    info = FnInfo(fn)
    if info.reference is not None:
        if len(_INFOS) > 1024:
            _INFOS.clear()
        _INFOS[fn] = info
    elif info.by_value:
        _VALUE_INFOS[fn] = info
    return info


#: Start of a by-value function's reference in a task: ``"@<root>:<name>"``,
#: its pickle's file in the producer's spill sub-directory (told from
#: ``"module:qualname"``; the worker knows the producer from the header).
BY_VALUE_PREFIX = "@"
_BY_VALUE: dict[str, Any] = {}  # worker side: spill reference -> function


def by_value_file(digest: str) -> str:
    """The file name of a by-value pickle of ``digest`` (ByValue.digest)."""
    return "f" + digest[:24]


def load_by_value(reference: str, subdir: str) -> Any:
    """The function of a by-value reference (``"@<root>:<name>"``) of the
    producer whose spill sub-directory is ``subdir``: unpickled once per file
    and kept (the worker side).

    Raises:
        spill.SpillError: a bad reference, or the file is gone.
        What unpickling raises.
    """
    root, _, name = reference[1:].partition(":")
    ref = f"{root}:{subdir}/{name}"
    fn = _BY_VALUE.get(ref)
    if fn is None:
        fn = spill.load(ref, pickle.loads, unlink=False)
        if len(_BY_VALUE) >= 256:
            _BY_VALUE.clear()
        _BY_VALUE[ref] = fn
    return fn


_FUNCTIONS: dict[str, tuple[Any, str, Any]] = {}  # reference -> (owner, name, fn)


def load_function(reference: str) -> Any:
    """Inverse of :func:`function_reference`, cached (the worker side): imports
    the module and looks the qualified name up, as unpickling would (again when
    the name was rebound since). A by-value reference goes to
    :func:`load_by_value` instead.

    Raises:
        TypeError: ``reference`` is not a ``"module:qualname"`` string.
        ImportError, AttributeError: the module or the name does not exist here.
    """
    hit = _FUNCTIONS.get(reference)  # type: ignore[arg-type]
    if hit is not None and getattr(hit[0], hit[1], None) is hit[2]:
        return hit[2]
    if not isinstance(reference, str) or ":" not in reference:
        raise TypeError(f"function reference {reference!r} is not 'module:qualname'")
    module, _, qualname = reference.partition(":")
    hit = _resolve(module, qualname)
    if len(_FUNCTIONS) >= 1024:
        _FUNCTIONS.clear()
    _FUNCTIONS[reference] = hit
    return hit[2]


