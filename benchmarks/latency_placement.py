#!/usr/bin/env python3
"""Round-trip latency by where the threads run: ``submit(fn, i).result()``
with the submitting process's threads and the task workers pinned to CPUs.

    python benchmarks/latency_placement.py [--mode 2|3] [-n 2000] [--pools 2]

For each layout, ``--pools`` fresh pools of 2 workers (warmed up first) each
time ``-n`` sequential round trips of a function defined in this script, and
the median of each pool is printed, in microseconds. The layouts, set with
``os.sched_setaffinity`` after the warm-up (the process's threads one by one;
the workers are the grandchildren of this process, its manager's children):

* ``together``: the calling thread and the collector on CPU 0, the workers on CPU 1;
* ``apart``: the calling thread on CPU 0, the collector (and the monitor) on CPU 1,
  the workers anywhere;
* ``crossed``: the calling thread and the workers on CPU 1, the collector on CPU 0;
* ``free``: nothing pinned (what a user gets).

What it shows (docs/benchmarks.md, "Latency"): whether the calling thread and
the collector share a CPU decides between about 30 and 70-120 µs here. Needs 2
CPUs or more.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from cpu_split import _children  # noqa: E402

LAYOUTS = ("together", "apart", "crossed", "free")


def inc(x):
    return x + 1


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def place(layout: str, workers: list[int]) -> None:
    """Pin this process's threads and ``workers`` as ``layout`` says."""
    me = os.getpid()
    if layout == "free":
        return
    caller, other = {"together": ({0}, {0}), "apart": ({0}, {1}),
                     "crossed": ({1}, {0})}[layout]
    for tid in os.listdir(f"/proc/{me}/task"):
        os.sched_setaffinity(int(tid), caller if int(tid) == me else other)
    if layout in ("together", "crossed"):
        for pid in workers:
            _pin(pid, {1})


def one_pool(mode: int, layout: str, n: int) -> float:
    """Median round trip of ``n`` sequential submit().result() calls, µs."""
    import mqexecutor
    everywhere = os.sched_getaffinity(0)
    try:
        with mqexecutor.MQExecutor(max_workers=2, mode=mode) as ex:
            cf.wait([ex.submit(inc, i) for i in range(16)])
            place(layout, [w for m in _children(os.getpid()) for w in _children(m)])
            for i in range(200):
                ex.submit(inc, i).result()
            samples = []
            clock = time.perf_counter_ns
            for i in range(n):
                t = clock()
                ex.submit(inc, i).result()
                samples.append(clock() - t)
    finally:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), everywhere)
    return statistics.median(samples) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", type=int, choices=(2, 3), default=3,
                        help="2: targeted, 3: preemptive (default 3)")
    parser.add_argument("-n", type=int, default=2000, help="round trips per pool")
    parser.add_argument("--pools", type=int, default=2, help="pools per layout")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        parser.error("needs CPUs 0 and 1")
    print(f"Python {sys.version.split()[0]}, mode {args.mode}, {args.n} round trips per pool; "
          "median per pool, µs")
    for layout in args.layouts:
        medians = [one_pool(args.mode, layout, args.n) for _ in range(args.pools)]
        print(f"  {layout:9s} " + "  ".join(f"{m:6.1f}" for m in medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())
