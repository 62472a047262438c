"""The physical limit of the transport: two processes, two SysV queues, no executor.

A client sends small messages (``size`` bytes, 64 by default: about a no-op
task's header and name) on one queue; an echo process forked beforehand
answers each with 8 bytes on the other queue. Nothing is pickled, no Future is
made: what is left is ``msgsnd``/``msgrcv`` through sysv_ipc and the wake-ups.

* ``pipelined(n)``: ``window`` messages in flight (4 KiB of a 16 KiB queue),
  one sent per reply received: round trips per second, the most a pool on
  this transport could complete with one worker and one collector.
* ``sequential(n)``: one message, wait for its reply, again: the median and
  p99 of the round trip, the floor of ``submit().result()``. child.py also
  runs it with both processes pinned to one CPU and to two: a wake-up on
  another CPU costs several times a switch on the same one.

Run by child.py for the executor kind ``sysv-raw``; the queue ids go to the
ids file as soon as they exist, and the queues and the echo process are gone
when a measurement returns or fails.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

STOP = 2  # message type that tells the echo process to exit
REPLY = b"r" * 8


class PingPong:
    """Two queues and an echo process; ``close()`` removes all three."""

    def __init__(self, record_ids: Callable[[list[int]], None] | None = None):
        import sysv_ipc
        self.sysv_ipc = sysv_ipc
        self.req = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
        self.rep = None
        self.pid = 0
        try:
            self.rep = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
            if record_ids is not None:
                record_ids([self.req.id, self.rep.id])
            self.pid = os.fork()  # this process has one thread: safe
            if self.pid == 0:
                self._echo()
        except BaseException:
            self.close()
            raise

    def _echo(self) -> None:
        status = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            receive, send = self.req.receive, self.rep.send
            while True:
                _, kind = receive()
                if kind == STOP:
                    break
                send(REPLY)
        except BaseException:  # noqa: BLE001 - queue removed under us: just go
            status = 1
        finally:
            os._exit(status)

    def sequential(self, n: int, size: int = 64, warmup: int = 200) -> list[int]:
        """Round-trip times (ns) of ``n`` ping-pongs, one message at a time."""
        msg = b"t" * size
        send, receive = self.req.send, self.rep.receive
        for _ in range(warmup):
            send(msg)
            receive()
        ns = time.perf_counter_ns
        out = []
        for _ in range(n):
            t0 = ns()
            send(msg)
            receive()
            out.append(ns() - t0)
        return out

    def pipelined(self, n: int, size: int = 64, window: int = 64) -> float:
        """Seconds for ``n`` round trips with up to ``window`` messages in flight."""
        msg = b"t" * size
        send, receive = self.req.send, self.rep.receive
        for _ in range(window):  # warm-up
            send(msg)
        for _ in range(window):
            receive()
        first = min(window, n)
        t0 = time.perf_counter()
        for _ in range(first):
            send(msg)
        for _ in range(n - first):
            receive()
            send(msg)
        for _ in range(first):
            receive()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the echo process (waited for) and remove both queues."""
        if self.pid > 0:
            try:
                self.req.send(b"", block=False, type=STOP)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if os.waitpid(self.pid, os.WNOHANG)[0]:
                        break
                    time.sleep(0.005)
                else:
                    raise TimeoutError
            except Exception:  # noqa: BLE001 - the queue is full or it hangs: kill it
                try:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            self.pid = 0
        for q in (self.req, self.rep):
            if q is None:
                continue
            try:
                q.remove()
            except Exception:  # noqa: BLE001 - already gone
                pass
