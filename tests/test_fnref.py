"""FN_REF (flag 0x0020): a function pickled by reference travels as "module:qualname".

``functions.function_reference`` decides on the producer side (once per function)
which callables may travel that way: module-level functions, builtins and
classes that the C pickler pickles by reference. Everything else (lambdas,
closures, partials, bound methods, callable objects, ``__main__`` functions,
functions no longer reachable under their name, modules registered with
``cloudpickle.register_pickle_by_value``) travels by value. Each worker
resolves a reference with ``functions.load_function``; a reference it cannot
resolve fails that task with TaskUnpicklingError and the pool goes on.
"""
from __future__ import annotations

import copy
import functools
import os
import pickle
import sys

import cloudpickle
import pytest

from mqexecutor import TaskUnpicklingError, codec, functions, ipcinfo, spill
from mqexecutor.protocol import F_FN_REF, Kind, parse, split_task_body

from . import helpers
from .helpers import (
    Gate,
    gated,
    pool,
    remove_test_key,
    run_script,
    square,
    unused_key,
)

THIS = __name__  # "tests.test_fnref"


# --------------------------------------------------------------------------
# Callables (module-level: the workers are forked with this module imported)
# --------------------------------------------------------------------------

class Outer:
    class Inner:
        """A nested class: callable itself, and with a static method."""

        def __init__(self, value):
            self.value = value

        def __eq__(self, other):
            return type(other) is type(self) and other.value == self.value

        __hash__ = None

        @staticmethod
        def method(x):
            return ("static", x * 3)

    def bound(self, x):
        return x + 1

    @classmethod
    def klass(cls, x):
        return x + 2


class CallableThing:
    def __call__(self, x):
        return x + 3


def rebindable(x):
    return ("original", x)


def _replacement(x):
    return ("replacement", x)


def forged_target(x):
    """Sent with a forged FN_REF (see the tests below); never runs."""
    return x


def make_closure(k):
    def closure(x):
        return x + k
    return closure


# --------------------------------------------------------------------------
# functions.function_reference / functions.load_function
# --------------------------------------------------------------------------

def test_module_level_function_builtin_and_class_are_references():
    assert functions.function_reference(square) == "tests.helpers:square"
    assert functions.function_reference(abs) == "builtins:abs"
    assert functions.function_reference(os.getpid) == f"{os.getpid.__module__}:getpid"
    assert functions.function_reference(Outer) == f"{THIS}:Outer"
    assert functions.function_reference(Outer.Inner) == f"{THIS}:Outer.Inner"
    assert functions.function_reference(Outer.Inner.method) == f"{THIS}:Outer.Inner.method"
    # a plain method looked up on its class is a module-level function too
    assert functions.function_reference(Outer.bound) == f"{THIS}:Outer.bound"


@pytest.mark.parametrize("fn", [
    lambda x: x,
    make_closure(1),
    functools.partial(square, 2),
    Outer().bound,
    Outer.klass,
    CallableThing(),
    [].append,
    "abc".upper,
    print.__call__,
], ids=["lambda", "closure", "partial", "bound-method", "classmethod",
        "callable-instance", "builtin-bound-method", "str-method", "method-wrapper"])
def test_callables_that_travel_by_value_have_no_reference(fn):
    assert functions.function_reference(fn) is None


def test_function_rebound_in_its_module_has_no_reference(monkeypatch):
    original = rebindable
    assert functions.function_reference(original) == f"{THIS}:rebindable"
    monkeypatch.setattr(sys.modules[THIS], "rebindable", _replacement)
    # the name now leads to another object: "tests.test_fnref:rebindable"
    # would run _replacement in a worker
    assert functions.function_reference(original) is None
    monkeypatch.setattr(sys.modules[THIS], "rebindable", 42)
    assert functions.function_reference(original) is None


def test_function_with_a_wrong_qualname_has_no_reference():
    def local():
        pass
    assert "<locals>" in local.__qualname__
    assert functions.function_reference(local) is None
    local.__module__ = THIS
    local.__qualname__ = "does_not_exist_here"
    assert functions.function_reference(local) is None


