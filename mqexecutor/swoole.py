"""Swoole compatibility: task packets posted by PHP code written for Swoole.

Swoole 1.7.2 let external programs post tasks into a server's task queue
(seed 000: the PHP class ``SwooleTask``, ``task_ipc_mode`` 2/3 and
``message_queue_key``). A pool started with ``swoole_handler="module:function"``
(``mqexecutor serve KEY --swoole-handler module:function``) reads every message
of its queue as such a packet and hands the payload to that function, as
Swoole hands it to the ``onTask`` callback.

The packet (the layout seed 000 builds with PHP's ``pack('lSsCCS', ...)``:
``l`` is a 32-bit signed int and ``S``/``s``/``C`` are u16/i16/u8, all in the
machine's byte order, no padding; this is Swoole's ``swDataHead``)::

    offset size  field     seed 000 puts
    0      4     task_id   i32: a counter of the sender (``$taskId``)
    4      2     len       u16: bytes of data (152 for a tmpfile packet)
    6      2     from_id   i16: 0 (or the sender's worker id)
    8      1     type      u8: 7, SW_EVENT_TASK
    9      1     (unused)  u8: 0
    10     2     flags     u16: SW_TASK_* bits (Swoole keeps them in ``from_fd``)
    12     ...   data

Flags: ``SW_TASK_TMPFILE`` (1): the data is ``pack('l', $size) . $path . "\\0"``
and the payload is in the file ``$path`` (PHP ``tempnam('/tmp/',
'swoole.task')``: seed 000 does this for payloads of 8180 bytes or more);
``SW_TASK_SERIALIZE`` (2): the payload is PHP ``serialize()`` output;
``SW_TASK_NONBLOCK`` (4): set by seed 000 on every task, no meaning here.

The sender chooses the message type: Swoole producers use the target task
worker's id + 1 (``task_ipc_mode`` 2). A preemptive pool (mode 3, the default)
receives every type; a targeted pool's worker *i* receives only type *i* + 1.

Temporary files, the rules (Swoole's receiver unlinks the file after reading it;
the sender never does, FIELD-NOTES):

* the path must be absolute and normal, its directory one of
  :func:`tmpfile_dirs` (``/tmp`` and :func:`tempfile.gettempdir`, or the
  directories of ``MQEXECUTOR_SWOOLE_TMPDIR``, colon-separated: Swoole's
  ``task_tmpdir``), its name ``swoole.task`` followed by at most 64 of
  ``[A-Za-z0-9._-]``;
* it is opened with ``O_NOFOLLOW | O_NONBLOCK`` relative to the directory, and
  must be a regular file with one link, owned by this process's user;
* it must hold at least the announced size (its first ``size`` bytes are the
  payload); it is unlinked once it passed these checks, then read.

Any other path is refused (and left alone). Refusals are returned as a reason
string, which the worker logs on its stderr; the pool goes on.
"""
from __future__ import annotations

import errno
import importlib
import inspect
import os
import re
import stat
import struct
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from .context import report

__all__ = ["load_handler", "handle_packet", "parse_packet", "pack_packet", "read_tmpfile",
           "tmpfile_dirs", "SwoolePacket", "PacketRefused", "HEADER", "SW_EVENT_TASK",
           "SW_TASK_TMPFILE", "SW_TASK_SERIALIZE", "SW_TASK_NONBLOCK", "TMPFILE_PREFIX",
           "ENV_TMPDIR"]

#: ``pack('lSsCCS', ...)``: native byte order, standard sizes, no padding.
HEADER = struct.Struct("=iHhBBH")
assert HEADER.size == 12
#: Packet type of a task (Swoole's ``SW_EVENT_TASK`` as seed 000 defines it).
SW_EVENT_TASK = 7
#: Flag bits, as Swoole and seed 000 define them.
SW_TASK_TMPFILE = 1
SW_TASK_SERIALIZE = 2
SW_TASK_NONBLOCK = 4
#: Name prefix of Swoole's task temporary files.
TMPFILE_PREFIX = "swoole.task"
#: Environment variable: colon-separated directories a tmpfile may be in.
ENV_TMPDIR = "MQEXECUTOR_SWOOLE_TMPDIR"
#: Payload size from which seed 000 goes through a temporary file, bytes.
TMPFILE_THRESHOLD = 8180

_TMPFILE_LEN = struct.Struct("=i")
_NAME_RE = re.compile(re.escape(TMPFILE_PREFIX) + r"[A-Za-z0-9._-]{0,64}")


class SwoolePacket:
    """A parsed task packet.

    Attributes:
        task_id (int): the sender's task id (i32).
        length (int): the header's ``len`` field.
        from_id (int): the header's ``from_id`` field.
        type (int): packet type (``SW_EVENT_TASK``).
        flags (int): ``SW_TASK_*`` bits.
        data (bytes): the data after the header (for a tmpfile packet, the
            ``size + path + NUL`` reference, not the payload).
    """

    __slots__ = ("task_id", "length", "from_id", "type", "flags", "data")

    def __init__(self, task_id: int, length: int, from_id: int, type: int, flags: int,
                 data: bytes):
        self.task_id = task_id
        self.length = length
        self.from_id = from_id
        self.type = type
        self.flags = flags
        self.data = data


