"""Runs ONE measurement for ONE executor kind in a fresh process, prints JSON.

Invoked by run.py as ``python child.py '<json spec>'``; never needs to be run by
hand. A fresh process per measurement keeps state (memory, warm caches, loky's
reusable executor) from leaking between executor kinds, and makes the peak RSS
of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` belong to one configuration.

The last stdout line starting with ``BENCH_RESULT `` holds the result. The SysV
queue ids a pool created are written to ``spec["ids_file"]`` as soon as it
exists, so that run.py can remove them if this process has to be killed.
"""
from __future__ import annotations

import collections
import gc
import json
import os
import resource
import sys
import time

import adapters
import workload

perf = time.perf_counter


def rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak RSS of this process so far, in MiB: VmHWM of /proc/self/status.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` would be the same figure if Linux did
    not carry the high-water mark of the pre-exec image over execve(): a child
    started by run.py would then report at least run.py's own RSS. VmHWM
    belongs to this process's memory map only. ru_maxrss is reported too."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def started(ad: adapters.Adapter, spec: dict, workers: int) -> None:
    ad.start(workers)
    path = spec.get("ids_file")
    if path:
        ids = ad.queue_ids()
        with open(path, "w") as f:
            json.dump(ids, f)


def warm_up(ad: adapters.Adapter, workers: int) -> None:
    """Make sure every worker is up before anything is timed."""
    hs = [ad.submit(workload.noop) for _ in range(4 * workers)]
    ad.wait_all(hs, 120)


def percentile(sorted_values: list, q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


# -- measurements ------------------------------------------------------------------
def m_throughput(ad: adapters.Adapter, spec: dict) -> dict:
    """No-op tasks: submit all then wait (method "submit"), or consume
    map(noop1, range(n), chunksize) (method "map"). Reports tasks/s and the
    process's peak RSS."""
    w, n, method = spec["workers"], spec["n"], spec.get("method", "submit")
    base = rss_mb()
    started(ad, spec, w)
    warm_up(ad, w)
    gc.collect()
    out: dict = {}
    if method == "submit":
        noop = workload.noop
        submit = ad.submit
        t0 = perf()
        hs = [submit(noop) for _ in range(n)]
        t1 = perf()
        ad.wait_all(hs, spec.get("task_timeout", 600))
        t2 = perf()
        out["errors"] = ad.errors(hs)
        out["submit_tps"] = n / (t1 - t0)
        del hs
    elif method == "map":
        t0 = perf()
        counter = collections.deque(
            enumerate(ad.map(workload.noop1, range(n), spec["chunksize"]), 1), maxlen=1)
        t2 = perf()
        done = counter[0][0] if counter else 0
        out["errors"] = n - done
    else:
        raise ValueError(method)
    out["tps"] = n / (t2 - t0)
    out["elapsed_s"] = t2 - t0
    ad.shutdown()
    out["base_rss_mb"] = base
    out["peak_rss_mb"] = peak_rss_mb()
    out["ru_maxrss_mb"] = ru_maxrss_mb()
    return out


def m_latency(ad: adapters.Adapter, spec: dict) -> dict:
    """Sequential submit(noop).result() calls: median, p99 (microseconds)."""
    w, n = spec["workers"], spec["n"]
    started(ad, spec, w)
    warm_up(ad, w)
    for _ in range(spec.get("warmup", 100)):
        ad.result(ad.submit(workload.noop), 60)
    samples = []
    noop, submit, result = workload.noop, ad.submit, ad.result
    ns = time.perf_counter_ns
    for _ in range(n):
        t0 = ns()
        result(submit(noop), 60)
        samples.append(ns() - t0)
    ad.shutdown()
    samples.sort()
    us = [s / 1000 for s in samples]
    return {"median_us": percentile(us, 50), "p99_us": percentile(us, 99),
            "min_us": us[0], "max_us": us[-1], "mean_us": sum(us) / len(us)}


def m_map(ad: adapters.Adapter, spec: dict) -> dict:
    """Throughput of consuming map(noop1, range(n), chunksize) for each
    (chunksize, n) pair of spec["maps"], on one pool."""
    w = spec["workers"]
    started(ad, spec, w)
    warm_up(ad, w)
    collections.deque(ad.map(workload.noop1, range(1000), 10), maxlen=0)
    out = {}
    for cs, n in spec["maps"]:
        gc.collect()
        t0 = perf()
        counter = collections.deque(enumerate(ad.map(workload.noop1, range(n), cs), 1),
                                    maxlen=1)
        dt = perf() - t0
        if not counter or counter[0][0] != n:
            raise RuntimeError(f"map(chunksize={cs}) returned {counter[0][0] if counter else 0}"
                               f" items instead of {n}")
        out[f"cs{cs}_tps"] = n / dt
    ad.shutdown()
    return out


def m_array(ad: adapters.Adapter, spec: dict) -> dict:
    """A float64 ndarray of spec["mb"] MiB passed as argument and returned."""
    import numpy as np
    w, mb, rounds = spec["workers"], spec["mb"], spec["rounds"]
    arr = np.arange(mb * 2**20 // 8, dtype=np.float64)
    started(ad, spec, w)
    warm_up(ad, w)
    small = np.ones(2**17)
    ad.result(ad.submit(workload.ident, small), 120)
    times = []
    for i in range(rounds):
        gc.collect()
        t0 = perf()
        back = ad.result(ad.submit(workload.ident, arr), 300)
        times.append(perf() - t0)
        if i == 0:
            if not np.array_equal(back, arr):
                raise RuntimeError("the array came back different")
        elif back.shape != arr.shape or back[-1] != arr[-1]:
            raise RuntimeError("the array came back different")
        del back
    ad.shutdown()
    times.sort()
    return {"rt_s": times[len(times) // 2], "rt_min_s": times[0], "rounds": times,
            "peak_rss_mb": peak_rss_mb()}


def m_startup(ad: adapters.Adapter, spec: dict) -> dict:
    """Constructor to first result, then shutdown() of the idle pool (seconds).
    The library is imported before the clock starts (import_s reports it)."""
    w = spec["workers"]
    t = perf()
    ad.preload()
    import_s = perf() - t
    t0 = perf()
    started(ad, spec, w)
    ad.result(ad.submit(workload.noop), 120)
    t1 = perf()
    ad.shutdown()
    t2 = perf()
    return {"startup_s": t1 - t0, "shutdown_s": t2 - t1, "import_s": import_s}


MEASURES = {"throughput": m_throughput, "latency": m_latency, "map": m_map,
            "array": m_array, "startup": m_startup}


def remove_queues(ids: list[int]) -> None:
    try:
        import sysv_ipc
    except ImportError:
        return
    for qid in ids:
        try:
            sysv_ipc.remove_message_queue(qid)
        except Exception:  # noqa: BLE001 - already gone
            pass


def main() -> None:
    import faulthandler
    import signal
    # run.py sends SIGUSR1 before killing a child that hangs: stacks go to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    spec = json.loads(sys.argv[1])
    ad = adapters.make(spec["kind"])
    if spec["measure"] != "startup":
        ad.preload()
    t = perf()
    try:
        out = MEASURES[spec["measure"]](ad, spec)
    except BaseException as exc:  # noqa: BLE001 - report, clean up, exit hard
        import traceback
        err = {"error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(), "diagnostics": ad.diagnostics()}
        ids = ad.queue_ids() if getattr(ad, "ex", None) is not None else []
        ad.abort()
        remove_queues(ids)
        print("BENCH_ERROR " + json.dumps(err, default=repr), flush=True)
        sys.stderr.flush()
        os._exit(3)
    out["wall_s"] = perf() - t
    out["describe"] = ad.describe()
    sys.stdout.flush()
    print("BENCH_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