def test_module_registered_by_value_disables_references():
    assert functions.function_reference(square) == "tests.helpers:square"
    cloudpickle.register_pickle_by_value(helpers)
    try:
        assert codec.by_value_registry()
        assert functions.function_reference(square) is None
        assert functions.function_reference(abs) is None  # any registry: all by value
    finally:
        cloudpickle.unregister_pickle_by_value(helpers)
    assert not codec.by_value_registry()
    assert functions.function_reference(square) == "tests.helpers:square"


def test_main_function_has_no_reference(tmp_path):
    code = (
        "import json\n"
        "from mqexecutor import functions\n"
        "def f(x):\n"
        "    return x\n"
        "class C:\n"
        "    pass\n"
        "print(json.dumps([functions.function_reference(f), functions.function_reference(C),\n"
        "                  functions.function_reference(abs)]))\n")
    res = run_script(code, tmp_path, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == '[null, null, "builtins:abs"]'


def test_load_function_resolves_references_and_refuses_bad_ones():
    assert functions.load_function("tests.helpers:square") is square
    assert functions.load_function("builtins:abs") is abs
    assert functions.load_function(f"{THIS}:Outer.Inner.method") is Outer.Inner.method
    assert functions.load_function("os.path:join") is os.path.join
    for fn in (square, abs, Outer, Outer.Inner, Outer.Inner.method, os.getpid):
        assert functions.load_function(functions.function_reference(fn)) is fn
    with pytest.raises(ImportError):
        functions.load_function("no_such_module_xyz:fn")
    with pytest.raises(AttributeError):
        functions.load_function("os:no_such_attr")
    with pytest.raises(AttributeError):
        functions.load_function(f"{THIS}:make_closure.<locals>.closure")
    with pytest.raises(TypeError):
        functions.load_function("no colon here")
    with pytest.raises(TypeError):
        functions.load_function(42)


# --------------------------------------------------------------------------
# On the wire, and end to end
# --------------------------------------------------------------------------

def _waiting_tasks(key: int) -> list[tuple[int, str, tuple]]:
    """(flags, name, unpickled payload) of the tasks waiting in ``key``'s queue."""
    info = ipcinfo.queue_info(key)
    assert info is not None
    copies = ipcinfo.peek(info.msqid)
    if copies is None:
        pytest.skip("this kernel has no msgrcv(MSG_COPY)")
    out = []
    for _mtype, raw in copies:
        h, body = parse(raw)
        assert h.kind == Kind.TASK
        name, payload = split_task_body(body)
        out.append((h.flags, name, pickle.loads(payload)))
    return out


@pytest.mark.timeout(60)
def test_references_on_the_wire_and_run_by_the_workers(tmp_path):
    # Tasks wait in the queue of an explicit key (which takes them all) while
    # the only worker is held on a gate: their messages are read in place.
    gate = Gate(tmp_path)
    key = unused_key()
    calls = [
        (square, (3,), "tests.helpers:square", 9),
        (abs, (-6,), "builtins:abs", 6),
        (Outer.Inner.method, (4,), f"{THIS}:Outer.Inner.method", ("static", 12)),
        (Outer.Inner, (5,), f"{THIS}:Outer.Inner", Outer.Inner(5)),
        (lambda x: x - 1, (8,), None, 7),
        (functools.partial(square, 2), (), None, 4),
    ]
    try:
        with pool(key=key, max_workers=1) as ex:
            blocker = ex.submit(gated, gate.path, gate.started_dir, "blocker")
            try:
                gate.wait_started(1)
                futures = [ex.submit(fn, *args) for fn, args, _, _ in calls]
                waiting = _waiting_tasks(key)
            finally:
                gate.open()
            assert len(waiting) == len(calls)
            for (flags, _name, (fn, args, kwargs)), (real, a, ref, _) in zip(waiting, calls):
                assert args == a and kwargs == {}
                if ref is None:
                    assert not flags & F_FN_REF, (real, flags)
                    assert callable(fn) and not isinstance(fn, str)
                else:
                    assert flags & F_FN_REF, (real, flags)
                    assert fn == ref
            blocker.result(timeout=30)
            assert [f.result(timeout=30) for f in futures] == [c[3] for c in calls]
    finally:
        remove_test_key(key)


@pytest.mark.timeout(60)
def test_no_reference_while_a_module_is_registered_by_value(tmp_path):
    # The reference of `square` is cached per function by the executor; a
    # later registration must still send it by value (no FN_REF flag).
    gate = Gate(tmp_path)
    key = unused_key()
    try:
        with pool(key=key, max_workers=1) as ex:
            assert ex.submit(square, 2).result(timeout=30) == 4  # caches the reference
            blocker = ex.submit(gated, gate.path, gate.started_dir, "blocker")
            try:
                gate.wait_started(1)
                cloudpickle.register_pickle_by_value(helpers)
                try:
                    fut = ex.submit(square, 5)
                finally:
                    cloudpickle.unregister_pickle_by_value(helpers)
                waiting = _waiting_tasks(key)
            finally:
                gate.open()
            assert len(waiting) == 1
            flags, _name, (fn, args, _kw) = waiting[0]
            assert not flags & F_FN_REF and not isinstance(fn, str) and args == (5,)
            assert fut.result(timeout=30) == 25
            blocker.result(timeout=30)
    finally:
        remove_test_key(key)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reference, cause", [
    ("no_such_module_xyz:fn", ImportError),
    ("os:no_such_attr", AttributeError),
    (f"{THIS}:make_closure.<locals>.closure", AttributeError),
    ("not a reference", TypeError),
])
def test_unresolvable_reference_fails_only_that_task(monkeypatch, reference, cause):
    # A producer that sends a reference the worker cannot resolve: the
    # executor's per-function reference is forged for `forged_target` only.
    real = functions.fn_info

    def forged(fn):
        info = real(fn)
        if fn is not forged_target:
            return info
        fake = copy.copy(info)
        fake.reference = reference
        return fake

    monkeypatch.setattr(functions, "fn_info", forged)
    with pool(max_workers=1) as ex:
        assert ex.submit(square, 2).result(timeout=30) == 4
        pids = set(ex._processes)
        bad = ex.submit(forged_target, 1)
        with pytest.raises(TaskUnpicklingError) as info:
            bad.result(timeout=30)
        assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
        assert type(info.value.__cause__).__name__ in str(info.value)
        # the pool goes on, with the same worker
        assert [f.result(timeout=30) for f in [ex.submit(square, i) for i in range(20)]] \
            == [i * i for i in range(20)]
        assert set(ex._processes) == pids
        assert ex.stats().rejected == 1


