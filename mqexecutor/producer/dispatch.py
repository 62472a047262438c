"""The Dispatcher: how a submitted call becomes a message in the task queue.

``MQExecutor.submit`` hands the call here. The dispatcher pickles it
(:mod:`mqexecutor.codec`, spilling what does not fit a message), chooses the
target worker (targeted mode), records the task in ``pending`` (and in the
journal of a durable pool), and sends it with a non-blocking msgsnd; when the
kernel queue is full, or tasks already wait, the task waits in the *backlog*,
which the collector (after each batch of results) and the monitor (polling)
move into the queue, several small tasks to a BATCH message when many wait.
``submit()`` never blocks on a full queue.
"""
from __future__ import annotations

import collections
import itertools
import operator
import threading
import time
from collections.abc import Callable
from typing import Any

import sysv_ipc

from .. import codec, functions, queues, spill
from ..errors import BrokenMQPool
from ..future import CANCELLED_STATES, DONE_STATES, MQFuture, fail
from ..manager.process import TERMINATE, WATCH
from ..protocol import (
    F_BATCH,
    F_FN_REF,
    F_KEEP_SPILL,
    F_SPILL,
    F_TARGETED,
    F_TIMEOUT,
    F_VALUES,
    HEADER_SIZE,
    LEN_STRUCT,
    PREEMPTIVE_MTYPE,
    Kind,
    ProtocolError,
    build,
    flatten,
    pack_task,
    spill_reference,
    targeted_mtype,
    timeout_field,
    unpack_header,
)
from ..relay import shared_context
from .pool import PoolFlags, Resources, interpreter_exiting

__all__ = ["Dispatcher"]

_LEN = LEN_STRUCT


