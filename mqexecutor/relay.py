"""What tasks log and print, relayed to the process that submitted them.

* **Logging records.** A task worker's root logger gets one handler, which
  puts each record (made picklable by ``logging.handlers.QueueHandler``'s
  ``prepare``, with ``worker_id`` and ``task_id`` attributes) in a bounded
  buffer; the worker's relay thread sends them to the producer of the task
  that emitted them, in RELAY messages on its reply queue. The producer's
  collector hands each record to ``logging.getLogger(record.name).handle``,
  as if the task had run in-process (the logging cookbook's socket receiver).
  The worker's root logger takes the level the producer's root logger had
  when the pool was made. ``MQExecutor(relay_logs=False)`` turns it off.
* **Printed text, in a notebook.** When the producer runs in a Jupyter
  kernel, a worker's ``sys.stdout`` and ``sys.stderr`` send what tasks write
  the same way, and the producer writes it in the context (the cell) that
  submitted the task. Elsewhere workers write to the terminal, as before.

Nothing here blocks a task: beyond ``BUFFER`` items waiting, records and text
are dropped and counted (``stats().relay_dropped``). Before a task's result is
sent, the worker waits up to ``DRAIN_SECONDS`` for what it logged and printed
to leave, so it arrives first. Printed text longer than a message holds
goes in pieces; a record longer than a message has the middle of its long
text attributes (its message) cut, and says so; a record still too long (a
large ``extra=`` object that is not text) is dropped and counted.

A RELAY message's body pickles ``(dropped, items)``: ``dropped`` counts what
was dropped since the last message; each item is ``("log", task_id, dict of
the record)`` or ``("out", task_id, "stdout" | "stderr", text)``.
"""
from __future__ import annotations

import collections
import io
import logging
import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

from .limits import msgmax
from .protocol import HEADER_SIZE, TAG_SIZE, Kind, build

__all__ = ["options", "in_notebook", "WorkerRelay", "deliver", "BUFFER", "DRAIN_SECONDS"]

