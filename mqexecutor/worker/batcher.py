"""ResultBatcher: the results of one BATCH message's tasks, sent together.

A task worker running the tasks of a BATCH message sends their results back in
RESULT BATCH messages (one msgsnd here and one msgrcv in the producer for up to
a message's worth of results), or, when all are plain return values, in one
RESULT VALUES message. Until sent they wait in the worker's outbox file
(:mod:`mqexecutor.outbox`), which the manager process delivers from if the
worker dies, so a death loses no finished result.
"""
from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import outbox
from ..codec import PROTOCOL
from ..limits import msgmax
from ..protocol import F_BATCH, F_VALUES, HEADER_SIZE, Kind, build, split_batch, values_body
from .replies import Replier, drop_results

__all__ = ["ResultBatcher", "NO_VALUE"]

#: ``ResultBatcher.add``'s value for a result that is not a plain inline value.
NO_VALUE: Any = object()


class ResultBatcher:
    """The results of one BATCH message's tasks, waiting to be sent together.

    Results are sent when the next would not fit in one message, before a task
    starts once the oldest waiting result is ``FLUSH_AGE`` seconds old, when the
    batch ends, and by a thread (``mqexecutor-outbox``) once the oldest is
    ``FLUSH_AGE`` old while a long task runs: a slow task never holds back the
    results of the quick ones before it.

    When the producer asked for it (F_VALUES on its BATCH) and every result
    waiting is a plain return value (``codec.PLAIN_TYPES``, inline, no
    authkey), they go in one RESULT VALUES message instead: their task ids and
    one pickle of the values, which the producer unpickles once.

    Args:
        replier (Replier): sends the messages.
        path (str): this worker's outbox file (made by the manager); without
            it, results are sent one by one.
        wid (int), pid (int): this worker's id and pid, put in the headers.
        start_thread (callable): starts a helper thread (the worker's, which
            keeps its stop signal off helper threads).
    """

    #: Seconds a result may wait for others before it is sent.
    FLUSH_AGE = 0.001

    def __init__(self, replier: Replier, path: str, wid: int, pid: int,
                 start_thread: Callable[..., threading.Thread]):
        self.replier = replier
        self.wid = wid
        self.pid = pid
        self._start_thread = start_thread
        self.box: outbox.Outbox | None
        try:
            self.box = outbox.Outbox(path)
        except (OSError, ValueError):
            self.box = None  # no file from the manager: results are sent one by one
        self.limit = msgmax() - HEADER_SIZE
        if self.box is not None:
            self.limit = min(self.limit, self.box.capacity)
        self.since = 0.0
        self.busy = 0.0  # seconds spent running the tasks of the waiting results
        self.route = outbox.Route(0, 0, 0)
        #: Whether the producer of the current BATCH reads RESULT VALUES
        #: (its BATCH had F_VALUES); then the return values of the results
        #: waiting are kept here too, while all are plain (``plain``).
        self.values_ok = False
        self.plain = True
        self.value_ids: list[int] = []
        self.values: list[Any] = []
        self.lock = threading.Lock()
        self.waiting = threading.Event()  # set while results wait
        self.flusher: threading.Thread | None = None

    def add(self, reply: int, pid: int, token: int, message: bytes, busy: float,
            task_id: int = 0, value: Any = NO_VALUE) -> None:
        """Keep (or send) the result ``message`` of task ``task_id``, which ran
        ``busy`` seconds; ``value``: its return value when ``message`` is a
        plain inline Status.OK result (``ok_result``)."""
        with self.lock:
            box = self.box
            if box is None or 4 + len(message) > self.limit:
                self._flush()
                self.send(outbox.Route(reply, pid, token), message, [message])
                return
            if box.count:
                route = self.route
                if (reply != route.reply or pid != route.pid or token != route.token
                        or box.used + 4 + len(message) > self.limit):
                    self._flush()
            if not box.count:
                self.route = outbox.Route(reply, pid, token)
                self.since = time.monotonic()
                if self.flusher is None:
                    self.flusher = self._start_thread(self._flush_late, "mqexecutor-outbox")
                self.waiting.set()
            box.add(self.route, message)
            self.busy += busy
            if self.values_ok and self.plain:
                if value is NO_VALUE:
                    self.plain = False
                else:
                    self.value_ids.append(task_id)
                    self.values.append(value)

    def due(self) -> bool:
        """Whether the oldest waiting result is ``FLUSH_AGE`` old."""
        box = self.box
        return (box is not None and box.count > 0
                and time.monotonic() - self.since >= self.FLUSH_AGE)

    def flush(self) -> None:
        """Send what waits."""
        with self.lock:
            self._flush()

    def _flush_late(self) -> None:
        """The flusher thread: send what waits once the oldest is FLUSH_AGE old."""
        box = self.box
        assert box is not None
        while True:
            self.waiting.wait()
            with self.lock:
                if not box.count:
                    self.waiting.clear()
                    continue
                delay = self.since + self.FLUSH_AGE - time.monotonic()
                if delay <= 0:
                    self._flush()
                    self.waiting.clear()
                    continue
            time.sleep(delay)

    def _flush(self) -> None:
        box = self.box
        if box is None or not box.count:
            return
        busy_us = min(int(self.busy * 1e6), 2**63) or 1
        self.busy = 0.0
        route = self.route
        if box.count == 1:
            message = box.first()
            self.send(route, message, [message])
        elif self.values_ok and self.plain:
            # plain values only: one pickle of them all (the outbox file keeps
            # the RESULT messages, for the manager to deliver if this worker dies)
            message = build(Kind.RESULT, F_VALUES, 0, busy_us, route.token, 0,
                            self.pid, self.wid,
                            values_body(self.value_ids, pickle.dumps(self.values, PROTOCOL)))
            self.send(route, message, [])  # no spill file to drop if not sent
        else:  # the inner messages carry their own HMAC: the outer header none;
            # its task id field tells how long the tasks ran (microseconds)
            message = build(Kind.RESULT, F_BATCH, 0, busy_us, route.token, 0,
                            self.pid, self.wid, box.body())
            self.send(route, message)
        box.clear()
        self.plain = True
        self.value_ids = []
        self.values = []

    def send(self, route: outbox.Route, message: bytes, inner: list[bytes] | None = None
             ) -> None:
        """Send ``message`` along ``route``; if the producer is gone, drop its
        results: ``inner``, or when None the entries of the RESULT BATCH
        ``message`` (split only then)."""
        if not self.replier.send(route.reply, message, route.pid, route.token):
            if inner is None:
                inner = split_batch(memoryview(message)[HEADER_SIZE:])
            drop_results(inner, route.pid, route.token)
