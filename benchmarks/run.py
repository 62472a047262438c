#!/usr/bin/env python3
"""Benchmark suite of mqexecutor: one command, every executor, every Python, same run.

    python benchmarks/run.py                          # full run, this Python and 3.14
    python benchmarks/run.py --quick                  # smoke run, docs untouched
    python benchmarks/run.py --pythons 3.11,3.14      # the Pythons to measure on

Compares, with the same worker count (``--workers``, default 2), mqexecutor in
targeted (mode 2) and preemptive (mode 3) mode, ProcessPoolExecutor with the
forkserver start method (the baseline of every ratio: Python 3.14's default)
and with fork (Linux's default before 3.14), loky's reusable executor,
multiprocessing.Pool, and a raw sysv_ipc ping-pong (the transport's limit) on:

  submit    throughput of inc(i), submit all then wait (100k tasks)
  latency   one submit(inc, i).result(): median and p99 over 2,000 sequential calls
  map       map(inc, ...) throughput with chunksize 1 and 100
  array     a 100 MiB ndarray passed to ident() and returned (s per round trip)
  startup   constructor to first result, then shutdown of the idle pool; in a
            fresh process, and in one that has a thread of its own
  module    submit and latency again, the functions imported from a module
  notebook  submit and latency inside a Jupyter kernel (nbclient), functions
            defined in a cell, against ProcessPoolExecutor in the same kernel
  workers   throughput with 1, 2, 4, 8 workers
  tasks     throughput and the parent's peak RSS with 1k, 10k, 100k, 1M tasks

The task functions are defined in child.py's own ``__main__`` and take one
argument (``inc(i)`` returns i + 1, ``ident(a)`` returns a), except in the
"module" figure. Every measurement of every executor kind runs in a fresh
subprocess (child.py), ``--repeat`` times, executor kinds interleaved; the report
gives the median, min-max and the ratios of medians to ProcessPoolExecutor.

Each Python of ``--pythons`` runs the whole plan in turn: this interpreter's
version here, any other through ``with-python`` (a Debian unstable chroot, see
.ci/with-python) in a venv of its own made on first use. Output: raw JSON in
benchmarks/results/, the results section of docs/benchmarks.md (between marker
comments) and docs/benchmarks.png.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import adapters  # noqa: E402
import report  # noqa: E402

CHILD = os.path.join(HERE, "child.py")
RESULTS = os.path.join(HERE, "results")
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
DEFAULT_PYTHONS = [THIS_PYTHON] + (["3.14"] if THIS_PYTHON != "3.14" else [])

FIGURES = ["submit", "latency", "map", "array", "startup", "module", "notebook",
           "workers", "tasks"]
ALIASES = {"scaling": ["workers", "tasks"], "all": FIGURES}
#: Figures the raw ping-pong has a figure for (round trips/s, round-trip time).
RAW_FIGURES = ("submit", "latency", "module")
NOTEBOOK_KINDS = adapters.NOTEBOOK_KINDS

FULL = {
    "submit_n": 100_000,
    "latency_n": 2000,
    "maps": [(1, 20_000), (100, 1_000_000)],
    "array_mb": 100,
    "array_rounds": 3,
    "notebook_submit_n": 100_000,
    "notebook_latency_n": 2000,
    "scale_workers": [1, 2, 4, 8],
    "scale_workers_n": 10_000,
    "scale_tasks": [1000, 10_000, 100_000, 1_000_000],
    "big_n": 1_000_000,      # from this many tasks on, --big-method is used
    "big_chunksize": 1000,
    "repeat": 5,
}
QUICK = {
    "submit_n": 5000,
    "latency_n": 300,
    "maps": [(1, 2000), (100, 100_000)],
    "array_mb": 10,
    "array_rounds": 1,
    "notebook_submit_n": 5000,
    "notebook_latency_n": 300,
    "scale_workers": [1, 2, 4, 8],
    "scale_workers_n": 2000,
    "scale_tasks": [1000, 5000, 100_000],
    "big_n": 100_000,
    "big_chunksize": 1000,
    "repeat": 1,
}


# -- specs -------------------------------------------------------------------------
def throughput_spec(cfg: dict, workers: int, n: int, big_method: str,
                    fn: str = "main") -> dict:
    if n >= cfg["big_n"] and big_method == "map":
        return {"measure": "throughput", "workers": workers, "n": n, "method": "map",
                "chunksize": cfg["big_chunksize"], "fn": fn}
    return {"measure": "throughput", "workers": workers, "n": n, "method": "submit",
            "fn": fn}


def figure_specs(fig: str, cfg: dict, workers: int, big_method: str) -> list[dict]:
    if fig == "submit":
        return [throughput_spec(cfg, workers, cfg["submit_n"], "submit")]
    if fig == "latency":
        return [{"measure": "latency", "workers": workers, "n": cfg["latency_n"], "fn": "main"}]
    if fig == "map":
        return [{"measure": "map", "workers": workers, "maps": cfg["maps"], "fn": "main"}]
    if fig == "array":
        return [{"measure": "array", "workers": workers, "mb": cfg["array_mb"],
                 "rounds": cfg["array_rounds"], "fn": "main"}]
    if fig == "startup":
        return [{"measure": "startup", "workers": workers, "threaded": threaded, "fn": "main"}
                for threaded in (False, True)]
    if fig == "module":
        return [throughput_spec(cfg, workers, cfg["submit_n"], "submit", fn="module"),
                {"measure": "latency", "workers": workers, "n": cfg["latency_n"],
                 "fn": "module"}]
    if fig == "notebook":
        return [{"measure": "notebook", "workers": workers,
                 "submit_n": cfg["notebook_submit_n"], "latency_n": cfg["notebook_latency_n"]}]
    if fig == "workers":
        return [throughput_spec(cfg, w, cfg["scale_workers_n"], big_method)
                for w in cfg["scale_workers"]]
    if fig == "tasks":
        return [throughput_spec(cfg, workers, n, big_method) for n in cfg["scale_tasks"]]
    raise ValueError(fig)


def applies(kind: str, fig: str, spec: dict) -> bool:
    """Does executor kind ``kind`` run this spec of figure ``fig``?"""
    if kind in adapters.RAW_KINDS:
        return fig in RAW_FIGURES and (spec["measure"] == "latency" or (
            spec["measure"] == "throughput" and spec.get("method") == "submit"))
    return True


def spec_key(spec: dict) -> str:
    return json.dumps({k: v for k, v in spec.items()
                       if k not in ("ids_file", "task_timeout", "order")}, sort_keys=True)


def default_timeout(spec: dict) -> float:
    """Seconds a child may take before it is killed (generous: ~5x expected)."""
    m = spec["measure"]
    if m == "throughput":
        per = 20_000 if spec.get("method") == "map" else 2000
        return 60 + spec["n"] / per + 5 * spec["workers"]
    if m == "latency":
        return 60 + spec["n"] * 0.005
    if m == "map":
        return 60 + sum(n / (2000 if cs == 1 else 50_000) for cs, n in spec["maps"])
    if m == "array":
        return 60 + spec["rounds"] * spec["mb"] * 0.1
    if m == "notebook":
        return 120 + len(spec.get("order", NOTEBOOK_KINDS)) * (
            30 + spec["submit_n"] / 2000 + spec["latency_n"] * 0.005)
    return 60


# -- SysV queues, processes and spill files -----------------------------------------------
def sysv_queues() -> dict[int, dict]:
    """Message queues of the system: msqid -> {key, uid, qnum, lspid, lrpid}."""
    out: dict[int, dict] = {}
    try:
        with open("/proc/sysvipc/msg") as f:
            header = f.readline().split()
            for line in f:
                row = dict(zip(header, line.split()))
                out[int(row["msqid"])] = {k: row.get(k) for k in
                                          ("key", "uid", "qnum", "lspid", "lrpid")}
    except OSError:
        pass
    return out


def ipcs_q() -> str:
    try:
        return subprocess.run(["ipcs", "-q"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def spill_roots() -> list[str]:
    """Where mqexecutor writes spill files (mirrors mqexecutor.spill.spill_roots,
    without importing the library in this process)."""
    override = os.environ.get("MQEXECUTOR_SPILL_DIR")
    if override:
        return [os.path.abspath(override)]
    name = f"mqexecutor-{os.getuid()}"
    return [os.path.join("/dev/shm", name), os.path.join(tempfile.gettempdir(), name)]


def spill_leftovers(pid: int) -> list[str]:
    """Spill sub-directories a producer of process ``pid`` left behind."""
    found = []
    for root in spill_roots():
        try:
            names = os.listdir(root)
        except OSError:
            continue
        found += [os.path.join(root, n) for n in names if n.startswith(f"p-{pid}-")]
    return found


def remove_queue(qid: int) -> bool:
    try:
        import sysv_ipc
        sysv_ipc.remove_message_queue(qid)
        return True
    except ImportError:
        return subprocess.run(["ipcrm", "-q", str(qid)], capture_output=True).returncode == 0
    except Exception:  # noqa: BLE001 - already gone
        return False


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (zombies excluded)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid``, if its leader is still that group's."""
    if not group_members(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def read_ids(path: str) -> dict:
    """The ids file a child writes: {"queues": [...], "pids": [...]}."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {"queues": list(data)}


# -- the library under test ---------------------------------------------------------------
def snapshot_library(ref: str | None, log, parent: str) -> tuple[str, dict]:
    """Copy mqexecutor/ (the working tree, or git ``ref``) into a new directory
    under ``parent`` that goes first on the children's PYTHONPATH, so that one
    run measures one version even while the library is being edited (and every
    Python of the run measures the same one: ``parent`` is inside the project,
    which with-python mounts).

    Returns (directory, description). Retries a working tree that does not
    import (someone is in the middle of an edit) for up to a minute."""
    parent = os.path.abspath(parent)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lib-", dir=parent)
    try:
        return _snapshot_into(tmp, ref, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _snapshot_into(tmp: str, ref: str | None, log) -> tuple[str, dict]:
    src = os.path.join(ROOT, "mqexecutor")
    for attempt in range(20):
        dst = os.path.join(tmp, "mqexecutor")
        shutil.rmtree(dst, ignore_errors=True)
        if ref:
            archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "mqexecutor"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        else:
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        check = subprocess.run(
            [sys.executable, "-c",
             "import sys; from mqexecutor import MQExecutor; import mqexecutor; "
             "sys.stdout.write(mqexecutor.__file__)"],
            env=dict(os.environ, PYTHONPATH=tmp), capture_output=True, text=True, cwd=tmp)
        if check.returncode == 0 and check.stdout.startswith(tmp):
            break
        if ref:
            raise SystemExit(f"mqexecutor at git {ref} does not import:\n{check.stderr}")
        log(f"note: the working tree's mqexecutor does not import yet (attempt {attempt + 1}),"
            f" retrying in 3 s: {check.stderr.strip().splitlines()[-1:]}")
        time.sleep(3)
    else:
        raise SystemExit("the working tree's mqexecutor does not import; "
                         "try --git-ref HEAD or --no-snapshot")
    desc = {"snapshot": f"git {ref}" if ref else "working tree, copied at the start of the run",
            "snapshot_sources_sha256": sources_hash(os.path.join(tmp, "mqexecutor"))}
    if ref:
        desc["snapshot_commit"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", ref], capture_output=True,
            text=True).stdout.strip()
    with open(os.path.join(tmp, "snapshot.json"), "w") as f:  # for the other Pythons
        json.dump(desc, f)
    return tmp, desc


def compile_library(lib_dir: str) -> None:
    """Byte-compile the snapshot for this Python, as pip does when it installs a
    package: children import it as an installed mqexecutor is imported, even
    under PYTHONDONTWRITEBYTECODE (which stops writing .pyc files, not reading them)."""
    import compileall
    compileall.compile_dir(os.path.join(lib_dir, "mqexecutor"), quiet=1)


# -- running one child -----------------------------------------------------------------
CHILD_ENV: dict | None = None  # environment of the children (PYTHONPATH of the snapshot)


def run_child(spec: dict, timeout: float, log) -> dict:
    """Run one measurement in a fresh process; never raises for the child's faults.

    Returns {"spec", "status": ok|error|timeout|crash, "result"?, "error"?,
    "leaks"?, "wall_s"}."""
    fd, ids_file = tempfile.mkstemp(prefix="mqbench-ids-", suffix=".json")
    os.close(fd)
    spec = dict(spec, ids_file=ids_file, task_timeout=max(5.0, timeout - 15))
    load = _read("/proc/loadavg").split()[:1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, CHILD, json.dumps(spec)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=CHILD_ENV)
    status = None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        try:
            os.kill(proc.pid, signal.SIGUSR1)  # faulthandler: stacks to stderr
            time.sleep(1.0)
        except ProcessLookupError:
            pass
        for pid in read_ids(ids_file).get("pids", []):
            kill_group(pid)  # a Jupyter kernel: its own session, with its pools
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its workers
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    rec: dict = {"spec": {k: v for k, v in spec.items()
                          if k not in ("ids_file", "task_timeout")},
                 "wall_s": wall, "pid": proc.pid, "returncode": proc.returncode,
                 "loadavg_1min_before": float(load[0]) if load else None}
    result = error = None
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
        elif line.startswith("BENCH_ERROR "):
            error = json.loads(line[len("BENCH_ERROR "):])
    if status is None:
        status = "ok" if result is not None and proc.returncode == 0 else (
            "error" if error is not None else "crash")
    rec["status"] = status
    if result is not None:
        rec["result"] = result
    if error is not None:
        rec["error"] = error
    if status != "ok":
        rec["stderr"] = err[-6000:]
    # Leaks: the queues this child's pools created must be gone, and its spill
    # dirs, and every process of its process group (and of a kernel's).
    leaks: dict = {}
    ids = read_ids(ids_file)
    for path in (ids_file, ids_file + ".tmp"):
        try:
            os.unlink(path)
        except OSError:
            pass
    groups = [proc.pid] + list(ids.get("pids", []))
    deadline = time.monotonic() + 3
    while any(group_members(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {g: group_members(g) for g in groups}
    left = {g: m for g, m in left.items() if m}
    if left:
        leaks["processes"] = left
        for g in left:
            kill_group(g)
    alive = [q for q in ids.get("queues", []) if q in sysv_queues()]
    if alive:
        leaks["queues"] = alive
        leaks["queues_removed_by_run_py"] = [q for q in alive if remove_queue(q)]
    spills = [d for g in groups for d in spill_leftovers(g)]
    if spills:
        leaks["spill_dirs"] = spills
        for d in spills:  # this child's own producer directories only
            shutil.rmtree(d, ignore_errors=True)
        leaks["spill_dirs_removed_by_run_py"] = [d for d in spills if not os.path.exists(d)]
    if leaks:
        rec["leaks"] = leaks
        if status == "ok":
            log(f"    WARNING: the measurement leaked after a clean exit: {leaks}")
    return rec


# -- statistics ----------------------------------------------------------------------------
def summarize(values: list[float]) -> dict:
    v = sorted(values)
    out = {"n": len(v), "values": values, "median": statistics.median(v),
           "min": v[0], "max": v[-1]}
    if len(v) >= 2:
        q = statistics.quantiles(v, n=4, method="inclusive")
        out["q1"], out["q3"] = q[0], q[2]
    else:
        out["q1"] = out["q3"] = v[0]
    return out


def build_summary(runs: list[dict]) -> dict:
    """{spec_key: {kind: {field: stats}}} over the ok runs. A notebook run holds
    every kind of its kernel (result["per_kind"])."""
    acc: dict = {}
    for rec in runs:
        if rec["status"] != "ok":
            continue
        spec = dict(rec["spec"])
        kind = spec.pop("kind")
        spec.pop("repeat", None)
        key = spec_key(spec)
        per_kind = rec["result"].get("per_kind") or {kind: rec["result"]}
        for k, res in per_kind.items():
            fields = acc.setdefault(key, {}).setdefault(k, {})
            for name, value in res.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    fields.setdefault(name, []).append(float(value))
    return {key: {kind: {f: summarize(vals) for f, vals in fields.items()}
                  for kind, fields in kinds.items()} for key, kinds in acc.items()}


# -- machine ----------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def sources_hash(pkg: str) -> str:
    """sha256 of the package's .py files (sub-packages included), by relative path."""
    h = hashlib.sha256()
    files = []
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        files += [os.path.join(dirpath, n) for n in filenames if n.endswith(".py")]
    for path in sorted(files):
        h.update(os.path.relpath(path, pkg).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def library_fingerprint() -> dict:
    """git HEAD of the repository and a hash of mqexecutor's sources as they are
    now in the working tree (the library may be edited while the benchmark runs)."""
    fp = {"mqexecutor_sources_sha256": sources_hash(os.path.join(ROOT, "mqexecutor"))}
    try:
        fp["git_head"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "mqexecutor"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        fp["mqexecutor_uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return fp


def machine_info() -> dict:
    cpu = "unknown"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    mem = None
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    from importlib import metadata
    versions = {}
    for pkg in ("mqexecutor", "sysv_ipc", "cloudpickle", "loky", "numpy", "matplotlib",
                "psutil", "ipykernel", "nbclient", "jupyter_client"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    import multiprocessing
    return {
        "cpu_model": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "memory_gib": mem, "kernel": platform.release(), "os": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": versions, "default_start_method": multiprocessing.get_start_method(),
        "msgmax": _read("/proc/sys/kernel/msgmax").strip(),
        "msgmnb": _read("/proc/sys/kernel/msgmnb").strip(),
        "msgmni": _read("/proc/sys/kernel/msgmni").strip(),
        "loadavg_start": _read("/proc/loadavg").split()[:3],
    }


# -- command line ----------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark mqexecutor against ProcessPoolExecutor (forkserver and "
                    "fork), loky, multiprocessing.Pool and a raw sysv_ipc ping-pong, on "
                    "several Pythons (see docs/benchmarks.md).")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: small sizes, 1 repeat, ~1-2 minutes per Python; "
                         "writes its report into the --out directory unless --doc is given")
    ap.add_argument("--pythons", default=",".join(DEFAULT_PYTHONS),
                    help="comma-separated Python versions to run the plan on, in order "
                         f"(default {','.join(DEFAULT_PYTHONS)}); this interpreter's "
                         f"({THIS_PYTHON}) runs here, others through with-python")
    ap.add_argument("--with-python", default=None, metavar="PATH",
                    help="the with-python script (default: $MQX_WITH_PYTHON, "
                         "../shared/tools/with-python, .ci/with-python)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="fresh-process repetitions per figure and executor "
                         "(default 5, --quick 1)")
    ap.add_argument("--workers", type=int, default=2,
                    help="worker processes of every pool (default 2)")
    ap.add_argument("--only", nargs="+", metavar="FIGURE", default=None,
                    help="figures to run: " + ", ".join(FIGURES)
                         + " (also: scaling = workers tasks); default all")
    ap.add_argument("--kinds", nargs="+", default=list(adapters.KINDS),
                    choices=list(adapters.KINDS), help="executors to compare (default all)")
    ap.add_argument("--out", default=RESULTS,
                    help="directory of the raw JSON (default benchmarks/results)")
    ap.add_argument("--doc", default=None,
                    help="markdown file whose results section is regenerated (default "
                         "docs/benchmarks.md for a complete full run; --quick or --only/"
                         "--kinds/--pythons: <out>/quick.md or <out>/partial.md)")
    ap.add_argument("--plot", default=None,
                    help="PNG plot (default docs/benchmarks.png, or <out>/quick.png, "
                         "<out>/partial.png as --doc)")
    ap.add_argument("--no-doc", action="store_true", help="write the JSON only")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds before a child is killed (default: from its size)")
    ap.add_argument("--big-method", choices=["map", "submit"], default="map",
                    help="how the largest task count (1M) is run: map(chunksize=1000) "
                         "(default) or submit of every task")
    ap.add_argument("--git-ref", default=None,
                    help="benchmark mqexecutor as committed at this git ref (e.g. HEAD) "
                         "instead of the working tree")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="import mqexecutor live from the working tree (or, for this "
                         "Python, wherever it is installed), instead of a copy of "
                         "mqexecutor/ taken at the start of the run")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="do not measure: regenerate the doc and plot from a saved JSON")
    # Used by the run of another Python inside with-python: the plan of this
    # Python only, into this JSON, with the library copy the first run made.
    ap.add_argument("--inner-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--library", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    figs: list[str] = []
    for name in args.only or FIGURES:
        for f in ALIASES.get(name, [name]):
            if f not in FIGURES:
                ap.error(f"unknown figure {name!r}; choose from {', '.join(FIGURES)}, scaling")
            if f not in figs:
                figs.append(f)
    args.figures = figs
    args.python_list = []
    for v in args.pythons.split(","):
        v = v.strip()
        if v in ("here", "this"):
            v = THIS_PYTHON
        if v and v not in args.python_list:
            if not (v.startswith("3.") and v[2:].isdigit()):
                ap.error(f"--pythons: {v!r} is not a version like 3.14")
            args.python_list.append(v)
    if not args.python_list:
        ap.error("--pythons: no version given")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if adapters.BASELINE not in args.kinds:
        print(f"note: {adapters.BASELINE} not selected: no ratios to it (the notebook "
              "figure still compares with ppe-fork)", file=sys.stderr)
    return args


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The options of this run that a run of another Python gets too."""
    out = []
    if args.quick:
        out.append("--quick")
    if args.repeat:
        out += ["--repeat", str(args.repeat)]
    out += ["--workers", str(args.workers), "--big-method", args.big_method]
    if args.only:
        out += ["--only", *args.figures]
    if args.kinds != list(adapters.KINDS):
        out += ["--kinds", *args.kinds]
    if args.timeout:
        out += ["--timeout", str(args.timeout)]
    return out


def is_complete(cfg: dict) -> bool:
    """Every figure, every executor, the default Pythons, full sizes."""
    return (not cfg.get("quick") and cfg["figures"] == FIGURES
            and cfg["kinds"] == list(adapters.KINDS)
            and set(DEFAULT_PYTHONS) <= set(cfg.get("pythons", [])))


def write_outputs(data: dict, args: argparse.Namespace) -> None:
    """The report goes to docs/ only for a complete full run (every figure, every
    executor, the default Pythons); a --quick or partial run writes
    <out>/quick.* or <out>/partial.* unless --doc/--plot say otherwise."""
    if args.no_doc:
        return
    cfg = data["config"]
    where = "quick" if cfg.get("quick") else (None if is_complete(cfg) else "partial")
    doc = args.doc or (os.path.join(args.out, where + ".md") if where
                       else os.path.join(ROOT, "docs", "benchmarks.md"))
    png = args.plot or (os.path.join(args.out, where + ".png") if where
                        else os.path.join(ROOT, "docs", "benchmarks.png"))
    plot_ok = report.write_plot(data, png)
    report.write_doc(data, doc, png if plot_ok else None)
    print(f"wrote {doc}" + (f" and {png}" if plot_ok else " (no plot: matplotlib missing?)"))


# -- one Python: the plan, here ---------------------------------------------------------------
def run_plan(args: argparse.Namespace, cfg: dict, log) -> dict:
    """Every figure of the plan for every kind, on this interpreter; the data of
    one Python (report's "format 1")."""
    repeat = cfg["repeat"]
    started = time.time()
    meta = machine_info()
    meta["library_at_start"] = library_fingerprint()
    meta["library_at_start"].update(args.library_desc)
    queues_before = sysv_queues()
    ipcs_before = ipcs_q()
    log(f"mqexecutor benchmarks: {meta['cpu_model']}, {meta['usable_cpus']} cpus, "
        f"Python {meta['python']}, workers={args.workers}, repeat={repeat}, "
        f"figures={' '.join(args.figures)}")
    if queues_before:
        log(f"note: {len(queues_before)} SysV message queue(s) exist before the run "
            f"(ipcs -q); they are not ours and are left alone")

    runs: list[dict] = []
    cache: dict[str, dict] = {}
    kinds = list(args.kinds)
    plan = {fig: figure_specs(fig, cfg, args.workers, args.big_method) for fig in args.figures}
    nb_kinds = [k for k in NOTEBOOK_KINDS if k in kinds]
    for fig, specs in plan.items():
        log(f"[{fig}]")
        for spec in specs:
            for rep in range(repeat):
                if spec["measure"] == "notebook":
                    if not nb_kinds:
                        continue
                    # One kernel per repetition runs every kind, in rotated order.
                    order = nb_kinds[rep % len(nb_kinds):] + nb_kinds[:rep % len(nb_kinds)]
                    todo = [dict(spec, kind="notebook", repeat=rep, order=order)]
                else:
                    # Rotate the order of executor kinds from one repetition to the next.
                    order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
                    todo = [dict(spec, kind=k, repeat=rep) for k in order
                            if applies(k, fig, spec)]
                for full in todo:
                    key = spec_key(full)
                    if key in cache:
                        continue
                    check_environment()
                    timeout = args.timeout or default_timeout(full)
                    rec = run_child(full, timeout, log)
                    cache[key] = rec
                    runs.append(rec)
                    log_record(rec, full, log)

    # Leak check of the whole run: queues now present that were not there before.
    queues_after = sysv_queues()
    new = {q: v for q, v in queues_after.items() if q not in queues_before}
    leaked_ours = sorted({q for r in runs for q in r.get("leaks", {}).get("queues", [])})
    warnings = []
    if leaked_ours:
        warnings.append(f"pools left {len(leaked_ours)} SysV queue(s) behind "
                        f"(msqid {leaked_ours}); run.py removed them")
    if new:
        warnings.append(f"{len(new)} SysV queue(s) appeared during the run that no "
                        f"benchmark child reported (another process on this machine?): "
                        f"{sorted(new)}")
    procs = [r["leaks"]["processes"] for r in runs if r.get("leaks", {}).get("processes")]
    if procs:
        warnings.append(f"processes outlived their measurement (run.py killed them): {procs}")
    spills = [d for r in runs for d in r.get("leaks", {}).get("spill_dirs", [])]
    if spills:
        warnings.append(f"spill directories left behind (run.py removed them): {spills}")
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        warnings.append(f"{len(failed)} measurement(s) failed: " + "; ".join(
            f"{r['spec']['kind']} {r['spec']['measure']} rep {r['spec'].get('repeat')}: "
            f"{r['status']}" for r in failed))
    meta["library_at_end"] = library_fingerprint()
    if (meta["library_at_end"].get("mqexecutor_sources_sha256")
            != meta["library_at_start"].get("mqexecutor_sources_sha256")):
        if args.library_dir:
            meta["library_at_end"]["note"] = ("the working tree changed during the run; "
                                              "the run used its snapshot")
        else:
            warnings.append("mqexecutor's sources changed during the run: results mix versions")
    meta["loadavg_end"] = _read("/proc/loadavg").split()[:3]
    loads = [r["loadavg_1min_before"] for r in runs if r.get("loadavg_1min_before") is not None]
    if loads:
        meta["loadavg_1min_during"] = {"median": statistics.median(loads), "max": max(loads)}
        cpus = meta.get("usable_cpus") or os.cpu_count() or 1
        # The benchmark itself keeps about workers + 1 processes busy.
        if statistics.median(loads) > cpus + 1:
            warnings.append(
                f"the machine was busy: median 1-min load average {statistics.median(loads):.1f}"
                f" (max {max(loads):.1f}) on {cpus} CPUs while measuring; other processes "
                f"competed with the pools, figures are noisier than usual")
    meta["ipcs_q_before"] = ipcs_before
    meta["ipcs_q_after"] = ipcs_q()
    return {
        "format": 1,
        "started": _dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "config": dict(cfg, workers=args.workers, kinds=kinds, figures=args.figures,
                       big_method=args.big_method),
        "machine": meta,
        "plan": {fig: [spec_key(s) for s in specs] for fig, specs in plan.items()},
        "runs": runs,
        "summary": build_summary(runs),
        "warnings": warnings,
    }


class EnvironmentGone(RuntimeError):
    """The files or mounts the run stands on went away."""


def check_environment() -> None:
    """Before each measurement: are this directory and /proc still there? Under
    with-python, another user's run re-mounts /src and, when it ends, unmounts
    /proc, /dev and /dev/shm of the chroot: stop rather than measure nonsense."""
    if not os.path.exists(CHILD) or not os.path.exists("/proc/self/status"):
        raise EnvironmentGone(
            f"{'/proc' if os.path.exists(CHILD) else HERE} is gone: another with-python "
            "run took the chroot's mounts (one user at a time); run again when it is free")


def log_record(rec: dict, full: dict, log) -> None:
    res = rec.get("result", {})
    if res.get("per_kind"):
        brief = "; ".join(
            f"{k}: " + (v["error"][:80] if v.get("error") else ", ".join(
                f"{f}={report.short(v[f])}" for f in ("tps", "median_us") if f in v))
            for k, v in res["per_kind"].items())
    else:
        brief = ", ".join(f"{k}={report.short(v)}" for k, v in res.items()
                          if isinstance(v, (int, float)) and k not in ("wall_s",))
    params = {k: v for k, v in full.items() if k not in ("measure", "kind", "repeat", "order")}
    log(f"  {full['kind']:<14} rep {full['repeat'] + 1} {json.dumps(params)}: "
        f"{rec['status']} ({rec['wall_s']:.1f}s) {brief}")
    if rec["status"] != "ok":
        err = rec.get("error", {}).get("error") or rec.get("stderr", "")[-800:]
        log(f"    {rec['status'].upper()}: {err}")
        if rec.get("error", {}).get("diagnostics"):
            log(f"    diagnostics: {rec['error']['diagnostics']}")
    if rec.get("leaks"):
        log(f"    leaks: {rec['leaks']}")


# -- another Python: the same plan through with-python ------------------------------------------
def find_with_python(args: argparse.Namespace) -> str | None:
    for cand in (args.with_python, os.environ.get("MQX_WITH_PYTHON"),
                 os.path.join(ROOT, "..", "shared", "tools", "with-python"),
                 os.path.join(ROOT, ".ci", "with-python")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def bench_requirements() -> list[str]:
    """mqexecutor's runtime dependencies (pyproject.toml) and what the
    benchmarks use besides: the packages a venv of another Python gets."""
    deps = ["sysv_ipc", "cloudpickle"]
    try:
        import tomllib
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
    except (ImportError, OSError, KeyError, ValueError):
        pass
    return deps + ["numpy", "loky", "nbclient", "nbformat", "ipykernel"]


def run_other_python(version: str, args: argparse.Namespace, stamp: str, log) -> dict:
    """Run this script under Python ``version`` through with-python, which
    mounts the project at /src; returns that run's data (format 1)."""
    tool = find_with_python(args)
    if tool is None:
        raise RuntimeError("with-python not found (--with-python PATH)")
    part = os.path.join(RESULTS, f".part-{version}-{stamp}.json")
    rel = os.path.relpath(part, ROOT)
    venv = f"/opt/mqx-bench-{version}"
    reqs = " ".join(shlex.quote(r) for r in bench_requirements())
    mods = "sysv_ipc, cloudpickle, numpy, loky, nbclient, nbformat, ipykernel"
    inner = [f"{venv}/bin/python", "benchmarks/run.py", "--inner-json", rel,
             *forwarded_args(args)]
    if args.library_dir:
        inner += ["--library", os.path.relpath(args.library_dir, ROOT)]
    else:
        inner += ["--library", "."]  # --no-snapshot: the working tree, live
    cmd = (f"set -e; [ -x {venv}/bin/python ] || /usr/bin/python{version} -m venv {venv}; "
           f"{venv}/bin/python -c 'import {mods}' 2>/dev/null || "
           f"{venv}/bin/pip install --progress-bar off -qq {reqs}; "
           + " ".join(shlex.quote(a) for a in inner))
    log(f"== Python {version}: {os.path.relpath(tool, ROOT)} {version} -- '{cmd}'")
    proc = subprocess.Popen([tool, version, "--", cmd], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        log(f"[{version}] {line}")
        tail = (tail + [line])[-20:]
    rc = proc.wait()
    try:
        with open(part) as f:
            data = json.load(f)
    except (OSError, ValueError):
        errors = [t for t in tail if t.startswith("ERROR") or "Error" in t.split(":", 1)[0]]
        raise RuntimeError(f"with-python {version} exited {rc} without results: "
                           + (errors[-1] if errors else " | ".join(tail[-3:]))) from None
    finally:
        try:
            os.unlink(part)
        except OSError:
            pass
    return data


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        write_outputs(report.load(args.report), args)
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    cfg["repeat"] = args.repeat or cfg["repeat"]
    os.makedirs(args.out, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    global CHILD_ENV
    started = time.time()
    stamp = _dt.datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S")
    wants_mq = any(k.startswith("mq") for k in args.kinds)

    # The library every Python of this run imports: a copy made here (or by
    # the run that started this one inside with-python).
    args.library_dir, args.library_desc, own_snapshot = None, {}, False
    if args.library:
        lib = os.path.abspath(os.path.join(ROOT, args.library))
        if os.path.samefile(lib, ROOT):
            args.library_desc = {"snapshot": "none: the working tree, live"}
        else:
            args.library_dir = lib
            try:  # what the run that made the copy knew of it
                with open(os.path.join(lib, "snapshot.json")) as f:
                    args.library_desc = json.load(f)
            except (OSError, ValueError):
                args.library_desc = {"snapshot": "a copy made by the run of another Python"}
            args.library_desc["snapshot_sources_sha256"] = sources_hash(
                os.path.join(lib, "mqexecutor"))
    elif not args.no_snapshot and wants_mq:
        args.library_dir, args.library_desc = snapshot_library(args.git_ref, log, RESULTS)
        own_snapshot = True
    elif args.no_snapshot:
        args.library_desc = {"snapshot": "none: the installed (live) mqexecutor"}
    if args.library_dir:
        compile_library(args.library_dir)
        pp = os.environ.get("PYTHONPATH")
        CHILD_ENV = dict(os.environ, PYTHONPATH=args.library_dir + (os.pathsep + pp if pp else ""))
    elif args.library:  # the live working tree
        pp = os.environ.get("PYTHONPATH")
        CHILD_ENV = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + pp if pp else ""))

    if args.inner_json:  # one Python, inside with-python
        try:
            data = run_plan(args, cfg, log)
        except EnvironmentGone as exc:
            log(f"ERROR: {exc}")
            return 2
        with open(os.path.join(ROOT, args.inner_json), "w") as f:
            json.dump(data, f, indent=1, default=repr)
        return 1 if any(r["status"] != "ok" for r in data["runs"]) else 0

    pythons: dict[str, dict] = {}
    failures: dict[str, str] = {}
    try:
        for version in args.python_list:
            try:
                if version == THIS_PYTHON:
                    log(f"== Python {version}: here ({sys.executable})")
                    pythons[version] = run_plan(args, cfg, log)
                else:
                    pythons[version] = run_other_python(version, args, stamp, log)
            except (RuntimeError, OSError) as exc:
                failures[version] = str(exc)
                log(f"ERROR: Python {version}: {exc}")
    finally:
        if own_snapshot and args.library_dir:
            shutil.rmtree(args.library_dir, ignore_errors=True)
    duration = time.time() - started
    data = {
        "format": 2,
        "started": _dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "duration_s": duration,
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)]
                            + (sys.argv[1:] if argv is None else argv)),
        "config": dict(cfg, quick=args.quick, workers=args.workers, kinds=list(args.kinds),
                       figures=args.figures, big_method=args.big_method,
                       pythons=list(pythons)),
        "pythons": pythons,
        "failed_pythons": failures,
        "warnings": [f"Python {v}: {w}" for v, d in pythons.items() for w in d["warnings"]]
                    + [f"Python {v} did not run: {e}" for v, e in failures.items()],
    }
    prefix = "quick-" if args.quick else ("" if is_complete(data["config"]) else "partial-")
    path = os.path.join(args.out, prefix + stamp + ".json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=repr)
    # latest.json: the last complete full run (what docs/benchmarks.md shows).
    with open(os.path.join(args.out, prefix + "latest.json"), "w") as f:
        json.dump(data, f, indent=1, default=repr)
    log(f"wrote {path} ({duration:.0f} s)")
    print()
    print(report.text_table(data))
    for w in data["warnings"]:
        log(f"WARNING: {w}")
    if pythons:
        write_outputs(data, args)
    bad = failures or any(r["status"] != "ok" for d in pythons.values() for r in d["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
