"""System V message queues: creating, opening, sending without blocking, removing.

A thin layer over ``sysv_ipc.MessageQueue`` that always passes the kernel's
msgmax as ``max_message_size`` (sysv_ipc's default of 2048 bytes would make
larger messages fail), creates queues with mode 0600 unless asked, and turns
sysv_ipc's errors into messages that name the key.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import sysv_ipc

from .limits import msgmax

__all__ = ["ftok", "open_queue", "create_private", "remove_quietly", "parse_key",
           "spin_receive", "SPIN_SECONDS", "random_key", "send_patiently"]

#: Seconds a thread polls for what it waits for before it blocks (task workers,
#: the collector, MQFuture.result): waking from a blocking msgrcv or a lock
#: costs tens of microseconds here, polling that long with sched_yield little.
SPIN_SECONDS = 0.0002



def ftok(path: str, proj_id: int = 1) -> int:
    """Turn an existing path and a project id (1..255) into a SysV key, as ftok(3).

    Returns:
        int: the key (may be negative when read as a signed key_t).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``proj_id`` is outside 1..255.
    """
    if not 1 <= proj_id <= 255:
        raise ValueError(f"proj_id must be in 1..255, not {proj_id}")
    os.stat(path)  # FileNotFoundError names the path
    return sysv_ipc.ftok(path, proj_id, silence_warning=True)


def parse_key(text: str | int) -> int:
    """A SysV key from an int or a string in decimal or 0x hex (as ``ipcs`` prints).

    Raises:
        ValueError: not a number, or outside the 32-bit key_t range.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        key = text
    else:
        try:
            key = int(str(text).strip(), 0)
        except ValueError:
            raise ValueError(f"key {text!r} is not a number (decimal or 0x hex)") from None
    if key > 0x7FFFFFFF:  # ipcs prints keys as unsigned hex
        key -= 1 << 32
    if not -(1 << 31) <= key <= 0x7FFFFFFF:
        raise ValueError(f"key {text!r} does not fit in a 32-bit key_t")
    return key


def open_queue(key: int, *, create: bool = True, mode: int = 0o600) -> sysv_ipc.MessageQueue:
    """Open the queue of ``key``, creating it (with ``mode``) when absent and ``create``.

    Raises:
        sysv_ipc.ExistentialError: no queue has this key and ``create`` is False.
        sysv_ipc.PermissionsError: the queue exists and this user may not use it.
    """
    if key == 0:  # IPC_PRIVATE would make a new queue instead of opening one
        raise sysv_ipc.ExistentialError("key 0 is IPC_PRIVATE: it names no queue")
    flags = sysv_ipc.IPC_CREAT if create else 0
    try:
        return sysv_ipc.MessageQueue(key, flags, mode=mode, max_message_size=msgmax())
    except sysv_ipc.ExistentialError:
        raise sysv_ipc.ExistentialError(f"no message queue has key {key} "
                                        f"(0x{key & 0xFFFFFFFF:08x})") from None
    except sysv_ipc.PermissionsError:
        raise sysv_ipc.PermissionsError(
            f"permission denied on the message queue of key {key} "
            f"(0x{key & 0xFFFFFFFF:08x})") from None


def random_key() -> int:
    """A random key_t for :func:`create_private`, in 0x10000..0x7FFFFFFE (above
    the keys ftok() and small hand-picked keys tend to use). Not checked:
    another queue may have it, which create_private's IPC_EXCL finds out."""
    import random  # here: off a manager's start-up
    return random.SystemRandom().randrange(0x10000, 0x7FFFFFFF)


def create_private(mode: int = 0o600, key: int | None = None) -> sysv_ipc.MessageQueue:
    """Create a new queue under a fresh random key nobody else uses: ``key``
    when it is free (drawn with :func:`random_key` and recorded beforehand by
    the caller), else another random one.

    The key is random (not IPC_PRIVATE) so that any process of this user, e.g.
    a worker started with ``spawn``, can open the queue by key. ``IPC_EXCL``
    guarantees the key was free.

    Raises:
        OSError: no free key in 64 tries.
    """
    for _ in range(64):
        if key is None:
            key = random_key()
        try:
            return sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=mode,
                                         max_message_size=msgmax())
        except sysv_ipc.ExistentialError:
            key = None
            continue
    raise OSError("could not find a free SysV key in 64 tries")


def remove_quietly(queue: sysv_ipc.MessageQueue | None) -> None:
    """Remove ``queue`` from the kernel; ignore a queue that is already gone."""
    if queue is None:
        return
    try:
        queue.remove()
    except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError):
        pass


def spin_receive(queue: sysv_ipc.MessageQueue, mtype: int = 0,
                 seconds: float = SPIN_SECONDS,
                 give_up: Callable[[], bool] | None = None) -> tuple[bytes, int] | None:
    """Poll ``queue`` for a message of type ``mtype`` (msgrcv with IPC_NOWAIT)
    for up to ``seconds`` seconds, yielding the CPU between tries, and not
    after ``give_up()`` (when given) returns True.

    Returns:
        (message, mtype), or None when nothing came, or on an error (queue
        removed, EINTR, E2BIG): the caller's blocking receive meets it again.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return queue.receive(block=False, type=mtype)
        except sysv_ipc.BusyError:
            if time.monotonic() >= deadline or give_up is not None and give_up():
                return None
            os.sched_yield()
        except (sysv_ipc.Error, OSError):
            return None


#: The one waiting policy of every "send, and try again while the queue is
#: full" in mqexecutor: the first pause (seconds), doubled after each try up to
#: the longest; ``still_wanted`` is asked at most once per check interval.
FIRST_PAUSE = 0.0001
LONGEST_PAUSE = 0.02
CHECK_INTERVAL = 0.2


def send_patiently(queue: sysv_ipc.MessageQueue, message: bytes, mtype: int, *,
                   patience: float | None = 2.0,
                   still_wanted: Callable[[], bool] | None = None) -> bool:
    """Send ``message`` with type ``mtype`` without ever blocking in the kernel:
    msgsnd with IPC_NOWAIT, tried again while the queue is full (or the call
    was interrupted), pausing ``FIRST_PAUSE`` seconds and doubling up to
    ``LONGEST_PAUSE``.

    Args:
        patience (float | None): seconds after which a queue that stays full
            is given up; None: no limit (then ``still_wanted`` decides).
        still_wanted (callable | None): asked every ``CHECK_INTERVAL`` seconds
            of a full queue; returning False gives up (e.g. the reader died).

    Returns:
        True when sent, False when given up.

    Raises:
        sysv_ipc.ExistentialError: the queue was removed.
        sysv_ipc.PermissionsError, OSError (e.g. EINVAL for a queue whose id
            was freed), ValueError (a message larger than the queue object's
            ``max_message_size``): as ``MessageQueue.send``.
    """
    pause = FIRST_PAUSE
    start = time.monotonic()
    checked = start
    while True:
        try:
            queue.send(message, block=False, type=mtype)
            return True
        except sysv_ipc.BusyError:
            pass
        except sysv_ipc.Error as exc:
            if type(exc) is not sysv_ipc.Error:  # EINTR is the bare class
                raise
        time.sleep(pause)
        pause = min(pause * 2, LONGEST_PAUSE)
        now = time.monotonic()
        if patience is not None and now - start > patience:
            return False
        if still_wanted is not None and now - checked >= CHECK_INTERVAL:
            checked = now
            if not still_wanted():
                return False