class Dispatcher:
    """The submission state of one pool, guarded by ``lock``.

    Args:
        res (Resources): the pool's queues, token and journal.
        flags (PoolFlags): checked by every submit.
        targeted (bool), max_workers (int): the pool's mode and size.
        retries (int): the executor's default retries after a worker death.
        authkey (bytes | None): signs every task message.
        batch_size (int | None): fixed tasks per BATCH message; None: adapted.
        task_timeout (float | None): the time limit of every task, seconds.
        capture_context (bool): keep the context of each submit on its Future
            (a notebook shows what a task prints under the cell that submitted it).

    Whoever holds the receiver's lock (the collector thread, or a thread
    waiting in ``result()``: producer/receiver.py) alone updates ``finished``,
    ``completed``, ``batch_limit`` and the rate marks (``take``,
    ``note_results``, ``note_busy``), without the pool lock, so that it never
    waits on submit().
    """

    def __init__(self, res: Resources, flags: PoolFlags, *, targeted: bool, max_workers: int,
                 retries: int, authkey: bytes | None, batch_size: int | None,
                 task_timeout: float | None = None, capture_context: bool = False):
        self.res = res
        self.flags = flags
        self.targeted = targeted
        self.max_workers = max_workers
        self.retries = retries
        self.authkey = authkey
        self.task_timeout = task_timeout
        #: Keep on each Future the context it was submitted in (relay.py).
        self.capture_context = capture_context
        #: The Context of the last submit, kept while the context stays equal
        #: (the same variables with the same values): one object for a cell's
        #: tasks rather than one per task for the garbage collector to scan.
        #: Per pool: only this pool's collector runs it, one item at a time.
        self.last_context: Any = None
        #: Whether the manager watches time limits (it does from the start
        #: with ``task_timeout``; else it is told at the first timed task).
        self.watching = bool(task_timeout)
        #: ``manager.send`` of the pool's manager process (None for attach():
        #: the pool's owner watches the limits, and terminate() only cancels).
        self.tell_manager: Callable[..., bool] | None = None
        self.durable = res.journal.durable
        #: The pool's receiver.Receiver (set with its collector): a thread
        #: waiting in MQFuture.result() polls the reply queue through it.
        self.receiver: Any = None
        self.lock = threading.RLock()
        self.backlog: collections.deque[MQFuture] = collections.deque()
        self.pending: dict[int, MQFuture] = {}
        self.ids = itertools.count(1)
        # Targeted mode: tasks given to each worker (changed under the lock) and
        # outcomes taken for each (by the receiver alone, without the lock, so
        # that it never waits on submit() for it); the difference is the load.
        self.outstanding = [0] * max_workers
        self.finished = [0] * max_workers
        self.completed = 0
        self.batch_limit = batch_size or 1  # tasks per message, adapted to the task rate
        self.batch_fixed = batch_size is not None
        # A private queue gets at most `depth` messages at a time: the other
        # tasks wait in the backlog, where they go out several to a message.
        # A named queue takes all it can hold, so that its tasks outlive us.
        self.hold_back = not res.explicit_key
        self.depth = 2 * max_workers
        self.last_target = 0  # targeted mode: the worker chosen last by submit()
        self.target_credit = 0  # ... and how many more it gets before a new choice
        self.rate_mark = (time.monotonic(), 0)
        self.busy_mark = (0, 0.0)  # tasks, seconds reported by workers
        #: Digest -> reference of the files holding the pickles of functions
        #: sent by value (functions.ByValue). Only for a private queue without
        #: journal: the files go with this producer, so must its tasks.
        self.by_value_files: dict[str, str] | None = (
            None if res.explicit_key or self.durable else {})

    # -- submit ------------------------------------------------------------------
    def check_open(self) -> None:
        """Raises BrokenMQPool or RuntimeError when no task may be submitted."""
        flags = self.flags
        if flags.broken is not None:
            raise BrokenMQPool(flags.broken)
        if flags.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def submit(self, fn: Callable, args: tuple, kwargs: dict, target: int | None,
               retries: int | None, timeout: float | None = None) -> MQFuture:
        """Encode ``fn(*args, **kwargs)`` and send it, or put it in the backlog.

        Args:
            target (int | None): the worker (targeted mode; checked by the
                caller), None for the least loaded one / any worker.
            retries (int | None): runs after a worker death (None: the pool's).
            timeout (float | None): the task's time limit, seconds (checked by
                the caller; None: the pool's ``task_timeout``).

        Returns:
            MQFuture: failed already when the call cannot be pickled (as
            ProcessPoolExecutor, submit() does not raise then).

        Raises:
            RuntimeError, BrokenMQPool: see :meth:`check_open`.
            TypeError: ``fn`` is not callable.
            OSError: a durable pool could not record the task.
        """
        flags = self.flags
        if flags.broken is not None or flags.shutdown_requested or interpreter_exiting():
            self.check_open()
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        res = self.res
        if retries is None:
            retries = self.retries
        if timeout is None:
            timeout = self.task_timeout
        info = functions.fn_info(fn)
        prefix = info.prefix
        fut = MQFuture(0, info.name, self)
        if self.capture_context:  # a notebook: what the task prints shows in this cell
            # a cell's submits share one Context; each Future gets one equal to
            # its own even while other threads submit
            fut._context = self.last_context = shared_context(self.last_context)
        if timeout:
            if not self.watching:
                self.watch_deadlines()
            prefix += timeout_field(timeout)
            fut._timeout = timeout
        keep = retries > 0 or self.durable
        task_flags = F_TARGETED if self.targeted else 0
        if timeout:
            task_flags |= F_TIMEOUT
        call: Any = fn
        if (info.reference is not None and getattr(info.owner, info.attr, None) is fn
                and not codec.by_value_registry()):
            call = info.reference  # made once; still names this very function
            task_flags |= F_FN_REF
        elif info.by_value and self.by_value_files is not None:
            ref = self.by_value_reference(info, fn)
            if ref is not None:
                call = ref  # its pickle, made once, in a file of this pool
                task_flags |= F_FN_REF
        room = res.inline_max - len(prefix)
        body = None
        if task_flags & F_FN_REF:
            if not args and not kwargs and call is info.reference and len(info.bare_call) <= room:
                body = info.bare_call
            else:
                body = codec.dumps_plain_call(call, args, kwargs, room)
        spilled = False
        if body is None:
            try:
                body, spilled = codec.dumps((call, args, kwargs), room, res.task_subdir)
            except Exception as exc:  # noqa: BLE001 - fails the Future, as ProcessPoolExecutor
                fut.set_exception(exc)
                return fut
        spill_ref = body.decode("ascii") if spilled else None
        if spilled:
            task_flags |= F_SPILL | (F_KEEP_SPILL if keep else 0)
        with self.lock:
            try:
                self.check_open()
            except BaseException:
                if spill_ref:
                    spill.discard(spill_ref)
                raise
            task_id = next(self.ids)
            fut.task_id = task_id
            if self.targeted:
                if target is None:
                    target = self.choose_target(len(prefix) + len(body))
                self.outstanding[target] += 1
                fut.worker_id = target
                mtype, worker = targeted_mtype(target), target
            else:
                mtype, worker = PREEMPTIVE_MTYPE, -1
            message = pack_task(task_flags, task_id, res.token, res.reply_queue.key, res.pid,
                                worker, prefix + body, self.authkey)
            fut._task(message, mtype, worker, spill_ref, retries, keep)
            try:
                res.journal.record(res.token, task_id, message)
            except OSError:
                if worker >= 0:
                    self.outstanding[worker] -= 1
                if spill_ref:
                    spill.discard(spill_ref)
                raise
            self.pending[task_id] = fut
            try:
                if not self.backlog and self.room() and self.send_now(fut):
                    return fut
            except BaseException:  # BrokenMQPool, or e.g. KeyboardInterrupt in msgsnd
                self.forget(fut)
                raise
            # The kernel queue is full: the task waits in the backlog, which the
            # collector refills from as results arrive (the monitor polls too).
            self.backlog.append(fut)
            if len(self.backlog) == 1:
                res.wake()
        return fut

    def watch_deadlines(self) -> None:
        """Have the manager watch its workers' deadlines from now on."""
        self.watching = True
        if self.tell_manager is not None:
            self.tell_manager(WATCH)

    def terminate(self, fut: MQFuture) -> bool:
        """Stop the task of ``fut``, which left this process (see
        ``MQFuture.terminate``): put it in the scoreboard's list of terminated
        tasks (a worker that takes it will not run it), end its Future
        CANCELLED, and have the manager stop the worker running it, if one
        does. False when it is done, or when this producer has no manager."""
        board = self.res.board
        if self.tell_manager is None or board is None:
            return False
        with self.lock:
            if fut._state in DONE_STATES or self.pending.get(fut.task_id) is not fut:
                return False
            board.terminate(self.res.token, fut.task_id)
            self.forget(fut)
        fut._terminated()
        self.tell_manager(TERMINATE, self.res.token, fut.task_id)
        return True

    def by_value_reference(self, info: functions.FnInfo, fn: Callable) -> str | None:
        """The reference of ``fn``'s pickle by value (``"@<root>:<name>"``, a
        file in this pool's spill directory written once per content); None
        when it is pickled with each call instead (it could not be pickled:
        the caller's pickling reports why; or what it refers to keeps
        changing)."""
        try:
            value = info.value(fn)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - dumps() below raises it again for the Future
            return None
        if value is None:
            return None
        files = self.by_value_files
        assert files is not None
        ref = files.get(value.digest)
        if ref is None:
            name = functions.by_value_file(value.digest)
            try:
                written = spill.write(self.res.subdir, value.data, name=name)
            except FileExistsError:  # written by another thread meanwhile
                return None
            except OSError:
                return None
            ref = f"{functions.BY_VALUE_PREFIX}{written.partition(':')[0]}:{name}"
            files[value.digest] = ref
        return ref

    def choose_target(self, size: int) -> int:
        """Targeted mode, lock held: the worker for a task of ``size`` body
        bytes submitted without one. The least busy worker; the one used last
        keeps the task on a tie (it may still be polling for its next task, see
        queues.SPIN_SECONDS), and while tasks go several to a message, until it
        has a message's worth more than the least busy: its tasks then lie
        together in the backlog, one BATCH message's worth at a time."""
        target = self.last_target
        if self.target_credit > 0:  # tasks it may take before this is looked at again
            self.target_credit -= 1
            return target
        busy = self.outstanding[target] - self.finished[target]
        if busy:
            loads = self.loads()
            least = min(loads)
            # a message's worth: batch_limit tasks, or as many of this size as
            # fit in one message
            run = max(1, min(self.batch_limit,
                             self.res.inline_max // (HEADER_SIZE + 4 + size)))
            if busy - least >= run:
                target = self.last_target = loads.index(least)
                busy = least
            self.target_credit = run - 1 - (busy - least)
        return target

    # -- sending -------------------------------------------------------------------
    def room(self) -> bool:
        """Whether a message may go to the kernel queue now (see ``hold_back``)."""
        if not self.hold_back or len(self.pending) - len(self.backlog) < self.depth:
            return True  # fewer tasks out than `depth`: fewer messages too
        try:
            return self.res.task_queue.current_messages < self.depth
        except (sysv_ipc.Error, OSError):
            return True  # let msgsnd report it

    def feed(self) -> bool:
        """Move tasks from the backlog to the kernel queue while there is room.
        Returns True when the backlog is empty."""
        with self.lock:
            backlog = self.backlog
            while backlog:
                if not self.room():
                    return False
                item = backlog[0]
                if item._state in DONE_STATES:
                    # cancelled, or completed by a result that came before it
                    # was sent again (a duplicate): nothing to send
                    backlog.popleft()
                    self.forget(item)
                    if item._state in CANCELLED_STATES:
                        item.set_running_or_notify_cancel()
                    continue
                if self.batch_limit > 1 and len(backlog) > 1 and item._spill_ref is None:
                    if self.send_batch() == 0:
                        return False
                    continue  # several sent, or the head alone
                try:
                    sent = self.send_now(item)
                except BaseException as exc:  # noqa: BLE001 - fail the task, keep feeding
                    backlog.popleft()
                    self.forget(item)
                    fail(item, exc if isinstance(exc, BrokenMQPool)
                         else BrokenMQPool(f"sending the task failed: {exc!r}"))
                    continue
                if not sent:
                    return False
                backlog.popleft()
            return True

    def send_now(self, item: MQFuture) -> bool:
        """Send a task straight to the kernel queue (caller holds the lock).

        The Future turns RUNNING just before msgsnd, because a worker may answer
        before msgsnd returns; it goes back to PENDING if the queue is full.
        Returns False when the queue is full.

        Raises:
            BrokenMQPool: the task queue is gone.
        """
        item._sending()
        try:
            self.res.task_queue.send(item._message, block=False, type=item._mtype)
        except BaseException as exc:
            item._unsent()
            if isinstance(exc, sysv_ipc.BusyError) or type(exc) is sysv_ipc.Error:
                return False  # full, or EINTR
            if isinstance(exc, (sysv_ipc.Error, OSError)):
                raise BrokenMQPool(f"the task queue is gone: {exc}") from None
            raise
        item._sent()
        return True

    def send_batch(self) -> int:
        """Send small tasks from the head of the backlog in one BATCH message
        (caller holds the lock): the consecutive ones of the head's message type,
        and in targeted mode also those among tasks for other workers, which
        keep their place. Returns how many were sent: 0 when the queue is full,
        1 when only the head qualified (sent alone)."""
        backlog = self.backlog
        first = backlog[0]
        limit = self.res.inline_max + HEADER_SIZE - 64
        items: list[MQFuture] = []
        skipped: list[MQFuture] = []
        parts: list[bytes] = []  # the body: length, message, length, message...
        size = 0
        mtype = first._mtype
        batch_limit = self.batch_limit
        scan = batch_limit * (self.max_workers if self.targeted else 1)
        for item in itertools.islice(backlog, scan):
            if item._mtype != mtype:
                if not self.targeted:
                    break
                skipped.append(item)
                continue
            msg = item._message
            n = len(msg)
            if (item._spill_ref is not None or item._state in DONE_STATES
                    or size + 4 + n > limit):
                break
            items.append(item)
            parts.append(_LEN.pack(n))
            parts.append(msg)
            size += 4 + n
            if len(items) >= batch_limit or size + 4 + n > limit:
                break  # full (or no room for another task of this size)
        if len(items) < 2:
            try:
                return 1 if self.send_now(first) and backlog.popleft() else 0
            except BrokenMQPool as exc:
                backlog.popleft()
                self.forget(first)
                fail(first, exc)
                return 1
        res = self.res
        flags = F_BATCH | (F_TARGETED if self.targeted else 0)
        if self.authkey is None and not self.durable:
            flags |= F_VALUES  # plain return values may come back together
        message = build(Kind.TASK, flags, 0, first.task_id, res.token,
                        res.reply_queue.key, res.pid, first._worker, b"".join(parts))
        for it in items:
            it._sending()
        try:
            res.task_queue.send(message, block=False, type=first._mtype)
        except BaseException as exc:
            for it in items:
                it._unsent()
            if isinstance(exc, sysv_ipc.BusyError) or type(exc) is sysv_ipc.Error:
                return 0
            if isinstance(exc, (sysv_ipc.Error, OSError)):
                raise BrokenMQPool(f"the task queue is gone: {exc}") from None
            raise
        for _ in range(len(items) + len(skipped)):
            backlog.popleft()
        backlog.extendleft(reversed(skipped))
        for it in items:
            it._sent_in_batch(items)
        return len(items)

    # -- results (the collector) -------------------------------------------------------
    def note_results(self, n: int) -> None:
        """Adapt how many tasks go in one message to the observed task rate:
        enough to cover about 5 ms of work, at most 256 (the collector calls it).

        The time a task takes is what workers report with their RESULT BATCH
        messages (:meth:`note_busy`) when there were some since the last
        estimate; else the time between results, which overstates it when
        this process is the bottleneck."""
        if self.batch_fixed:
            return
        t0, c0 = self.rate_mark
        count = c0 + n
        if count < 64:
            self.rate_mark = (t0, count)
            return
        now = time.monotonic()
        elapsed = now - t0
        self.rate_mark = (now, 0)
        busy_tasks, busy_s = self.busy_mark
        if busy_tasks:
            self.busy_mark = (0, 0.0)
            per_task = busy_s / busy_tasks
        elif elapsed > 0:
            per_task = elapsed * self.max_workers / count  # seconds of work per task
        else:
            return
        self.batch_limit = max(1, min(256, int(0.005 / max(per_task, 1e-7))))

    def note_busy(self, tasks: int, seconds: float) -> None:
        """A worker reports that ``tasks`` tasks took it ``seconds`` to run."""
        n, busy = self.busy_mark
        self.busy_mark = (n + tasks, busy + seconds)

    def take(self, task_id: int) -> MQFuture | None:
        """Remove the pending task ``task_id`` whose outcome came (the holder of
        the receiver's lock only: it alone counts ``finished``). Returns None
        when it is not pending anymore."""
        item = self.pending.pop(task_id, None)  # atomic under the GIL
        if item is not None:
            if item._worker >= 0:
                self.finished[item._worker] += 1
            item._batch = None  # what a Future the caller keeps need not keep
            item._message = b""
        return item

    def loads(self) -> list[int]:
        """Targeted mode: the tasks each worker has been given and not answered."""
        return list(map(operator.sub, self.outstanding, self.finished))

    # -- dropping tasks ----------------------------------------------------------------
    def forget(self, item: MQFuture) -> None:
        """Drop a task that will not run (caller holds the lock)."""
        self.pending.pop(item.task_id, None)
        self.res.journal.forget(self.res.token, item.task_id)
        if item._worker >= 0:
            self.outstanding[item._worker] -= 1
        if item._spill_ref:
            spill.discard(item._spill_ref)
            item._spill_ref = None

    def cancel_backlog(self) -> None:
        """Cancel every task waiting in the backlog."""
        with self.lock:
            while self.backlog:
                item = self.backlog.popleft()
                self.forget(item)
                item._cancel_pending()

    def mtypes(self) -> list[int]:
        """The message types this pool's tasks are sent with: one per worker
        (worker id + 1) when targeted, else ``PREEMPTIVE_MTYPE``."""
        if self.targeted:
            return [targeted_mtype(w) for w in range(self.max_workers)]
        return [PREEMPTIVE_MTYPE]

    def withdraw_queued(self) -> None:
        """Take this producer's tasks back from the kernel queue and cancel them
        (shutdown with cancel_futures=True). Other producers' tasks go back."""
        queue = self.res.task_queue
        if queue is None:
            return
        mtypes = self.mtypes()
        foreign: list[tuple[bytes, int]] = []
        token = self.res.token
        with self.lock:
            for mtype in mtypes:
                while True:
                    try:
                        whole, got = queue.receive(block=False, type=mtype)
                    except sysv_ipc.Error:
                        break
                    for raw in flatten(whole):
                        try:
                            h = unpack_header(raw)
                        except ProtocolError:
                            foreign.append((raw, got))
                            continue
                        if h.token != token:
                            foreign.append((raw, got))
                            continue
                        item = self.pending.get(h.task_id)
                        if item is None:
                            continue
                        if item._withdraw():
                            self.forget(item)
                            ref = spill_reference(raw)
                            if ref is not None:
                                spill.discard(ref)
        for raw, mtype in foreign:
            try:
                queues.send_patiently(queue, raw, mtype)
            except (sysv_ipc.Error, OSError):
                break

    def fail_all(self, message: str) -> None:
        """Fail every pending task with BrokenMQPool(``message``). A durable
        pool keeps their records and spill files: they did not run here, and
        the next owner of the key runs them (at least once)."""
        with self.lock:
            items = list(self.pending.values())
            self.pending.clear()
            self.backlog.clear()
            self.outstanding = list(self.finished)
        for item in items:
            if item._spill_ref and not self.durable:
                spill.discard(item._spill_ref)
            if not item.done():
                fail(item, BrokenMQPool(message))
