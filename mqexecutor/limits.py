"""Kernel limits of System V message queues, read at run time.

Nothing here is hard-coded: an administrator may change ``kernel.msgmax`` or
``kernel.msgmnb`` with sysctl, and a queue's own ``msg_qbytes`` may differ from
the default. The figures measured on the machines this project is built on
(msgmax 8192 bytes, msgmnb 16384 bytes) are only the fall-backs used when
``/proc`` cannot be read.
"""
from __future__ import annotations

import functools

__all__ = ["msgmax", "msgmnb", "msgmni", "PROC_MSGMAX", "PROC_MSGMNB", "PROC_MSGMNI"]

PROC_MSGMAX = "/proc/sys/kernel/msgmax"
PROC_MSGMNB = "/proc/sys/kernel/msgmnb"
PROC_MSGMNI = "/proc/sys/kernel/msgmni"

# Linux defaults (include/uapi/linux/msg.h), used only when /proc is unreadable.
_DEFAULT_MSGMAX = 8192
_DEFAULT_MSGMNB = 16384
_DEFAULT_MSGMNI = 32000


def _read_int(path: str, default: int) -> int:
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


@functools.cache
def msgmax() -> int:
    """Largest message the kernel accepts, in bytes (``kernel.msgmax``).

    Returns:
        int: bytes; 8192 on stock Linux. Read once per process from
        ``/proc/sys/kernel/msgmax``.
    """
    return _read_int(PROC_MSGMAX, _DEFAULT_MSGMAX)


def msgmnb() -> int:
    """Default capacity of a new queue, in bytes (``kernel.msgmnb``).

    A queue's ``msg_qbytes`` starts at this value; raising it above msgmnb needs
    CAP_SYS_RESOURCE. Returns bytes (16384 on stock Linux).
    """
    return _read_int(PROC_MSGMNB, _DEFAULT_MSGMNB)


def msgmni() -> int:
    """System-wide maximum number of message queues (``kernel.msgmni``)."""
    return _read_int(PROC_MSGMNI, _DEFAULT_MSGMNI)
