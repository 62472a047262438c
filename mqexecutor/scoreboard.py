"""The scoreboard: one shared-memory slot per task worker saying what it runs,
and the list of tasks their producer terminated.

The pool owner creates a small file in its spill sub-directory (tmpfs when
available); its manager process and every worker map it. A worker writes the
task it has just taken into its slot before unpickling it, and clears the slot
after the reply is sent. When a worker dies, the manager reads the slot to
learn which task died with it and whom to tell: the producer's reply key is in
the slot, so a task submitted by another process (``MQExecutor.attach``) fails
in that process too. The slot also holds when the task started and its
deadline (a time limit), which the manager watches.

Slot layout, 48 bytes, little-endian::

    task_id u64 | token u64 | reply key i32 | producer pid i32 | state u32 |
    rejected u32 | started u64 | deadline u64

``rejected`` counts the messages the worker under that id set aside (dead
letters). ``started`` and ``deadline`` are CLOCK_MONOTONIC nanoseconds (the
same clock in every process of the machine); ``deadline`` is 0 without a
time limit.

After the slots, the terminated tasks (``MQFuture.terminate`` of a task
already in the kernel queue), written by the owner only::

    generation u32 | count u32 | TERMINATED_MAX x (token u64, task_id u64)

A worker reads the list again only when ``generation`` changed, and does not
run a task found there.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from typing import NamedTuple

__all__ = ["Scoreboard", "Slot", "IDLE", "BUSY", "INIT_FAILED", "SLOT_SIZE",
           "TERMINATED_MAX"]

_SLOT = struct.Struct("<QQiiIIQQ")
_HEAD = struct.Struct("<QQiiI")  # the first five fields
_TIMES = struct.Struct("<QQ")  # started, deadline
_COUNT = struct.Struct("<I")
_GEN_COUNT = struct.Struct("<II")
_ENTRY = struct.Struct("<QQ")
SLOT_SIZE = 48
_REJECTED = 28  # offset of ``rejected`` in a slot
_STARTED = 32  # offset of ``started``
assert _SLOT.size == SLOT_SIZE
IDLE = 0
BUSY = 1
#: The worker's initializer raised; it exits and must not be replaced.
INIT_FAILED = 2
#: How many terminated tasks the list holds (a ring: the oldest go first).
TERMINATED_MAX = 1024


class Slot(NamedTuple):
    """What one worker is doing, as read from the scoreboard."""

    task_id: int
    token: int
    reply: int
    producer_pid: int
    state: int
    started: int = 0  # CLOCK_MONOTONIC ns
    deadline: int = 0  # CLOCK_MONOTONIC ns; 0: no time limit


class Scoreboard:
    """A memory-mapped file of ``nslots`` slots and the terminated tasks (see
    the module docstring).

    Args:
        path: the file; created (mode 0600) and sized when ``create``.
        nslots: number of workers.
        create: True in the pool owner, False in the manager and workers.

    Raises:
        OSError: the file cannot be created or opened.
    """

    def __init__(self, path: str, nslots: int, create: bool = False):
        self.path = path
        self.nslots = nslots
        self._list = max(1, nslots) * SLOT_SIZE
        size = self._list + _GEN_COUNT.size + TERMINATED_MAX * _ENTRY.size
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

    def busy(self, slot: int, task_id: int, token: int, reply: int, pid: int,
             limit_ns: int = 0) -> None:
        """Record that worker ``slot`` has taken task ``task_id`` now, with a
        time limit of ``limit_ns`` nanoseconds (0: none)."""
        off = slot * SLOT_SIZE
        _HEAD.pack_into(self._mm, off, task_id, token, reply, pid, BUSY)
        started = time.monotonic_ns()
        _TIMES.pack_into(self._mm, off + _STARTED, started, started + limit_ns if limit_ns else 0)

    def idle(self, slot: int) -> None:
        """Record that worker ``slot`` runs nothing."""
        off = slot * SLOT_SIZE
        _HEAD.pack_into(self._mm, off, 0, 0, 0, 0, IDLE)
        _TIMES.pack_into(self._mm, off + _STARTED, 0, 0)

    def init_failed(self, slot: int) -> None:
        """Record that worker ``slot``'s initializer raised."""
        _HEAD.pack_into(self._mm, slot * SLOT_SIZE, 0, 0, 0, 0, INIT_FAILED)

    def read(self, slot: int) -> Slot:
        """The slot of worker ``slot``."""
        (task_id, token, reply, pid, state, _rejected, started,
         deadline) = _SLOT.unpack_from(self._mm, slot * SLOT_SIZE)
        return Slot(task_id, token, reply, pid, state, started, deadline)

    def add_rejected(self, slot: int) -> None:
        """Count one more message set aside by worker ``slot``."""
        off = slot * SLOT_SIZE + _REJECTED
        (n,) = _COUNT.unpack_from(self._mm, off)
        _COUNT.pack_into(self._mm, off, (n + 1) & 0xFFFFFFFF)

    def rejected(self) -> int:
        """Messages set aside by all workers so far."""
        return sum(_COUNT.unpack_from(self._mm, i * SLOT_SIZE + _REJECTED)[0]
                   for i in range(self.nslots))

    # -- terminated tasks ----------------------------------------------------------
    def terminate(self, token: int, task_id: int) -> None:
        """Add (token, task_id) to the terminated tasks (the owner only: one
        writer), then move the generation on."""
        gen, count = _GEN_COUNT.unpack_from(self._mm, self._list)
        _ENTRY.pack_into(self._mm, self._list + _GEN_COUNT.size
                         + (count % TERMINATED_MAX) * _ENTRY.size, token, task_id)
        _GEN_COUNT.pack_into(self._mm, self._list, (gen + 1) & 0xFFFFFFFF,
                             (count + 1) & 0xFFFFFFFF)

    def generation(self) -> int:
        """Moves on with every :meth:`terminate`: a worker reads the list again
        only then."""
        return _COUNT.unpack_from(self._mm, self._list)[0]

    def terminated(self) -> set[tuple[int, int]]:
        """The terminated tasks, as (token, task_id)."""
        _gen, count = _GEN_COUNT.unpack_from(self._mm, self._list)
        base = self._list + _GEN_COUNT.size
        return {_ENTRY.unpack_from(self._mm, base + i * _ENTRY.size)
                for i in range(min(count, TERMINATED_MAX))}

    def close(self) -> None:
        """Unmap the file (idempotent; ignored while views are exported)."""
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass
