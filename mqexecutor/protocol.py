"""The wire format: one fixed 40-byte header in front of every message.

Every message mqexecutor puts on a System V queue, task or result, starts with
this header (little-endian, no padding; ``struct`` format ``HEADER_FORMAT``)::

    offset size field     meaning
    0      2    magic     b"MQ"
    2      1    version   WIRE_VERSION (1); a worker refuses other versions
    3      1    kind      Kind: TASK, RESULT
    4      2    flags     Flag bits: SPILL, TARGETED, ...
    6      2    status    Status of a RESULT; 0 in a TASK
    8      8    task_id   unsigned; unique per producer
    16     8    token     unsigned; random id of the producing executor
    24     4    reply     signed key_t of the producer's reply queue
    28     4    pid       producer pid (TASK) or worker pid (RESULT)
    32     4    worker    target worker id, -1 for any (TASK); worker id (RESULT)
    36     4    length    bytes of body that follow the header

The body of a RESULT is a pickle (protocol 5) or, when ``Flag.SPILL`` is set,
the reference of a spill file (see :mod:`mqexecutor.spill`); with
``Flag.BATCH``, several whole messages (:func:`join_batch`); with
``Flag.VALUES``, the task ids and one pickle of the plain return values of
several tasks (:func:`values_body`). The body of a TASK
starts with the function's qualified name (u16 length, then UTF-8 bytes), so a
queue can be inspected without unpickling anything, followed by the same
pickle-or-reference payload. docs/protocol.md
describes the format for producers written in other languages.
"""
from __future__ import annotations

import enum
import struct
from types import ModuleType
from typing import NamedTuple

__all__ = [
    "MAGIC", "WIRE_VERSION", "HEADER_FORMAT", "HEADER_SIZE", "HEADER_STRUCT", "Kind", "Flag",
    "Status",
    "Header", "ProtocolError", "pack_header", "unpack_header", "PREEMPTIVE_MTYPE",
    "RESULT_MTYPE", "CONTROL_MTYPE", "WAKE_MTYPE", "targeted_mtype", "task_body", "split_task_body",
    "task_payload", "replace_route", "build", "parse", "AuthError", "TAG_SIZE", "split_batch",
    "join_batch", "flatten", "ok_result", "batch_entries",
    "F_SPILL", "F_TARGETED", "F_BATCH", "F_AUTH", "F_KEEP_SPILL", "F_FN_REF", "F_VALUES",
    "F_TIMEOUT", "timeout_field", "task_timeout", "MAX_TIMEOUT",
    "values_body", "split_values", "pack_task", "spill_reference", "reference_text",
    "ENTRY_STRUCT", "entry_payload_start", "LEN_STRUCT", "death_body", "parse_death_body",
    "DeathCause",
]

MAGIC = b"MQ"
WIRE_VERSION = 1
HEADER_FORMAT = "<2sBBHHQQiiiI"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
#: The header's ``struct.Struct`` (for code that packs or unpacks it in place).
HEADER_STRUCT = struct.Struct(HEADER_FORMAT)
assert HEADER_SIZE == 40

#: Message type of tasks sent in preemptive mode. Preemptive workers receive with
#: msgtyp 0 (any type), as Swoole's task_ipc_mode 3 does, so this value matters
#: only to tools that read the queue.
PREEMPTIVE_MTYPE = 1
#: Message type of results on a producer's reply queue.
RESULT_MTYPE = 1
#: Message type of control messages on a producer's reply queue (collector stop).
CONTROL_MTYPE = 2
#: Message type of the empty message that gets a producer's collector out of a
#: blocking msgrcv on its reply queue, so that a thread waiting in result()
#: receives the reply itself (producer/receiver.py).
WAKE_MTYPE = 3


def targeted_mtype(worker_id: int) -> int:
    """Message type that worker ``worker_id`` receives in targeted mode.

    As Swoole's task_ipc_mode 2: mtype = worker id + 1 (mtype must be > 0).
    """
    return worker_id + 1


class Kind(enum.IntEnum):
    """What a message carries."""

    TASK = 1
    RESULT = 2
    #: Logging records and printed text of tasks, for their producer
    #: (:mod:`mqexecutor.relay`).
    RELAY = 3


