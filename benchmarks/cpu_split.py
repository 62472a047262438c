#!/usr/bin/env python3
"""Where the CPU of a burst goes: each thread of the submitting process and
each task worker, in microseconds per task, during the submits and during the
wait that follows.

    python benchmarks/cpu_split.py [--mode 2|3] [-n 100000] [--runs 3] [--module]

Runs figure 1 of run.py in this process: ``submit(inc, i)`` for i in
range(n), then ``concurrent.futures.wait`` on them all, on a pool of 2 workers
warmed up beforehand, ``--runs`` times. ``inc`` is defined in this script (a
``__main__`` function, sent by value) unless ``--module`` (workload.inc).
Before and after each phase it reads the CPU time (user + system) of every
thread of this process from /proc/self/task and of every worker (the
grandchildren of this process: its manager's children) from /proc, and prints
the differences per task, with the phases' wall times and the garbage
collector's time (gc.callbacks; it runs in whichever thread allocates).

What it shows: the submitting process's threads share one GIL, so their sum
per task bounds the throughput (1e6 / that sum, in tasks/s), whatever the
workers do. The clock ticks of /proc are 10 ms: use n of 100,000 or more.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

TICK = os.sysconf("SC_CLK_TCK")


def inc(x):
    return x + 1


def _cpu(path: str) -> tuple[str, float]:
    """(thread name, CPU seconds) from a /proc .../stat file."""
    with open(path) as f:
        stat = f.read()
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return name, (int(fields[11]) + int(fields[12])) / TICK


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def snapshot(workers: list[int]) -> dict[str, float]:
    """CPU seconds of each thread of this process and of each worker."""
    out = {}
    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        name, cpu = _cpu(f"/proc/self/task/{tid}/stat")
        name = names.get(int(tid), name)
        label = "submitting thread" if int(tid) == os.getpid() else f"thread {name}"
        out[label if label not in out else f"{label} {tid}"] = cpu
    for i, pid in enumerate(workers):
        total = 0.0
        for tid in os.listdir(f"/proc/{pid}/task"):
            total += _cpu(f"/proc/{pid}/task/{tid}/stat")[1]
        out[f"worker {i}"] = total
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", type=int, choices=(2, 3), default=2,
                        help="2: targeted, 3: preemptive (default 2)")
    parser.add_argument("-n", type=int, default=100_000, help="tasks per run")
    parser.add_argument("--runs", type=int, default=3, help="bursts, one after the other")
    parser.add_argument("--module", action="store_true",
                        help="submit workload.inc (a module function) instead of this "
                             "script's inc")
    args = parser.parse_args()

    import mqexecutor
    if args.module:
        import workload
        fn = workload.inc
    else:
        fn = inc
    gc_time = [0.0, 0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_time[1] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_time[1]

    gc.callbacks.append(on_gc)
    with mqexecutor.MQExecutor(max_workers=2, mode=args.mode) as ex:
        cf.wait([ex.submit(fn, i) for i in range(16)])
        workers = [w for m in _children(os.getpid()) for w in _children(m)]
        print(f"Python {sys.version.split()[0]}, mode {args.mode}, "
              f"{'module' if args.module else '__main__'} function, {args.n} tasks, "
              f"{len(workers)} workers; CPU in µs per task (submit phase + wait phase)")
        submit = ex.submit
        for _ in range(args.runs):
            gc.collect()
            gc_time[0] = 0.0
            a = snapshot(workers)
            t0 = time.perf_counter()
            fs = [submit(fn, i) for i in range(args.n)]
            t1 = time.perf_counter()
            b = snapshot(workers)
            cf.wait(fs)
            t2 = time.perf_counter()
            c = snapshot(workers)
            per = 1e6 / args.n
            print(f"  {args.n / (t2 - t0):,.0f} tasks/s: submits {1e3 * (t1 - t0):.0f} ms, "
                  f"wait {1e3 * (t2 - t1):.0f} ms, gc {1e3 * gc_time[0]:.0f} ms")
            owner = 0.0
            for label in c:
                s, w = b.get(label, 0) - a.get(label, 0), c[label] - b.get(label, 0)
                if not label.startswith("worker"):
                    owner += s + w
                print(f"    {label:32s} {per * s:5.1f} + {per * w:5.1f} = {per * (s + w):5.1f}")
            print(f"    {'submitting process, all threads':32s} {per * owner:21.1f}"
                  f"  (bound: {args.n / owner if owner else 0:,.0f} tasks/s)")
            del fs
    return 0


if __name__ == "__main__":
    sys.exit(main())
