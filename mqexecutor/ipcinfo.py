"""The kernel's view of message queues: ``/proc/sysvipc/msg`` and non-destructive peeks.

Used by :meth:`MQExecutor.stats` and the ``mqexecutor`` command. Reading a
message without taking it needs ``msgrcv(..., MSG_COPY)`` (Linux >= 3.8 built
with CONFIG_CHECKPOINT_RESTORE); sysv_ipc does not offer it, so :func:`peek`
calls the C library through ctypes and returns None where the kernel lacks it.
"""
from __future__ import annotations

import errno
from typing import NamedTuple

__all__ = ["QueueInfo", "list_queues", "queue_info", "peek", "PROC_MSG"]

PROC_MSG = "/proc/sysvipc/msg"
_MSG_COPY = 0o40000
_IPC_NOWAIT = 0o4000


class QueueInfo(NamedTuple):
    """One line of /proc/sysvipc/msg.

    Attributes: key (signed key_t), msqid, perms (mode bits), cbytes (bytes of
    messages queued), qnum (messages queued), lspid / lrpid (pid of the last
    msgsnd / msgrcv), uid, gid, stime / rtime / ctime (epoch seconds).
    """

    key: int
    msqid: int
    perms: int
    cbytes: int
    qnum: int
    lspid: int
    lrpid: int
    uid: int
    gid: int
    stime: int
    rtime: int
    ctime: int


def list_queues() -> list[QueueInfo]:
    """Every message queue this process can see, from /proc/sysvipc/msg."""
    out: list[QueueInfo] = []
    try:
        with open(PROC_MSG) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        v = line.split()
        if len(v) < 14:
            continue
        key = int(v[0])
        if key > 0x7FFFFFFF:
            key -= 1 << 32
        out.append(QueueInfo(key, int(v[1]), int(v[2], 8), int(v[3]), int(v[4]),
                             int(v[5]), int(v[6]), int(v[7]), int(v[8]), int(v[11]),
                             int(v[12]), int(v[13])))
    return out


def queue_info(key: int) -> QueueInfo | None:
    """The /proc line of ``key``'s queue, None when no queue has that key."""
    for q in list_queues():
        if q.key == key:
            return q
    return None


_libc = None


def peek(msqid: int, max_messages: int = 100000, max_size: int = 1 << 20
         ) -> list[tuple[int, bytes]] | None:
    """Copies of the messages waiting in queue ``msqid``, oldest first, without
    taking them (``MSG_COPY``).

    Returns:
        list of (mtype, bytes), or None when the kernel does not support MSG_COPY.

    Raises:
        PermissionError: this user may not read the queue.
        FileNotFoundError: the queue does not exist.
    """
    import ctypes  # here: 2-3 ms of import that only `mqexecutor peek` needs
    import ctypes.util
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    buf = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + max_size)
    out: list[tuple[int, bytes]] = []
    for index in range(max_messages):
        n = _libc.msgrcv(ctypes.c_int(msqid), buf, ctypes.c_size_t(max_size),
                         ctypes.c_long(index), _MSG_COPY | _IPC_NOWAIT)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.ENOMSG:
                break
            if err == errno.ENOSYS:
                return None
            if err == errno.EACCES:
                raise PermissionError(err, f"permission denied reading queue {msqid}")
            if err in (errno.EINVAL, errno.EIDRM):
                if index == 0 and out == []:
                    raise FileNotFoundError(err, f"no message queue has id {msqid}")
                break
            if err == errno.E2BIG:
                return peek(msqid, max_messages, max_size * 4)
            raise OSError(err, f"msgrcv(MSG_COPY) on queue {msqid} failed")
        mtype = ctypes.c_long.from_buffer(buf).value
        out.append((mtype, buf.raw[ctypes.sizeof(ctypes.c_long):
                                   ctypes.sizeof(ctypes.c_long) + n]))
    return out