class Flag(enum.IntFlag):
    """Bits of the header's ``flags`` field."""

    NONE = 0
    #: The body is a spill-file reference, not the pickle itself.
    SPILL = 0x0001
    #: The task was sent in targeted mode (Mode.TARGETED); preemptive workers refuse it.
    TARGETED = 0x0002
    #: The body is several whole TASK messages (see :func:`split_batch`), run in
    #: order by one worker; the producer packs them when its backlog holds many
    #: small tasks. The outer header carries no HMAC: each inner message does.
    BATCH = 0x0004
    #: The last TAG_SIZE (32) bytes are an HMAC-SHA256, under the pool's authkey,
    #: of everything before them (header included); ``length`` counts them.
    AUTH = 0x0008
    #: The worker must not unlink the task's spill file: the producer removes it
    #: once the outcome is in, since it may need to send the task again
    #: (retries, durable mode).
    KEEP_SPILL = 0x0010
    #: The payload pickles ``("module:qualname", args, kwargs)``: the function
    #: comes as a reference the producer makes once per function and the worker
    #: resolves once (import the module, look the name up, as unpickling does).
    FN_REF = 0x0020
    #: On a BATCH: its producer reads RESULT VALUES replies. On a RESULT: the
    #: body is the return values of several tasks (see :func:`values_body`),
    #: all Status.OK: one unpickling for all of them in the producer.
    VALUES = 0x0040
    #: The TASK has a time limit: a u32 of milliseconds follows the function
    #: name (:func:`timeout_field`). The clock starts when a worker takes it.
    TIMEOUT = 0x0080


class Status(enum.IntEnum):
    """Outcome carried by a RESULT message."""

    #: The body pickles the return value.
    OK = 0
    #: The body pickles (exception, traceback text) raised by the task.
    RAISED = 1
    #: The worker could not read the task (unpickling or spill file failed);
    #: the body pickles (exception, traceback text).
    BAD_TASK = 2
    #: The worker died running the task (sent by the pool's manager process);
    #: the body is :func:`death_body`.
    WORKER_DIED = 3
    #: A worker's initializer raised; the body pickles (exception, traceback text).
    INIT_FAILED = 4
    #: The task was terminated (``MQFuture.terminate``) before it started: the
    #: worker did not run it. Empty body.
    CANCELLED = 5


class DeathCause(enum.IntEnum):
    """Why the worker running a task died (in a WORKER_DIED notice)."""

    #: It died by itself: a signal, ``os._exit``, the OOM killer.
    DIED = 0
    #: The manager stopped it: the task ran past its time limit.
    TIMEOUT = 1
    #: The manager stopped it: the task was terminated (``MQFuture.terminate``).
    TERMINATED = 2
    #: Sent by a producer to itself: a worker that died took the task from
    #: the queue and did not start it (producer/recovery.py).
    LOST = 3


#: The body of a WORKER_DIED notice: worker id i32, the dead worker's pid
#: i32, its exit status i32 (negative: minus the signal number), the task id
#: u64 (as its producer numbered it), the cause u8 (:class:`DeathCause`), and
#: for the cause TIMEOUT the time limit in milliseconds u32 (else 0).
_DEATH = struct.Struct("<iiiQBI")


def death_body(worker_id: int, pid: int, exitcode: int, task_id: int,
               cause: int = 0, limit_ms: int = 0) -> bytes:
    """The body of a WORKER_DIED notice (see ``_DEATH``)."""
    return _DEATH.pack(worker_id, pid, exitcode, task_id, cause,
                       min(max(limit_ms, 0), 0xFFFFFFFF))


def parse_death_body(body: bytes | memoryview) -> tuple[int, int, int, int, int, int]:
    """Inverse of :func:`death_body`: (worker_id, pid, exitcode, task_id, cause,
    limit_ms).

    Raises:
        ProtocolError: the body is not of that size.
    """
    if len(body) != _DEATH.size:
        raise ProtocolError(f"WORKER_DIED body of {len(body)} bytes, not {_DEATH.size}")
    return _DEATH.unpack(body)


# Plain int copies of the flags for the hot paths (IntFlag arithmetic runs in
# Python and costs a microsecond per operation).
F_SPILL = int(Flag.SPILL)
F_TARGETED = int(Flag.TARGETED)
F_BATCH = int(Flag.BATCH)
F_AUTH = int(Flag.AUTH)
F_KEEP_SPILL = int(Flag.KEEP_SPILL)
F_FN_REF = int(Flag.FN_REF)
F_VALUES = int(Flag.VALUES)
F_TIMEOUT = int(Flag.TIMEOUT)


class ProtocolError(ValueError):
    """A message is not a valid mqexecutor message (bad magic, version, size...)."""


class AuthError(ProtocolError):
    """A message's HMAC is missing or wrong for the pool's authkey."""


