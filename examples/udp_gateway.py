#!/usr/bin/env python3
"""A UDP front end that queues every packet to competing task workers.

The job of seed 002 (a PHP sysvmsg tutorial): one proxy process receives UDP
packets and puts each on a System V queue, where forked workers compete for
them (``msg_receive`` type 0: Swoole's ``task_ipc_mode`` 3, here
``Mode.PREEMPTIVE``); the proxy answers ``OK`` when the packet was queued and
``ER`` when it was not. Done with ``MQExecutor``, plus what the seed's author
left out ("no process management, signal handling or overload protection"):

* process management: the pool replaces a worker that dies;
* signals: SIGINT / SIGTERM stop the gateway; packets already accepted are
  still processed, then the queue is removed;
* overload protection: at most ``--max-inflight`` packets queued or running;
  beyond that the gateway answers ``BUSY`` at once instead of queueing (the
  seed's ``msg_send`` blocked the whole proxy when the queue was full).

Replies, one line each: ``OK`` (queued), ``BUSY`` (too many in flight: retry
later), ``ER`` (empty packet, larger than ``--max-packet``, or the pool is
broken). Each worker prints ``[Worker <id>] <packet>`` as the seed's do.

    python examples/udp_gateway.py --port 9999
    echo hello | nc -u -w1 127.0.0.1 9999       # -> OK

Prints ``udp_gateway: listening on udp://HOST:PORT ...`` once bound (``--port 0``
binds an ephemeral port), and a summary line when it stops.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

from mqexecutor import MQExecutor, Mode, worker_id


def process_packet(data: bytes, work_ms: float = 0.0) -> int:
    """The task: what seed 002's workers do with a packet (print it), after
    ``work_ms`` milliseconds of simulated work. Returns the packet's size."""
    if work_ms > 0:
        time.sleep(work_ms / 1000)
    text = data.decode("utf-8", "replace").rstrip("\r\n")
    print(f"[Worker {worker_id()}] {text}", flush=True)
    return len(data)


class Gateway:
    """Receives datagrams on ``sock`` and queues them to ``executor``.

    Args:
        sock: a bound UDP socket.
        executor: the pool (``Mode.PREEMPTIVE``: workers compete for packets).
        max_inflight (int): packets queued or running at most; more get BUSY.
        max_packet (int): largest accepted packet, bytes; larger ones get ER.
        work_ms (float): simulated work per packet, milliseconds.
    """

    def __init__(self, sock: socket.socket, executor: MQExecutor, max_inflight: int,
                 max_packet: int, work_ms: float):
        self.sock = sock
        self.executor = executor
        self.max_inflight = max_inflight
        self.max_packet = max_packet
        self.work_ms = work_ms
        self.lock = threading.Lock()
        self.inflight = 0
        self.counts = {"received": 0, "queued": 0, "processed": 0, "failed": 0, "busy": 0,
                       "errors": 0}
        self.stop = threading.Event()

    def _done(self, fut) -> None:
        with self.lock:
            self.inflight -= 1
            if fut.cancelled() or fut.exception() is not None:
                self.counts["failed"] += 1
            else:
                self.counts["processed"] += 1

    def answer(self, data: bytes) -> bytes:
        """Queue one packet; returns the reply to send (OK, BUSY or ER)."""
        with self.lock:
            self.counts["received"] += 1
            if not data or len(data) > self.max_packet:
                self.counts["errors"] += 1
                return b"ER\n"
            if self.inflight >= self.max_inflight:
                self.counts["busy"] += 1
                return b"BUSY\n"
            self.inflight += 1
        try:
            fut = self.executor.submit(process_packet, data, self.work_ms)
        except Exception:  # noqa: BLE001 - a broken or shut-down pool: ER
            with self.lock:
                self.inflight -= 1
                self.counts["errors"] += 1
            return b"ER\n"
        with self.lock:
            self.counts["queued"] += 1
        fut.add_done_callback(self._done)
        return b"OK\n"

    def serve(self) -> None:
        """Receive until ``stop`` is set (checked every 0.2 s)."""
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            except OSError:
                if self.stop.is_set():
                    break
                raise
            reply = self.answer(data)
            try:
                self.sock.sendto(reply, peer)
            except OSError:
                pass  # the client went away: nothing to tell it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="UDP front end for mqexecutor task "
                                     "workers (seed 002), with overload protection")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default "
                        "127.0.0.1)")
    parser.add_argument("--port", type=int, default=9999, help="UDP port (0: any free "
                        "port; default 9999 as the seed)")
    parser.add_argument("--workers", type=int, default=2, help="task workers (default 2)")
    parser.add_argument("--max-inflight", type=int, default=64, metavar="N",
                        help="packets queued or running at most; more get BUSY "
                        "(default 64)")
    parser.add_argument("--max-packet", type=int, default=8192, metavar="BYTES",
                        help="largest packet accepted; larger get ER (default 8192)")
    parser.add_argument("--work-ms", type=float, default=0.0,
                        help="simulated work per packet, ms (default 0)")
    parser.add_argument("--key", type=lambda s: int(s, 0), default=None,
                        help="SysV key of the task queue (default: a private queue, "
                        "removed at exit)")
    opts = parser.parse_args(argv)
    if opts.max_inflight < 1 or opts.workers < 1:
        parser.error("--max-inflight and --workers must be >= 1")

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((opts.host, opts.port))
    host, port = sock.getsockname()
    executor = MQExecutor(opts.key, opts.workers, mode=Mode.PREEMPTIVE)
    gateway = Gateway(sock, executor, opts.max_inflight, opts.max_packet, opts.work_ms)

    def on_signal(signum, frame):
        gateway.stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    qkey = executor.stats().key & 0xFFFFFFFF
    print(f"udp_gateway: listening on udp://{host}:{port} ({opts.workers} preemptive "
          f"task workers, at most {opts.max_inflight} packets in flight, queue key "
          f"0x{qkey:08x})", flush=True)
    try:
        gateway.serve()
    finally:
        sock.close()
        executor.shutdown(wait=True)  # accepted packets are still processed
    c = gateway.counts
    print(f"udp_gateway: stopped: received {c['received']}, queued {c['queued']}, "
          f"processed {c['processed']}, failed {c['failed']}, busy {c['busy']}, "
          f"errors {c['errors']}", flush=True)
    return 0 if c["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
