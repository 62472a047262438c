"""Failures: exceptions of tasks, pickling errors at every step (modelled on the
cases of CPython's test_concurrent_futures/test_deadlock.py), crashing and
exiting workers, failing initializers."""
from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import threading
from concurrent.futures.process import BrokenProcessPool

import pytest

import mqexecutor
from mqexecutor import (
    Mode,
    RemoteTraceback,
    ResultUnpicklingError,
    TaskUnpicklingError,
    TerminatedWorkerError,
)

from .helpers import (
    exit_now,
    getpid,
    identity,
    in_worker,
    kill_self,
    no_core,
    pool,
    shutdown_or_fail,
    sleep_return,
    square,
    wait_until,
    where,
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# exceptions raised by tasks
# --------------------------------------------------------------------------

class CustomError(Exception):
    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code


def raising_function_for_traceback():
    raise ValueError("kaboom 42")


def raise_custom():
    raise CustomError("custom", 17)


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_exception_type_and_remote_traceback(mode):
    with pool(mode=mode) as ex:
        f = ex.submit(raising_function_for_traceback)
        with pytest.raises(ValueError, match="kaboom 42") as info:
            f.result(timeout=10)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        text = str(cause)
        assert "raising_function_for_traceback" in text
        assert "Traceback (most recent call last)" in text
        assert "ValueError: kaboom 42" in text
        assert isinstance(f.exception(timeout=1), ValueError)
        # the pool goes on
        assert ex.submit(square, 3).result(timeout=10) == 9


def test_custom_exception_keeps_its_type_and_attributes():
    with pool() as ex:
        with pytest.raises(CustomError) as info:
            ex.submit(raise_custom).result(timeout=10)
        assert info.value.code == 17
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raise_custom" in str(info.value.__cause__)


def test_lambda_exception():
    with pool() as ex:
        f = ex.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            f.result(timeout=10)
        assert "<lambda>" in str(f.exception().__cause__)


# --------------------------------------------------------------------------
# pickling errors at each step (facts from CPython's test_deadlock.py)
# --------------------------------------------------------------------------

def _exit_in_worker():
    if in_worker():
        sys.exit(5)


def _error_in_worker():
    if in_worker():
        raise ValueError("error at task unpickle")


def _abort_in_worker():
    if in_worker():
        no_core()
        os.abort()


def _segv_in_worker():
    if in_worker():
        no_core()
        faulthandler._sigsegv()


def _error_in_parent():
    if not in_worker():
        raise ValueError("error at result unpickle")


def _exit_in_parent():
    if not in_worker():
        sys.exit(9)


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("error at pickle")


class ExitAtPickle:
    def __reduce__(self):
        if in_worker():
            sys.exit(6)
        return (ExitAtPickle, ())


class CrashAtPickle:
    def __reduce__(self):
        if in_worker():
            no_core()
            faulthandler._sigsegv()
        return (CrashAtPickle, ())


class ExitAtUnpickle:
    def __reduce__(self):
        return (_exit_in_worker, ())


class ErrorAtUnpickle:
    def __reduce__(self):
        return (_error_in_worker, ())


class AbortAtUnpickle:
    def __reduce__(self):
        return (_abort_in_worker, ())


class SegvAtUnpickle:
    def __reduce__(self):
        return (_segv_in_worker, ())


class ErrorAtResultUnpickle:
    def __reduce__(self):
        return (_error_in_parent, ())


class ExitAtResultUnpickle:
    def __reduce__(self):
        return (_exit_in_parent, ())


def return_instance(cls):
    return cls()


def crash_in_task():
    no_core()
    faulthandler._sigsegv()


def exit_in_task():
    sys.exit(4)


def error_in_task():
    raise RuntimeError("error in task")


# (name, fn, args, expected exception type)
CASES = [
    ("error at task pickle", identity, (ErrorAtPickle(),), pickle.PicklingError),
    ("exit at task unpickle", identity, (ExitAtUnpickle(),), TaskUnpicklingError),
    ("error at task unpickle", identity, (ErrorAtUnpickle(),), TaskUnpicklingError),
    ("abort at task unpickle", identity, (AbortAtUnpickle(),), TerminatedWorkerError),
    ("segfault at task unpickle", identity, (SegvAtUnpickle(),), TerminatedWorkerError),
    ("crash during func", crash_in_task, (), TerminatedWorkerError),
    ("exit during func", exit_in_task, (), SystemExit),
    ("error during func", error_in_task, (), RuntimeError),
    ("crash during result pickle", return_instance, (CrashAtPickle,), TerminatedWorkerError),
    ("exit during result pickle", return_instance, (ExitAtPickle,), SystemExit),
    ("error during result pickle", return_instance, (ErrorAtPickle,), pickle.PicklingError),
    ("error during result unpickle", return_instance, (ErrorAtResultUnpickle,),
     ResultUnpicklingError),
    ("exit during result unpickle", return_instance, (ExitAtResultUnpickle,),
     ResultUnpicklingError),
]


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
@pytest.mark.parametrize("name,fn,args,expected", CASES, ids=[c[0] for c in CASES])
def test_pickling_and_crash_matrix(mode, name, fn, args, expected):
    with pool(mode=mode) as ex:
        f = ex.submit(fn, *args)  # must not raise, whatever happens later
        with pytest.raises(expected) as info:
            f.result(timeout=20)
        err = info.value
        if expected in (TaskUnpicklingError, ResultUnpicklingError, TerminatedWorkerError):
            assert isinstance(err, BrokenProcessPool)
        if expected is TaskUnpicklingError:
            assert isinstance(err.__cause__, BaseException)
        if expected is TerminatedWorkerError:
            assert err.task_id == f.task_id
        # only that Future failed: the same executor runs a normal task
        assert ex.submit(square, 3).result(timeout=20) == 9
        assert [g.result(timeout=20) for g in [ex.submit(square, i) for i in range(10)]] \
            == [i * i for i in range(10)]


_PAD = b"s" * (1024 * 1024)  # forces a spill file


def first_of(a, b):
    return a


def return_padded(cls):
    return [b"r" * (1024 * 1024), cls()]


SPILLED_CASES = [
    ("error at task unpickle", first_of, (ErrorAtUnpickle(), _PAD), TaskUnpicklingError),
    ("abort at task unpickle", first_of, (AbortAtUnpickle(), _PAD), TerminatedWorkerError),
    ("crash during result pickle", return_padded, (CrashAtPickle,), TerminatedWorkerError),
    ("error during result pickle", return_padded, (ErrorAtPickle,), pickle.PicklingError),
    ("error during result unpickle", return_padded, (ErrorAtResultUnpickle,),
     ResultUnpicklingError),
    ("exit during result unpickle", return_padded, (ExitAtResultUnpickle,),
     ResultUnpicklingError),
]


@pytest.mark.parametrize("name,fn,args,expected", SPILLED_CASES,
                         ids=[c[0] for c in SPILLED_CASES])
def test_pickling_failures_with_spilled_payloads(name, fn, args, expected):
    """The same failures when the call or the result travels through a spill
    file: only that Future fails and no spill file is left behind."""
    from .helpers import spill_files_of
    with pool() as ex:
        f = ex.submit(fn, *args)
        with pytest.raises(expected):
            f.result(timeout=20)
        assert ex.submit(len, _PAD).result(timeout=20) == len(_PAD)
        assert wait_until(lambda: spill_files_of(ex) == [], 5), spill_files_of(ex)


def crash_after(delay, data=None):
    import time
    time.sleep(delay)
    no_core()
    faulthandler._sigsegv()


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_worker_crash_after_shutdown_call(mode):
    """A worker that crashes after shutdown() was called (CPython's
    test_shutdown_deadlock): shutdown returns and the Future fails."""
    ex = mqexecutor.MQExecutor(max_workers=2, mode=mode)
    f = ex.submit(crash_after, 0.2)
    shutdown_or_fail(ex)
    with pytest.raises(BrokenProcessPool):
        f.result(timeout=0)


def test_crash_with_big_data_is_an_error_not_a_hang():
    """CPython's test_crash_big_data: workers crash while handling big data."""
    data = b"a" * (1024 * 1024)
    with pool() as ex:
        with pytest.raises(BrokenProcessPool):
            list(ex.map(crash_after, [0] * 10, [data] * 10))
        assert ex.submit(len, data).result(timeout=20) == len(data)


def test_error_at_task_unpickle_cause_is_worker_error():
    with pool() as ex:
        with pytest.raises(TaskUnpicklingError) as info:
            ex.submit(identity, ErrorAtUnpickle()).result(timeout=20)
        cause = info.value.__cause__
        assert isinstance(cause, ValueError)
        assert "error at task unpickle" in str(cause)
        assert "error at task unpickle" in str(info.value)


def test_error_at_result_unpickle_cause():
    with pool() as ex:
        with pytest.raises(ResultUnpicklingError) as info:
            ex.submit(return_instance, ErrorAtResultUnpickle).result(timeout=20)
        assert isinstance(info.value.__cause__, ValueError)
        assert "error at result unpickle" in str(info.value)


def test_unpicklable_argument_fails_only_its_future():
    with pool() as ex:
        f = ex.submit(identity, threading.Lock())  # must not raise here
        with pytest.raises((TypeError, pickle.PicklingError)):
            f.result(timeout=10)
        assert ex.submit(square, 5).result(timeout=10) == 25


def make_lock():
    return threading.Lock()


def test_unpicklable_result_fails_only_its_future():
    with pool() as ex:
        f = ex.submit(make_lock)
        with pytest.raises((TypeError, pickle.PicklingError)):
            f.result(timeout=10)
        assert ex.submit(square, 5).result(timeout=10) == 25


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be unpickled: __init__ wants two arguments and
    BaseException.__reduce__ passes only self.args (one)."""

    def __init__(self, a, b):
        super().__init__(a)
        self.b = b


def raise_needs_two_args():
    raise NeedsTwoArgs("one", "two")


def raise_with_unpicklable_payload():
    raise ValueError(threading.Lock())


def test_exception_that_cannot_be_unpickled_fails_only_its_future():
    with pool() as ex:
        with pytest.raises(BrokenProcessPool) as info:
            ex.submit(raise_needs_two_args).result(timeout=20)
        assert isinstance(info.value, ResultUnpicklingError)
        assert ex.submit(square, 4).result(timeout=20) == 16


def test_exception_that_cannot_be_pickled_fails_only_its_future():
    with pool() as ex:
        f = ex.submit(raise_with_unpicklable_payload)
        exc = f.exception(timeout=20)
        assert exc is not None
        # some clear error; which one is the library's choice (ProcessPoolExecutor
        # raises the pickling error)
        assert isinstance(exc, (TypeError, pickle.PicklingError, RuntimeError, ValueError))
        assert ex.submit(square, 4).result(timeout=20) == 16


# --------------------------------------------------------------------------
# workers that die mid-task
# --------------------------------------------------------------------------

@pytest.mark.parametrize("code", [1, 3])
@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_worker_os_exit_mid_task(mode, code):
    with pool(mode=mode) as ex:
        pids_before = set(ex._processes)
        others = [ex.submit(sleep_return, 0.05, i) for i in range(6)]
        f = ex.submit(exit_now, code)
        with pytest.raises(TerminatedWorkerError) as info:
            f.result(timeout=20)
        err = info.value
        assert isinstance(err, BrokenProcessPool)
        assert err.exitcode == code
        assert err.pid in pids_before
        assert err.worker_id in (0, 1)
        assert err.task_id == f.task_id
        msg = str(err)
        assert f"worker {err.worker_id}" in msg
        assert str(err.pid) in msg
        assert f"exit code {code}" in msg
        assert str(f.task_id) in msg
        assert "exit_now" in msg
        # only that Future failed
        assert [o.result(timeout=20) for o in others] == list(range(6))
        assert ex.submit(square, 4).result(timeout=20) == 16
        # the dead worker is replaced under the same id
        assert wait_until(lambda: len(ex._processes) == 2 and err.pid not in ex._processes
                          and all(p.is_alive() for p in ex._processes.values())), \
            ex._processes


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_worker_sigkill_mid_task(mode):
    with pool(mode=mode) as ex:
        f = ex.submit(kill_self, signal.SIGKILL)
        with pytest.raises(TerminatedWorkerError) as info:
            f.result(timeout=20)
        err = info.value
        assert err.exitcode == -signal.SIGKILL
        msg = str(err)
        assert "SIGKILL" in msg
        assert str(err.pid) in msg and f"worker {err.worker_id}" in msg
        assert "kill_self" in msg
        results = [g.result(timeout=20) for g in [ex.submit(where) for _ in range(8)]]
        assert all(pid != err.pid for _, pid in results)


# Exit status 3 is what a worker whose initializer failed uses internally; a
# task may exit with any status, and the worker must still be replaced.
@pytest.mark.parametrize("code", [1, 3, 255])
def test_targeted_tasks_queued_for_a_dead_worker_still_run(code):
    with pool(mode=Mode.TARGETED) as ex:
        dead_pid = ex.submit_to(0, getpid).result(timeout=10)
        f = ex.submit_to(0, exit_now, code)
        queued = [ex.submit_to(0, where) for _ in range(5)]
        with pytest.raises(TerminatedWorkerError) as info:
            f.result(timeout=20)
        assert info.value.worker_id == 0 and info.value.exitcode == code
        assert info.value.pid == dead_pid
        results = [q.result(timeout=20) for q in queued]
        assert all(wid == 0 for wid, _ in results)
        assert all(pid != dead_pid for _, pid in results)
        assert len({pid for _, pid in results}) == 1


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_idle_worker_killed_from_outside_is_replaced(signum):
    with pool() as ex:
        assert ex.submit(square, 2).result(timeout=10) == 4
        victim = next(iter(ex._processes))
        os.kill(victim, signum)
        assert wait_until(lambda: victim not in ex._processes and len(ex._processes) == 2)
        assert [f.result(timeout=10) for f in [ex.submit(square, i) for i in range(20)]] \
            == [i * i for i in range(20)]


def test_sigint_to_a_worker_is_ignored():
    """Ctrl-C is the owner's to handle: a worker ignores SIGINT."""
    with pool(mode=Mode.TARGETED) as ex:
        pid = ex.submit_to(0, getpid).result(timeout=10)
        os.kill(pid, signal.SIGINT)
        assert ex.submit_to(0, sleep_return, 0.2, "x").result(timeout=10) == "x"
        os.kill(pid, signal.SIGINT)
        assert ex.submit_to(0, getpid).result(timeout=10) == pid


def test_many_worker_deaths_in_a_row():
    with pool() as ex:
        for _ in range(6):
            with pytest.raises(TerminatedWorkerError):
                ex.submit(exit_now, 2).result(timeout=20)
        assert ex.submit(square, 6).result(timeout=20) == 36


# --------------------------------------------------------------------------
# initializer
# --------------------------------------------------------------------------

def failing_initializer(message):
    raise ValueError(message)


def initializer_failing_in_worker_1(message):
    if mqexecutor.worker_id() == 1:
        raise ValueError(message)


def exiting_initializer():
    sys.exit(2)


def _submit_error(ex, *args):
    """The BrokenProcessPool of a submit: raised by submit or by the Future."""
    try:
        f = ex.submit(*args)
    except BrokenProcessPool as exc:
        return exc
    exc = f.exception(timeout=20)
    assert exc is not None, "the task ran on a broken pool"
    return exc


@pytest.mark.parametrize("mode", [Mode.PREEMPTIVE, Mode.TARGETED])
def test_failing_initializer_breaks_the_pool(mode):
    ex = mqexecutor.MQExecutor(max_workers=2, mode=mode, initializer=failing_initializer,
                               initargs=("boom",))
    try:
        err = _submit_error(ex, square, 2)
        assert isinstance(err, BrokenProcessPool)
        assert "boom" in str(err) and "ValueError" in str(err)
        # once broken, submit raises as ProcessPoolExecutor's does
        with pytest.raises(BrokenProcessPool) as info:
            ex.submit(square, 3)
        assert "boom" in str(info.value) and "ValueError" in str(info.value)
    finally:
        shutdown_or_fail(ex)


def test_failing_initializer_fails_all_pending_futures():
    ex = mqexecutor.MQExecutor(max_workers=2, initializer=failing_initializer,
                               initargs=("boom many",))
    try:
        fs = []
        for i in range(50):
            try:
                fs.append(ex.submit(square, i))
            except BrokenProcessPool:
                break
        for f in fs:
            with pytest.raises(BrokenProcessPool, match="boom many"):
                f.result(timeout=20)
    finally:
        shutdown_or_fail(ex)


def test_initializer_failing_in_one_worker_breaks_the_pool():
    ex = mqexecutor.MQExecutor(max_workers=2, initializer=initializer_failing_in_worker_1,
                               initargs=("only worker 1",))
    try:
        def broken():
            try:
                ex.submit(square, 1)
            except BrokenProcessPool:
                return True
            return False
        assert wait_until(broken, 20), "the pool never reported the initializer failure"
        with pytest.raises(BrokenProcessPool, match="only worker 1"):
            ex.submit(square, 2)
    finally:
        shutdown_or_fail(ex)


def test_initializer_calling_sys_exit_breaks_the_pool():
    ex = mqexecutor.MQExecutor(max_workers=2, initializer=exiting_initializer)
    try:
        err = _submit_error(ex, square, 2)
        assert isinstance(err, BrokenProcessPool)
    finally:
        shutdown_or_fail(ex)
