"""The notebook figure: submit throughput and latency inside a real Jupyter kernel.

run.py starts child.py with ``{"measure": "notebook", ...}``; child.py calls
``run(spec)`` here, which writes a kernelspec whose argv is this interpreter
(``sys.executable -m ipykernel_launcher``, as tests/test_notebook.py does), and
executes a notebook through nbclient. In the kernel, a cell defines the task
function, ``inc`` (and ``nap``, the warm-up's), so that it is a function of the
kernel's ``__main__``, as a user's is; then one cell per executor kind, in the
order of ``spec["order"]``, measures with child.py's own code:

* submit throughput: ``inc(i)`` for 0 <= i < n, submit all, then wait;
* latency: sequential ``submit(inc, i).result()``, median and p99;

each on a pool of its own, started and warmed up before the clock starts.
ProcessPoolExecutor runs with ``fork`` here: with ``forkserver`` or ``spawn``
its workers cannot find a function defined in a cell (they import
``__main__`` from a file, and a notebook's has none); the ``ppe-forkserver``
cell reports what happens when it is tried.

A kernel has threads of its own (ZMQ, heartbeat, control), so mqexecutor's
manager process is a fresh interpreter here, as in the threaded start-up figure.

Needs nbclient, nbformat and ipykernel (``pip install mqexecutor[notebook]``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_NAME = "mqexecutor-bench"
FIELDS = ("tps", "submit_tps", "median_us", "p99_us")


# -- in the kernel ---------------------------------------------------------------------
def kernel_setup(ids_file: str | None) -> dict:
    """First cell: tell the driver (and run.py, through the ids file) which
    process to kill if the kernel hangs; describe the kernel."""
    import child
    child.record_ids(ids_file, pids=[os.getpid()])
    info = {"pid": os.getpid(), "python": sys.version.split()[0],
            "executable": os.path.basename(sys.executable),
            "threads": len(os.listdir("/proc/self/task"))}
    print("NB_KERNEL " + json.dumps(info), flush=True)
    return info


def measure_in_kernel(kind: str, fns: dict, spec: dict) -> dict:
    """One executor kind: throughput then latency, each on a fresh pool; prints
    ``NB_RESULT {json}``. A failure (e.g. a worker that cannot unpickle a
    cell's function) is reported in the result, not raised."""
    import gc

    import adapters
    import child
    out: dict = {"kind": kind, "fn_module": getattr(fns["inc"], "__module__", None)}
    for what, measure, sub in (
            ("throughput", child.m_throughput,
             {"measure": "throughput", "method": "submit", "n": spec["submit_n"]}),
            ("latency", child.m_latency, {"measure": "latency", "n": spec["latency_n"]})):
        ad = adapters.make(kind)
        sub = dict(sub, workers=spec["workers"], ids_file=spec.get("ids_file"),
                   task_timeout=spec.get("task_timeout", 600))
        try:
            ad.preload()
            res = measure(ad, sub, fns)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            out["error"] = f"{what}: {type(exc).__name__}: {exc}"[:500]
            ad.abort()
            try:
                ad.shutdown()
            except Exception:  # noqa: BLE001
                pass
            break
        finally:
            gc.collect()
        out.update({k: v for k, v in res.items() if k in FIELDS})
        desc = ad.describe()
        if desc.get("manager"):
            out["manager"] = desc["manager"]
    print("NB_RESULT " + json.dumps(out), flush=True)
    return out


# -- the driver (in child.py's process) ------------------------------------------------------
def cells(spec: dict) -> list[str]:
    sub = {k: spec[k] for k in ("workers", "submit_n", "latency_n")}
    sub["ids_file"] = spec.get("ids_file")
    sub["task_timeout"] = spec.get("task_timeout", 600)
    out = [
        "import json, os, sys\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import nbbench\n"
        f"SPEC = json.loads({json.dumps(sub)!r})\n"
        "nbbench.kernel_setup(SPEC['ids_file']);",
        "import time\n\n"
        "def inc(x):\n    return x + 1\n\n"
        "def nap(fn, x, seconds):  # the warm-up's\n"
        "    time.sleep(seconds)\n    return fn(x)",
    ]
    for kind in spec["order"]:
        out.append(f"nbbench.measure_in_kernel({kind!r}, {{'inc': inc, 'nap': nap}}, "
                   "SPEC);")
    return out


def run(spec: dict) -> dict:
    """Execute the notebook in a fresh kernel; {"per_kind": {kind: fields},
    "kernel": {...}, "kernel_start_s", "notebook_s"}."""
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    tmp = tempfile.mkdtemp(prefix="mqbench-nb-")
    km = None
    try:
        spec_dir = os.path.join(tmp, "kernels", KERNEL_NAME)
        os.makedirs(spec_dir)
        with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
            json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher",
                                "-f", "{connection_file}"],
                       "display_name": "mqexecutor benchmarks", "language": "python",
                       # ipykernel's debugger warns about frozen modules on stderr
                       "env": {"PYDEVD_DISABLE_FILE_VALIDATION": "1"}}, f)
        ksm = KernelSpecManager(kernel_dirs=[os.path.join(tmp, "kernels")])
        km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src) for src in cells(spec)]
        client = nbclient.NotebookClient(
            nb, km=km, timeout=spec.get("task_timeout", 600),  # per cell
            resources={"metadata": {"path": tmp}}, allow_errors=False)
        t0 = time.perf_counter()
        try:
            client.execute()
        finally:
            elapsed = time.perf_counter() - t0
            if km.has_kernel:
                km.shutdown_kernel(now=False)
        per_kind: dict = {}
        kernel: dict = {}
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                if o.get("output_type") != "stream" or o.get("name") != "stdout":
                    continue
                for line in o.get("text", "").splitlines():
                    if line.startswith("NB_RESULT "):
                        r = json.loads(line[len("NB_RESULT "):])
                        per_kind[r.pop("kind")] = r
                    elif line.startswith("NB_KERNEL "):
                        kernel = json.loads(line[len("NB_KERNEL "):])
        missing = [k for k in spec["order"] if k not in per_kind]
        if missing:
            raise RuntimeError(f"the notebook printed no result for {missing}")
        return {"per_kind": per_kind, "kernel": kernel, "notebook_s": elapsed}
    finally:
        if km is not None and km.has_kernel:
            km.shutdown_kernel(now=True)
        shutil.rmtree(tmp, ignore_errors=True)
