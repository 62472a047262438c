"""MQExecutor: a concurrent.futures Executor whose task workers are fed by a
System V message queue. See docs/architecture.md for the processes, threads and
the path of one task.

How it differs from ``concurrent.futures.ProcessPoolExecutor`` (on purpose):

* **Healing, not breaking.** A task worker that dies (a segfault, the OOM
  killer, ``os._exit``) fails only the task it was running, with
  ``TerminatedWorkerError`` (a BrokenProcessPool subclass naming the worker,
  its exit code and the task); the manager process replaces it under the same
  worker id and the pool keeps serving. ProcessPoolExecutor breaks the whole
  pool. ``retries=`` runs such a task again instead.
* **A manager process.** Task workers are forked by the pool's manager
  process, a process with one thread (never by a thread of the caller), and
  ``mp_context`` chooses how the manager starts (see
  :mod:`mqexecutor.manager.launch`). All workers start with the pool, not on
  demand.
* **RUNNING means "in the kernel queue".** A Future turns RUNNING when its
  task enters the SysV queue, as ProcessPoolExecutor's do when they enter its
  call queue; ``cancel()`` succeeds only before. ``shutdown(cancel_futures=True)``
  also takes back the tasks still queued.
* **No Condition per Future.** ``MQFuture._condition`` is a bare reentrant
  lock; ``result()`` waits on a lock of its own (see :mod:`mqexecutor.future`).
* **Functions by value when needed.** Lambdas, closures and ``__main__``
  functions travel with cloudpickle; module functions travel as a reference.
* **Its own process group.** The manager process leads a process group of
  its own, with the workers in it: Ctrl-C in a terminal reaches only the
  submitting process, and leaving ``with`` on KeyboardInterrupt stops the
  running tasks (``terminate_workers()``) instead of waiting for them.
* **Per-task control.** Time limits (``task_timeout=``,
  ``with_options(timeout=)``: TaskTimeoutError), ``MQFuture.terminate()``
  of a running task, ``max_memory_per_child``, and ``logging`` records of
  tasks relayed to this process's handlers.
* **More than a pool**: a queue on a key of yours (``key=``) outlives the
  executor, other programs may post tasks to it, tasks may target one worker
  (``Mode.TARGETED``, ``submit_to``), and a task that does not fit in a
  message travels through a spill file.
"""
from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any, Literal

import sysv_ipc

from . import ipcinfo, persistence, relay, spill
from .config import PoolConfig
from .errors import QueueModeError
from .future import MQFuture
from .manager.launch import ManagerProcess, start_method
from .mapping import check_map_arguments, map_results
from .mode import Mode
from .options import (
    CapacityWarning,
    TaskOptions,
    check_authkey,
    check_batch_size,
    check_capacity,
    check_key_mode,
    check_max_memory,
    check_max_tasks_per_child,
    check_max_workers,
    check_no_live_owner,
    check_retries,
    check_timeout,
    set_capacity,
)
from .producer.adoption import StrandedTask, adopt_leftovers
from .producer.collector import Collector
from .producer.dispatch import Dispatcher
from .producer.monitor import RECYCLE_CAUSES, Monitor
from .producer.pool import PoolFlags, Resources, WorkerProcess, live_pools, register
from .producer.state import PoolState, PoolStats
from .protocol import WIRE_VERSION

__all__ = ["MQExecutor", "MQFuture", "Mode", "PoolStats", "StrandedTask", "CapacityWarning",
           "TaskOptions"]

#: Seconds ``_processes`` and ``stats()`` wait for the manager process to
#: start the workers (the constructor does not wait: tasks submitted meanwhile
#: wait in the kernel queue).
START_TIMEOUT = 60.0


_gc_done = False


def _sweep_once() -> bool:
    """True the first time in this process: the pool made then has its manager
    reclaim the leftovers of dead producers (``persistence.collect_garbage``,
    shortly after it starts, off the path to the first result)."""
    global _gc_done
    if _gc_done:
        return False
    _gc_done = True
    return True