#: Items (records, pieces of text) a worker keeps waiting at most; beyond, it
#: drops and counts them.
BUFFER = 10_000
#: Seconds a worker waits, at the end of a task, for its relayed items to leave.
DRAIN_SECONDS = 0.5
#: Bytes of pickled items per RELAY message, aimed at (a message holds msgmax).
_MESSAGE_ITEMS = 6000
#: Bytes a RELAY body keeps for the pickle's own framing and the record's
#: other attributes.
_OVERHEAD = 1024


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (ipykernel's ``sys.stdout``)."""
    return type(sys.stdout).__module__.startswith("ipykernel")


def options(relay_logs: bool) -> dict:
    """The PoolConfig fields of relaying for a pool made now: the root
    logger's level (None: no log relay), and whether to relay printed text."""
    return {"log_level": logging.getLogger().getEffectiveLevel() if relay_logs else None,
            "relay_output": in_notebook()}


# -- the producer's side ------------------------------------------------------------
def deliver(items: list, context_of: Callable[[int], Any]) -> None:
    """Hand relayed items to this process's logging and streams; ``context_of``
    gives the ``contextvars.Context`` a task was submitted in (or None), in
    which they are handled (a notebook shows them under that cell)."""
    for item in items:
        try:
            context = context_of(item[1])
            if item[0] == "log":
                record = logging.makeLogRecord(item[2])
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    _run(context, logger.handle, record)
            elif item[0] == "out":
                stream = sys.stderr if item[2] == "stderr" else sys.stdout
                _run(context, stream.write, item[3])
        except Exception:  # noqa: BLE001 - a bad record or handler must not stop the rest
            pass


def _run(context: Any, fn: Callable, arg: Any) -> None:
    if context is None:
        fn(arg)
    else:
        context.run(fn, arg)


def shared_context(last: Any) -> Any:
    """The ``contextvars.Context`` to keep on the Future of a submit made now
    (when text is relayed: ipykernel's streams find the cell there): ``last`` (the
    one kept for the previous submit, or None) when the current context holds
    the same variables with equal values, as a notebook cell's submits do,
    so that a cell's pending tasks share one object; else a new copy.

    A value whose comparison raises (a numpy array's ``==``, say) counts as
    different; nothing is raised. Safe to call from several threads: each
    caller gets a Context equal to its own, whatever ``last`` another thread
    keeps meanwhile.
    """
    context = _copy_context()
    if last is not None:
        try:
            if context == last:
                return last
        except Exception:  # noqa: BLE001 - an uncomparable value: keep a copy
            pass
    return context


def _copy_context() -> Any:
    import contextvars
    return contextvars.copy_context()


# -- the worker's side --------------------------------------------------------------
class _Handler(logging.Handler):
    """The worker root logger's handler: records go to the relay, never block.

    Records are made picklable by ``logging.handlers.QueueHandler.prepare``
    (the message formatted, args and exc_info cleared), imported with the
    first record: logging.handlers (and socket with it) stay off a worker's
    start-up."""

    def __init__(self, relay: WorkerRelay):
        super().__init__()
        self.relay = relay
        self._prepare: Callable[..., logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._prepare is None:
                import logging.handlers
                self._prepare = logging.handlers.QueueHandler.prepare
            record = self._prepare(self, record)  # type: ignore[arg-type]
            record.worker_id = self.relay.wid
            record.task_id = self.relay.task_id
            self.relay.add(("log", self.relay.task_id, record.__dict__))
        except Exception:  # noqa: BLE001 - as logging.Handler.emit
            self.handleError(record)


class _Writer(io.TextIOBase):
    """A worker's sys.stdout or sys.stderr that relays what is written,
    a line at a time (and what is left at each flush)."""

    def __init__(self, relay: WorkerRelay, name: str, original: Any):
        self.relay = relay
        self.name = name
        self.original = original
        self.buffer_: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer_.append(text)
        if "\n" in text or sum(map(len, self.buffer_)) > 4096:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self.buffer_:
            text = "".join(self.buffer_)
            self.buffer_ = []
            self.relay.add(("out", self.relay.task_id, self.name, text))

    def fileno(self) -> int:
        return self.original.fileno()

    def isatty(self) -> bool:
        return False


class WorkerRelay:
    """A task worker's relay: a bounded buffer and the thread that sends it.

    Args:
        send (callable): ``send(reply, message, pid, token) -> bool``, the
            worker's Replier.send.
        wid (int), pid (int): the worker's id and pid (message headers).
        owner (tuple): (reply key, pid, token) of the pool's owner, where
            what happens outside a task goes.
        start_thread (callable): the worker's helper-thread starter.
        authkey (bytes | None): signs RELAY messages (a pool with an authkey
            refuses unsigned ones).
    """

    def __init__(self, send: Callable[..., bool], wid: int, pid: int,
                 owner: tuple[int, int, int], start_thread: Callable[..., Any],
                 authkey: bytes | None = None):
        self.send = send
        self.wid = wid
        self.pid = pid
        self.authkey = authkey
        #: Bytes of a RELAY body, at most (msgmax less the header and tag).
        self.body_max = msgmax() - HEADER_SIZE - TAG_SIZE
        #: Characters of text per relayed piece (4 UTF-8 bytes at most each).
        self.piece = max(64, (self.body_max - _OVERHEAD) // 4)
        self.writers: list[_Writer] = []
        self.owner = owner
        self.route = owner  # (reply, pid, token) of the task running
        self.task_id: int | None = None
        self.items: collections.deque[tuple] = collections.deque()
        self.dropped = 0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        start_thread(self._run, "mqexecutor-relay")

    # -- set-up ------------------------------------------------------------------
    def capture_logs(self, level: int) -> None:
        """Make the root logger relay its records at or above ``level``."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_Handler(self))
        root.setLevel(level)

    def capture_output(self) -> None:
        """Relay what is written to sys.stdout and sys.stderr."""
        self.writers = [_Writer(self, "stdout", sys.__stdout__),
                        _Writer(self, "stderr", sys.__stderr__)]
        sys.stdout, sys.stderr = self.writers  # type: ignore[assignment]

    # -- tasks -------------------------------------------------------------------
    def begin(self, task_id: int, reply: int, pid: int, token: int) -> None:
        """A task starts: what is logged or printed now goes to its producer."""
        self.task_id = task_id
        self.route = (reply, pid, token)

    def end(self) -> None:
        """The task returned: flush what it printed, and wait (at most
        DRAIN_SECONDS) until what it relayed has left."""
        for writer in self.writers:
            writer.flush()
        if self.items:
            self.idle.wait(DRAIN_SECONDS)
        self.task_id = None
        self.route = self.owner

    def add(self, item: tuple) -> None:
        """Queue an item for the current route; drop it when BUFFER are waiting.
        Text longer than one message holds goes as several pieces."""
        pieces = [item]
        if item[0] == "out" and len(item[3]) > self.piece:
            pieces = [item[:3] + (text,) for text in _split(item[3], self.piece)]
        with self.lock:
            for piece in pieces:
                if len(self.items) >= BUFFER:
                    self.dropped += 1
                    continue
                self.items.append((self.route, piece))
            self.idle.clear()
        self.ready.set()

    # -- the relay thread --------------------------------------------------------
    def _run(self) -> None:
        while True:
            self.ready.wait()
            self.ready.clear()
            while True:
                with self.lock:
                    if not self.items:
                        self.idle.set()
                        break
                    route = self.items[0][0]
                    batch: list = []
                    size = 0
                    while self.items and self.items[0][0] == route and size < _MESSAGE_ITEMS:
                        item = self.items.popleft()[1]
                        batch.append(item)
                        size += _size(item)
                    dropped, self.dropped = self.dropped, 0
                self._send(route, dropped, batch)

    def _send(self, route: tuple[int, int, int], dropped: int, batch: list) -> None:
        reply, pid, token = route
        body = _dumps((dropped, batch))
        if len(body) > self.body_max:
            if len(batch) > 1:  # too big: halve it
                half = len(batch) // 2
                self._send(route, dropped, batch[:half])
                self._send(route, 0, batch[half:])
                return
            record = _shortened(batch[0], self.piece)  # a record longer than a message
            body = _dumps((dropped, [record])) if record is not None else b""
            if record is None or len(body) > self.body_max:
                body = _dumps((dropped + 1, []))  # dropped: say so at once
        message = build(Kind.RELAY, 0, 0, 0, token, 0, self.pid, self.wid, body, self.authkey)
        try:
            self.send(reply, message, pid, token)
        except Exception:  # noqa: BLE001 - the relay must not die
            pass


def _split(text: str, piece: int) -> list[str]:
    """``text`` in pieces that each pickle within a message: ``piece``
    characters (4 UTF-8 bytes at most each), or 4 times more when ASCII."""
    n = piece * 4 if text.isascii() else piece
    return [text[i:i + n] for i in range(0, len(text), n)]


def _shortened(item: tuple, piece: int) -> tuple | None:
    """A logging record too long for one RELAY message, with the middle of
    each long text attribute (``msg``, and ``message`` that
    ``QueueHandler.prepare`` sets to the same text) cut and said so: the
    start and the end of a traceback are kept. None for anything else."""
    if item[0] != "log":
        return None
    keep = piece // 2
    record = dict(item[2])
    for name, value in record.items():
        if isinstance(value, str) and len(value) > 2 * keep:
            cut = len(value) - 2 * keep
            record[name] = (f"{value[:keep]}\n... [{cut} characters cut: a relayed record"
                            f" holds one message] ...\n{value[-keep:]}")
    return ("log", item[1], record)


def _size(item: tuple) -> int:
    if item[0] == "out":
        return len(item[3]) + 32
    return 64 + len(str(item[2].get("msg", "")))


def _dumps(obj: Any) -> bytes:
    """Pickle relayed items; a record attribute that does not pickle (an
    ``extra=`` object) travels as its repr."""
    try:
        return pickle.dumps(obj, 5)
    except Exception:  # noqa: BLE001
        dropped, batch = obj
        safe = []
        for item in batch:
            if item[0] == "log":
                record = {}
                for key, value in item[2].items():
                    try:
                        pickle.dumps(value, 5)
                        record[key] = value
                    except Exception:  # noqa: BLE001
                        record[key] = repr(value)
                item = ("log", item[1], record)
            safe.append(item)
        return pickle.dumps((dropped, safe), 5)

