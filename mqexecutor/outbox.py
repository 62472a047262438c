"""The outbox: results a task worker holds before it sends them together.

A worker running the tasks of a BATCH message sends their results back together,
in RESULT BATCH messages: one msgsnd in the worker and one msgrcv in the
producer for up to a message's worth of results, instead of one each per task.
Until they are sent, the results wait in a small memory-mapped file of the pool
owner's spill sub-directory (tmpfs when available), one file per worker id. So a
worker that dies holding results does not lose them: before it reports the
death, the pool's manager process sends what the file holds on to its producer,
and only the task the worker was running fails (the promise of
``TerminatedWorkerError``).

Layout, little-endian::

    count u32 | used u32 | reply key i32 | producer pid i32 | token u64   (24 bytes)
    then ``count`` entries: length u32, then one whole RESULT message

``count`` is written last: an entry is in the outbox once ``count`` covers it.
A worker that dies after sending a batch but before clearing the file makes its
producer receive those results twice; the second copy finds no pending task and
is dropped.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

from .protocol import HEADER_SIZE, LEN_STRUCT

__all__ = ["Outbox", "Route", "outbox_path", "create", "drain", "HEAD_SIZE"]

_HEAD = struct.Struct("<IIiiQ")
HEAD_SIZE = _HEAD.size
_COUNT_USED = struct.Struct("<II")  # the first two fields of the head
_ROUTE = struct.Struct("<iiQ")  # the last three, at offset 8
_LEN = LEN_STRUCT  # an entry's length, as in a batch body
#: No message is shorter than its header.
MIN_MESSAGE = HEADER_SIZE


class Route(NamedTuple):
    """Where the results in an outbox go: their producer's reply queue."""

    reply: int
    pid: int
    token: int


def outbox_path(directory: str, worker_id: int) -> str:
    """The outbox file of worker ``worker_id`` in the owner's ``directory``."""
    return os.path.join(directory, f"outbox-{worker_id}")


def create(path: str, capacity: int) -> None:
    """Create (or empty) an outbox file holding ``capacity`` bytes of entries
    (mode 0600, never following a symlink).

    Raises:
        OSError: the file cannot be created.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, HEAD_SIZE + capacity)
    finally:
        os.close(fd)


class Outbox:
    """A worker's view of its outbox file.

    Args:
        path: the file, created by the owner with :func:`create`.

    Raises:
        OSError: the file is missing or not a regular file of the right size.
        ValueError: the file is smaller than its header.
    """

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size <= HEAD_SIZE:
                raise ValueError(f"outbox {path} is {size} bytes, smaller than its header")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.capacity = size - HEAD_SIZE
        self.count = 0
        self.used = 0
        self.clear()

    def fits(self, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` bytes still fits."""
        return self.used + 4 + nbytes <= self.capacity

    def add(self, route: Route | tuple[int, int, int], message: bytes) -> None:
        """Keep ``message`` (a whole RESULT message) for ``route``; all the
        entries of one outbox share a route, the first one's (the caller
        flushes before the route changes). The caller checked :meth:`fits`."""
        mm = self._mm
        off = HEAD_SIZE + self.used
        n = len(message)
        _LEN.pack_into(mm, off, n)
        mm[off + 4:off + 4 + n] = message
        if not self.count:
            _ROUTE.pack_into(mm, 8, route[0], route[1], route[2])
        self.used += 4 + n
        self.count += 1
        _COUNT_USED.pack_into(mm, 0, self.count, self.used)  # last: the entry is in

    def body(self) -> bytes:
        """The entries, as the body of a RESULT BATCH message (the layout of
        :func:`mqexecutor.protocol.join_batch`)."""
        return self._mm[HEAD_SIZE:HEAD_SIZE + self.used]

    def first(self) -> bytes:
        """The message of the first entry (the outbox holds one or more)."""
        (n,) = _LEN.unpack_from(self._mm, HEAD_SIZE)
        return self._mm[HEAD_SIZE + 4:HEAD_SIZE + 4 + n]

    def clear(self) -> None:
        """Forget every entry (they were sent)."""
        self.count = 0
        self.used = 0
        _COUNT_USED.pack_into(self._mm, 0, 0, 0)

    def close(self) -> None:
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass


def drain(path: str) -> tuple[Route, list[bytes]] | None:
    """Take what the outbox file at ``path`` holds (the owner, after its worker
    died) and empty it. Returns (route, messages), or None when it holds nothing
    or cannot be read. Entries that run past the file are ignored."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, os.fstat(fd).st_size)
        if len(data) < HEAD_SIZE:
            return None
        count, used, reply, pid, token = _HEAD.unpack_from(data)
        if count == 0:
            return None
        messages: list[bytes] = []
        off = HEAD_SIZE
        end = min(len(data), HEAD_SIZE + used)
        while len(messages) < count and off + 4 <= end:
            (n,) = _LEN.unpack_from(data, off)
            if n < MIN_MESSAGE or off + 4 + n > end:
                break  # not a message: the file is damaged from here on
            messages.append(data[off + 4:off + 4 + n])
            off += 4 + n
        os.pwrite(fd, bytes(HEAD_SIZE), 0)
        return (Route(reply, pid, token), messages) if messages else None
    except OSError:
        return None
    finally:
        os.close(fd)