@pytest.mark.timeout(60)
def test_nested_class_and_static_method_run_through_references():
    with pool(max_workers=2) as ex:
        assert functions.fn_info(Outer.Inner.method).reference \
            == f"{THIS}:Outer.Inner.method"
        assert ex.submit(Outer.Inner.method, 7).result(timeout=30) == ("static", 21)
        assert ex.submit(Outer.Inner, "v").result(timeout=30) == Outer.Inner("v")
        assert list(ex.map(Outer.Inner.method, range(5))) == \
            [("static", 3 * i) for i in range(5)]


@pytest.mark.timeout(60)
def test_a_function_rebound_since_its_first_submit_travels_by_value(monkeypatch):
    """The executor keeps each function's reference, but sends it only while
    the name still holds that very function: rebound since, the function
    travels by value (as pickling would send it)."""
    original = rebindable
    with pool(max_workers=1) as ex:
        assert ex.submit(original, 1).result(timeout=30) == ("original", 1)
    monkeypatch.setattr(sys.modules[THIS], "rebindable", _replacement)
    assert functions.function_reference(original) is None  # not a reference any more
    with pool(max_workers=1) as ex:  # workers forked after the rebinding
        assert ex.submit(original, 2).result(timeout=30) == ("original", 2)


class _Int(int):
    pass


