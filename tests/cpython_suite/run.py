"""Run CPython's concurrent.futures process-pool tests against MQExecutor.

    python -m tests.cpython_suite.run [-v|-q] [-x] [-k PATTERN] [--run-expected]
                                      [--only-expected] [--list] [--timeout SECONDS]
                                      [ID ...]

from the project root, under a Python whose ``test.test_concurrent_futures``
is installed (Debian: ``libpython3.X-testsuite``). Nothing of CPython's is
copied here: the tests are imported from the installed package at run time.

What it does:

- imports the process-pool modules of ``test.test_concurrent_futures``
  (:data:`MODULES`) and keeps only their process-pool test classes (names
  ``ProcessPool*``, plus ``FailingInitializerResourcesTest``); thread and
  interpreter pools and the executor-independent Future tests are not run;
- routes every process pool of these tests to ``MQProcessPoolExecutor``
  (:mod:`.shim`): the mixins' ``executor_type``,
  ``concurrent.futures.ProcessPoolExecutor``, and the child interpreters that
  test_shutdown starts (a bootstrap prefixed to their ``-c`` code);
- skips, with their reason, the tests listed in :mod:`.expected` (behaviour
  MQExecutor differs in on purpose, or private internals it does not have);
  ``--run-expected`` runs them too, ``--only-expected`` runs only them;
- after each test, fails it as LEAK when it left an MQExecutor pool open or a
  process running (5 s of grace), then kills those workers and processes and
  removes those queues, so that one leak does not hang the rest of the run;
- when one test, or the tear-down after it, lasts longer than ``--timeout``
  (default 120 s), dumps every thread's traceback, kills the workers of this
  process's pools and the processes started since the test began, and fails
  the test as TIMEOUT; if it is still stuck 60 s later, prints the summary so
  far, kills every descendant (by pid), removes the pools' queues and exits
  with status 3;
- prints a summary and exits 0 only when no selected test failed.

ID arguments and ``-k`` select tests whose id (without the
``test.test_concurrent_futures.`` prefix) matches: a fnmatch pattern
(``test_wait.*Spawn*``) or, without wildcards, a substring.
"""
from __future__ import annotations

import argparse
import faulthandler
import fnmatch
import importlib
import os
import sys
import time
import unittest

from . import expected, guard, shim

PACKAGE = "test.test_concurrent_futures"
# Modules with process-pool tests. test_future (Future alone), test_thread_pool
# and test_interpreter_pool (3.14+) do not involve a process pool.
MODULES = ("test_process_pool", "test_deadlock", "test_shutdown", "test_wait",
           "test_as_completed", "test_init")
EXTRA_CLASSES = ("FailingInitializerResourcesTest",)  # test_init: runs ProcessPool*Test
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEAK_GRACE = 5.0  # seconds a test's pools and processes get to go after it ended
STUCK_GRACE = 60.0  # seconds a timed-out test gets after its workers were killed
FAILED = ("FAIL", "ERROR", "LEAK", "TIMEOUT")


def short_id(test: unittest.TestCase) -> str:
    tid = test.id()
    prefix = PACKAGE + "."
    return tid[len(prefix):] if tid.startswith(prefix) else tid


