"""The seeds' servers as examples: examples/udp_gateway.py (seed 002) and
examples/tcp_server.py (seeds 003/004), run as subprocesses on 127.0.0.1 with
an ephemeral port, fed bounded traffic, stopped with SIGINT/SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from . import helpers
from .test_external import EXAMPLES

UDP_GATEWAY = os.path.join(EXAMPLES, "udp_gateway.py")
TCP_SERVER = os.path.join(EXAMPLES, "tcp_server.py")
ROOT = os.path.dirname(EXAMPLES)


def ipcs_keys() -> set[int]:
    """Keys of every message queue, from ``ipcs -q``."""
    out = subprocess.run(["ipcs", "-q"], capture_output=True, text=True, check=True).stdout
    return {int(p[0], 16) & 0xFFFFFFFF for p in (line.split() for line in out.splitlines())
            if len(p) >= 2 and p[0].startswith("0x") and p[1].isdigit()}


class Example:
    """An example server as a subprocess; output to a file in ``tmp_path``."""

    def __init__(self, tmp_path, script: str, *args: str):
        self.path = os.path.join(str(tmp_path), os.path.basename(script) + ".out")
        self.file = open(self.path, "w")
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, script, "--port", "0", *args],
                                     stdout=self.file, stderr=subprocess.STDOUT,
                                     cwd=str(tmp_path), env=env)

    def output(self) -> str:
        with open(self.path) as f:
            return f.read()

    def wait_banner(self, pattern: str, timeout: float = 30.0) -> re.Match:
        found = []

        def check():
            m = re.search(pattern, self.output())
            if m:
                found.append(m)
            return bool(found) or self.proc.poll() is not None

        helpers.wait_until(check, timeout)
        if not found:
            self.kill()
            raise AssertionError(f"no banner {pattern!r}:\n{self.output()}")
        return found[0]

    def stop(self, signum: int, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not stop within {timeout} s:\n{self.output()}") \
                from None
        self.file.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.file.close()


# --------------------------------------------------------------------------
# UDP gateway
# --------------------------------------------------------------------------

def udp_exchange(port: int, packets: list[bytes], timeout: float = 5.0,
                 burst: bool = False) -> list[bytes]:
    """Send ``packets`` to 127.0.0.1:port; returns the replies (one each).
    ``burst``: send all first, then read; else one at a time."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        if burst:
            for p in packets:
                s.sendto(p, ("127.0.0.1", port))
            return [s.recvfrom(100)[0] for _ in packets]
        out = []
        for p in packets:
            s.sendto(p, ("127.0.0.1", port))
            out.append(s.recvfrom(100)[0])
        return out
    finally:
        s.close()


@pytest.mark.timeout(90)
def test_udp_gateway_queues_packets_to_competing_workers(tmp_path):
    ex = Example(tmp_path, UDP_GATEWAY, "--workers", "2", "--max-inflight", "64",
                 "--max-packet", "1000")
    try:
        m = ex.wait_banner(r"listening on udp://127\.0\.0\.1:(\d+) .*queue key (0x[0-9a-f]+)")
        port, key = int(m.group(1)), int(m.group(2), 16)
        assert key in ipcs_keys()
        packets = [f"hello{i}".encode() for i in range(40)]
        assert udp_exchange(port, packets) == [b"OK\n"] * 40
        assert udp_exchange(port, [b"", b"x" * 1500]) == [b"ER\n", b"ER\n"]
        # every queued packet is processed by one worker, each exactly once
        helpers.wait_until(lambda: ex.output().count("[Worker ") >= 40, 15)
    finally:
        code = ex.stop(signal.SIGINT)
    out = ex.output()
    assert code == 0, out
    lines = re.findall(r"\[Worker (\d)\] (hello\d+)", out)
    assert sorted(text for _, text in lines) == sorted(p.decode() for p in packets)
    assert {w for w, _ in lines} <= {"0", "1"}
    assert "received 42, queued 40, processed 40, failed 0, busy 0, errors 2" in out
    assert key not in ipcs_keys(), "the gateway left its queue behind"