class PacketRefused(ValueError):
    """A packet that is not handed to the handler; ``str()`` is the reason."""


def load_handler(spec: str) -> Callable[..., Any]:
    """Import ``"module:function"`` (``function`` may be dotted) and return it.

    Raises:
        ValueError: ``spec`` is not ``module:function``, or names something
            that is not callable as ``handler(data, task_id=..., flags=...)``.
        ImportError: the module does not import.
        AttributeError: the module has no such attribute.
    """
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"a Swoole handler is named 'module:function', not {spec!r}")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"the Swoole handler {spec!r} is not callable")
    if not _accepts_keywords(obj):
        raise ValueError(f"the Swoole handler {spec!r} must accept "
                         "handler(data, task_id=..., flags=...)")
    return obj


def pack_packet(task_id: int, data: bytes, flags: int = SW_TASK_NONBLOCK,
                length: int | None = None, type: int = SW_EVENT_TASK,
                from_id: int = 0) -> bytes:
    """Build a packet as seed 000's ``SwooleTask::pack`` does (for tests and
    Python producers). ``data`` is put as is: to send a tmpfile reference,
    pass ``struct.pack('=i', size) + path + b"\\0"`` and ``flags`` with
    ``SW_TASK_TMPFILE``. ``length`` defaults to ``len(data)`` (seed 000 puts
    152 for a tmpfile packet)."""
    if length is None:
        length = len(data) if not flags & SW_TASK_TMPFILE else 128 + 24
    return HEADER.pack(task_id, length & 0xFFFF, from_id, type, 0, flags) + bytes(data)


def parse_packet(raw: bytes) -> SwoolePacket:
    """Split one message into header fields and data.

    For a packet without ``SW_TASK_TMPFILE`` the data is the ``len`` bytes after
    the header (the message may not be shorter).

    Raises:
        PacketRefused: shorter than the 12-byte header, a type other than
            ``SW_EVENT_TASK``, or ``len`` larger than the data present.
    """
    if len(raw) < HEADER.size:
        raise PacketRefused(f"a Swoole task packet has a {HEADER.size}-byte header; "
                            f"this message has {len(raw)} bytes")
    task_id, length, from_id, ptype, _unused, flags = HEADER.unpack_from(raw)
    if ptype != SW_EVENT_TASK:
        raise PacketRefused(f"packet type {ptype} is not a task (SW_EVENT_TASK = "
                            f"{SW_EVENT_TASK}); is this a Swoole task packet?")
    data = bytes(raw[HEADER.size:])
    if not flags & SW_TASK_TMPFILE:
        if length > len(data):
            raise PacketRefused(f"the header announces {length} bytes of data, the "
                                f"message holds {len(data)}")
        data = data[:length]
    return SwoolePacket(task_id, length, from_id, ptype, flags, data)


def tmpfile_dirs() -> list[str]:
    """Directories a Swoole tmpfile may be in, as absolute normal paths.

    ``MQEXECUTOR_SWOOLE_TMPDIR`` (colon-separated) when set, else ``/tmp`` and
    :func:`tempfile.gettempdir` (PHP's ``tempnam`` falls back to the system
    temp directory; Swoole's ``task_tmpdir`` defaults to /tmp).
    """
    env = os.environ.get(ENV_TMPDIR)
    if env:
        candidates = [d for d in env.split(":") if d]
    else:
        candidates = ["/tmp", tempfile.gettempdir()]
    out: list[str] = []
    for d in candidates:
        d = os.path.normpath(d)
        if os.path.isabs(d) and d not in out:
            out.append(d)
    return out


