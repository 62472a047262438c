"""Runs ONE measurement for ONE executor kind in a fresh process, prints JSON.

Invoked by run.py as ``python child.py '<json spec>'``; never needs to be run by
hand. A fresh process per measurement keeps state (memory, warm caches, loky's
reusable executor) from leaking between executor kinds, and makes the peak RSS
of the process belong to one configuration.

The task functions of the default figures, ``inc`` and ``ident``, are defined
here, so that in this process they are functions of ``__main__``: what a script
or a notebook submits, and what executors cannot pickle by reference the way
they do a module's function. Spec ``"fn": "module"`` uses the same functions
imported from workload.py instead (the "module functions" table).

ProcessPoolExecutor with forkserver or spawn, and multiprocessing.Pool where
that is the default, re-import this file in their workers as ``__mp_main__`` to
find ``__main__.inc``: nothing below runs on import but definitions (main() is
behind ``if __name__ == "__main__"``).

The last stdout line starting with ``BENCH_RESULT `` holds the result. The SysV
queue ids a pool created (and the pid of a Jupyter kernel started for the
notebook figure) are written to ``spec["ids_file"]`` as soon as they exist, so
that run.py can remove them if this process has to be killed.
"""
from __future__ import annotations

import collections
import gc
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported from a Jupyter kernel (nbbench.py)
    sys.path.insert(0, HERE)

import adapters  # noqa: E402
import workload  # noqa: E402

perf = time.perf_counter


# -- the task functions of the default figures (functions of __main__ here) ----------
def inc(x):
    """submit, latency and map: one argument, one result."""
    return x + 1


def ident(x):
    """The array round trip: returns its argument."""
    return x


def nap(fn, x, seconds):
    """Warm-up: ``fn(x)`` after a sleep, so that every worker gets one."""
    time.sleep(seconds)
    return fn(x)


def functions(which: str) -> dict:
    """The task functions of spec["fn"]: "main" (this file's) or "module"."""
    if which == "module":
        return {"inc": workload.inc, "ident": workload.ident, "nap": workload.nap}
    if which == "main":
        return {"inc": inc, "ident": ident, "nap": nap}
    raise ValueError(f"unknown function set {which!r}")


# -- memory -------------------------------------------------------------------------
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


# -- what run.py must clean up if this process dies --------------------------------------
def record_ids(path: str | None, queues: list[int] = (), pids: list[int] = ()) -> None:
    """Add SysV queue ids and process-group leaders (a Jupyter kernel) to the
    ids file: ``{"queues": [...], "pids": [...]}``."""
    if not path:
        return
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data["queues"] = sorted(set(data.get("queues", [])) | set(queues))
    data["pids"] = sorted(set(data.get("pids", [])) | set(pids))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_ids(path: str | None) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {"queues": data}
    except (OSError, ValueError, TypeError):
        return {}


def started(ad: adapters.Adapter, spec: dict, workers: int) -> None:
    ad.start(workers)
    record_ids(spec.get("ids_file"), queues=ad.queue_ids())


def warm_up(ad: adapters.Adapter, workers: int, fns: dict, fn: str = "inc",
            arg=None) -> None:
    """Make sure every worker is up and has run ``fns[fn]`` (on ``arg``, or on
    ints) before anything is timed: 2 tasks per worker that sleep 50 ms first,
    so that each worker takes one whatever the executor's way of sharing them
    out, then 4 per worker at once. A worker's first task of a kind can cost
    tens of milliseconds (a function sent by value, an import: numpy for an
    ndarray), and would otherwise land in the figure of whichever worker got
    no warm-up task."""
    f, naps = fns[fn], fns["nap"]
    if arg is not None:
        hs = [ad.submit(naps, f, arg, 0.05) for _ in range(2 * workers)]
        ad.wait_all(hs, 120)
        if ad.errors(hs):
            check_values(ad, hs, 0)  # raises with the first failure
        return
    hs = [ad.submit(naps, f, i, 0.05) for i in range(2 * workers)]
    ad.wait_all(hs, 120)
    check_values(ad, hs, 0)
    hs = [ad.submit(f, i) for i in range(4 * workers)]
    ad.wait_all(hs, 120)
    check_values(ad, hs, 0)