def _mp_authkey() -> bytes | None:
    """This process's multiprocessing authkey, when it uses
    multiprocessing.managers (a task may get one of its proxies)."""
    if "multiprocessing.managers" not in sys.modules:
        return None
    from multiprocessing import process
    return bytes(process.current_process().authkey)


class MQExecutor(Executor):
    """A process pool fed by a System V message queue; a drop-in replacement for
    ``concurrent.futures.ProcessPoolExecutor`` on Linux.

    Args:
        key (int | None): SysV key of the task queue. None (default): a fresh
            private queue, removed at shutdown. An int: that key's queue, created
            (with ``queue_mode``) if absent and kept after shutdown, so tasks left
            in it survive the executor (Swoole's ``message_queue_key``); tasks
            that dead producers left there are adopted (:meth:`recovered`).
            :func:`mqexecutor.ftok` turns a path into a key.
        max_workers (int | None): number of task worker processes; None means the
            number of CPUs this process may use.
        mp_context: a ``multiprocessing`` context (or a start method name): how
            the manager process, which forks the workers, starts. None or
            ``"fork"``: forked from this process when it has a single thread
            (fast; workers inherit its modules and data), else as
            ``"forkserver"``; ``"forkserver"`` and ``"spawn"``: a fresh
            interpreter. See :mod:`mqexecutor.manager.launch`.
        initializer (callable | None), initargs (tuple): run once in each worker
            at start, as ProcessPoolExecutor. If it raises, the pool is broken.
        max_tasks_per_child (int | None): a worker exits after this many tasks and
            is replaced under the same worker id (Swoole's task_max_request).
        mode (Mode | int): ``Mode.PREEMPTIVE`` (3, default): workers compete for
            every task. ``Mode.TARGETED`` (2): worker i receives message type i + 1
            and ``submit_to`` chooses the worker. Named after Swoole's task_ipc_mode.
        queue_mode (int): permission bits of a queue this executor creates
            (default 0o600: only this user can post tasks, i.e. run code).
        capacity (int | None): bytes of msg_qbytes to ask the kernel for. Above
            kernel.msgmnb this needs CAP_SYS_RESOURCE; when refused, a
            CapacityWarning names the limit in force and tasks beyond it wait in
            this process.
        allow (iterable of str): fnmatch patterns of ``"module:qualname"`` that
            JSON tasks from other programs may call (:mod:`mqexecutor.external`);
            empty (default): JSON tasks are refused.
        swoole_handler (str | None): ``"module:function"`` that receives every
            message as Swoole packets, like Swoole's onTask (:mod:`mqexecutor.swoole`).
        authkey (bytes | None): a secret of 16 bytes or more. Every message then
            carries an HMAC-SHA256 and workers refuse, without unpickling, any
            message whose HMAC is missing or wrong (so a local user who can
            write to the queue cannot run code). None: no HMAC.
        retries (int): run a task again, at most this many times, when the
            worker running it dies (default 0). Per task:
            ``ex.with_options(retries=N).submit(...)``.
        durable (bool | str): record every task in a spool directory (a path, or
            True for the default) before it is queued, and forget it once its
            outcome is delivered; after the whole process tree is killed, the
            next executor on the key runs again every unfinished task
            (at-least-once; :mod:`mqexecutor.journal`). Needs an explicit key.
        batch_size (int | None): at most this many small tasks per message when
            tasks wait in the backlog (a full kernel queue). None (default):
            adapted to the task rate, so that one message holds about 5 ms of
            work; 1: one task per message always.
        task_timeout (float | None): a time limit for every task, seconds
            (None: none), counted from when a worker takes it. A task past it
            has its worker stopped (SIGTERM, then SIGKILL) and replaced under
            the same id, and its Future fails with TaskTimeoutError (retries do
            not apply). Per task: ``ex.with_options(timeout=s).submit(...)``;
            a pool on a key also honours the limits of tasks its ``attach()``
            producers send, and gives those without one this limit.
            Honoured within about 0.1 s (up to 0.5 s on a busy machine).
        max_memory_per_child (int | None): bytes of resident set above which a
            worker, after a task, is recycled as ``max_tasks_per_child`` does
            (same worker id; queued tasks still run); ``stats().recycles``
            counts it. None: no limit.
        relay_logs (bool): ``logging`` records emitted in a task at or above
            the level of this process's root logger (at construction) reach
            this process's handlers, with ``worker_id`` and ``task_id``
            attributes (default True).

    The arguments of ProcessPoolExecutor (``max_workers, mp_context,
    initializer, initargs``) follow ``key`` positionally, in its order.

    Raises:
        ValueError: ``max_workers`` <= 0, an unknown ``mode`` or start method,
            ``max_tasks_per_child`` < 1, ``durable`` without a key, a
            ``task_timeout`` not > 0, ``max_memory_per_child`` under 1 MiB.
        QueueModeError: the key's queue holds tasks of the other mode or another
            wire version, or a live pool of the other mode serves it.
        TypeError: ``initializer`` not callable, ``key`` not an int,
            ``task_timeout`` not a number, ``max_memory_per_child`` not an int.
        sysv_ipc.PermissionsError: the queue of ``key`` belongs to someone else.
        OSError: the kernel refused to create a queue (e.g. msgmni reached).

    The constructor returns once the manager process is started, without
    waiting for it to fork the workers: tasks submitted meanwhile wait in the
    queue, and if the workers cannot start, their Futures fail with
    BrokenMQPool.
    """

    def __init__(self, key: int | None = None, max_workers: int | None = None,
                 mp_context: Any = None, initializer: Callable | None = None,
                 initargs: tuple = (), *, max_tasks_per_child: int | None = None,
                 mode: Mode | int = Mode.PREEMPTIVE, queue_mode: int = 0o600,
                 capacity: int | None = None, allow: Iterable[str] = (),
                 swoole_handler: str | None = None, authkey: bytes | None = None,
                 retries: int = 0, durable: bool | str = False,
                 batch_size: int | None = None, task_timeout: float | None = None,
                 max_memory_per_child: int | None = None, relay_logs: bool = True):
        key, mode = check_key_mode(key, mode)
        if durable and key is None:
            raise ValueError("durable=True needs an explicit key: a private queue dies "
                             "with its executor, so there is nothing to recover into")
        max_workers = check_max_workers(max_workers)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        max_tasks_per_child = check_max_tasks_per_child(max_tasks_per_child)
        task_timeout = check_timeout(task_timeout, "task_timeout")
        max_memory_per_child = check_max_memory(max_memory_per_child)
        check_capacity(capacity)
        method = start_method(mp_context)
        init: Any = None
        if initializer is not None:
            # A forked manager (and its workers) inherits the objects as they
            # are; a fresh interpreter gets them pickled with its config
            # (manager.launch: by value, multiprocessing queues allowed).
            init = (initializer, tuple(initargs))
        if key is not None:
            check_no_live_owner(key, mode, live_pools())
        if swoole_handler is not None:
            from . import swoole  # only a pool with a Swoole handler loads it
            swoole.load_handler(swoole_handler)  # fail here, not in every worker
        self._start(key=key, max_workers=max_workers, mode=mode, attach=False,
                    queue_mode=queue_mode, capacity=capacity, authkey=check_authkey(authkey),
                    retries=check_retries(retries), durable=durable,
                    batch_size=check_batch_size(batch_size), method=method,
                    task_timeout=task_timeout,
                    worker_options=dict(initializer=init,
                                        max_tasks_per_child=max_tasks_per_child,
                                        allow=tuple(allow), swoole_handler=swoole_handler,
                                        max_memory_per_child=max_memory_per_child,
                                        task_timeout=task_timeout,
                                        # a keyed pool also serves attach()
                                        # producers, whose tasks may have limits
                                        watch_deadlines=(task_timeout is not None
                                                         or key is not None),
                                        **relay.options(relay_logs)))

    @classmethod
    def attach(cls, key: int, *, mode: Mode | int = Mode.PREEMPTIVE,
               workers: int | None = None, authkey: bytes | None = None,
               retries: int = 0, durable: bool | str = False) -> MQExecutor:
        """An executor that starts no workers and submits to the pool another
        process serves on ``key`` (``mqexecutor serve`` or an MQExecutor).

        Its ``submit``, ``map`` and Futures work as usual; its results come back
        on its own reply queue, so it never sees another producer's results.

        Args:
            key (int): the pool's SysV key (decimal, or parsed from 0x hex with
                :func:`mqexecutor.queues.parse_key`).
            mode: the pool's mode; a mismatch with the pool raises.
            workers (int | None): the pool's size, for ``submit_to`` range checks;
                read from the pool's metadata when None.
            authkey (bytes | None): the pool's HMAC key, when it has one.
            retries (int): as in the constructor; a worker death is reported to
                this process by the pool's manager.
            durable (bool | str): as in the constructor; the pool's next owner
                recovers this producer's unfinished tasks if it dies.

        Raises:
            sysv_ipc.ExistentialError: no queue has this key.
            QueueModeError: the pool serving the key runs in the other mode.
        """
        checked, mode = check_key_mode(key, mode)
        if checked is None:
            raise TypeError("attach() needs the key of a served queue, not None")
        key = checked
        meta = persistence.read_meta(spill.key_subdir(key))
        if meta is not None and meta.mode != int(mode) and persistence.pid_alive(meta.owner_pid):
            raise QueueModeError(
                f"the pool on key 0x{key & 0xFFFFFFFF:08x} (pid {meta.owner_pid}) runs in "
                f"{Mode(meta.mode).name} mode; attach() asked for {mode.name}")
        if workers is None:
            workers = meta.workers if meta is not None and meta.workers > 0 else 1
        self = cls.__new__(cls)
        self._start(key=key, max_workers=workers, mode=mode, attach=True, queue_mode=0o600,
                    capacity=None, authkey=check_authkey(authkey),
                    retries=check_retries(retries), durable=durable, batch_size=None,
                    method="", worker_options={})
        return self

    def _start(self, *, key: int | None, max_workers: int, mode: Mode, attach: bool,
               queue_mode: int, capacity: int | None, authkey: bytes | None, retries: int,
               durable: bool | str, batch_size: int | None, method: str,
               worker_options: dict, task_timeout: float | None = None) -> None:
        """Make the pool: queues and files, adoption of leftovers, the manager
        process and its workers (unless ``attach``), the collector and monitor
        threads. Undoes what it made when a step fails."""
        res = Resources(key=key, queue_mode=queue_mode, attach=attach,
                        max_workers=max_workers, mode=int(mode), authkey=authkey,
                        durable=durable)
        flags = PoolFlags()
        dispatch = Dispatcher(res, flags, targeted=mode == Mode.TARGETED,
                              max_workers=max_workers, retries=retries, authkey=authkey,
                              batch_size=batch_size, task_timeout=task_timeout,
                              capture_context=bool(worker_options.get("relay_output")))
        state = PoolState(None, res, dispatch, flags, attach)
        self._mode = mode
        self._max_workers = max_workers
        self._key: int = res.task_queue.key
        self._state = state
        self._recovered: list[MQFuture] = []
        self._stranded: list[StrandedTask] = []
        self._inherited = 0
        try:
            if capacity is not None:
                set_capacity(res.task_queue, capacity)
                res.fit_to_queue()
            if key is not None and not attach:
                adopted = adopt_leftovers(state, mode.name,
                                          worker_options.get("swoole_handler") is not None)
                self._recovered, self._stranded, self._inherited = adopted
                persistence.write_meta(spill.key_subdir(self._key), persistence.QueueMeta(
                    key=self._key, mode=int(mode), workers=max_workers,
                    wire=WIRE_VERSION, owner_pid=res.pid, owner_token=res.token,
                    reply_key=res.reply_queue.key))
            if not attach:
                state.config = PoolConfig(
                    task_key=self._key, targeted=dispatch.targeted, max_workers=max_workers,
                    owner_pid=res.pid, owner_token=res.token,
                    owner_reply_key=res.reply_queue.key, owner_subdir=res.subdir,
                    board_dir=res.board_dir, private_queue=key is None,
                    spill_env=os.environ.get(spill.ENV_SPILL_DIR), authkey=authkey,
                    sweep=_sweep_once(), sys_path=tuple(sys.path),
                    mp_authkey=_mp_authkey(), **worker_options)
                state.manager = ManagerProcess(state.config, method)
                dispatch.tell_manager = state.manager.send
            else:
                state.ready.set()  # no workers of its own
        except BaseException:
            if state.manager is not None:
                state.manager.send("stop")
                state.manager.join()
                state.manager.close()
            res.release()
            raise
        state.collector = Collector(state)
        state.monitor = Monitor(state)
        try:
            state.collector.start()
            state.monitor.start()
        except RuntimeError as exc:  # no new thread (at interpreter shutdown)
            # A broken pool, torn down here: submit() raises BrokenMQPool.
            state.break_pool(f"the pool could not start its threads: {exc}")
            state.monitor.teardown()
        register(state)
        #: As ProcessPoolExecutor's: the thread that tears the pool down.
        self._executor_manager_thread = state.monitor
        weakref.finalize(self, PoolState.request_shutdown, state)

    # -- properties --------------------------------------------------------------
    @property
    def key(self) -> int:
        """SysV key of the task queue (a random key for a private queue)."""
        return self._key

    @property
    def msqid(self) -> int:
        """Kernel id of the task queue."""
        return self._state.res.task_queue.id

    @property
    def reply_key(self) -> int:
        """SysV key of this executor's reply queue (where its results come
        back; ``mqexecutor ls`` lists it with the role "reply")."""
        return self._state.res.reply_queue.key

    @property
    def token(self) -> int:
        """The random 64-bit id of this executor in its messages' headers
        (its spill sub-directory is ``p-<pid>-<token:016x>``)."""
        return self._state.res.token

    @property
    def mode(self) -> Mode:
        """The executor's :class:`Mode`."""
        return self._mode

    @property
    def max_workers(self) -> int:
        """Number of task workers."""
        return self._max_workers

    @property
    def broken(self) -> str | None:
        """Why the pool cannot be used any more (e.g. a worker's initializer
        raised, the manager process died), or None while it can."""
        return self._state.flags.broken

    @property
    def _broken(self) -> str | bool:
        """As ProcessPoolExecutor's ``_broken``: the reason, or False."""
        return self._state.flags.broken or False

    @property
    def _processes(self) -> dict[int, WorkerProcess]:
        """The task workers by pid (as ProcessPoolExecutor's private attribute):
        the latest process of each worker id, as the manager reported it
        (waits, at most START_TIMEOUT seconds, until it started them)."""
        self._state.ready.wait(START_TIMEOUT)
        return {p.pid: p for p in list(self._state.processes.values())}

    @property
    def inherited(self) -> int:
        """Number of tasks of dead producers found in the queue when this executor
        attached to its key (adopted ones plus stranded ones)."""
        return self._inherited

    def recovered(self) -> list[MQFuture]:
        """Futures of the tasks this executor adopted from producers that died
        (explicit keys only). Each has a new ``task_id``, the old one in
        ``original_task_id``, the dead producer's pid in ``original_pid`` and the
        function's qualified name in ``fn_name``. Returns a new list."""
        return list(self._recovered)

    def stranded(self) -> list[StrandedTask]:
        """Tasks found in the queue for worker ids this pool does not have
        (targeted mode, a smaller pool than the one they were sent to). They are
        left in the queue; a warning was issued at start."""
        return list(self._stranded)

    def stats(self) -> PoolStats:
        """A :class:`PoolStats` snapshot: kernel queue messages, bytes and
        capacity, this executor's backlog, running and completed tasks, live
        workers, inherited tasks, dead letters (``rejected``), workers
        replaced by cause (``recycles``) and relayed records dropped
        (``relay_dropped``). Waits (up to 60 s) for a new pool's workers to
        start."""
        state = self._state
        state.ready.wait(START_TIMEOUT)  # the workers started (or never will)
        res = state.res
        dispatch = state.dispatch
        info = ipcinfo.queue_info(self._key)
        try:
            capacity = res.task_queue.max_size
        except (sysv_ipc.Error, AttributeError):
            capacity = 0
        with dispatch.lock:
            backlog = len(dispatch.backlog)
            running = len(dispatch.pending) - backlog
        workers = sum(1 for p in list(state.processes.values()) if p.exitcode is None)
        try:
            rejected = res.board.rejected() if res.board is not None else 0
        except (ValueError, OSError):  # closed at shutdown
            rejected = 0
        return PoolStats(
            key=self._key, msqid=info.msqid if info else -1,
            queued_messages=info.qnum if info else 0,
            queued_bytes=info.cbytes if info else 0, capacity_bytes=capacity,
            backlog=backlog, running=running, completed=dispatch.completed,
            workers=workers, inherited=self._inherited, rejected=rejected,
            recycles={cause: state.exits[cause] for cause in RECYCLE_CAUSES},
            relay_dropped=state.relay_dropped)

    # -- submitting --------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> MQFuture:
        """Schedule ``fn(*args, **kwargs)`` and return its :class:`MQFuture`.

        Never blocks because the kernel queue is full: the task then waits in
        this process. In targeted mode the worker with the fewest outstanding
        tasks is chosen; the worker chosen last keeps getting them while it has
        less than a message's worth more than that (the tasks packed in one
        BATCH message: 1 unless tasks are short and many wait).

        Raises:
            RuntimeError: after ``shutdown()`` or interpreter shutdown.
            BrokenMQPool: the pool is broken (a worker's initializer raised).
            TypeError: ``fn`` is not callable.
        A call that cannot be pickled does not raise here: its Future fails with
        the pickling error, as in ProcessPoolExecutor.
        """
        return self._state.dispatch.submit(fn, args, kwargs, None, None)

    def submit_to(self, worker_id: int, fn: Callable, /, *args: Any,
                  **kwargs: Any) -> MQFuture:
        """Run ``fn(*args, **kwargs)`` on task worker ``worker_id`` (Swoole
        task_ipc_mode 2: ``$serv->task($data, $dst_worker_id)``).

        Args:
            worker_id (int): 0..max_workers-1.

        Raises:
            QueueModeError (a ValueError): the executor is not Mode.TARGETED
                (Swoole ignores the target in mode 3; mqexecutor refuses).
            ValueError: ``worker_id`` out of range.
            RuntimeError, BrokenMQPool: as :meth:`submit`.
        """
        self._check_target(worker_id)
        return self._state.dispatch.submit(fn, args, kwargs, worker_id, None)

    def _check_target(self, worker_id: Any) -> None:
        if self._mode != Mode.TARGETED:
            raise QueueModeError("submit_to() sends to one worker and needs "
                                 "mode=Mode.TARGETED; this executor is Mode.PREEMPTIVE")
        if (isinstance(worker_id, bool) or not isinstance(worker_id, int)
                or not 0 <= worker_id < self._max_workers):
            raise ValueError(f"worker_id must be in 0..{self._max_workers - 1}, "
                             f"not {worker_id!r}")

    def with_options(self, *, retries: int | None = None,
                     timeout: float | None = None) -> TaskOptions:
        """A view of this executor whose ``submit``, ``submit_to`` and ``map``
        apply per-task options.

        Args:
            retries (int | None): runs after a worker death (None: the
                executor's ``retries``).
            timeout (float | None): the time limit of each task, seconds,
                counted from when a worker takes it (None: the executor's
                ``task_timeout``); see TaskTimeoutError.

        Raises:
            TypeError, ValueError: as the constructor's ``retries`` and
                ``task_timeout``.

        Example: ``ex.with_options(retries=3, timeout=60).submit(fetch, url)``.
        """
        return TaskOptions(self, retries=None if retries is None else check_retries(retries),
                           timeout=check_timeout(timeout))

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None,
            _options: TaskOptions | None = None) -> Iterator:
        """Ordered, lazy ``map(fn, *iterables)`` run by the workers, as Python
        3.14's ProcessPoolExecutor.map.

        Args:
            timeout (float | None): seconds, counted from this call, after which
                the iterator raises TimeoutError (and cancels what is left).
            chunksize (int): argument tuples sent per task (>= 1).
            buffersize (int | None): at most this many tasks (chunks) submitted
                ahead of the result being read; None submits everything now.

        Raises:
            ValueError: chunksize < 1 or buffersize < 1.
            TypeError: buffersize not an int (``True`` counts as 1, as in 3.14).
        Exceptions of ``fn`` are raised by the iterator when their item is
        reached. The iterator keeps no reference to a result it yielded
        (CPython bpo-14406).
        """
        check_map_arguments(chunksize, buffersize)
        retries = _options.retries if _options is not None else None
        limit = _options.timeout if _options is not None else None
        ref = weakref.ref(self)  # the iterator must not keep the executor alive

        def submit(fn: Callable, args: tuple) -> MQFuture | None:
            executor = ref()  # gone: no more tasks (as CPython's map)
            return None if executor is None else executor._state.dispatch.submit(
                fn, args, {}, None, retries, limit)

        return map_results(submit, fn, iterables, timeout=timeout, chunksize=chunksize,
                           buffersize=buffersize)

    # -- stopping ----------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 keep_queued: bool = False) -> None:
        """Stop accepting tasks and release the pool, as ProcessPoolExecutor.

        Args:
            wait (bool): block until pending tasks are done and every worker
                process has exited.
            cancel_futures (bool): cancel tasks that no worker has taken yet,
                also those already in the kernel queue.
            keep_queued (bool): explicit key only: stop the workers after the
                tasks they run, and leave the tasks still in the kernel queue
                for the next executor on the key (their Futures here are
                cancelled). Implied by ``wait=False`` on an explicit key.

        Queues and spill files of this executor are removed once the last task
        is done; the queue of an explicit key is kept. Calling it again is
        harmless. With a private queue and ``wait=False``, pending tasks still
        run, as in ProcessPoolExecutor.
        """
        state = self._state
        abandon = state.res.explicit_key and (keep_queued or not wait)
        state.request_shutdown(cancel_futures, abandon=abandon)
        monitor = state.monitor
        me = threading.get_ident()
        if wait and monitor is not None and monitor.ident not in (None, me) and (
                state.collector is None or state.collector.ident != me):
            monitor.join()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        """Leaving ``with``: ``shutdown(wait=True)``, as ProcessPoolExecutor;
        after Ctrl-C (KeyboardInterrupt) the tasks are stopped first
        (``terminate_workers()``): what waits is cancelled and nothing runs on."""
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate_workers()
        self.shutdown(wait=True)
        return False

    def _force_shutdown(self, signum: int) -> None:
        state = self._state
        state.flags.terminating = True
        self.shutdown(wait=False, cancel_futures=True)
        if state.manager is not None:
            state.manager.send("signal", signum)

    def terminate_workers(self) -> None:
        """Shut down and send SIGTERM to every worker, as Python 3.14's
        ProcessPoolExecutor.terminate_workers. Tasks they were running fail with
        a BrokenProcessPool subclass (TerminatedWorkerError or BrokenMQPool);
        tasks not yet taken are cancelled."""
        self._force_shutdown(15)

    def kill_workers(self) -> None:
        """As :meth:`terminate_workers`, with SIGKILL (Python 3.14)."""
        self._force_shutdown(9)
