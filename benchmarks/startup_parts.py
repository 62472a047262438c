"""Where a pool's start-up goes: the constructor, the first submit() and the
wait for its result, timed apart, in fresh processes.

    python benchmarks/startup_parts.py [--runs 6] [--workers 2]

Each run is a fresh interpreter that makes ``MQExecutor(max_workers=N)``,
submits one call and waits for it, in four cases: a function defined in the
script (``__main__``: sent by value, so cloudpickle is imported by the
submitting process and by the worker) or a module function
(``operator.neg``), each in a process with one thread (the manager process is
a fork) and with a thread of its own (the manager is a fresh interpreter).
Prints the median and the spread of each part, in milliseconds. Figure 5 of
run.py measures the total of the ``__main__`` cases against the other pools.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = """
import json, sys, threading, time
from mqexecutor import MQExecutor

def inc(x):
    return x + 1

case, threaded, workers = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
if case == "module":
    from operator import neg as fn
else:
    fn = inc
if threaded:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
t0 = time.perf_counter()
ex = MQExecutor(max_workers=workers)
t1 = time.perf_counter()
future = ex.submit(fn, 1)
t2 = time.perf_counter()
future.result(timeout=60)
t3 = time.perf_counter()
ex.shutdown()
if threaded:
    stop.set()
    thread.join()
print(json.dumps({"constructor": t1 - t0, "submit": t2 - t1, "result": t3 - t2,
                  "total": t3 - t0}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=6, help="fresh processes per case")
    parser.add_argument("--workers", type=int, default=2, help="max_workers of the pool")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    print(f"{'case':<28}" + "".join(f"{p:>22}" for p in ("constructor", "submit", "result",
                                                           "total")) + "   (ms)")
    for case in ("__main__", "module"):
        for threaded in (False, True):
            runs = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, "-c", CHILD, case, str(int(threaded)),
                                      str(args.workers)], env=env, capture_output=True,
                                     text=True, timeout=120, check=True).stdout
                runs.append(json.loads(out.splitlines()[-1]))
            label = f"{case}, {'threaded' if threaded else 'one thread'}"
            cells = []
            for part in ("constructor", "submit", "result", "total"):
                ms = sorted(1e3 * r[part] for r in runs)
                cells.append(f"{statistics.median(ms):7.1f} [{ms[0]:.1f}-{ms[-1]:.1f}]")
            print(f"{label:<28}" + "".join(f"{c:>22}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