def check_values(ad: adapters.Adapter, hs: list, first: int) -> None:
    """The tasks ``inc(first), inc(first + 1), ...`` behind ``hs`` all returned
    their argument + 1 (after wait_all)."""
    failed = ad.errors(hs)
    if failed:
        bad = next(h for h in hs if (ad.errors([h])))
        try:
            ad.value(bad)
        except BaseException as exc:  # noqa: BLE001 - reported, not raised as is
            raise RuntimeError(f"{failed} of {len(hs)} tasks failed; the first with "
                               f"{type(exc).__name__}: {exc}") from exc
        raise RuntimeError(f"{failed} of {len(hs)} tasks failed")
    n = len(hs)
    total = sum(map(ad.value, hs))
    expected = n * (2 * first + n + 1) // 2
    if total != expected:
        raise RuntimeError(f"wrong results: sum {total}, expected {expected}")


def percentile(sorted_values: list, q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def latency_stats(samples_ns: list[int]) -> dict:
    samples_ns = sorted(samples_ns)
    us = [s / 1000 for s in samples_ns]
    return {"median_us": percentile(us, 50), "p99_us": percentile(us, 99),
            "min_us": us[0], "max_us": us[-1], "mean_us": sum(us) / len(us)}


# -- measurements ------------------------------------------------------------------
def m_throughput(ad: adapters.Adapter, spec: dict, fns: dict) -> dict:
    """``inc(i)`` for i in range(n): submit all then wait (method "submit"), or
    consume map(inc, range(n), chunksize) (method "map"). Reports tasks/s and
    the process's peak RSS; every result is checked after the clock stops."""
    w, n, method = spec["workers"], spec["n"], spec.get("method", "submit")
    fn = fns["inc"]
    base = rss_mb()
    started(ad, spec, w)
    warm_up(ad, w, fns)
    gc.collect()
    out: dict = {}
    if method == "submit":
        submit = ad.submit
        t0 = perf()
        hs = [submit(fn, i) for i in range(n)]
        t1 = perf()
        ad.wait_all(hs, spec.get("task_timeout", 600))
        t2 = perf()
        check_values(ad, hs, 0)
        out["submit_tps"] = n / (t1 - t0)
        del hs
    elif method == "map":
        t0 = perf()
        last = collections.deque(enumerate(ad.map(fn, range(n), spec["chunksize"]), 1),
                                 maxlen=1)
        t2 = perf()
        if not last or last[0] != (n, n):
            raise RuntimeError(f"map returned {last[0] if last else None} last, "
                               f"expected {(n, n)}")
    else:
        raise ValueError(method)
    out["tps"] = n / (t2 - t0)
    out["elapsed_s"] = t2 - t0
    ad.shutdown()
    out["base_rss_mb"] = base
    out["peak_rss_mb"] = peak_rss_mb()
    out["ru_maxrss_mb"] = ru_maxrss_mb()
    return out


def m_latency(ad: adapters.Adapter, spec: dict, fns: dict) -> dict:
    """Sequential submit(inc, i).result() calls: median, p99 (microseconds)."""
    w, n = spec["workers"], spec["n"]
    fn = fns["inc"]
    started(ad, spec, w)
    warm_up(ad, w, fns)
    submit, result = ad.submit, ad.result
    for i in range(spec.get("warmup", 100)):
        result(submit(fn, i), 60)
    samples = []
    wrong = 0
    ns = time.perf_counter_ns
    for i in range(n):
        t0 = ns()
        r = result(submit(fn, i), 60)
        samples.append(ns() - t0)
        if r != i + 1:
            wrong += 1
    ad.shutdown()
    if wrong:
        raise RuntimeError(f"{wrong} of {n} results were wrong")
    return latency_stats(samples)


def m_map(ad: adapters.Adapter, spec: dict, fns: dict) -> dict:
    """Throughput of consuming map(inc, range(n), chunksize) for each
    (chunksize, n) pair of spec["maps"], on one pool."""
    w = spec["workers"]
    fn = fns["inc"]
    started(ad, spec, w)
    warm_up(ad, w, fns)
    collections.deque(ad.map(fn, range(1000), 10), maxlen=0)
    out = {}
    for cs, n in spec["maps"]:
        gc.collect()
        t0 = perf()
        last = collections.deque(enumerate(ad.map(fn, range(n), cs), 1), maxlen=1)
        dt = perf() - t0
        if not last or last[0] != (n, n):
            raise RuntimeError(f"map(chunksize={cs}) ended on {last[0] if last else None}"
                               f" instead of {(n, n)}")
        out[f"cs{cs}_tps"] = n / dt
    ad.shutdown()
    return out


def m_array(ad: adapters.Adapter, spec: dict, fns: dict) -> dict:
    """A float64 ndarray of spec["mb"] MiB passed as argument and returned."""
    import numpy as np
    w, mb, rounds = spec["workers"], spec["mb"], spec["rounds"]
    fn = fns["ident"]
    arr = np.arange(mb * 2**20 // 8, dtype=np.float64)
    started(ad, spec, w)
    warm_up(ad, w, fns)
    warm_up(ad, w, fns, "ident", np.ones(2**17))  # every worker imports numpy
    times = []
    for i in range(rounds):
        gc.collect()
        t0 = perf()
        back = ad.result(ad.submit(fn, arr), 300)
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


def m_startup(ad: adapters.Adapter, spec: dict, fns: dict) -> dict:
    """Constructor to first result of ``inc(1)``, then shutdown() of the idle
    pool (seconds). The library is imported before the clock starts (import_s
    reports it). With spec["threaded"], a thread of this process's own waits
    on an Event from before the constructor until after shutdown: a notebook
    kernel or a server has threads, and then mqexecutor's manager process is
    a fresh interpreter instead of a fork of this one."""
    import threading
    w = spec["workers"]
    t = perf()
    ad.preload()
    import_s = perf() - t
    stop = threading.Event()
    idle = None
    if spec.get("threaded"):
        idle = threading.Thread(target=stop.wait, name="bench-idle", daemon=True)
        idle.start()
    t0 = perf()
    started(ad, spec, w)
    value = ad.result(ad.submit(fns["inc"], 1), 120)
    t1 = perf()
    ad.shutdown()
    t2 = perf()
    stop.set()
    if idle is not None:
        idle.join()
    if value != 2:
        raise RuntimeError(f"inc(1) returned {value!r}")
    return {"startup_s": t1 - t0, "shutdown_s": t2 - t1, "import_s": import_s}


def m_raw(spec: dict) -> dict:
    """The raw sysv_ipc ping-pong (pingpong.py) for the throughput and latency
    specs: round trips/s with a window of messages in flight, or the round
    trip of one message at a time."""
    import pingpong
    pp = pingpong.PingPong(lambda ids: record_ids(spec.get("ids_file"), queues=ids))
    try:
        if spec["measure"] == "throughput":
            n = spec["n"]
            dt = pp.pipelined(n)
            return {"tps": n / dt, "elapsed_s": dt}
        if spec["measure"] == "latency":
            out = latency_stats(pp.sequential(spec["n"]))
            out.update(pinned_round_trips(pp, spec["n"]))
            return out
        raise ValueError(f"the raw ping-pong has no {spec['measure']!r} measure")
    finally:
        pp.close()


def pinned_round_trips(pp, n: int) -> dict:
    """The ping-pong's median round trip with both processes pinned to one
    CPU, and to two: a wake-up on another CPU costs more than a switch on the
    same one, and unpinned processes get either."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return {}
    if len(cpus) < 2:
        return {}
    out = {}
    try:
        for name, mine, peer in (("one_cpu", cpus[0], cpus[0]), ("two_cpus", cpus[0], cpus[1])):
            os.sched_setaffinity(0, {mine})
            os.sched_setaffinity(pp.pid, {peer})
            out[name + "_median_us"] = latency_stats(pp.sequential(n))["median_us"]
    finally:
        os.sched_setaffinity(0, cpus)
        try:
            os.sched_setaffinity(pp.pid, cpus)
        except OSError:
            pass
    return out


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
    # run.py sends SIGUSR1 before killing a child that hangs: stacks to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    spec = json.loads(sys.argv[1])
    kind = spec.get("kind")
    fns = functions(spec.get("fn", "main"))
    if spec.get("fn", "main") == "main":
        # What the default figures claim: the functions belong to __main__.
        assert fns["inc"].__module__ == "__main__", fns["inc"].__module__
    ad = None
    t = perf()
    try:
        if spec["measure"] == "notebook":
            import nbbench
            out = nbbench.run(spec)
        elif kind in adapters.RAW_KINDS:
            out = m_raw(spec)
        else:
            ad = adapters.make(kind)
            if spec["measure"] != "startup":
                ad.preload()
            out = MEASURES[spec["measure"]](ad, spec, fns)
    except BaseException as exc:  # noqa: BLE001 - report, clean up, exit hard
        import traceback
        err = {"error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(),
               "diagnostics": ad.diagnostics() if ad is not None else {}}
        if ad is not None:
            ad.abort()
        remove_queues(read_ids(spec.get("ids_file")).get("queues", []))
        print("BENCH_ERROR " + json.dumps(err, default=repr), flush=True)
        sys.stderr.flush()
        os._exit(3)
    out["wall_s"] = perf() - t
    out["describe"] = ad.describe() if ad is not None else {}
    sys.stdout.flush()
    print("BENCH_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
