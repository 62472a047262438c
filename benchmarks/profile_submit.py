#!/usr/bin/env python3
"""Profile the parent side of mqexecutor's submit throughput, with a no-op module
function in preemptive mode (the module path, figure M1 without arguments).

    python benchmarks/profile_submit.py                   # py-spy, every thread
    python benchmarks/profile_submit.py --tool pyinstrument   # caller thread only
    python benchmarks/profile_submit.py --tool cprofile       # caller thread only

Runs ``[submit(noop) for _ in range(n)]`` then waits for all of them, on a
pool started and warmed up beforehand, and prints where the submitting process
spends its time. py-spy (``pip install py-spy``; needs ptrace permission) samples
every thread, so the collector and monitor threads that compete with the caller
for the GIL show up too; pyinstrument and cProfile see the caller's thread only.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def workload_run(args: argparse.Namespace, profiler=None) -> float:
    import concurrent.futures as cf

    import workload

    import mqexecutor
    ex = mqexecutor.MQExecutor(max_workers=args.workers, mode=args.mode)
    try:
        cf.wait([ex.submit(workload.noop) for _ in range(8 * args.workers)])
        noop, submit = workload.noop, ex.submit
        if profiler is not None:
            profiler.start()
        t0 = time.perf_counter()
        fs = [submit(noop) for _ in range(args.n)]
        t1 = time.perf_counter()
        done, not_done = cf.wait(fs, 300)
        t2 = time.perf_counter()
        if profiler is not None:
            profiler.stop()
        if not_done:
            raise SystemExit(f"{len(not_done)} tasks not done after 300 s")
        print(f"mode {args.mode}, {args.workers} workers, {args.n} no-op tasks: "
              f"submit phase {args.n / (t1 - t0):,.0f}/s, submit+wait {args.n / (t2 - t0):,.0f}/s",
              file=sys.stderr)
        return t2 - t0
    finally:
        ex.shutdown()


def summarize_pyspy(raw_path: str, top: int) -> None:
    """Aggregate py-spy's collapsed stacks ("thread;frame;frame count")."""
    import re
    self_t: collections.Counter = collections.Counter()
    self_fn: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    per_thread: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            thread = frames[0].rpartition("): ")[2] or frames[0]
            frames = frames[1:]
            total += n
            per_thread[thread] += n
            if frames:
                self_t[(thread, frames[-1])] += n
                self_fn[(thread, re.sub(r":\d+\)$", ")", frames[-1]))] += n
            for fr in set(frames):
                incl[(thread, fr)] += n
    print(f"\n{total} samples. Per thread:")
    for th, n in per_thread.most_common():
        print(f"  {100 * n / total:5.1f}%  {th}")
    print(f"\nTop {top} by self time (the frame on top of the stack):")
    for (th, fr), n in self_t.most_common(top):
        print(f"  {100 * n / total:5.1f}%  [{th}] {fr}")
    print(f"\nTop {top} functions by self time (lines of a function added up):")
    for (th, fr), n in self_fn.most_common(top):
        print(f"  {100 * n / total:5.1f}%  [{th}] {fr}")
    print(f"\nTop {top} by inclusive time:")
    for (th, fr), n in incl.most_common(top):
        print(f"  {100 * n / total:5.1f}%  [{th}] {fr}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tool", choices=["py-spy", "pyinstrument", "cprofile", "none"],
                    default="py-spy")
    ap.add_argument("--mode", type=int, default=3, choices=[2, 3])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("-n", "--n", type=int, default=100_000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    args = ap.parse_args()

    if args.tool == "none":
        workload_run(args)
    elif args.tool == "py-spy":
        pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(pyspy):
            pyspy = "py-spy"
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "stacks.txt")
            cmd = [pyspy, "record", "--rate", str(args.rate), "--format", "raw", "--nonblocking",
                   "--threads", "--output", raw, "--", sys.executable, os.path.abspath(__file__),
                   "--tool", "none", "--mode", str(args.mode), "--workers",
                   str(args.workers), "--n", str(args.n)]
            subprocess.run(cmd, check=True)
            summarize_pyspy(raw, args.top)
        print("\nnote: py-spy samples the whole run of the script (start-up, warm-up and "
              "shutdown included; they are short next to the measured loop)")
    elif args.tool == "pyinstrument":
        from pyinstrument import Profiler
        prof = Profiler(interval=0.0002)
        workload_run(args, prof)
        print(prof.output_text(unicode=True, color=False, show_all=False))
    else:
        import cProfile
        import pstats

        class P:
            def __init__(self):
                self.p = cProfile.Profile()

            def start(self):
                self.p.enable()

            def stop(self):
                self.p.disable()

        p = P()
        workload_run(args, p)
        pstats.Stats(p.p).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
