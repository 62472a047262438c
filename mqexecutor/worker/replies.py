"""How a task worker sends outcomes back: to each producer's reply queue,
never blocking for good on a producer that died (see docs/architecture.md,
"Why results have their own queue").

* :class:`Liveness` tells whether a producer still lives (a pidfd kept per pid).
* :class:`Replier` opens reply queues by key (cached) and sends with
  :func:`mqexecutor.queues.send_patiently`; a producer found dead has its reply
  queue and spill directory removed.
* :func:`encode_outcome` pickles an outcome into a RESULT message, and pickles
  the failure instead when the outcome itself cannot be pickled.
"""
from __future__ import annotations

import os
import select
import threading
import time
import traceback
from typing import Any

import sysv_ipc

from .. import codec, persistence, queues, spill
from ..limits import msgmax
from ..protocol import F_SPILL, RESULT_MTYPE, TAG_SIZE, Kind, Status, build, spill_reference

__all__ = ["Liveness", "Replier", "encode_outcome", "format_exc", "drop_results"]


def format_exc(exc: BaseException) -> str:
    """The traceback of ``exc`` as text, as ``traceback.format_exception``."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _alive(pid: int) -> bool:
    """Whether producer ``pid`` lives; an unknown pid (<= 0) counts as alive."""
    return pid <= 0 or persistence.pid_alive(pid)


class Liveness:
    """Whether producers live, asked before every result is sent: one poll() of
    a pidfd kept per producer pid (readable once the process exited, zombie
    included), about 1 us, against about 15 us for kill(0) plus reading
    /proc/<pid>/stat. Falls back to :func:`persistence.pid_alive` where pidfds
    do not exist."""

    LIMIT = 64  # pidfds kept open

    def __init__(self) -> None:
        self._polls: dict[int, Any] = {}
        self._fds: dict[int, int] = {}

    def alive(self, pid: int) -> bool:
        """True while process ``pid`` runs (always for pid <= 0: unknown)."""
        if pid <= 0:
            return True
        poller = self._polls.get(pid)
        if poller is None:
            if len(self._fds) >= self.LIMIT:
                self.close()
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return False
            except (AttributeError, OSError):  # no pidfd here: the slow way
                return _alive(pid)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            self._fds[pid] = fd
            self._polls[pid] = poller
        if poller.poll(0):
            # That process exited. The pid may have been given to a new
            # producer since: ask again with a fresh pidfd.
            self.forget(pid)
            return self.alive(pid) if _alive(pid) else False
        return True

    def forget(self, pid: int) -> None:
        self._polls.pop(pid, None)
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for pid in list(self._fds):
            self.forget(pid)


def _owns(key: int, producer_pid: int, token: int) -> bool:
    """Whether the metadata of producer (pid, token) exists and names ``key``
    as its reply queue (every MQExecutor writes it when it starts)."""
    meta = persistence.read_meta(spill.producer_subdir(producer_pid, token))
    return meta is not None and meta.reply_key == key and meta.owner_pid == producer_pid


class Replier:
    """Sends results to producers' reply queues, opened by key and cached.
    Thread-safe (the result batcher's flusher thread sends too)."""

    #: Seconds a reply queue may stay full before the worker checks that its
    #: producer is still the process that has its pid.
    FULL_PATIENCE = 10.0

    def __init__(self) -> None:
        self._queues: dict[int, sysv_ipc.MessageQueue] = {}
        self._liveness = Liveness()
        self._lock = threading.RLock()

    def _queue(self, key: int) -> sysv_ipc.MessageQueue:
        q = self._queues.get(key)
        if q is None:
            if key == 0:  # IPC_PRIVATE: msgget would create a queue nobody reads
                raise sysv_ipc.ExistentialError("reply key 0 (IPC_PRIVATE) names no queue")
            if len(self._queues) > 256:
                self._queues.clear()
            q = sysv_ipc.MessageQueue(key, 0, max_message_size=msgmax())
            self._queues[key] = q
        return q

    def send(self, key: int, message: bytes, producer_pid: int, token: int = 0) -> bool:
        """Send a result to the reply queue of ``key``, waiting while it is full
        as long as its producer (``producer_pid``, ``token``) lives. Returns
        False when the result had to be dropped: the producer died (its reply
        queue and spill directory are then removed, so nothing it left leaks),
        the queue is gone, or it stayed full ``FULL_PATIENCE`` seconds while
        the pid now belongs to another process."""
        with self._lock:
            if not self._liveness.alive(producer_pid):
                self._bury(key, producer_pid, token)
                return False
            full_since = time.monotonic()

            def still_wanted() -> bool:
                if not self._liveness.alive(producer_pid):
                    self._bury(key, producer_pid, token)
                    return False
                # Full for long, and the pid lives but its producer's metadata
                # is gone: the pid belongs to another process now, and nobody
                # will read this queue.
                return not (token and time.monotonic() - full_since > self.FULL_PATIENCE
                            and not _owns(key, producer_pid, token))

            for _ in range(2):  # a cached queue may be stale: open it again once
                try:
                    sent = queues.send_patiently(self._queue(key), message, RESULT_MTYPE,
                                                 patience=None, still_wanted=still_wanted)
                except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError):
                    self._queues.pop(key, None)
                    return False
                except OSError:
                    # EINVAL: the cached queue was removed and the key reused
                    # by a new queue.
                    self._queues.pop(key, None)
                    continue
                if not sent:
                    self._queues.pop(key, None)
                return sent
            return False

    def send_raw(self, key: int, mtype: int, message: bytes) -> bool:
        """Send ``message`` with type ``mtype`` to the queue of ``key`` (for
        external producers' replies). Never blocks: gives up after about a
        second of a full queue. Returns False when it could not be sent."""
        for _ in range(2):  # a cached queue may be stale: open it again once
            try:
                return queues.send_patiently(self._queue(key), message, mtype, patience=1.0)
            except OSError:  # EINVAL: a stale cached queue (key reused)
                if self._queues.pop(key, None) is None:
                    return False
            except (sysv_ipc.Error, ValueError):
                self._queues.pop(key, None)
                return False
        return False

    def _bury(self, key: int, producer_pid: int, token: int) -> None:
        """Remove the reply queue and spill directory of a producer that died,
        only when its own metadata names that reply key: a forged header
        naming a dead pid must not destroy a live producer's queue."""
        self._queues.pop(key, None)
        if not token or key == 0:
            return
        subdir = spill.producer_subdir(producer_pid, token)
        meta = persistence.read_meta(subdir)
        if meta is None or meta.reply_key != key or meta.owner_pid != producer_pid:
            return
        persistence.release_producer(key, subdir)


