"""The dead-letter place: messages a worker refused, kept for inspection.

A worker never crashes or hangs on what it finds in the queue. A message it
cannot or must not run (random bytes, a truncated or unknown header, another
wire version, a bad HMAC, a spill reference outside the spill root, a corrupted
pickle...) is counted, logged on stderr with its reason, and recorded here as
one JSON file: ``<spill root 0>/k-<key>/dead/<time ns>-<pid>.json`` with
``time`` (epoch seconds), ``reason``, ``worker``, ``size`` (bytes) and the
message itself in base64 (its first ``KEEP_BYTES`` bytes). At most
``MAX_RECORDS`` records are kept per key; later ones are only counted and logged.
``mqexecutor dead KEY`` lists them; ``--purge`` removes them.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import time

from . import spill

__all__ = ["record", "list_records", "purge", "MAX_RECORDS", "KEEP_BYTES"]

MAX_RECORDS = 1000
KEEP_BYTES = 65536


def _dir(key: int, create: bool) -> str:
    base = spill.ensure_subdir(0, spill.key_subdir(key)) if create else os.path.join(
        spill.root_dir(0, create=False), spill.key_subdir(key))
    path = os.path.join(base, "dead")
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def record(key: int, raw: bytes, reason: str, worker: int | None) -> str | None:
    """Keep a refused message of queue ``key``; returns the file written, or None
    when the place is full or cannot be written (never raises)."""
    try:
        path = _dir(key, create=True)
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)  # workers write concurrently: keep the cap exact
        if len(os.listdir(path)) >= MAX_RECORDS:
            return None
        name = os.path.join(path, f"{time.time_ns()}-{os.getpid()}.json")
        data = {"time": time.time(), "reason": reason, "worker": worker, "size": len(raw),
                "message": base64.b64encode(raw[:KEEP_BYTES]).decode("ascii")}
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        return name
    except (OSError, ValueError):
        return None
    finally:
        os.close(dfd)  # releases the lock


def list_records(key: int) -> list[dict]:
    """The dead letters of ``key``, oldest first; each a dict with time,
    reason, worker, size, message (bytes) and path."""
    out: list[dict] = []
    try:
        path = _dir(key, create=False)
        names = sorted(os.listdir(path))
    except OSError:
        return out
    for name in names:
        full = os.path.join(path, name)
        try:
            with open(full) as f:
                data = json.load(f)
            data["message"] = base64.b64decode(data.get("message", ""))
            data["path"] = full
            out.append(data)
        except (OSError, ValueError):
            continue
    return out


def purge(key: int) -> int:
    """Remove the dead letters of ``key``; returns how many were removed."""
    n = 0
    for rec in list_records(key):
        try:
            os.unlink(rec["path"])
            n += 1
        except OSError:
            pass
    return n