#: Bytes of the HMAC-SHA256 tag that ends a message with F_AUTH.
TAG_SIZE = 32


class Header(NamedTuple):
    """The decoded header of one message (see the module docstring)."""

    kind: int
    flags: int
    status: int
    task_id: int
    token: int
    reply: int
    pid: int
    worker: int
    length: int
    version: int = WIRE_VERSION


def pack_header(kind: int, flags: int, status: int, task_id: int, token: int,
                reply: int, pid: int, worker: int, length: int) -> bytes:
    """Encode a header; returns ``HEADER_SIZE`` (40) bytes."""
    return HEADER_STRUCT.pack(MAGIC, WIRE_VERSION, kind, flags, status, task_id, token,
                              reply, pid, worker, length)


_NAME_LEN = struct.Struct("<H")


def task_body(fn_name: str, payload: bytes) -> bytes:
    """The body of a TASK: u16 name length, the name (UTF-8, at most 255 bytes),
    then the payload (pickle or spill reference). With F_TIMEOUT, the time
    limit (:func:`timeout_field`) comes between the name and the payload."""
    name = fn_name.encode("utf-8", "replace")[:255]
    return _NAME_LEN.pack(len(name)) + name + payload


def _name_end(view: memoryview) -> int:
    if len(view) < 2:
        raise ProtocolError("task body shorter than its name length field")
    n = 2 + (view[0] | view[1] << 8)
    if n > len(view):
        raise ProtocolError(f"task body of {len(view)} bytes cannot hold a "
                            f"{n - 2}-byte function name")
    return n


def _payload_start(view: memoryview, flags: int) -> int:
    start = _name_end(view)
    if flags & F_TIMEOUT:
        start += _TIMEOUT.size
        if start > len(view):
            raise ProtocolError("task body ends inside its time limit")
    return start


def split_task_body(body: bytes | memoryview, flags: int = 0) -> tuple[str, memoryview]:
    """Inverse of :func:`task_body`: returns (function name, payload) of the
    body of a TASK whose header has ``flags``.

    Raises:
        ProtocolError: the name (or the time limit) runs past the end of the body.
    """
    view = memoryview(body)
    start = _payload_start(view, flags)
    return bytes(view[2:_name_end(view)]).decode("utf-8", "replace"), view[start:]


def task_payload(body: bytes | memoryview, flags: int = 0) -> memoryview:
    """The payload of a TASK body, past the function name and time limit
    (see :func:`task_body`).

    Raises:
        ProtocolError: the name (or the time limit) runs past the end of the body.
    """
    view = memoryview(body)
    return view[_payload_start(view, flags):]


#: A TASK's time limit (with F_TIMEOUT): u32 milliseconds, after the name.
_TIMEOUT = struct.Struct("<I")
#: The largest time limit a TASK can carry, seconds (about 49 days).
MAX_TIMEOUT = 0xFFFFFFFF / 1000


