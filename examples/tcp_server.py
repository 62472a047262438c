#!/usr/bin/env python3
"""An asyncio TCP server whose handlers offload slow work to task workers.

The job of seeds 003 and 004 (Swoole tutorials): the server's ``onReceive``
hands slow work to a task worker with ``$serv->task($data)``, answers the
client at once with the task id, and the result comes back in ``onFinish``
while the server goes on serving other clients. Here the event loop is
asyncio's, the task workers are an ``MQExecutor``, and a Future stands for
onFinish: ``await asyncio.wrap_future(executor.submit(fn, arg))`` or
``await loop.run_in_executor(executor, fn, arg)``.

Line protocol (one command per line, replies one per line)::

    ping           -> pong                        (answered by the event loop)
    sum N          -> queued ID, later: done ID <sum of i*i for i < N> worker W
    sleep S        -> queued ID, later: done ID <S> worker W   (S <= 10 seconds)
    quit           -> the results still owed, then bye; the connection closes
                      (end of input does the same)
    anything else  -> error - <reason>

A client may have at most ``--max-pending`` tasks queued or running; beyond
that a command gets ``busy ID``. Replies to ``sum``/``sleep`` come in the
order the tasks finish, not the order they were sent.

    python examples/tcp_server.py --port 9501
    printf 'sleep 1\\nping\\nsum 1000000\\n' | nc -q2 127.0.0.1 9501

Prints ``tcp_server: listening on HOST:PORT`` once bound (``--port 0`` binds an
ephemeral port). SIGINT/SIGTERM: stop accepting, cancel queued tasks, wait for
running ones, remove the queue, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import time

from mqexecutor import MQExecutor, worker_id

MAX_SUM = 50_000_000
MAX_SLEEP = 10.0


def sum_squares(n: int) -> tuple[int, int | None]:
    """CPU-bound work: sum of i*i for 0 <= i < n; returns (sum, worker id)."""
    return sum(i * i for i in range(n)), worker_id()


def slow(seconds: float) -> tuple[float, int | None]:
    """I/O-like work: sleep ``seconds``; returns (seconds, worker id)."""
    time.sleep(seconds)
    return seconds, worker_id()


class Server:
    """The protocol of the module docstring, served over ``executor``."""

    def __init__(self, executor: MQExecutor, max_pending: int):
        self.executor = executor
        self.max_pending = max_pending
        self.ids = itertools.count(1)
        self.tasks: set[asyncio.Task] = set()

    async def run_task(self, writer: asyncio.StreamWriter, task_id: int, kind: str,
                       arg, pending: list[int]) -> None:
        """Offload one task, then write its ``done``/``error`` line (onFinish)."""
        try:
            if kind == "sum":
                fut = self.executor.submit(sum_squares, arg)
                value, wid = await asyncio.wrap_future(fut)
            else:
                loop = asyncio.get_running_loop()
                value, wid = await loop.run_in_executor(self.executor, slow, arg)
            line = f"done {task_id} {value} worker {wid}\n"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - told to the client
            line = f"error {task_id} {type(exc).__name__}: {exc}\n"
        finally:
            pending[0] -= 1
        if not writer.is_closing():
            writer.write(line.encode())

    def command(self, line: str, writer: asyncio.StreamWriter, pending: list[int],
                mine: set) -> str:
        """Answer one command at once; start a task for sum/sleep (added to
        ``mine``, this connection's tasks)."""
        parts = line.split()
        if not parts:
            return "error - empty command\n"
        cmd = parts[0].lower()
        if cmd == "ping":
            return "pong\n"
        if cmd not in ("sum", "sleep") or len(parts) != 2:
            return f"error - unknown command {line[:40]!r}\n"
        try:
            arg = int(parts[1]) if cmd == "sum" else float(parts[1])
        except ValueError:
            return f"error - {cmd} needs a number\n"
        if (cmd == "sum" and not 0 <= arg <= MAX_SUM) or (
                cmd == "sleep" and not 0 <= arg <= MAX_SLEEP):
            return f"error - {cmd} argument out of range\n"
        task_id = next(self.ids)
        if pending[0] >= self.max_pending:
            return f"busy {task_id}\n"
        pending[0] += 1
        task = asyncio.create_task(self.run_task(writer, task_id, cmd, arg, pending))
        self.tasks.add(task)
        mine.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(mine.discard)
        return f"queued {task_id}\n"

    async def handle(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """One client connection (Swoole's onConnect/onReceive/onClose)."""
        pending = [0]  # this client's tasks queued or running
        mine: set[asyncio.Task] = set()
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").strip()
                if line.lower() == "quit":
                    break
                reply = self.command(line, writer, pending, mine)
                writer.write(reply.encode())
                await writer.drain()
            # quit or end of input: the results still owed come first, then bye.
            await asyncio.gather(*mine, return_exceptions=True)
            writer.write(b"bye\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def serve(opts: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    executor = MQExecutor(opts.key, opts.workers)
    app = Server(executor, opts.max_pending)
    try:
        server = await asyncio.start_server(app.handle, opts.host, opts.port)
        host, port = server.sockets[0].getsockname()[:2]
        qkey = executor.stats().key & 0xFFFFFFFF
        print(f"tcp_server: listening on {host}:{port} ({opts.workers} task workers, "
              f"queue key 0x{qkey:08x})", flush=True)
        async with server:
            await stop.wait()
            server.close()
            if hasattr(server, "close_clients"):  # Python 3.13+: leaving the block
                server.close_clients()  # waits for every connection to close
            for task in list(app.tasks):
                task.cancel()
            await asyncio.gather(*app.tasks, return_exceptions=True)
    finally:
        # Queued tasks are cancelled, running ones finish; the queue is removed.
        await loop.run_in_executor(None, lambda: executor.shutdown(wait=True,
                                                                   cancel_futures=True))
    print("tcp_server: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="asyncio TCP server offloading slow "
                                     "work to mqexecutor task workers (seeds 003/004)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=9501, help="0: any free port; "
                        "default 9501 as the seeds")
    parser.add_argument("--workers", type=int, default=2, help="task workers (default 2)")
    parser.add_argument("--max-pending", type=int, default=100, metavar="N",
                        help="tasks queued or running per client at most (default 100)")
    parser.add_argument("--key", type=lambda s: int(s, 0), default=None,
                        help="SysV key of the task queue (default: a private queue)")
    opts = parser.parse_args(argv)
    if opts.workers < 1 or opts.max_pending < 1:
        parser.error("--workers and --max-pending must be >= 1")
    return asyncio.run(serve(opts))


if __name__ == "__main__":
    sys.exit(main())
