"""Adopting the tasks that producers which died left in a persistent queue
(see :mod:`mqexecutor.persistence` and docs/persistence.md).

An executor made on an explicit key first drains its queue: tasks whose
producer still lives go back; tasks of dead producers are re-addressed to this
executor (new task id, token, reply queue) and put in its backlog, with
Futures the caller gets from ``MQExecutor.recovered()``; in durable mode the
journal adds the dead producers' tasks that were no longer queued (running,
or waiting in their backlog). Tasks for worker ids this pool does not have
stay queued (``stranded()``).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import sysv_ipc

from .. import deadletter, persistence, queues
from ..errors import QueueModeError
from ..future import MQFuture
from ..protocol import (
    F_KEEP_SPILL,
    F_SPILL,
    F_TARGETED,
    PREEMPTIVE_MTYPE,
    WIRE_VERSION,
    Kind,
    ProtocolError,
    flatten,
    parse,
    reference_text,
    replace_route,
    split_task_body,
    targeted_mtype,
    unpack_header,
)
from .pool import live_pools
from .state import PoolState

__all__ = ["StrandedTask", "Adopted", "adopt_leftovers", "producer_alive"]


class StrandedTask(NamedTuple):
    """A task found in the queue for a worker id this pool does not have (a
    named tuple).

    It is left in the queue for a pool with enough workers.
    Attributes: task_id (as sent), worker_id, fn_name, producer_pid.
    """

    task_id: int
    worker_id: int
    fn_name: str
    producer_pid: int


class Adopted(NamedTuple):
    """What :func:`adopt_leftovers` found: the Futures of adopted tasks, the
    stranded tasks, and how many tasks of dead producers were found in all."""

    recovered: list
    stranded: list
    inherited: int


def producer_alive(pid: int, token: int) -> bool:
    """Whether the producer (pid, token) of a queued task still waits for it."""
    if pid == os.getpid():
        return any(s.res.token == token and not s.res.closed for s in live_pools())
    return persistence.pid_alive(pid)


def _send_back(queue: sysv_ipc.MessageQueue, raw: bytes, mtype: int) -> None:
    try:
        queues.send_patiently(queue, raw, mtype)
    except (sysv_ipc.Error, OSError):
        pass


def adopt_leftovers(state: PoolState, mode_name: str, swoole: bool) -> Adopted:
    """Take over the tasks that dead producers left in the queue of ``state``.

    Args:
        mode_name (str): this pool's mode, for messages.
        swoole (bool): the pool hands every message to a Swoole handler (such
            messages are left for the workers).

    Raises:
        QueueModeError: they were sent in the other mode or another wire
            version (the queue is left as it was).
    """
    res = state.res
    dispatch = state.dispatch
    targeted = dispatch.targeted
    queue = res.task_queue
    key = queue.key
    found: list[tuple[bytes, int]] = []
    while True:
        try:
            whole, mtype = queue.receive(block=False)
        except sysv_ipc.BusyError:
            break
        except sysv_ipc.Error:
            continue  # EINTR
        found.extend((raw, mtype) for raw in flatten(whole))
    journaled: dict[tuple[int, int], tuple[bytes, Any]] = {}
    for token, tid, msg in res.journal.entries():
        try:
            h = unpack_header(msg)
        except ProtocolError:
            continue
        if producer_alive(h.pid, h.token):
            continue  # its producer lives and will get the outcome
        journaled[(token, tid)] = (msg, h)
    if not found and not journaled:
        return Adopted([], [], 0)
    keep: list[tuple[bytes, int]] = []
    adopt: list[tuple[bytes, int, Any]] = []
    problem = None
    for raw, mtype in found:
        if swoole or raw[:1] == b"{":
            keep.append((raw, mtype))  # JSON tasks, Swoole packets: for the workers
            continue
        try:
            h = unpack_header(raw)
        except ProtocolError as exc:
            if raw[:2] == b"MQ" and len(raw) > 2 and raw[2] != WIRE_VERSION:
                problem = (f"the queue of key 0x{key & 0xFFFFFFFF:08x} holds tasks "
                           f"of wire version {raw[2]}; this mqexecutor speaks version "
                           f"{WIRE_VERSION}")
            else:
                deadletter.record(key, raw, f"found at start: {exc}", None)
                warnings.warn(f"mqexecutor: set aside a message of {len(raw)} bytes "
                              f"found in the queue: {exc}", RuntimeWarning, stacklevel=4)
            continue
        if h.kind != Kind.TASK:
            continue
        if bool(h.flags & F_TARGETED) != targeted:
            theirs = "TARGETED" if h.flags & F_TARGETED else "PREEMPTIVE"
            problem = (f"the queue of key 0x{key & 0xFFFFFFFF:08x} holds tasks sent "
                       f"in {theirs} mode; this executor is {mode_name}")
        if producer_alive(h.pid, h.token):
            keep.append((raw, mtype))  # a live producer still waits for it
            continue
        journaled.pop((h.token, h.task_id), None)  # in the queue: adopted from there
        adopt.append((raw, mtype, h))
    if problem is not None:
        for raw, mtype in found:
            _send_back(queue, raw, mtype)
        raise QueueModeError(problem)
    # Recorded tasks no longer queued: running when their producer died, or
    # still waiting in its backlog (durable mode).
    for msg, h in journaled.values():
        if bool(h.flags & F_TARGETED) != targeted:
            warnings.warn(f"mqexecutor: spool entry of task {h.task_id} was sent in "
                          "the other mode; left in the spool", RuntimeWarning, stacklevel=4)
            continue
        mtype = targeted_mtype(h.worker) if targeted else PREEMPTIVE_MTYPE
        adopt.append((msg, mtype, h))
    stranded: list[StrandedTask] = []
    kept_adopt = []
    for raw, mtype, h in adopt:
        if targeted and not 0 <= h.worker < dispatch.max_workers:
            try:
                name, _ = split_task_body(parse(raw)[1], h.flags)
            except ProtocolError:
                name = "?"
            stranded.append(StrandedTask(h.task_id, h.worker, name, h.pid))
            if any(raw is r for r, _ in found):
                keep.append((raw, mtype))
            continue
        kept_adopt.append((raw, mtype, h))
    for raw, mtype in keep:
        _send_back(queue, raw, mtype)
    if stranded:
        warnings.warn(
            f"mqexecutor: {len(stranded)} task(s) in the queue of key "
            f"0x{key & 0xFFFFFFFF:08x} target worker ids this pool of "
            f"{dispatch.max_workers} does not have; they stay queued (see stranded())",
            RuntimeWarning, stacklevel=4)
    recovered: list[MQFuture] = []
    durable = res.journal.durable
    with dispatch.lock:
        for raw, mtype, h in kept_adopt:
            task_id = next(dispatch.ids)
            try:
                name, payload = split_task_body(parse(raw)[1], h.flags)
                message = replace_route(raw, task_id, res.token, res.reply_queue.key,
                                        res.pid, dispatch.authkey)
            except ProtocolError as exc:
                deadletter.record(key, raw, f"not adopted: {exc}", None)
                continue
            fut = MQFuture(task_id, name, dispatch)
            fut.original_task_id = h.task_id
            fut.original_pid = h.pid
            worker = h.worker if targeted else -1
            if worker >= 0:
                fut.worker_id = worker
                dispatch.outstanding[worker] += 1
            ref = reference_text(payload) if h.flags & F_SPILL else None
            res.journal.move((h.token, h.task_id), (res.token, task_id), message)
            fut._task(message, mtype, worker, ref, 0, durable or bool(h.flags & F_KEEP_SPILL))
            dispatch.pending[task_id] = fut
            dispatch.backlog.append(fut)
            recovered.append(fut)
    dispatch.feed()
    return Adopted(recovered, stranded, len(kept_adopt) + len(stranded))
