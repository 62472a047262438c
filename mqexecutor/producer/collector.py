"""The collector thread: drains the pool's reply queue and completes Futures.

It blocks in msgrcv on the producer's private reply queue, takes up to 256
more messages without blocking, completes their Futures (a result, a RESULT
BATCH read in place, a RESULT VALUES unpickled once for all), handles the
notices of worker deaths (retries, or TerminatedWorkerError), and refills the
task queue from the backlog: a result leaving means room in the queue. It ends
on the "stop" control message the monitor sends at teardown, behind every
result already sent.
"""
from __future__ import annotations

import errno
import pickle
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import sysv_ipc

from .. import codec, spill
from ..errors import ResultUnpicklingError, TaskTimeoutError, TerminatedWorkerError
from ..future import RUNNING, MQFuture, fail, finish_values, set_outcome
from ..manager.process import describe_exit
from ..protocol import (
    CONTROL_MTYPE,
    ENTRY_STRUCT,
    F_BATCH,
    F_SPILL,
    F_VALUES,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    WAKE_MTYPE,
    WIRE_VERSION,
    DeathCause,
    Kind,
    ProtocolError,
    Status,
    parse,
    parse_death_body,
    reference_text,
    split_batch,
    split_values,
    unpack_header,
)
from ..queues import SPIN_SECONDS
from ..relay import deliver
from .receiver import Receiver
from .state import PoolState

__all__ = ["Collector", "REPLY_QUEUE_GONE"]

REPLY_QUEUE_GONE = ("the reply queue was removed from the kernel (ipcrm?) while the pool "
                    "was running: the outcomes of its tasks cannot come back")

_PLAIN_RESULT = (MAGIC, WIRE_VERSION, int(Kind.RESULT))
_RELAY = int(Kind.RELAY)
#: What Collector.receive returns when the reply queue is gone.
_GONE = object()