@pytest.mark.timeout(90)
def test_udp_gateway_answers_busy_when_overloaded(tmp_path):
    ex = Example(tmp_path, UDP_GATEWAY, "--workers", "2", "--max-inflight", "2",
                 "--work-ms", "400")
    try:
        m = ex.wait_banner(r"listening on udp://127\.0\.0\.1:(\d+) .*queue key (0x[0-9a-f]+)")
        port, key = int(m.group(1)), int(m.group(2), 16)
        replies = udp_exchange(port, [f"burst{i}".encode() for i in range(10)], burst=True)
        accepted, busy = replies.count(b"OK\n"), replies.count(b"BUSY\n")
        # 2 in flight at most: the burst (sent in well under the 400 ms a packet
        # takes) gets 2 OK; a gateway stalled by a loaded machine may admit a few more
        assert 2 <= accepted <= 4 and accepted + busy == 10, replies
        # once those in flight are done, packets are accepted again
        assert helpers.wait_until(lambda: ex.output().count("[Worker ") >= accepted, 15)
        ok = False
        for _ in range(50):
            reply = udp_exchange(port, [b"later"])
            if reply == [b"OK\n"]:
                ok = True
                break
            assert reply == [b"BUSY\n"], reply
            busy += 1  # the collector had not seen the results yet
            time.sleep(0.1)
        assert ok, "the gateway never accepted packets again"
    finally:
        code = ex.stop(signal.SIGTERM)  # the packet accepted last is still processed
    out = ex.output()
    assert code == 0, out
    assert f"queued {accepted + 1}, processed {accepted + 1}, failed 0, busy {busy}," in out
    assert out.count("[Worker ") == accepted + 1 and "] later" in out
    assert key not in ipcs_keys()


# --------------------------------------------------------------------------
# asyncio TCP server
# --------------------------------------------------------------------------

def tcp_session(port: int, commands: list[str], timeout: float = 20.0) -> list[str]:
    """Send ``commands`` (then quit) on one connection; returns every reply line
    until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("".join(c + "\n" for c in commands) + "quit\n").encode())
        data = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode().splitlines()


@pytest.mark.timeout(90)
def test_tcp_server_offloads_and_replies_when_done(tmp_path):
    ex = Example(tmp_path, TCP_SERVER, "--workers", "2", "--max-pending", "3")
    try:
        m = ex.wait_banner(r"listening on 127\.0\.0\.1:(\d+) .*queue key (0x[0-9a-f]+)")
        port, key = int(m.group(1)), int(m.group(2), 16)
        lines = tcp_session(port, ["sleep 0.6", "ping", "sum 100000", "bogus", "sum x"])
        assert lines[:5] == ["queued 1", "pong", "queued 2",
                             "error - unknown command 'bogus'", "error - sum needs a number"]
        done = {line.split()[1]: line for line in lines[5:7]}
        assert set(done) == {"1", "2"} and lines[-1] == "bye", lines
        assert done["2"].startswith(f"done 2 {sum(i * i for i in range(100000))} worker ")
        assert done["1"].startswith("done 1 0.6 worker ")
        # the slow task finished last: the event loop answered while it ran
        assert lines.index(done["2"]) < lines.index(done["1"])
        # per-client bound: the fourth pending task is refused
        lines = tcp_session(port, ["sleep 0.8"] * 4)
        assert [x.split()[0] for x in lines[:4]] == ["queued", "queued", "queued", "busy"]
        assert sum(x.startswith("done ") for x in lines) == 3 and lines[-1] == "bye"
        # two clients at once are served concurrently
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: tcp_session(port, ["sum 1000", "ping"]),
                                    range(2)))
        for lines in results:
            assert "pong" in lines and any(x.endswith(" worker 0") or x.endswith(" worker 1")
                                           for x in lines if x.startswith("done "))
    finally:
        code = ex.stop(signal.SIGTERM)
    out = ex.output()
    assert code == 0 and "tcp_server: stopped" in out, out
    assert key not in ipcs_keys(), "the server left its queue behind"


@pytest.mark.timeout(60)
def test_tcp_server_stops_on_sigint_with_a_client_connected(tmp_path):
    ex = Example(tmp_path, TCP_SERVER, "--workers", "1")
    try:
        m = ex.wait_banner(r"listening on 127\.0\.0\.1:(\d+) .*queue key (0x[0-9a-f]+)")
        port, key = int(m.group(1)), int(m.group(2), 16)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"sleep 0.2\nsleep 0.2\nsleep 0.2\n")
        assert s.recv(100).startswith(b"queued 1")
    finally:
        code = ex.stop(signal.SIGINT)
    s.close()
    assert code == 0, ex.output()
    assert key not in ipcs_keys()