def iter_tests(suite: unittest.TestSuite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from iter_tests(item)
        else:
            yield item


def matches(sid: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(sid, pattern)
    return pattern in sid


def load(modules) -> list[unittest.TestCase]:
    util = importlib.import_module(PACKAGE + ".util")
    shim.install(util)
    bootstrap = shim.subprocess_bootstrap(ROOT)
    loader = unittest.TestLoader()
    tests: list[unittest.TestCase] = []
    for name in modules:
        mod = importlib.import_module(f"{PACKAGE}.{name}")
        if hasattr(mod, "assert_python_ok"):  # test_shutdown's child interpreters
            mod.assert_python_ok = _with_bootstrap(mod.assert_python_ok, bootstrap)
        for test in iter_tests(loader.loadTestsFromModule(mod)):
            cls = type(test)
            if cls.__name__.startswith("ProcessPool") or cls.__name__ in EXTRA_CLASSES:
                tests.append(test)
    # Never test CPython's pool by mistake.
    for test in tests:
        et = getattr(test, "executor_type", shim.MQProcessPoolExecutor)
        if et is not shim.MQProcessPoolExecutor:
            raise SystemExit(f"{test.id()}: executor_type is {et!r}, not the shim")
    return tests


def _with_bootstrap(assert_python_ok, bootstrap: str):
    def wrapped(*args, **env_vars):
        args = list(args)
        if "-c" in args:
            i = args.index("-c") + 1
            args[i] = bootstrap + args[i]
        return assert_python_ok(*args, **env_vars)
    return wrapped


def mark_expected(tests, run_expected: bool) -> tuple[dict[str, str], list[str]]:
    """Skip (unless run_expected) the tests :mod:`.expected` lists. Returns
    {short id: reason} of the tests it matched and the unused patterns."""
    marked: dict[str, str] = {}
    used: set[str] = set()
    for test in tests:
        sid = short_id(test)
        for pattern, reason in expected.EXPECTED.items():
            if fnmatch.fnmatchcase(sid, pattern):
                used.add(pattern)
                marked[sid] = reason
                if not run_expected:
                    def skipped():
                        pass
                    skipped.__unittest_skip__ = True  # type: ignore[attr-defined]
                    skipped.__unittest_skip_why__ = (  # type: ignore[attr-defined]
                        "expected difference: " + reason)
                    setattr(test, test._testMethodName, skipped)
                break
    return marked, [p for p in expected.EXPECTED if p not in used]


class Result(unittest.TextTestResult):
    """Records each test's outcome and time, arms the watchdog, checks for
    leaks after each test and notes tests after which test.support reports a
    changed environment (dangling threads or child processes)."""

    watchdog: guard.Watchdog | None = None
    pools: guard.Pools | None = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.outcomes: dict[str, str] = {}
        self.times: dict[str, float] = {}
        self.env_changed: list[str] = []
        self.leaks: dict[str, list[str]] = {}
        self.stuck: set[str] = set()  # labels the watchdog had to unblock
        self._t0 = 0.0
        self._mark = 0
        self._procs: set[int] = set()

    def unblock(self, label: str) -> None:
        """Watchdog thread: the test (or the tear-down after it) named ``label``
        is stuck. Kill the pools' workers and the processes started since the
        test began (not multiprocessing's forkserver and resource tracker),
        then fail what the pools still have pending (BrokenMQPool)."""
        self.stuck.add(label)
        states = self.pools.open_states() if self.pools is not None else []
        guard.Pools.kill_workers(states)
        guard.kill(guard.new_processes(self._procs, 0))
        time.sleep(0.5)
        for state in states:  # Futures no dead worker accounts for (lost tasks)
            state.break_pool(f"test timed out: the cpython_suite runner killed the workers "
                             f"of this pool ({label})")

    def startTest(self, test):
        from test import support
        support.environment_altered = False
        if self.watchdog is not None:
            self.watchdog.arm(short_id(test))
        if self.pools is not None:
            self._mark = self.pools.mark()
        self._procs = guard.descendants()
        self._t0 = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        from test import support
        sid = short_id(test)
        self.times[sid] = time.monotonic() - self._t0
        if support.environment_altered:
            self.env_changed.append(sid)
        if sid in self.stuck:
            self.outcomes[sid] = "TIMEOUT"
            limit = self.watchdog.timeout if self.watchdog is not None else 0
            self.failures.append((test, f"still running after {limit:.0f} s "
                                  "(tracebacks on stderr): the runner killed its pools' "
                                  "workers and new processes to let it end"))
        self._check_leaks(test)
        if self.watchdog is not None:
            self.watchdog.arm(f"after {sid}")
        super().stopTest(test)

    def _check_leaks(self, test) -> None:
        found: list[str] = []
        if self.pools is not None:
            open_pools = self.pools.unclosed_since(self._mark, LEAK_GRACE)
            found += [f"pool left open: {self.pools.describe(s)}" for s in open_pools]
            self.pools.tear_down(open_pools)
        procs = guard.new_processes(self._procs, 0 if found else LEAK_GRACE)
        found += [f"process left running: pid {pid}: {cmd[:120]}"
                  for pid, cmd in sorted(procs.items())]
        guard.kill(procs)
        if found:
            sid = short_id(test)
            self.leaks[sid] = found
            if self.outcomes.get(sid) in (None, "ok", "skip"):
                self.outcomes[sid] = "LEAK"  # else it stays FAIL or ERROR, leaks listed
            text = "leaked after the test (now killed/removed by the runner):\n  " + \
                "\n  ".join(found)
            self.failures.append((test, text))
            if self.showAll:
                self.stream.writeln(f"  LEAK: {sid}: " + "; ".join(found))

    def _note(self, test, outcome):
        if isinstance(test, unittest.TestCase):
            self.outcomes.setdefault(short_id(test), outcome)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._note(test, "ok")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._note(test, "FAIL")

    def addError(self, test, err):
        super().addError(test, err)
        if isinstance(test, unittest.TestCase):
            self._note(test, "ERROR")
        else:  # a class or module fixture (_ErrorHolder)
            self.outcomes[test.description] = "ERROR"

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._note(test, "skip")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._note(test, "ok")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._note(test, "ok")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            sid = short_id(test)
            if self.outcomes.get(sid) != "ERROR":
                self.outcomes[sid] = "FAIL" if failed else "ERROR"


def own_queues() -> list[str]:
    """SysV queues whose last sender or receiver is this process: queues this
    run's executors left behind (their owner is this process)."""
    me = str(os.getpid())
    left = []
    try:
        with open("/proc/sysvipc/msg") as f:
            next(f)
            for line in f:
                cols = line.split()
                # key msqid perms cbytes qnum lspid lrpid ...
                if me in (cols[5], cols[6]):
                    left.append(f"key={int(cols[0]) & 0xFFFFFFFF:#x} msqid={cols[1]}")
    except OSError:
        pass
    return left


def summarize(result: Result, marked: dict[str, str], run_expected: bool,
              elapsed: float) -> int:
    counts = dict.fromkeys(("ok", "skip") + FAILED, 0)
    for outcome in result.outcomes.values():
        counts[outcome] += 1
    skipped_expected = 0 if run_expected else sum(
        1 for s in marked if result.outcomes.get(s) == "skip")
    bad = sorted(s for s, o in result.outcomes.items() if o in FAILED)
    print("\n==== CPython concurrent.futures process-pool tests against MQExecutor ====")
    extra = "".join(f", {counts[k]} {k.lower()}" for k in ("LEAK", "TIMEOUT") if counts[k])
    print(f"Python {sys.version.split()[0]}: {len(result.outcomes)} tests in {elapsed:.0f} s: "
          f"{counts['ok']} passed, {counts['FAIL']} failed, {counts['ERROR']} errors{extra}, "
          f"{counts['skip']} skipped ({skipped_expected} of them listed in "
          f"tests/cpython_suite/expected.py)")
    for s in bad:
        tag = "  (listed in expected.py)" if s in marked else ""
        print(f"  {result.outcomes[s]:7} {s}{tag}")
        for leak in result.leaks.get(s, ()):
            print(f"          {leak}")
    if run_expected:
        for s in sorted(s for s in marked if result.outcomes.get(s) == "ok"):
            print(f"  note: listed in expected.py but passed: {s}")
    if result.env_changed:
        print(f"  environment changed (dangling threads or processes) after "
              f"{len(result.env_changed)} test(s): " + ", ".join(result.env_changed))
    left = own_queues()
    if left:
        print("  SysV queues left by this run: " + ", ".join(left))
    return 0 if not bad and not left and result.wasSuccessful() else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cpython_suite.run",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", metavar="ID",
                    help="run only tests whose id matches (fnmatch pattern or substring)")
    ap.add_argument("-k", dest="patterns", action="append", default=[],
                    help="as ID; may be repeated")
    ap.add_argument("-v", "--verbose", action="count", default=1,
                    help="-v (default): name each test; -vv: also test.support's output")
    ap.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose",
                    help="dots only")
    ap.add_argument("-x", "--failfast", action="store_true", help="stop at the first failure")
    ap.add_argument("--run-expected", action="store_true",
                    help="also run the tests listed in expected.py (they should fail)")
    ap.add_argument("--only-expected", action="store_true",
                    help="run only the tests listed in expected.py (implies --run-expected)")
    ap.add_argument("--list", action="store_true", help="list the selected tests and exit")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds one test (or the tear-down after it) may take before "
                         "the runner kills what it waits for and fails it (default 120)")
    args = ap.parse_args(argv)

    try:
        from test import support
        importlib.import_module(PACKAGE)
    except ImportError as exc:
        v = f"{sys.version_info[0]}.{sys.version_info[1]}"
        print(f"cannot import {PACKAGE} ({exc}): install CPython's test suite "
              f"(Debian: apt-get install libpython{v}-testsuite)", file=sys.stderr)
        return 2
    support.verbose = int(args.verbose >= 2)
    for stream in (sys.stdout, sys.stderr):  # progress visible in a log file too
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    tests = load(MODULES)
    wanted = args.ids + args.patterns
    if wanted:
        tests = [t for t in tests if any(matches(short_id(t), p) for p in wanted)]
    args.run_expected = args.run_expected or args.only_expected
    marked, unused = mark_expected(tests, args.run_expected)
    if args.only_expected:
        tests = [t for t in tests if short_id(t) in marked]
    if unused and not wanted:
        print(f"note: {len(unused)} entries of expected.py match no test of this Python's "
              "suite: " + ", ".join(p.rsplit(".", 1)[-1] for p in unused), file=sys.stderr)

    import mqexecutor
    tests_dir = os.path.dirname(sys.modules[PACKAGE].__file__ or "?")
    print(f"Python {sys.version.split()[0]}; tests from {tests_dir}; "
          f"mqexecutor from {os.path.dirname(mqexecutor.__file__ or '?')}")
    if args.list:
        for t in tests:
            sid = short_id(t)
            print(sid + (f"    [expected: {marked[sid]}]" if sid in marked else ""))
        print(f"{len(tests)} tests, {len(marked)} listed in expected.py")
        return 0
    if not tests:
        print("no test selected", file=sys.stderr)
        return 2

    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    results: list[Result] = []
    pools = guard.Pools()
    t0 = time.monotonic()

    def on_stuck(label: str) -> None:
        if results:
            results[0].unblock(label)
            if label.startswith("after "):  # not a test: no stopTest will record it
                results[0].outcomes[label] = "TIMEOUT"

    def on_abort(label: str) -> None:
        pools.kill_workers(pools.open_states())
        guard.kill(guard.descendants())
        pools.tear_down_all()
        if results:
            results[0].outcomes[label] = "TIMEOUT"
            results[0].printErrors()
            summarize(results[0], marked, args.run_expected, time.monotonic() - t0)

    def make_result(*a, **kw):
        results.append(Result(*a, **kw))
        return results[-1]

    Result.watchdog = guard.Watchdog(args.timeout, STUCK_GRACE, on_stuck, on_abort)
    Result.pools = pools
    runner = unittest.TextTestRunner(
        stream=sys.stdout, verbosity=2 if args.verbose else 1, failfast=args.failfast,
        resultclass=make_result)
    result = runner.run(unittest.TestSuite(tests))
    Result.watchdog.disarm()
    pools.tear_down_all()  # nothing, unless a test's pool outlived the leak check
    return summarize(result, marked, args.run_expected, time.monotonic() - t0)


if __name__ == "__main__":
    sys.exit(main())