class Collector(threading.Thread):
    """The thread ``mqexecutor-collector`` of one pool.

    Args:
        state (PoolState): the pool (the collector holds no executor).

    Attributes:
        observe (callable | None): a debugging and test seam: when set,
            called as ``observe(results, raw)`` after each reply message is
            handled (``results``: how many outcomes it carried).
    """

    def __init__(self, state: PoolState):
        super().__init__(name="mqexecutor-collector", daemon=True)
        self.state = state
        self.dispatch = state.dispatch
        self.queue = state.res.reply_queue
        self.token = state.res.token
        self.authkey = state.dispatch.authkey
        self.journal = state.res.journal
        #: No authkey, no journal: results may be read in place, and plain
        #: return values come back as RESULT VALUES.
        self.plain = self.authkey is None and not self.journal.durable
        self.observe: Callable[[int, bytes], None] | None = None
        #: Who receives from the reply queue: this thread, or one waiting in
        #: result() (the Dispatcher hands it to the pool's Futures).
        self.receiver = Receiver(self)
        self.dispatch.receiver = self.receiver

    def run(self) -> None:
        """Drain the reply queue for good: complete Futures, refill the task
        queue. Takes turns with the threads that wait in ``result()``
        (:mod:`.receiver`): it holds the receiver's lock while it receives and
        handles, and stays out of a blocking msgrcv while they poll."""
        queue = self.queue
        dispatch = self.dispatch
        receiver = self.receiver
        receiver.collector_ident = threading.get_ident()
        lock = receiver.lock
        spin = False
        found_nothing = False
        while True:
            block = receiver.collector_turn(found_nothing)
            found_nothing = False
            with lock:
                handover = receiver.inbox
                if handover:  # taken by a waiting thread, left to us: first
                    handled = 0
                    while handover:
                        handled += self.handle_one(handover.popleft()[0])
                    self.after_batch(handled)
                    continue
                got = None
                if block:
                    if spin:
                        got = receiver.spin(SPIN_SECONDS)
                    if got is None:
                        if not receiver.enter_msgrcv():
                            continue  # a thread started polling: its turn
                        try:
                            got = self.receive(True)
                        finally:
                            receiver.blocked = False
                else:  # a thread waited in result() lately: poll
                    got = self.receive(False)
                    if got is None:
                        found_nothing = True
                        if dispatch.backlog:
                            dispatch.feed()
                        continue
                if got is None:
                    continue
                if got is _GONE:
                    receiver.close()
                    return
                raw, mtype = got
                handled = 0
                for more in range(255, -1, -1):
                    if mtype == CONTROL_MTYPE:
                        receiver.close()
                        return  # sent by the monitor after the last worker exited
                    if mtype == WAKE_MTYPE:
                        receiver.wake_sent = False
                    else:
                        handled += self.handle_one(raw)
                    if not more:
                        break
                    try:  # drain what else is waiting before refilling the task queue
                        raw, mtype = queue.receive(block=False)
                    except (sysv_ipc.Error, OSError):
                        break
                self.after_batch(handled)
                # A few tasks out and none waiting here: the next result is likely
                # close, and polling for it beats being woken (about 30 us here).
                spin = not dispatch.backlog and 0 < len(dispatch.pending) <= dispatch.max_workers

    def receive(self, block: bool) -> Any:
        """One message of the reply queue, as ``(raw, mtype)``; None when
        there is none (``block`` False), on EINTR, or for a message too large
        (not ours: dropped); ``_GONE`` when the queue was removed (the pool is
        broken then, unless it is being released)."""
        queue = self.queue
        try:
            return queue.receive(block=block)
        except sysv_ipc.ExistentialError:
            # Removed at shutdown, after this thread was joined; else by hand.
            if not self.state.res.closed:
                self.state.break_pool(REPLY_QUEUE_GONE)
            return _GONE
        except sysv_ipc.Error:
            return None  # EINTR, or nothing there (BusyError)
        except OSError as exc:
            if exc.errno == errno.E2BIG:  # not ours: our messages fit msgmax
                try:
                    queue.receive(block=False)
                except Exception:  # noqa: BLE001
                    pass
                return None
            raise

    def handle_one(self, raw: bytes) -> int:
        """:meth:`handle_message`, which must not end the collector: an
        exception is printed. Returns how many results ``raw`` carried."""
        try:
            n = self.handle_message(raw)
            if self.observe is not None:
                self.observe(n, raw)
            return n
        except BaseException:  # noqa: BLE001 - the collector must not die
            traceback.print_exc()
            return 0

    def after_batch(self, handled: int) -> None:
        """After a batch of replies: adapt the batch size, refill the task
        queue from the backlog (a result leaving means room), and wake the
        monitor when a shutdown waits for the last outcome."""
        dispatch = self.dispatch
        dispatch.note_results(handled)
        if dispatch.backlog:
            dispatch.feed()
        if self.state.flags.shutdown_requested and not dispatch.pending:
            self.state.res.wake()  # the monitor waits for the last outcome to tear down

    # -- one message -------------------------------------------------------------
    def handle_message(self, raw: bytes) -> int:
        """Handle one message of the reply queue: a result, a RESULT BATCH or a
        RESULT VALUES. Returns how many results it carried."""
        if len(raw) >= HEADER_SIZE and raw[:2] == MAGIC:
            if raw[4] & F_VALUES:
                return self.handle_values(raw)
            if raw[4] & F_BATCH:
                return self.handle_batch(raw)
            if raw[3] == _RELAY:
                self.handle_relay(raw)
                return 0
        self.handle_result(raw)
        return 1

    def handle_relay(self, raw: bytes) -> None:
        """A RELAY message: logging records and printed text of tasks
        (:mod:`mqexecutor.relay`), handled in the context each was submitted in."""
        try:
            h, body = parse(raw, self.authkey)
            if h.token != self.token:
                return
            dropped, items = pickle.loads(body)
        except Exception as exc:  # noqa: BLE001 - ProtocolError, a bad pickle
            _refused(exc)
            return
        self.state.relay_dropped += dropped
        pending = self.dispatch.pending

        def context_of(task_id: Any) -> Any:
            fut = pending.get(task_id) if task_id else None
            return None if fut is None else fut._context

        deliver(items, context_of)

    def handle_batch(self, raw: bytes) -> int:
        """A RESULT BATCH: the results of one BATCH's tasks."""
        try:
            h = unpack_header(raw)
            if h.kind != Kind.RESULT or h.token != self.token:
                return 0
            if self.plain:
                n = self.handle_plain_batch(raw)
            else:
                inner = split_batch(memoryview(raw)[HEADER_SIZE:])
                for message in inner:  # each checked on its own (HMAC included)
                    self.handle_result(message)
                n = len(inner)
        except ProtocolError as exc:
            _refused(exc)
            return 0
        if h.task_id:  # microseconds the worker spent running these tasks
            self.dispatch.note_busy(n, h.task_id / 1e6)
        return n

    def handle_plain_batch(self, raw: bytes) -> int:
        """The results of a RESULT BATCH, read in place (no copy per entry): a
        plain return value completes its Future here; any other entry (exception,
        spill file, stale, odd) goes through :meth:`handle_result`. Only without
        authkey and journal. Returns how many entries it held.

        Raises:
            ProtocolError: an entry runs past the end of the message (the entries
                before it are handled).
        """
        view = memoryview(raw)
        end = len(raw)
        off = HEADER_SIZE
        token = self.token
        dispatch = self.dispatch
        pending = dispatch.pending
        count = done = 0
        try:
            while off < end:
                if off + ENTRY_STRUCT.size > end:
                    raise ProtocolError("batch entry shorter than a header")
                (n, magic, version, kind, flags, status, task_id, tok, _reply, _pid, _worker,
                 length) = ENTRY_STRUCT.unpack_from(raw, off)
                start = off + 4
                off = start + n
                if n < HEADER_SIZE or off > end:
                    raise ProtocolError(f"batch entry of {n} bytes does not fit the batch body")
                count += 1
                item = pending.get(task_id)
                if (item is None or flags or status or tok != token or length != n - HEADER_SIZE
                        or (magic, version, kind) != _PLAIN_RESULT
                        or item._keep and item._spill_ref or dispatch.take(task_id) is None):
                    self.handle_result(bytes(view[start:off]))
                    continue
                done += 1
                self.set_value(item, view[start + HEADER_SIZE:off])
        finally:
            dispatch.completed += done
        return count

    def handle_values(self, raw: bytes) -> int:
        """Complete the Futures of a RESULT VALUES message: plain return values
        of several tasks, unpickled together. Returns how many it held."""
        try:
            h = unpack_header(raw)
            if h.kind != Kind.RESULT or h.token != self.token or h.status or not self.plain:
                # a pool with an authkey or a journal never asks for RESULT VALUES
                raise ProtocolError("RESULT VALUES must be a Status.OK result for this "
                                    "producer, which has no authkey and no journal")
            ids, pickled = split_values(memoryview(raw)[HEADER_SIZE:])
        except ProtocolError as exc:
            _refused(exc)
            return 0
        dispatch = self.dispatch
        try:
            values = pickle.loads(pickled)
            if type(values) is not list or len(values) != len(ids):
                raise ProtocolError(f"{len(ids)} task ids but not as many values")
        except BaseException as exc:  # noqa: BLE001 - fails those tasks, as set_value
            for task_id in ids:
                fut = dispatch.take(task_id)
                if fut is not None:
                    self.unpickling_failed(fut, exc)
            return len(ids)
        futures = []
        kept = []
        take = dispatch.take
        for task_id, value in zip(ids, values):
            fut = take(task_id)
            if fut is not None:  # else not ours anymore (cancelled at shutdown, a duplicate)
                futures.append(fut)
                kept.append(value)
        dispatch.completed += len(futures)
        finish_values(futures, kept)
        if h.task_id:  # microseconds the worker spent running these tasks
            dispatch.note_busy(len(ids), h.task_id / 1e6)
        return len(ids)

    def set_value(self, fut: MQFuture, data: memoryview) -> None:
        """Complete ``fut`` (taken from pending) with the return value pickled in ``data``."""
        try:
            value = pickle.loads(data)
        except BaseException as exc:  # noqa: BLE001 - SystemExit at unpickle too
            self.interrupted(exc)
            self.unpickling_failed(fut, exc)
            return
        set_outcome(fut, Status.OK, value, -1)

    def handle_result(self, raw: bytes) -> None:
        """One RESULT message (also an entry of a RESULT BATCH)."""
        dispatch = self.dispatch
        # Fast path: a task's return value, inline, without HMAC (most results).
        # Anything else, or anything odd, takes the checked path below.
        if self.plain and len(raw) >= HEADER_SIZE:
            (magic, version, kind, flags, status, task_id, token, _reply, _pid, _worker,
             length) = HEADER_STRUCT.unpack_from(raw)
            if ((magic, version, kind) == _PLAIN_RESULT and not flags and not status
                    and token == self.token and length == len(raw) - HEADER_SIZE):
                item = dispatch.pending.get(task_id)
                if item is None:
                    return  # not ours anymore (e.g. cancelled at shutdown)
                if not (item._keep and item._spill_ref):
                    if dispatch.take(task_id) is None:
                        return
                    dispatch.completed += 1
                    self.set_value(item, memoryview(raw)[HEADER_SIZE:])
                    return
        try:
            h, body = parse(raw, self.authkey)
        except ProtocolError as exc:
            _refused(exc)
            return
        spilled = bool(h.flags & F_SPILL)
        if h.kind != Kind.RESULT or h.token != self.token:
            if spilled and h.token == self.token:
                spill.discard(reference_text(body))
            return
        if h.status == Status.INIT_FAILED:
            try:
                init_exc, tb = codec.loads(body, spilled)
                what = f"{type(init_exc).__name__}: {init_exc}"
            except BaseException as load_err:  # noqa: BLE001
                what = f"an exception that could not be unpickled ({load_err!r})"
                tb = ""
            self.state.break_pool(f"the initializer of task worker {h.worker} raised {what}; "
                                  f"the pool is not usable anymore\n{tb}")
            return
        if h.status == Status.WORKER_DIED:
            self.worker_died(h.task_id, body)
            return
        if h.status == Status.CANCELLED:  # terminated before it ran: forgotten already
            fut = dispatch.take(h.task_id)
            if fut is not None:
                fut._terminated()
            return
        fut = dispatch.take(h.task_id)
        if fut is None:
            if spilled:
                spill.discard(reference_text(body))
            return
        if fut._keep and fut._spill_ref:
            spill.discard(fut._spill_ref)  # normally gone already: the worker unlinks it
        dispatch.completed += 1
        try:
            value = codec.loads(body, spilled)
        except BaseException as exc:  # noqa: BLE001 - SystemExit at unpickle too
            self.interrupted(exc)
            self.unpickling_failed(fut, exc)
            return
        set_outcome(fut, h.status, value, h.worker)
        self.journal.forget(self.token, h.task_id)  # delivered: forget it

    def interrupted(self, exc: BaseException) -> None:
        """Raise ``exc`` again when it is a KeyboardInterrupt in a thread
        other than this one (a thread waiting in ``result()`` that handles a
        reply, producer/receiver.py): it is the user's Ctrl-C, not the
        result's fault; the receiver leaves the reply to the collector."""
        if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is not self:
            raise exc

    def unpickling_failed(self, fut: MQFuture, exc: BaseException) -> None:
        err = ResultUnpicklingError(
            f"the result of task {fut.task_id} ({fut.fn_name}) could not be unpickled: "
            f"{type(exc).__name__}: {exc}")
        err.__cause__ = exc
        fail(fut, err)
        self.journal.forget(self.token, fut.task_id)

    # -- worker deaths -------------------------------------------------------------------
    def worker_died(self, task_id: int, body: Any) -> None:
        """The worker running ``task_id`` died (a WORKER_DIED notice whose
        ``body`` is :func:`~mqexecutor.protocol.death_body`): send again the
        tasks of its batch that never started, run the task again if it has
        retries left, else fail it."""
        dispatch = self.dispatch
        cause: int = DeathCause.DIED
        limit_ms = 0
        try:
            wid, pid, exitcode, _task, cause, limit_ms = parse_death_body(body)
            err = TerminatedWorkerError(
                f"task worker {wid} (pid {pid}) died with {describe_exit(exitcode)} "
                f"while running task {task_id}", worker_id=wid, pid=pid, exitcode=exitcode,
                task_id=task_id)
        except ProtocolError as exc:
            err = TerminatedWorkerError(f"the task worker running task {task_id} died "
                                        f"({exc})", task_id=task_id)
        if cause == DeathCause.LOST:
            self.task_lost(task_id, err, limit_ms)  # the field holds the times sent
            return
        with dispatch.lock:
            again: list[MQFuture] = []
            lost: list[MQFuture] = []
            pending = dispatch.pending
            dead = pending.get(task_id)
            batch = dead._batch if dead is not None else _batch_of(pending, task_id)
            if batch is not None:
                ids = [it.task_id for it in batch]
                at = ids.index(task_id) if task_id in ids else len(batch)
                again = [it for it in batch[at + 1:] if it.task_id in pending
                         and not it.done() and it._message]
                # Tasks before it in the batch ran, but their results were still in
                # the worker's outbox: run them again if they have retries left.
                for it in batch[:at]:
                    if it.task_id not in pending or it.done():
                        continue
                    if it._retries > 0 and it._message:
                        it._retries -= 1
                        again.append(it)
                    else:
                        lost.append(dispatch.take(it.task_id) or it)
            item = pending.get(task_id)
            if (item is not None and not item.done() and item._retries > 0 and item._message
                    and cause == DeathCause.DIED):
                item._retries -= 1  # run it again (retries=; not past a time limit)
                again.insert(0, item)
                item = None
            elif item is not None:
                item = dispatch.take(task_id)
            for it in reversed(again):
                it._batch = None
                dispatch.backlog.appendleft(it)
        if again:
            dispatch.feed()
            self.state.res.wake()
        for it in lost:
            self.fail_item(it, TerminatedWorkerError(
                f"task {it.task_id} ran, but its result was lost: {err.args[0]}",
                worker_id=err.worker_id, pid=err.pid, exitcode=err.exitcode,
                task_id=it.task_id))
        if item is None or item.done():
            return
        if cause == DeathCause.TIMEOUT:
            # its own limit, or the pool's (task_timeout of the pool serving it)
            limit = item._timeout or limit_ms / 1000
            self.fail_item(item, TaskTimeoutError(
                f"task {task_id} ({item.fn_name}) ran longer than its time limit of "
                f"{limit:g} s: task worker {err.worker_id} (pid {err.pid}) was stopped",
                task_id=task_id, fn_name=item.fn_name, limit=limit,
                worker_id=err.worker_id, pid=err.pid))
            return
        self.fail_item(item, err)

    def task_lost(self, task_id: int, err: TerminatedWorkerError, sends: int) -> None:
        """A worker that died took ``task_id`` from the queue and never started
        it (a LOST notice, producer/recovery.py, found after the task's
        ``sends``-th send): send it again when its message is kept (in a
        BATCH, with retries, durable), else fail it. A task done by now (its
        result came first), sent again since, or waiting to be, is left
        alone."""
        dispatch = self.dispatch
        with dispatch.lock:
            item = dispatch.pending.get(task_id)
            if (item is None or item.done() or item._state != RUNNING
                    or item._attempts != sends or any(it is item for it in dispatch.backlog)):
                return
            if item._message:
                item._batch = None
                dispatch.backlog.appendleft(item)
                item = None
            else:
                item = dispatch.take(task_id)
        if item is None:
            dispatch.feed()
            self.state.res.wake()
            return
        if item._spill_ref:  # the worker died before it read the file
            spill.discard(item._spill_ref)
        self.fail_item(item, TerminatedWorkerError(
            f"task {task_id} was lost: a task worker took it from the queue and died before "
            f"starting it (the last to die so: task worker {err.worker_id}, pid {err.pid}, "
            f"{describe_exit(err.exitcode)})", worker_id=err.worker_id, pid=err.pid,
            exitcode=err.exitcode, task_id=task_id))

    def fail_item(self, fut: MQFuture, err: BaseException) -> None:
        """Fail the Future of a task whose worker died (taken from pending)."""
        if isinstance(err, TerminatedWorkerError):
            err.fn_name = fut.fn_name
            tries = f" (attempt {fut._attempts})" if fut._attempts > 1 else ""
            err.args = (f"{err.args[0]} ({fut.fn_name}){tries}",)
        if fut._spill_ref and fut._keep:
            spill.discard(fut._spill_ref)
        self.journal.forget(self.token, fut.task_id)
        fail(fut, err)


def _batch_of(pending: dict[int, MQFuture], task_id: int) -> list[MQFuture] | None:
    """The BATCH of a task no longer pending (it finished, and its worker died
    while freeing its call, before starting the next one), found through the
    pending tasks of the same BATCH: the rest of it must be sent again. Scans
    ``pending``; worker deaths are rare."""
    for fut in pending.values():
        batch = fut._batch
        if batch is not None and any(it.task_id == task_id for it in batch):
            return batch
    return None


def _refused(exc: Exception) -> None:
    sys.stderr.write(f"mqexecutor: refused a message on the reply queue: {exc}\n")