@pytest.mark.timeout(10)
def test_dumps_plain_call_is_dumps_in_one_step_for_plain_arguments():
    ref = "tests.helpers:square"
    for args, kwargs in [((), {}), ((7,), {}), ((1, 2.5, "s", b"b", None, True, 3j), {}),
                         ((), {"x": 1, "y": "z"})]:
        got = codec.dumps_plain_call(ref, args, kwargs, 8000)
        assert got == codec.dumps((ref, args, kwargs), 8000, "")[0]
        assert pickle.loads(got) == (ref, args, kwargs)
    # anything else is left to dumps(): containers, subclasses, objects
    for args, kwargs in [(([1],), {}), ((_Int(1),), {}), ((object(),), {}),
                         ((), {"x": [1]}), ((), {"x": _Int(2)})]:
        assert codec.dumps_plain_call(ref, args, kwargs, 8000) is None
    # and a payload that does not fit (dumps() spills it)
    assert codec.dumps_plain_call(ref, (b"x" * 9000,), {}, 8000) is None


@pytest.mark.timeout(60)
def test_a_call_without_arguments_sends_the_payload_pickled_once(monkeypatch):
    """submit(fn) with no arguments sends the bytes made once per function,
    which are what dumps_plain_call would make every time: it pickles nothing
    (both picklers are made to fail here); the workers run it."""
    ref = functions.function_reference(os.getpid)
    info = functions.fn_info(os.getpid)
    assert info.bare_call == codec.dumps_plain_call(ref, (), {}, 8000)
    assert pickle.loads(info.bare_call) == (ref, (), {})

    def no_pickling(*_args, **_kwargs):
        raise AssertionError("submit(fn) pickled its call again")

    with pool(max_workers=1) as ex:
        with monkeypatch.context() as m:
            m.setattr(codec, "dumps_plain_call", no_pickling)
            m.setattr(codec, "dumps", no_pickling)
            pids = {ex.submit(os.getpid).result(timeout=30) for _ in range(3)}
        assert len(pids) == 1 and pids != {os.getpid()}
        assert ex.submit(helpers.square, 5).result(timeout=30) == 25


@pytest.mark.timeout(60)
def test_plain_arguments_too_large_for_a_message_still_spill(monkeypatch):
    written = []
    real_write = spill.write

    def counting_write(*args, **kwargs):
        written.append(args[0])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(spill, "write", counting_write)
    with pool(max_workers=1) as ex:
        data = os.urandom(50_000)
        assert ex.submit(helpers.length, data).result(timeout=30) == len(data)
        assert len(written) == 1, "the call was not spilled"
        assert ex.submit(square, 12).result(timeout=30) == 144


LAZY_CLOUDPICKLE = """
import sys
import mqexecutor
from mqexecutor import codec, functions
assert "cloudpickle" not in sys.modules, "import mqexecutor imported cloudpickle"
assert not codec.by_value_registry()
import cloudpickle
import tests.helpers
cloudpickle.register_pickle_by_value(tests.helpers)
assert codec.by_value_registry(), "a registration made after import was missed"
cloudpickle.unregister_pickle_by_value(tests.helpers)
assert not codec.by_value_registry()
print("OK")
"""


@pytest.mark.timeout(60)
def test_cloudpickle_is_imported_only_when_needed(tmp_path):
    """``import mqexecutor`` leaves cloudpickle (about 10 ms) unimported; a
    module registered by value once it is imported is still seen."""
    proc = run_script(LAZY_CLOUDPICKLE, tmp_path, env={"PYTHONPATH": helpers.REPO})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


LAZY_IMPORTS = """
import sys
heavy = ["hmac", "hashlib", "secrets", "ctypes", "dataclasses", "inspect", "cloudpickle"]
before = {m for m in heavy if m in sys.modules}  # what the interpreter itself loaded
import mqexecutor
print("LOADED", sorted(m for m in heavy if m in sys.modules and m not in before))
"""


@pytest.mark.timeout(60)
def test_import_leaves_heavy_modules_for_first_use(tmp_path):
    """``import mqexecutor`` does not import what only some pools need: hmac and
    hashlib (authkey), secrets (spill file names), ctypes (``mqexecutor peek``),
    nor dataclasses and inspect (its records are named tuples): about 12 ms of
    import together, measured."""
    proc = run_script(LAZY_IMPORTS, tmp_path, env={"PYTHONPATH": helpers.REPO})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout
