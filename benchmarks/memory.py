"""Parent memory under load, memory per pending task, and the cost of durable mode.

    python benchmarks/memory.py                      # everything (~5 minutes on 2 cores)
    python benchmarks/memory.py --only pending,durable --n 200000

Every configuration runs in a fresh subprocess (``--child``), so each peak RSS
belongs to one configuration. Reported per configuration:

* ``ru_maxrss``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the process
  that submits (KiB on Linux, printed in MiB). Linux carries the high-water mark
  of the image before ``execve`` into it, so it is at least the RSS this
  driver had when it started the child (a few tens of MiB);
* ``VmHWM``: the peak RSS of the child's own memory map (/proc/self/status),
  which has no such floor.

Measurements (workers: 2):

``map``
    ``N`` (default 1,000,000) tiny tasks (``workload.noop1``) through
    ``MQExecutor.map(..., buffersize=B)`` (default 1000), and through
    ProcessPoolExecutor.map in the same run: with ``buffersize`` where Python
    has it (3.14+), else eagerly (``chunksize=1``: one Future per task up
    front, its only mode on older Pythons) and with ``chunksize=1000``.
``pending``
    Both workers held on a gate, then ``P`` (default 100,000) submits that stay
    pending: bytes per pending task = (RSS with P pending - RSS before) / P, for
    MQExecutor and ProcessPoolExecutor.
``durable``
    ``MQExecutor(key, durable=True)`` against ``MQExecutor(key)``, alternating,
    3 runs each: submit rate of 20,000 no-op tasks (the submit loop alone, and
    until every result is in) and the latency of one ``submit(noop).result()``
    (median and p90 of 1,000 in a row). The spool is on the temp directory's
    file system (disk), one file created and one removed per task.

Prints a markdown table per measurement; ``--json PATH`` also writes the raw
results. Explicit keys used here are removed at the end of each child.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
perf = time.perf_counter


# -- measuring ---------------------------------------------------------------------
def _status(field: str) -> float:
    """A field of /proc/self/status (kB), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status("VmRSS")


def hwm_mb() -> float:
    return _status("VmHWM")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def wait_for(path: str, started: str | None = None) -> None:
    """Block until ``path`` exists (at most 10 minutes); mark ``started`` first."""
    if started:
        with open(os.path.join(started, str(os.getpid())), "w"):
            pass
    end = time.monotonic() + 600
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)


def _free_key() -> int:
    from mqexecutor import ipcinfo
    rng = random.SystemRandom()
    while True:
        key = rng.randrange(0x10000000, 0x7FFFFFFF)
        if ipcinfo.queue_info(key) is None:
            return key


# -- child measurements --------------------------------------------------------------
def c_map(spec: dict) -> dict:
    import workload
    n, kind = spec["n"], spec["kind"]
    t0 = perf()
    if kind == "mq":
        from mqexecutor import MQExecutor
        ex = MQExecutor(max_workers=2)
        it = ex.map(workload.noop1, range(n), buffersize=spec.get("buffersize"))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        ex = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
        kw = {"chunksize": spec.get("chunksize", 1)}
        if spec.get("buffersize"):
            kw["buffersize"] = spec["buffersize"]
        it = ex.map(workload.noop1, range(n), **kw)
    count = 0
    for _ in it:
        count += 1
    elapsed = perf() - t0
    out = {"count": count, "seconds": elapsed, "rate": n / elapsed,
           "ru_maxrss_mb": maxrss_mb(), "hwm_mb": hwm_mb()}
    ex.shutdown()
    return out


def c_pending(spec: dict) -> dict:
    import gc
    import multiprocessing

    import workload
    p, kind = spec["p"], spec["kind"]
    tmp = tempfile.mkdtemp(prefix="mqmem-")
    gate, started = os.path.join(tmp, "gate"), os.path.join(tmp, "started")
    os.mkdir(started)
    if kind == "mq":
        from mqexecutor import MQExecutor
        ex = MQExecutor(max_workers=2)
    else:
        from concurrent.futures import ProcessPoolExecutor
        ex = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
    for f in [ex.submit(workload.noop) for _ in range(8)]:
        f.result()
    blockers = [ex.submit(wait_for, gate, started) for _ in range(2)]
    while len(os.listdir(started)) < 2:
        time.sleep(0.01)
    gc.collect()
    time.sleep(0.2)
    before = rss_mb()
    t0 = perf()
    futures = [ex.submit(workload.noop) for _ in range(p)]
    submit_s = perf() - t0
    time.sleep(0.5)  # let the executor's threads settle
    during = rss_mb()
    out = {"before_mb": before, "with_pending_mb": during,
           "bytes_per_task": (during - before) * 1024 * 1024 / p,
           "submit_rate": p / submit_s, "ru_maxrss_mb": maxrss_mb(), "hwm_mb": hwm_mb()}
    if kind == "mq":
        out["backlog"] = ex.stats().backlog
    ex.shutdown(wait=False, cancel_futures=True)
    with open(gate, "w"):
        pass
    ex.shutdown(wait=True)
    for f in blockers:
        f.result()
    del futures
    os.unlink(gate)
    for name in os.listdir(started):
        os.unlink(os.path.join(started, name))
    os.rmdir(started)
    os.rmdir(tmp)
    return out


def c_durable(spec: dict) -> dict:
    import workload

    from mqexecutor import MQExecutor, persistence
    key = _free_key()
    n, lat_n = spec["n"], spec["lat"]
    ex = MQExecutor(key, 2, durable=spec["durable"])
    try:
        for f in [ex.submit(workload.noop) for _ in range(100)]:
            f.result()
        t0 = perf()
        futures = [ex.submit(workload.noop) for _ in range(n)]
        t1 = perf()
        for f in futures:
            f.result()
        t2 = perf()
        lat = []
        for _ in range(lat_n):
            s = perf()
            ex.submit(workload.noop).result()
            lat.append(perf() - s)
        lat.sort()
        return {"submit_rate": n / (t1 - t0), "total_rate": n / (t2 - t0),
                "latency_median_us": statistics.median(lat) * 1e6,
                "latency_p90_us": lat[int(0.9 * len(lat))] * 1e6}
    finally:
        ex.shutdown()
        persistence.remove_queue(key)


CHILDREN = {"map": c_map, "pending": c_pending, "durable": c_durable}


def child_main(spec: dict) -> None:
    sys.path[:0] = [HERE, ROOT]
    result = CHILDREN[spec["what"]](spec)
    print("MEM_RESULT " + json.dumps(result), flush=True)


# -- driver --------------------------------------------------------------------------
def run_child(spec: dict, timeout: float = 1800) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (HERE, ROOT, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith("MEM_RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"child {spec} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return json.loads(lines[-1][len("MEM_RESULT "):])


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="map,pending,durable")
    ap.add_argument("--n", type=int, default=1_000_000, help="tasks through map")
    ap.add_argument("--buffersize", type=int, default=1000)
    ap.add_argument("--pending", type=int, default=100_000, help="pending tasks")
    ap.add_argument("--durable-n", type=int, default=20_000)
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    only = set(args.only.split(","))
    results: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    print(f"python {results['python']}, {os.cpu_count()} CPUs, driver RSS {rss_mb():.0f} MiB")

    if "map" in only:
        n, b = args.n, args.buffersize
        configs = [(f"MQExecutor.map(buffersize={b})",
                    {"what": "map", "kind": "mq", "n": n, "buffersize": b})]
        if sys.version_info >= (3, 14):
            configs.append((f"ProcessPoolExecutor.map(buffersize={b})",
                            {"what": "map", "kind": "ppe", "n": n, "buffersize": b}))
        configs += [("ProcessPoolExecutor.map(chunksize=1), eager",
                     {"what": "map", "kind": "ppe", "n": n, "chunksize": 1}),
                    ("ProcessPoolExecutor.map(chunksize=1000), eager",
                     {"what": "map", "kind": "ppe", "n": n, "chunksize": 1000})]
        rows = []
        for name, spec in configs:
            r = run_child(spec)
            results.setdefault("map", {})[name] = r
            rows.append([name, f"{r['ru_maxrss_mb']:.0f}", f"{r['hwm_mb']:.0f}",
                         f"{r['seconds']:.1f}", f"{r['rate']:,.0f}"])
            print(f"  {name}: {rows[-1]}", flush=True)
        print(f"\n{n:,} tiny tasks through map, 2 workers: parent memory\n")
        print(table(["configuration", "peak RSS ru_maxrss (MiB)", "VmHWM (MiB)", "seconds",
                     "tasks/s"], rows))

    if "pending" in only:
        p = args.pending
        rows = []
        for name, kind in (("MQExecutor", "mq"), ("ProcessPoolExecutor", "ppe")):
            r = run_child({"what": "pending", "kind": kind, "p": p})
            results.setdefault("pending", {})[name] = r
            rows.append([name, f"{r['before_mb']:.0f}", f"{r['with_pending_mb']:.0f}",
                         f"{r['bytes_per_task']:,.0f}", f"{r['ru_maxrss_mb']:.0f}",
                         f"{r['hwm_mb']:.0f}"])
            print(f"  {name}: {rows[-1]}", flush=True)
        print(f"\n{p:,} pending tasks (workers held), parent memory\n")
        print(table(["executor", "RSS before (MiB)", f"RSS with {p:,} pending (MiB)",
                     "bytes per pending task", "peak ru_maxrss (MiB)", "VmHWM (MiB)"], rows))

    if "durable" in only:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(3):
            for durable in (False, True):
                runs[durable].append(run_child({"what": "durable", "durable": durable,
                                                "n": args.durable_n, "lat": 1000}))
        med = {d: {k: statistics.median(r[k] for r in runs[d]) for k in runs[d][0]}
               for d in runs}
        results["durable"] = {"runs": {str(k): v for k, v in runs.items()},
                              "median": {str(k): v for k, v in med.items()}}
        rows = []
        for label, k, fmt in (("submit rate, submit loop (tasks/s)", "submit_rate", "{:,.0f}"),
                              ("submit rate, until all results (tasks/s)", "total_rate",
                               "{:,.0f}"),
                              ("latency submit().result(), median (us)", "latency_median_us",
                               "{:,.0f}"),
                              ("latency, p90 (us)", "latency_p90_us", "{:,.0f}")):
            a, b = med[False][k], med[True][k]
            rows.append([label, fmt.format(a), fmt.format(b), f"{b / a:.2f}"])
        print(f"\ndurable mode, {args.durable_n:,} no-op tasks and 1,000 round trips, "
              f"medians of 3 alternating runs; spool on {tempfile.gettempdir()}\n")
        print(table(["figure", "MQExecutor(key)", "MQExecutor(key, durable=True)",
                     "durable / plain"], rows))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
