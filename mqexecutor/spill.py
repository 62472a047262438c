"""Spill files: payloads larger than one message travel through a file.

A pickled call or result that does not fit in one message (msgmax minus the
header) is written to a spill file and the message carries only the file's
*reference*. As in Swoole, the receiver unlinks the file as soon as it has
opened it; unlike Swoole, nothing else is trusted:

* Spill roots are per-user directories, mode 0700: ``/dev/shm/mqexecutor-<uid>``
  (tmpfs, when it exists and has room for the payload; Docker gives containers
  only 64 MB there) and ``<tempdir>/mqexecutor-<uid>``. ``MQEXECUTOR_SPILL_DIR``
  replaces both with one directory of the user's choice.
* Below a root, each producer has its own sub-directory (``p-<pid>-<token>``)
  and each persistent queue key one (``k-<key>``), so that the files of a
  producer that died can be reclaimed without touching tasks that wait in a
  persistent queue.
* A reference is ``"<root index>:<subdir>/<name>"``, with both parts matching
  ``[A-Za-z0-9_.-]+`` (no ``..``). It cannot name a path outside the spill root,
  and every component is opened with ``O_NOFOLLOW``: a symbolic link is refused.
* Files are created ``O_EXCL`` with mode 0600.
* A default root is made on first use and removed again by whoever empties it
  (``remove_subdir``); a producer that finds it gone between making it and
  making its sub-directory makes it again (``ensure_subdir``). A root named by
  ``MQEXECUTOR_SPILL_DIR`` belongs to the user and is never removed.

File layout (little-endian), made for pickle protocol 5 out-of-band buffers so a
large NumPy array is written once and mapped, not copied, by the reader::

    b"MQSP" | version u8 | 3 pad | nbuf u32 | pickle_len u64 | nbuf x u64 lengths
    | zero padding to 64 | pickle | (padding to 64 | buffer) x nbuf
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "SpillError", "spill_roots", "root_dir", "ensure_subdir", "write", "load",
    "remove_subdir", "list_files", "producer_subdir", "key_subdir", "choose_root",
    "ENV_SPILL_DIR",
]

ENV_SPILL_DIR = "MQEXECUTOR_SPILL_DIR"
_MAGIC = b"MQSP"
_VERSION = 1
_ALIGN = 64
_FIXED = struct.Struct("<4sB3xIQ")
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_REF_RE = re.compile(r"([0-9]):([A-Za-z0-9_-][A-Za-z0-9_.-]{0,127})/"
                     r"([A-Za-z0-9_-][A-Za-z0-9_.-]{0,127})")
#: Keep this much of a tmpfs free (bytes), or a quarter of it when smaller.
_TMPFS_MARGIN = 16 * 1024 * 1024


class SpillError(OSError):
    """A spill file could not be written or read (bad reference, missing file,
    symbolic link, wrong owner or permissions of the spill directory)."""


def spill_roots() -> list[str]:
    """The spill roots of this user, most preferred first.

    Returns a list of directory paths (not necessarily existing yet): the value
    of ``MQEXECUTOR_SPILL_DIR`` alone when it is set, else
    ``["/dev/shm/mqexecutor-<uid>", "<tempdir>/mqexecutor-<uid>"]`` (the first
    only when /dev/shm is a directory).
    """
    first = _first_root()
    if first[1]:
        return [first[0]]
    return [first[0], _temp_root()] if first[0] else [_temp_root()]


def _first_root() -> tuple[str, bool]:
    """(root 0 when it is tmpfs or the override else "", whether it is the
    override): root 0 without ``tempfile.gettempdir()``, whose first call
    writes a test file (0.2 ms of every pool's start-up)."""
    override = os.environ.get(ENV_SPILL_DIR)
    if override:
        return os.path.abspath(override), True
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return os.path.join("/dev/shm", f"mqexecutor-{os.getuid()}"), False
    return "", False


def _temp_root() -> str:
    import tempfile  # here: with shutil and random, 6 ms of a manager's start-up
    return os.path.join(tempfile.gettempdir(), f"mqexecutor-{os.getuid()}")


def _root_path(index: int) -> str:
    """Path of spill root ``index`` (see ``spill_roots``)."""
    if index == 0:
        first, _override = _first_root()
        if first:
            return first
    roots = spill_roots()
    if not 0 <= index < len(roots):
        raise SpillError(errno.ENOENT, f"no spill root number {index}")
    return roots[index]


def root_dir(index: int, create: bool = True) -> str:
    """Path of spill root ``index``, created mode 0700 when ``create``.

    Raises:
        SpillError: the root exists but is not a directory owned by this user,
            or is reached through a symbolic link.
    """
    path = _root_path(index)
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=False)
        except FileExistsError:
            pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise
        return path
    import stat as _stat
    if not _stat.S_ISDIR(st.st_mode):
        raise SpillError(errno.ENOTDIR, f"spill root {path} is not a directory "
                         "(a symbolic link or a file is refused)")
    if st.st_uid != os.getuid():
        raise SpillError(errno.EACCES, f"spill root {path} belongs to uid {st.st_uid}, "
                         f"not to this user ({os.getuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def producer_subdir(pid: int, token: int) -> str:
    """Name of the sub-directory that holds one producer's spill files."""
    return f"p-{pid}-{token:016x}"


def key_subdir(key: int) -> str:
    """Name of the sub-directory that holds the spilled tasks of a persistent key."""
    return f"k-{key & 0xFFFFFFFF:08x}"


#: Attempts of ``ensure_subdir`` when another process removes the empty root
#: between our making it and making the sub-directory.
_ROOT_RACE_ATTEMPTS = 8


def ensure_subdir(index: int, subdir: str) -> str:
    """Create (mode 0700) and return ``<root index>/<subdir>``, making the root
    first when it is missing.

    Raises:
        SpillError: ``subdir`` is not a plain name, the root is refused (see
            ``root_dir``), or ``<root>/<subdir>`` exists and is not a directory.
        OSError: the directory could not be made (e.g. no space, no permission).
    """
    if not _NAME_RE.fullmatch(subdir) or ".." in subdir:
        raise SpillError(errno.EINVAL, f"bad spill sub-directory name {subdir!r}")
    attempts = _ROOT_RACE_ATTEMPTS
    while True:
        try:
            path = os.path.join(root_dir(index), subdir)
            os.mkdir(path, 0o700)
        except FileExistsError:
            if os.path.islink(path) or not os.path.isdir(path):
                raise SpillError(errno.ENOTDIR, f"spill directory {path} is not a directory")
        except FileNotFoundError:
            # The root was empty and another process's remove_subdir took it
            # away after root_dir() made it: make it again.
            attempts -= 1
            if not attempts:
                raise
            continue
        return path


def _remove_root_if_empty(root: str) -> None:
    """Remove a default spill root that holds nothing (never raises).

    rmdir(2) fails on a directory that is not empty, so a root another producer
    is using stays; one that producer is about to use is made again by its
    ``ensure_subdir``."""
    if os.environ.get(ENV_SPILL_DIR):
        return
    try:
        os.rmdir(root)
    except OSError:
        pass


def choose_root(nbytes: int) -> int:
    """Index of the root to spill ``nbytes`` into: tmpfs when it has room, else
    the next root (the temp directory)."""
    roots = spill_roots()
    if len(roots) == 1:
        return 0
    try:
        st = os.statvfs(os.path.dirname(roots[0]))
    except OSError:
        return 1
    avail = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    margin = min(_TMPFS_MARGIN, total // 4)
    return 0 if avail >= nbytes + margin else 1


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def _write_all(fd: int, data: memoryview) -> None:
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while len(view):
        written = os.write(fd, view[: 1 << 30])
        view = view[written:]


def write(subdir: str, pickled: bytes, buffers: Sequence[memoryview] = (),
          name: str | None = None) -> str:
    """Write one payload to a new spill file and return its reference.

    Args:
        subdir: sub-directory name (``producer_subdir`` or ``key_subdir``).
        pickled: the pickle stream (protocol 5).
        buffers: contiguous out-of-band buffers of that pickle, in order.
        name: the file's name (``[A-Za-z0-9_.-]``, no ``..``); default: a
            random one. A file of that name already there is an error.

    Returns:
        str: the reference ``"<root>:<subdir>/<name>"`` to put in the message.

    Raises:
        SpillError / OSError: the file could not be created or written on any root
        (e.g. every file system is full).
    """
    if name is not None and (not _NAME_RE.fullmatch(name) or ".." in name):
        raise SpillError(errno.EINVAL, f"bad spill file name {name!r}")
    lengths = [b.nbytes for b in buffers]
    total = len(pickled) + sum(lengths) + 64 * (len(lengths) + 2)
    first = choose_root(total)
    last_error: Exception | None = None
    for index in range(first, len(spill_roots())):
        directory = ensure_subdir(index, subdir)
        filename = name or os.urandom(12).hex() + ".spill"  # as secrets.token_hex
        path = os.path.join(directory, filename)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            head = _FIXED.pack(_MAGIC, _VERSION, len(lengths), len(pickled))
            head += struct.pack(f"<{len(lengths)}Q", *lengths)
            head += b"\0" * _pad(len(head))
            _write_all(fd, memoryview(head))
            _write_all(fd, memoryview(pickled))
            offset = len(head) + len(pickled)
            for buf in buffers:
                pad = _pad(offset)
                if pad:
                    os.write(fd, b"\0" * pad)
                _write_all(fd, memoryview(buf))
                offset += pad + buf.nbytes
        except OSError as exc:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                last_error = exc
                continue
            raise
        os.close(fd)
        return f"{index}:{subdir}/{filename}"
    raise SpillError(errno.ENOSPC, f"no spill root had room for {total} bytes: {last_error}")


def parse_reference(reference: str) -> tuple[int, str, str]:
    """Split and check a reference; returns (root index, subdir, name).

    Raises:
        SpillError: the reference is malformed or could name a path outside the
            spill root (absolute paths, ``..``, extra slashes).
    """
    m = _REF_RE.fullmatch(reference)
    if not m or ".." in m.group(2) or ".." in m.group(3):
        raise SpillError(errno.EINVAL, f"refused spill reference {reference[:200]!r}: "
                         "not of the form <root>:<subdir>/<name> inside the spill root")
    index = int(m.group(1))
    if index >= len(spill_roots()):
        raise SpillError(errno.EINVAL, f"spill reference {reference!r} names root "
                         f"{index}, this user has {len(spill_roots())}")
    return index, m.group(2), m.group(3)


def _open_spill(reference: str, unlink: bool = True) -> int:
    index, subdir, name = parse_reference(reference)
    root = root_dir(index, create=False)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        rfd = os.open(root, flags | os.O_DIRECTORY)
    except OSError as exc:
        raise SpillError(exc.errno, f"spill root {root}: {exc.strerror}") from None
    try:
        sfd = os.open(subdir, flags | os.O_DIRECTORY, dir_fd=rfd)
    except OSError as exc:
        os.close(rfd)
        raise SpillError(exc.errno, f"spill reference {reference}: {exc.strerror}") from None
    try:
        try:
            fd = os.open(name, flags, dir_fd=sfd)
        except OSError as exc:
            what = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise SpillError(exc.errno, f"spill file {reference}: {what}") from None
        if unlink:
            try:
                os.unlink(name, dir_fd=sfd)
            except FileNotFoundError:
                pass
        return fd
    finally:
        os.close(sfd)
        os.close(rfd)


def load(reference: str, loads: Callable[..., Any], unlink: bool = True) -> Any:
    """Open, unlink and unpickle the spill file named by ``reference``.

    Args:
        reference: as returned by :func:`write`.
        loads: ``pickle.loads``-compatible function taking ``buffers=``.
        unlink: remove the file once open (the default; the receiver unlinks).

    Returns:
        The unpickled object. Out-of-band buffers (e.g. NumPy arrays) are views of
        a private (copy-on-write) mapping of the file, so they are not copied.

    Raises:
        SpillError: bad reference, missing file, symbolic link, bad file format.
        Any exception of ``loads``.
    """
    fd = _open_spill(reference, unlink)
    try:
        size = os.fstat(fd).st_size
        if size < _FIXED.size:
            raise SpillError(errno.EINVAL, f"spill file {reference} is truncated "
                             f"({size} bytes)")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    view = memoryview(mm)
    magic, version, nbuf, plen = _FIXED.unpack_from(view)
    if magic != _MAGIC or version != _VERSION:
        raise SpillError(errno.EINVAL, f"spill file {reference} has a bad header")
    offset = _FIXED.size
    if offset + 8 * nbuf > size:
        raise SpillError(errno.EINVAL, f"spill file {reference} is truncated")
    lengths = struct.unpack_from(f"<{nbuf}Q", view, offset)
    offset += 8 * nbuf
    offset += _pad(offset)
    if offset + plen > size:
        raise SpillError(errno.EINVAL, f"spill file {reference} is truncated")
    pickled = view[offset: offset + plen]
    offset += plen
    buffers = []
    for n in lengths:
        offset += _pad(offset)
        if offset + n > size:
            raise SpillError(errno.EINVAL, f"spill file {reference} is truncated")
        buffers.append(view[offset: offset + n])
        offset += n
    return loads(pickled, buffers=buffers)


def discard(reference: str) -> bool:
    """Unlink the spill file of ``reference`` if it exists (never raises).
    Returns True when a file was removed."""
    try:
        os.close(_open_spill(reference))
        return True
    except (OSError, ValueError):
        return False


def remove_subdir(subdir: str) -> None:
    """Remove ``subdir`` and its files under every spill root (never raises)."""
    if not _NAME_RE.fullmatch(subdir) or ".." in subdir:
        return
    import shutil  # here: with bz2 and lzma, 2-3 ms of a manager's start-up
    for root in spill_roots():
        shutil.rmtree(os.path.join(root, subdir), ignore_errors=True)
        _remove_root_if_empty(root)


def remove_if_empty(subdir: str) -> None:
    """Remove ``subdir`` under every spill root where it holds no file (never
    raises): a worker that spilled a result for a producer that turned out dead
    re-created its directory. A default root left empty goes too."""
    if not _NAME_RE.fullmatch(subdir) or ".." in subdir:
        return
    for root in spill_roots():
        try:
            os.rmdir(os.path.join(root, subdir))
        except OSError:
            continue
        _remove_root_if_empty(root)


def list_files(subdir: str | None = None) -> list[str]:
    """Paths of the spill files present (all, or those of ``subdir``)."""
    found: list[str] = []
    for root in spill_roots():
        try:
            names = sorted(os.listdir(root)) if subdir is None else [subdir]
        except OSError:  # no root (yet, or any more)
            continue
        for d in names:
            p = os.path.join(root, d)
            if os.path.isdir(p) and not os.path.islink(p):
                try:
                    found.extend(os.path.join(p, f) for f in sorted(os.listdir(p)))
                except OSError:  # removed meanwhile
                    pass
    return found
