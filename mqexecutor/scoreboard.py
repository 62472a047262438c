"""The scoreboard: one shared-memory slot per task worker saying what it runs.

The pool owner creates a small file in its spill sub-directory (tmpfs when
available); its manager process and every worker map it. A worker writes the
task it has just taken into its slot before unpickling it, and clears the slot
after the reply is sent. When a worker dies, the manager reads the slot to
learn which task died with it and whom to tell: the producer's reply key is in
the slot, so a task submitted by another process (``MQExecutor.attach``) fails
in that process too.

Slot layout, 32 bytes, little-endian::

    task_id u64 | token u64 | reply key i32 | producer pid i32 | state u32 | rejected u32

``rejected`` counts the messages the worker under that id set aside (dead letters).
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

__all__ = ["Scoreboard", "Slot", "IDLE", "BUSY", "INIT_FAILED", "SLOT_SIZE"]

_SLOT = struct.Struct("<QQiiI")
_COUNT = struct.Struct("<I")
SLOT_SIZE = 32
IDLE = 0
BUSY = 1
#: The worker's initializer raised; it exits and must not be replaced.
INIT_FAILED = 2


class Slot(NamedTuple):
    """What one worker is doing, as read from the scoreboard."""

    task_id: int
    token: int
    reply: int
    producer_pid: int
    state: int


class Scoreboard:
    """A memory-mapped file of ``nslots`` slots (see module docstring).

    Args:
        path: the file; created (mode 0600) and sized when ``create``.
        nslots: number of workers.
        create: True in the pool owner, False in workers.
    """

    def __init__(self, path: str, nslots: int, create: bool = False):
        self.path = path
        self.nslots = nslots
        size = max(1, nslots) * SLOT_SIZE
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def busy(self, slot: int, task_id: int, token: int, reply: int, pid: int) -> None:
        """Record that worker ``slot`` has taken task ``task_id``."""
        _SLOT.pack_into(self._mm, slot * SLOT_SIZE, task_id, token, reply, pid, BUSY)

    def idle(self, slot: int) -> None:
        """Record that worker ``slot`` runs nothing."""
        _SLOT.pack_into(self._mm, slot * SLOT_SIZE, 0, 0, 0, 0, IDLE)

    def init_failed(self, slot: int) -> None:
        """Record that worker ``slot``'s initializer raised."""
        _SLOT.pack_into(self._mm, slot * SLOT_SIZE, 0, 0, 0, 0, INIT_FAILED)

    def read(self, slot: int) -> Slot:
        """The slot of worker ``slot``."""
        return Slot(*_SLOT.unpack_from(self._mm, slot * SLOT_SIZE))

    def add_rejected(self, slot: int) -> None:
        """Count one more message set aside by worker ``slot``."""
        off = slot * SLOT_SIZE + 28
        (n,) = _COUNT.unpack_from(self._mm, off)
        _COUNT.pack_into(self._mm, off, (n + 1) & 0xFFFFFFFF)

    def rejected(self) -> int:
        """Messages set aside by all workers so far."""
        return sum(_COUNT.unpack_from(self._mm, i * SLOT_SIZE + 28)[0]
                   for i in range(self.nslots))

    def close(self) -> None:
        """Unmap the file (idempotent; ignored while views are exported)."""
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass
