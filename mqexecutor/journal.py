"""Durable mode: every task is written to a spool directory before it is queued.

``MQExecutor(key, durable=True)`` records each task message in a file before it
enters the kernel queue or the in-process backlog, and removes the file only
once the task's outcome has been delivered to its Future. After the whole
process tree is killed (SIGKILL, OOM killer), the next executor on the key
adopts every recorded task of the dead producer that is not in the queue any
more (it was running, or waiting in the dead process) besides those still
queued: delivery is *at least once*.

Files: ``<spool>/<token:016x>-<task_id>.task`` holding the whole message
(header, body, HMAC), written to a temporary name and renamed, so a crash
mid-write leaves no half entry. The default spool is
``<tempdir>/mqexecutor-<uid>/k-<key>/spool`` (disk rather than tmpfs; files are
not fsync'ed: they survive a killed process, not a power cut — pass
``durable="/path"`` for another place). Cost: one file created and one removed
per task (see docs/benchmarks.md).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator

from . import spill

__all__ = ["Journal", "NullJournal", "NULL_JOURNAL", "default_spool"]

_NAME = re.compile(r"([0-9a-f]{16})-([0-9]+)\.task")


def default_spool(key: int) -> str:
    """The default spool directory of ``key`` (on the temp root, i.e. disk)."""
    index = len(spill.spill_roots()) - 1
    return os.path.join(spill.ensure_subdir(index, spill.key_subdir(key)), "spool")


class Journal:
    """The spool directory of one key.

    Args:
        directory (str): created mode 0700 when missing.
    """

    #: Tasks are recorded (the producer keeps their messages to send again).
    durable = True

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, token: int, task_id: int) -> str:
        return os.path.join(self.directory, f"{token:016x}-{task_id}.task")

    def record(self, token: int, task_id: int, message: bytes) -> None:
        """Write the task ``message`` of (token, task_id).

        Raises:
            OSError: the spool is full or not writable (the task is then not
                accepted: nothing is queued without its record).
        """
        final = self._path(token, task_id)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(message)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, final)

    def forget(self, token: int, task_id: int) -> None:
        """Remove the record of (token, task_id); a missing one is fine."""
        try:
            os.unlink(self._path(token, task_id))
        except FileNotFoundError:
            pass

    def move(self, old: tuple[int, int], new: tuple[int, int], message: bytes) -> None:
        """Hand the record of ``old`` (token, task_id) to ``new``, with the
        re-addressed ``message``."""
        self.record(new[0], new[1], message)
        self.forget(*old)

    def entries(self) -> Iterator[tuple[int, int, bytes]]:
        """(token, task_id, message) of every record, in task id order per token."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        found = []
        for name in names:
            m = _NAME.fullmatch(name)
            if m is None:
                if name.endswith(".tmp"):  # a write cut short by a crash
                    try:
                        os.unlink(os.path.join(self.directory, name))
                    except OSError:
                        pass
                continue
            found.append((int(m.group(1), 16), int(m.group(2)), name))
        found.sort()
        for token, task_id, name in found:
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    yield token, task_id, f.read()
            except OSError:
                continue

    def __len__(self) -> int:
        try:
            return sum(1 for n in os.listdir(self.directory) if n.endswith(".task"))
        except OSError:
            return 0


class NullJournal:
    """The journal of a pool without ``durable=``: records nothing. Chosen once
    at construction, so the producer calls the same methods either way."""

    durable = False

    def record(self, token: int, task_id: int, message: bytes) -> None:
        """Nothing to record."""

    def forget(self, token: int, task_id: int) -> None:
        """Nothing to forget."""

    def move(self, old: tuple[int, int], new: tuple[int, int], message: bytes) -> None:
        """Nothing to move."""

    def entries(self) -> Iterator[tuple[int, int, bytes]]:
        """No records."""
        return iter(())

    def __len__(self) -> int:
        return 0


NULL_JOURNAL = NullJournal()
