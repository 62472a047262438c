"""Channel: the control connection between a pool's owner and its manager
process: pickled tuples, each behind a u32 length, over one end of a Unix
socket pair. A few lines instead of ``multiprocessing.connection``, whose
import (about 10 ms) would be on the path of every manager's start-up."""
from __future__ import annotations

import os
import pickle
import select
import struct
from typing import Any

__all__ = ["Channel"]

_LEN = struct.Struct("<I")


class Channel:
    """One end of the control connection.

    Args:
        fd (int): a connected stream socket (or pipe) this object now owns.

    Methods raise EOFError once the other end is closed, OSError for other
    failures of the socket.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self._buffer = b""

    def fileno(self) -> int:
        """The socket's file descriptor (for select/poll)."""
        return self.fd

    def send(self, message: Any) -> None:
        """Send ``message`` (picklable), whole."""
        self.send_bytes(pickle.dumps(message, 5))

    def send_bytes(self, data: bytes) -> None:
        """Send a message pickled already (``recv`` unpickles it)."""
        view = memoryview(_LEN.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fd, view):]

    def _fill(self, need: int) -> None:
        while len(self._buffer) < need:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("the other end of the control connection closed")
            self._buffer += chunk

    def recv(self) -> Any:
        """The next message (blocks until it is whole)."""
        self._fill(_LEN.size)
        (n,) = _LEN.unpack_from(self._buffer)
        self._fill(_LEN.size + n)
        data = self._buffer[_LEN.size:_LEN.size + n]
        self._buffer = self._buffer[_LEN.size + n:]
        return pickle.loads(data)

    def pending(self) -> bool:
        """Whether a whole message was read already and waits in the buffer
        (then select() on the socket would not say so)."""
        if len(self._buffer) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buffer)
            return len(self._buffer) >= _LEN.size + n
        return False

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether :meth:`recv` would not block (data or end of file is there),
        waiting up to ``timeout`` seconds (None: for ever)."""
        if self.pending():
            return True
        return bool(select.select([self.fd], [], [], timeout)[0])

    def close(self) -> None:
        """Close the socket (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0