def timeout_field(seconds: float) -> bytes:
    """The time-limit field of a TASK body (F_TIMEOUT), from seconds (rounded
    up to the millisecond).

    Raises:
        ValueError: ``seconds`` is not in (0, MAX_TIMEOUT].
    """
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"a time limit must be > 0 and <= {MAX_TIMEOUT:.0f} s, not {seconds}")
    return _TIMEOUT.pack(max(1, int(-(-seconds * 1000 // 1))))


def task_timeout(body: bytes | memoryview, flags: int) -> float | None:
    """The time limit (seconds) of a TASK body, None without F_TIMEOUT.

    Raises:
        ProtocolError: the body is too short for it.
    """
    if not flags & F_TIMEOUT:
        return None
    view = memoryview(body)
    end = _name_end(view)
    if end + _TIMEOUT.size > len(view):
        raise ProtocolError("task body ends inside its time limit")
    return _TIMEOUT.unpack_from(view, end)[0] / 1000


def unpack_header(data: bytes | memoryview) -> Header:
    """Decode and check the header at the start of ``data``.

    Raises:
        ProtocolError: when ``data`` is shorter than a header, the magic is not
            b"MQ", the version is not ``WIRE_VERSION``, the kind is unknown, or
            ``length`` disagrees with the size of the body.
    """
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than the "
                            f"{HEADER_SIZE}-byte header")
    (magic, version, kind, flags, status, task_id, token, reply, pid, worker,
     length) = HEADER_STRUCT.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version} is not supported "
                            f"(this mqexecutor speaks version {WIRE_VERSION})")
    if not 1 <= kind <= 3:  # Kind.TASK, Kind.RESULT, Kind.RELAY
        raise ProtocolError(f"unknown message kind {kind}")
    if length != len(data) - HEADER_SIZE:
        raise ProtocolError(f"header says {length} body bytes, message has "
                            f"{len(data) - HEADER_SIZE}")
    return _new_header(Header, (kind, flags, status, task_id, token, reply, pid, worker,
                                length, version))


_new_header = tuple.__new__  # Header(...) without NamedTuple's Python-level __new__


_LEN = struct.Struct("<I")
#: A u32, little-endian: the length in front of each entry of a batch body.
LEN_STRUCT = _LEN
#: One entry of a batch body read in place: its u32 length, then its header's
#: fields (for loops that unpack each entry once, without a Header object).
ENTRY_STRUCT = struct.Struct("<I" + HEADER_FORMAT[1:])


def entry_payload_start(data: bytes | memoryview, offset: int) -> int:
    """Where the payload of the TASK message at ``offset`` in ``data`` starts:
    past its header and function name (:func:`task_body`). The caller checks
    that it lies inside the message."""
    return offset + HEADER_SIZE + 2 + (data[offset + HEADER_SIZE] |
                                       data[offset + HEADER_SIZE + 1] << 8)


def batch_entries(data: bytes | memoryview, start: int = 0) -> list[tuple[int, int]]:
    """Where the inner messages of a batch body lie: (offset, length) of each,
    for a body that begins at ``start`` in ``data`` and runs to its end
    (see :func:`split_batch`, which copies them out).

    Raises:
        ProtocolError: a length runs past the end of the body.
    """
    end = len(data)
    out = []
    offset = start
    while offset < end:
        if offset + 4 > end:
            raise ProtocolError("batch body ends inside a length field")
        (n,) = _LEN.unpack_from(data, offset)
        offset += 4
        if n < HEADER_SIZE or offset + n > end:
            raise ProtocolError(f"batch entry of {n} bytes does not fit the batch body")
        out.append((offset, n))
        offset += n
    return out


def split_batch(body: bytes | memoryview) -> list[bytes]:
    """The inner TASK messages of a BATCH message's body (each a u32 length,
    little-endian, then a whole message with its own header and HMAC).

    Raises:
        ProtocolError: a length runs past the end of the body.
    """
    view = memoryview(body)
    return [bytes(view[offset:offset + n]) for offset, n in batch_entries(view)]


def join_batch(messages: list[bytes]) -> bytes:
    """The body of a BATCH message carrying ``messages`` (whole messages, each
    with its header): inverse of :func:`split_batch`."""
    return b"".join(_LEN.pack(len(m)) + m for m in messages)


_COUNT = _LEN  # a RESULT VALUES body's count: a u32 as well


def values_body(task_ids: list[int], pickled_values: bytes) -> bytes:
    """The body of a RESULT VALUES message: u32 count, count u64 task ids,
    then one pickle of the list of their return values, in the same order
    (little-endian; ``pickled_values`` is that pickle, protocol 5).

    Raises:
        struct.error: a task id is not in 0..2**64-1."""
    n = len(task_ids)
    return _COUNT.pack(n) + struct.pack(f"<{n}Q", *task_ids) + pickled_values


def split_values(body: bytes | memoryview) -> tuple[tuple[int, ...], memoryview]:
    """Inverse of :func:`values_body`: (the task ids, a view of the pickle of
    the values).

    Raises:
        ProtocolError: the body is shorter than its count says.
    """
    view = memoryview(body)
    if len(view) < _COUNT.size:
        raise ProtocolError("RESULT VALUES body shorter than its count")
    (n,) = _COUNT.unpack_from(view)
    end = _COUNT.size + 8 * n
    if len(view) <= end:
        raise ProtocolError(f"RESULT VALUES body of {len(view)} bytes cannot hold {n} "
                            "task ids and their values")
    return struct.unpack_from(f"<{n}Q", view, _COUNT.size), view[end:]


def flatten(raw: bytes) -> list[bytes]:
    """The task messages carried by ``raw``: its inner messages when it is a
    BATCH, else ``[raw]``. Malformed batches come back whole (``[raw]``), for
    the caller's own checks to refuse."""
    if len(raw) >= HEADER_SIZE and raw[:2] == MAGIC and raw[4] & F_BATCH:
        try:
            unpack_header(raw)
            return split_batch(memoryview(raw)[HEADER_SIZE:])
        except ProtocolError:
            return [raw]
    return [raw]


def replace_route(message: bytes, task_id: int, token: int, reply: int, pid: int,
                  authkey: bytes | None = None) -> bytes:
    """A copy of a TASK message addressed to another producer: same flags,
    worker and body, new task id, token, reply key and pid (signed again with
    ``authkey``). Used to adopt the tasks of a producer that died.

    Raises:
        ProtocolError, AuthError: as :func:`parse` with ``authkey``.
    """
    h, body = parse(message, authkey)
    return build(h.kind, h.flags, h.status, task_id, token, reply, pid, h.worker,
                 bytes(body), authkey)


def _hmac() -> ModuleType:
    """The hmac module, imported on first use: with hashlib and OpenSSL it is
    3-4 ms of ``import mqexecutor`` that only pools with an authkey need."""
    import hmac
    return hmac


def build(kind: int, flags: int, status: int, task_id: int, token: int, reply: int,
          pid: int, worker: int, body: bytes, authkey: bytes | None = None) -> bytes:
    """A whole message: header, body and, when ``authkey`` is given, the
    HMAC-SHA256 tag of both (F_AUTH is then set)."""
    if authkey:
        flags |= F_AUTH
        message = pack_header(kind, flags, status, task_id, token, reply, pid, worker,
                              len(body) + TAG_SIZE) + body
        return message + _hmac().digest(authkey, message, "sha256")
    return pack_header(kind, flags & ~F_AUTH, status, task_id, token, reply, pid, worker,
                       len(body)) + body


def ok_result(task_id: int, token: int, pid: int, worker: int, body: bytes) -> bytes:
    """``build(Kind.RESULT, 0, Status.OK, task_id, token, 0, pid, worker, body)``
    without HMAC, made in one step (a worker's most common message)."""
    return HEADER_STRUCT.pack(MAGIC, WIRE_VERSION, _RESULT, 0, _OK, task_id, token,
                              0, pid, worker, len(body)) + body


_TASK = int(Kind.TASK)
_RESULT = int(Kind.RESULT)
_OK = int(Status.OK)


def pack_task(flags: int, task_id: int, token: int, reply: int, pid: int, worker: int,
              body: bytes, authkey: bytes | None = None) -> bytes:
    """A whole TASK message: ``build(Kind.TASK, flags, 0, ...)``, made in one
    step when there is no ``authkey`` (every submit() makes one).

    Args:
        body (bytes): the task body, :func:`task_body` (function name, payload).
        worker (int): the target worker id, -1 for any.
    """
    if authkey is None:
        return HEADER_STRUCT.pack(MAGIC, WIRE_VERSION, _TASK, flags, 0, task_id, token,
                                  reply, pid, worker, len(body)) + body
    return build(Kind.TASK, flags, 0, task_id, token, reply, pid, worker, body, authkey)


def reference_text(payload: bytes | memoryview) -> str:
    """A spill reference carried as a message's payload, as text (undecodable
    bytes replaced: such a reference is refused by :mod:`mqexecutor.spill`)."""
    return bytes(payload).decode("ascii", "replace")


def spill_reference(message: bytes | memoryview) -> str | None:
    """The spill file named by a whole TASK or RESULT message with F_SPILL
    (its HMAC unchecked); None when the message names none or is malformed."""
    try:
        h, body = parse(bytes(message))
        if not h.flags & F_SPILL:
            return None
        if h.kind == Kind.TASK:
            body = task_payload(body, h.flags)
    except ProtocolError:
        return None
    return reference_text(body)


def parse(raw: bytes, authkey: bytes | None = None) -> tuple[Header, memoryview]:
    """Check a whole message; returns (header, body without the tag).

    With ``authkey``, the message must carry a valid HMAC (checked before
    anything in the body is looked at). Without it, a tag is stripped unchecked.

    Raises:
        ProtocolError: malformed header (see :func:`unpack_header`).
        AuthError: ``authkey`` is given and the tag is missing or wrong.
    """
    h = unpack_header(raw)
    view = memoryview(raw)[HEADER_SIZE:]
    if h.flags & F_AUTH:
        if len(view) < TAG_SIZE:
            raise ProtocolError("message flagged AUTH is shorter than its HMAC tag")
        hmac = _hmac() if authkey else None
        if hmac is not None and not hmac.compare_digest(
                hmac.digest(authkey, memoryview(raw)[:-TAG_SIZE], "sha256"),
                bytes(view[-TAG_SIZE:])):
            raise AuthError("HMAC does not match the pool's authkey: refused unread")
        return h, view[:-TAG_SIZE]
    if authkey:
        raise AuthError("message carries no HMAC and the pool requires one (authkey): "
                        "refused unread")
    return h, view