def _tmpfile_reference(data: bytes) -> tuple[int, str]:
    """(size, path) of a tmpfile packet's data: ``pack('l', size) . path . "\\0"``."""
    if len(data) < _TMPFILE_LEN.size + 2:
        raise PacketRefused("a tmpfile packet holds pack('l', size) . path . NUL; "
                            f"this one has {len(data)} bytes")
    (size,) = _TMPFILE_LEN.unpack_from(data)
    rest = data[_TMPFILE_LEN.size:]
    end = rest.find(b"\x00")
    if end < 0:
        raise PacketRefused("the tmpfile path is not NUL-terminated")
    try:
        path = rest[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise PacketRefused("the tmpfile path is not UTF-8") from None
    if size < 0:
        raise PacketRefused(f"negative tmpfile size {size}")
    return size, path


def read_tmpfile(path: str, size: int) -> bytes:
    """Read (and unlink) the payload a tmpfile packet names, under the rules of
    the module docstring.

    Args:
        path: the path the packet carries.
        size: the payload size it announces, bytes.

    Returns:
        The file's first ``size`` bytes.

    Raises:
        PacketRefused: the path breaks a rule, the file is missing, is not a
            regular file of this user with one link, or is shorter than ``size``.
    """
    if not os.path.isabs(path) or os.path.normpath(path) != path or "\x00" in path:
        raise PacketRefused(f"tmpfile path {path!r} is not absolute and normal")
    directory, name = os.path.split(path)
    if directory not in tmpfile_dirs():
        raise PacketRefused(f"tmpfile {path!r} is not in an allowed directory "
                            f"({', '.join(tmpfile_dirs())}; set {ENV_TMPDIR})")
    if not _NAME_RE.fullmatch(name):
        raise PacketRefused(f"tmpfile name {name!r} does not start with {TMPFILE_PREFIX!r} "
                            "or has other characters than [A-Za-z0-9._-]")
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PacketRefused(f"cannot open tmpfile directory {directory!r}: {exc}") from None
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError as exc:
            why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise PacketRefused(f"cannot open tmpfile {path!r}: {why}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PacketRefused(f"tmpfile {path!r} is not a regular file")
            if st.st_uid != os.geteuid():
                raise PacketRefused(f"tmpfile {path!r} belongs to uid {st.st_uid}, not "
                                    f"to this user ({os.geteuid()})")
            if st.st_nlink != 1:
                raise PacketRefused(f"tmpfile {path!r} has {st.st_nlink} links")
            # Ours: consume it, as Swoole's receiver does (unlink after reading;
            # here right after the checks, so a failure below cannot leak it).
            try:
                now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
            if st.st_size < size:
                raise PacketRefused(f"tmpfile {path!r} holds {st.st_size} bytes; the "
                                    f"packet announces {size}")
            chunks = []
            left = size
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    raise PacketRefused(f"tmpfile {path!r} ended after "
                                        f"{size - left} of {size} bytes")
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def _unserialize(payload: bytes) -> Any:
    """PHP ``unserialize()`` with the optional ``phpserialize`` package, strings
    decoded as UTF-8 (surrogateescape: undecodable bytes survive), objects as
    ``phpserialize.phpobject``, arrays as dicts. Returns ``payload`` unchanged
    when phpserialize is not installed."""
    try:
        import phpserialize  # type: ignore[import-not-found]
    except ImportError:
        return payload
    try:
        return phpserialize.loads(payload, decode_strings=True, errors="surrogateescape",
                                  object_hook=phpserialize.phpobject)
    except Exception as exc:  # noqa: BLE001 - malformed input may raise anything
        raise PacketRefused(f"SW_TASK_SERIALIZE is set but the data is not PHP "
                            f"serialize() output: {type(exc).__name__}: {exc}") from None


def handle_packet(raw: bytes, handler: Callable[..., Any]) -> str | None:
    """Hand one Swoole task packet to ``handler``, as Swoole calls onTask.

    Called by a task worker of a pool started with ``swoole_handler=`` for every
    message it receives.

    The handler is called as ``handler(data, task_id=<int>, flags=<int>)``:

    * ``data`` (bytes): the payload, read from the tmpfile when
      ``SW_TASK_TMPFILE`` is set (the flag stays set in ``flags``);
    * with ``SW_TASK_SERIALIZE`` and the optional ``phpserialize`` package
      installed, ``data`` is the unserialized value (PHP strings as str,
      arrays as dict, objects as ``phpserialize.phpobject``); without it,
      ``data`` stays the serialized bytes;
    * ``task_id``: the packet's task id; ``flags``: its ``SW_TASK_*`` bits.

    The handler's return value is ignored: an external producer has no
    ``onFinish`` to receive it (send results yourself, e.g. to a queue or a
    file). An exception raised by the handler is printed with its traceback on
    the worker's stderr; the message still counts as handled.

    Args:
        raw: the whole message.
        handler: the function ``load_handler`` returned.

    Returns:
        None when the handler was called; else the reason the packet was
        refused (too short, not a task, a tmpfile that breaks the rules, PHP
        serialize() data that does not parse). Never raises.
    """
    try:
        packet = parse_packet(raw)
        data: Any = packet.data
        if packet.flags & SW_TASK_TMPFILE:
            size, path = _tmpfile_reference(packet.data)
            data = read_tmpfile(path, size)
        if packet.flags & SW_TASK_SERIALIZE:
            data = _unserialize(data)
    except PacketRefused as exc:
        return f"Swoole packet refused: {exc}"
    except Exception as exc:  # noqa: BLE001 - never crash the worker on bad input
        return f"Swoole packet refused: {type(exc).__name__}: {exc}"
    try:
        handler(data, task_id=packet.task_id, flags=packet.flags)
    except BaseException as exc:  # noqa: BLE001 - as onTask: the worker goes on
        try:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        except BaseException:  # noqa: BLE001
            text = type(exc).__name__
        report(f"Swoole handler raised on task {packet.task_id}:\n{text.rstrip()}")
    return None


def _accepts_keywords(handler: Callable[..., Any]) -> bool:
    """Whether ``handler(data, task_id=..., flags=...)`` binds (for early checks)."""
    try:
        inspect.signature(handler).bind(b"", task_id=0, flags=0)
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): assume it does
        return True
    return True
