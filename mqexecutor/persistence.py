"""Queues that outlive executors: metadata, and adopting the tasks left behind.

A queue with an explicit key keeps its messages when its executor goes away
(Swoole's ``message_queue_key``). The next pool owner on the key drains what it
finds, and for each task whose producer has died rewrites the route (task id,
token, reply key, pid: :func:`mqexecutor.protocol.replace_route`) so the outcome
comes back to it as a *recovered* Future. Tasks of producers that are still
alive, and tasks targeted at worker ids the new pool lacks, go back unchanged.

Each pool writes a small JSON file beside its spill files so that the CLI and
later executors know what a queue is: ``k-<key>/meta.json`` for a persistent
key, ``p-<pid>-<token>/meta.json`` for a private executor.
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple

import sysv_ipc

from . import spill
from .limits import msgmax
from .protocol import flatten, spill_reference

__all__ = ["QueueMeta", "read_meta", "write_meta", "producer_metas", "pid_alive",
           "collect_garbage", "purge_queue", "remove_queue", "release_producer"]

META = "meta.json"


class QueueMeta(NamedTuple):
    """What mqexecutor knows of a queue it made.

    Attributes:
        key: task queue key; mode: 2 or 3; workers: pool size (0 for a producer
        that only attaches); wire: wire version; owner_pid / owner_token: the
        process that wrote it; reply_key: that process's reply queue; private:
        True for a key=None executor's queue.
    """

    key: int
    mode: int
    workers: int
    wire: int
    owner_pid: int
    owner_token: int = 0
    reply_key: int = 0
    private: bool = False
    extra: dict = {}  # kept for the files' format; never changed in place


def _path(subdir: str) -> str:
    return os.path.join(spill.root_dir(0, create=False), subdir, META)


def write_meta(subdir: str, meta: QueueMeta) -> None:
    """Write ``meta`` atomically into spill sub-directory ``subdir`` (root 0)."""
    directory = spill.ensure_subdir(0, subdir)
    import json  # here, as tempfile and ipcinfo: off a manager's start-up
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".meta-")
    with os.fdopen(fd, "w") as f:
        json.dump(meta._asdict(), f)
    os.replace(tmp, os.path.join(directory, META))


def read_meta(subdir: str) -> QueueMeta | None:
    """The metadata in ``subdir``, None when absent or unreadable."""
    import json
    try:
        with open(_path(subdir)) as f:
            data = json.load(f)
        return QueueMeta(**data)
    except (OSError, ValueError, TypeError):
        return None


def producer_metas() -> list[tuple[str, QueueMeta]]:
    """(subdir, meta) of every producer and key directory with metadata."""
    out: list[tuple[str, QueueMeta]] = []
    root = spill.spill_roots()[0]
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return out
    for name in names:
        if name.startswith(("p-", "k-")):
            meta = read_meta(name)
            if meta is not None:
                out.append((name, meta))
    return out


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` runs (or cannot be signalled by us). A zombie
    (exited, not yet reaped by its parent) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError):
        return False  # gone since the kill(0)
    except (OSError, IndexError):
        return True


#: Seconds after a producer's last meta.json write within which a queue of a
#: key it names counts as its own (it makes its queues right after naming
#: their keys; msgctl(IPC_SET) of the capacity moves a queue's ctime too).
CTIME_SLACK = 10


def collect_garbage() -> list[str]:
    """Reclaim what producers that died left behind (``mqexecutor gc``).

    For each producer spill directory ``p-<pid>-<token>`` whose process is gone:
    remove its reply queue and, for a private executor, its task queue (only
    when the queue was created by this user, no live process last used it,
    and it was made no later than ``CTIME_SLACK`` seconds after the producer
    last wrote its metadata: a producer names its keys before it makes the
    queues), then the directory and its spill files. A persistent key's directory is
    removed only when its queue is gone and it holds nothing but metadata older
    than a minute (no spill file, durable spool or dead letter); its queue is
    never touched.

    Returns:
        list of str: one line per thing removed, for logs and the CLI.
    """
    from . import ipcinfo  # here, as json: off a manager's start-up

    removed: list[str] = []
    by_key = {q.key: q for q in ipcinfo.list_queues()}
    for root in spill.spill_roots():
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            if name.startswith("k-"):
                removed.extend(_stale_key_dir(root, name, by_key))
                continue
            if not name.startswith("p-"):
                continue
            try:
                pid = int(name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid_alive(pid):
                continue
            meta = read_meta(name) if root == spill.spill_roots()[0] else None
            in_use = False
            if meta is not None:
                try:
                    written = os.stat(_path(name)).st_mtime
                except OSError:
                    written = time.time()
                keys = [meta.reply_key] + ([meta.key] if meta.private else [])
                for key in keys:
                    if key == 0:
                        continue
                    info = by_key.get(key)
                    if info is None or info.uid != os.getuid():
                        continue
                    if info.ctime > written + CTIME_SLACK:
                        # Made after the producer last wrote its metadata: under
                        # a key it named but never got (killed before msgget),
                        # taken since by another process. Not its queue.
                        continue
                    if pid_alive(info.lspid) and info.lspid != pid or (
                            pid_alive(info.lrpid) and info.lrpid != pid):
                        in_use = True  # someone still uses it: try again later
                        continue
                    try:
                        sysv_ipc.MessageQueue(key, 0).remove()
                        removed.append(f"queue 0x{key & 0xFFFFFFFF:08x} "
                                       f"(msqid {info.msqid}) of dead pid {pid}")
                    except sysv_ipc.Error:
                        pass
            if in_use:
                continue  # keep meta.json, so a later gc still finds the queue
            spill.remove_subdir(name)
            removed.append(f"spill directory {os.path.join(root, name)}")
    return removed


def _stale_key_dir(root: str, name: str, by_key: dict) -> list[str]:
    """Remove ``root/k-<key>`` when its queue no longer exists and it holds
    nothing but metadata (no spill file, spool record or dead letter)."""
    try:
        key = int(name[2:], 16)
    except ValueError:
        return []
    if key > 0x7FFFFFFF:
        key -= 1 << 32
    if key in by_key:
        return []
    path = os.path.join(root, name)
    try:
        entries = os.listdir(path)
        if any(e != META for e in entries):
            return []
        # An owner writes meta.json just after creating its queue: a recent file
        # may belong to a queue created after ``by_key`` was read. Look again.
        if META in entries and time.time() - os.stat(os.path.join(path, META)).st_mtime < 60:
            return []
    except OSError:
        return []
    from . import ipcinfo
    if ipcinfo.queue_info(key) is not None:
        return []
    try:
        for e in entries:
            os.unlink(os.path.join(path, e))
        os.rmdir(path)
    except OSError:
        return []
    return [f"stale metadata {path} (its queue is gone)"]


def purge_queue(key: int) -> tuple[int, int]:
    """Drop every message waiting in ``key``'s queue and the spill files its
    tasks reference.

    Returns:
        (messages dropped, spill files removed).

    Raises:
        sysv_ipc.ExistentialError: no queue has this key.
        sysv_ipc.PermissionsError: this user may not read it.
    """

    if key == 0:
        raise sysv_ipc.ExistentialError("key 0 is IPC_PRIVATE: it names no queue")
    queue = sysv_ipc.MessageQueue(key, 0, max_message_size=max(msgmax(), 1 << 16))
    messages = files = 0
    while True:
        try:
            raw, _ = queue.receive(block=False)
        except sysv_ipc.BusyError:
            break
        except sysv_ipc.ExistentialError:
            break
        except sysv_ipc.Error:
            continue
        for inner in flatten(raw):
            messages += 1
            ref = spill_reference(inner)
            if ref is not None:
                files += spill.discard(ref)
    return messages, files


def remove_queue(key: int) -> tuple[int, int]:
    """Purge ``key``'s queue (:func:`purge_queue`), remove it from the kernel and
    remove its spill directory and metadata. The inverse of creating an
    ``MQExecutor(key)``; for tests and operators (``mqexecutor rm``).

    Returns:
        (messages dropped, spill files removed).

    Raises:
        sysv_ipc.ExistentialError: no queue has this key.
        sysv_ipc.PermissionsError: this user may not remove it.
    """
    counts = purge_queue(key)
    sysv_ipc.MessageQueue(key, 0).remove()
    spill.remove_subdir(spill.key_subdir(key))
    return counts


def release_producer(reply_key: int, subdir: str, task_key: int | None = None) -> None:
    """Remove what only a producer that is gone would have removed: its reply
    queue, its spill sub-directory and, for a private pool, its task queue
    (``task_key``). Never raises. Used by the manager process when its owner
    dies, and by a task worker when both the owner and the manager are gone."""
    for key in (task_key, reply_key):
        if not key:
            continue
        try:
            sysv_ipc.MessageQueue(key, 0).remove()
        except sysv_ipc.Error:
            pass
    if subdir:
        spill.remove_subdir(subdir)