def _result_message(status: int, task_id: int, token: int, wid: int, obj: Any,
                    inline_max: int, subdir: str, authkey: bytes | None, pid: int) -> bytes:
    body, spilled = codec.dumps(obj, inline_max, subdir)
    return build(Kind.RESULT, F_SPILL if spilled else 0, status, task_id, token, 0, pid,
                 wid, body, authkey)


def encode_outcome(status: int, task_id: int, token: int, wid: int, obj: Any,
                   inline_max: int, subdir: str, authkey: bytes | None = None,
                   pid: int = 0) -> bytes:
    """A RESULT message carrying ``obj`` (a return value, or (exception,
    traceback text)) with ``status``; when ``obj`` cannot be pickled, one
    carrying that failure (Status.RAISED) instead. Never raises but for a
    spill file that cannot be written.

    Args:
        inline_max (int): largest body (bytes) that fits one message, HMAC
            tag excluded; larger ones are spilled into ``subdir``.
        pid (int): the sender's pid (default: this process's).
    """
    if authkey:
        inline_max -= TAG_SIZE
    pid = pid or os.getpid()
    try:
        return _result_message(status, task_id, token, wid, obj, inline_max, subdir, authkey,
                               pid)
    except BaseException as exc:  # noqa: BLE001 - SystemExit at pickle time is an outcome
        failure = (exc, format_exc(exc))
    try:
        return _result_message(Status.RAISED, task_id, token, wid, failure, inline_max,
                               subdir, authkey, pid)
    except BaseException as exc2:  # noqa: BLE001
        text = f"{type(failure[0]).__name__}: {failure[0]}"
        plain = (RuntimeError(f"the task's outcome could not be pickled ({text}), "
                              f"nor the error itself ({type(exc2).__name__}: {exc2})"),
                 failure[1])
        return _result_message(Status.RAISED, task_id, token, wid, plain, inline_max,
                               subdir, authkey, pid)


def drop_results(messages: list[bytes], pid: int, token: int) -> None:
    """Results that could not be sent: unlink their spill files, and the
    producer's spill directory if that left it empty (spilling re-created it)."""
    spilled = False
    for m in messages:
        ref = spill_reference(m)
        if ref is not None:
            spill.discard(ref)
            spilled = True
    if spilled:
        spill.remove_if_empty(spill.producer_subdir(pid, token))
