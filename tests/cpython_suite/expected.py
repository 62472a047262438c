"""Tests of CPython's suite that fail against MQExecutor on purpose.

Keys are fnmatch patterns of test ids without the ``test.test_concurrent_futures.``
prefix (``*`` in the class name stands for the start methods Fork, Forkserver
and Spawn); values are the reason, shown as the skip message. The runner skips
them; ``--run-expected`` runs them anyway.

Only two kinds of reasons belong here:

- a behaviour MQExecutor chose differently and documents (docs/guide.md,
  "Differences from ProcessPoolExecutor"): a dead worker fails only its task,
  workers start with the executor, workers are forked by a manager process
  (never by a process with threads), queued tasks still run after the
  executor is garbage-collected;
- a test that reads, patches or mocks ProcessPoolExecutor's private internals
  (``_force_shutdown(operation=)``, ``_shutdown_lock``, ``_spawn_worker``,
  ``_RemoteTraceback``, ``Process.terminate`` of ``_processes``), which
  MQExecutor does not have.

A failure a ProcessPoolExecutor user could hit is a bug and must NOT be listed
here: it stays a failure of the run.
"""
from __future__ import annotations

_PP = "test_process_pool.ProcessPool*ProcessPoolExecutorTest."

EXPECTED: dict[str, str] = {
    # -- a dead worker fails only its own task; the pool heals -----------------
    _PP + "test_killed_child":
        "by design a killed worker fails only its own task and the pool keeps serving",
    _PP + "test_broken_process_pool_traceback":
        "by design a killed worker does not break the pool: the tasks blocked on a "
        "never-set event never end (the test hangs)",
    # -- workers start with the executor, not on demand -------------------------
    _PP + "test_idle_process_reuse_one":
        "by design all max_workers workers start with the executor (not on demand)",
    _PP + "test_idle_process_reuse_multiple":
        "by design all max_workers workers start with the executor (not on demand)",
    "test_shutdown.ProcessPoolForkserverProcessPoolShutdownTest.test_processes_terminate":
        "by design all max_workers workers start with the executor (5, not the 3 used)",
    "test_shutdown.ProcessPoolSpawnProcessPoolShutdownTest.test_processes_terminate":
        "by design all max_workers workers start with the executor (5, not the 3 used)",
    # -- workers are forked by the manager process, whatever the start method ----
    "test_process_pool.ProcessPoolForkProcessPoolExecutorTest.test_max_tasks_per_child":
        "by design fork is allowed with max_tasks_per_child (no ValueError): workers "
        "are forked by a manager process that has one thread",
    _PP + "test_max_tasks_per_child_defaults_to_spawn_context":
        "by design mp_context=None is not spawn: the manager is forked from a "
        "one-thread owner, else a fresh interpreter",
    "test_init.ProcessPool*FailingInitializerTest.test_initializer":
        "by design a process with threads (this runner) never forks: its pool's manager "
        "is a fresh interpreter, to which a multiprocessing.Queue in initargs cannot be "
        "pickled (only inherited); a Manager().Queue() proxy can",
    "test_init.FailingInitializerResourcesTest.test_*":
        "runs the FailingInitializerTest above (a multiprocessing.Queue in initargs)",
    # -- queued tasks still run after the executor is garbage-collected ---------
    _PP + "test_gc_during_max_tasks_worker_exit_gh152967":
        "by design queued tasks still run (workers replaced) after the executor is "
        "garbage-collected; no BrokenProcessPool('... garbage collected')",
    _PP + "test_shutdown_no_wait_max_tasks_gh119592":
        "by design queued tasks still run (workers replaced) after the executor is "
        "garbage-collected; no BrokenProcessPool('... garbage collected')",
    # -- ProcessPoolExecutor's private internals ----------------------------------
    _PP + "test_terminate_workers":
        "mocks the private _force_shutdown(operation=...)",
    _PP + "test_kill_workers":
        "mocks the private _force_shutdown(operation=...)",
    _PP + "test_force_shutdown_workers_invalid_op":
        "calls the private _force_shutdown(operation=...)",
    _PP + "test_force_shutdown_workers":
        "mocks Process.terminate()/kill() of _processes entries; MQExecutor signals "
        "its workers with os.kill(pid)",
    _PP + "test_force_shutdown_during_max_tasks_worker_exit":
        "sets the private _shutdown_lock/_force_shutting_down",
    _PP + "test_failed_worker_replacement_breaks_pool":
        "patches the private concurrent.futures.process._spawn_worker",
    _PP + "test_traceback":
        "checks that __cause__ is exactly the private concurrent.futures.process."
        "_RemoteTraceback (mqexecutor.RemoteTraceback has the same .tb)",
}
