"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel.

The kernel is started from a kernelspec written for this test whose argv is
``sys.executable -m ipykernel_launcher``: it is this interpreter and this venv,
whatever 'python3' kernelspec happens to be installed. Needs the notebook extra
(``pip install mqexecutor[notebook]``); skips with that hint without it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time

import pytest

nbformat = pytest.importorskip(
    "nbformat", reason="the notebook extra is not installed: pip install mqexecutor[notebook]")
nbclient = pytest.importorskip(
    "nbclient", reason="the notebook extra is not installed: pip install mqexecutor[notebook]")
pytest.importorskip(
    "ipykernel", reason="the notebook extra is not installed: pip install mqexecutor[notebook]")
pytest.importorskip("numpy", reason="the quickstart notebook uses numpy")
pytest.importorskip("tqdm", reason="the quickstart notebook draws progress bars: "
                                   "pip install mqexecutor[notebook]")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")
KERNEL_NAME = "mqexecutor-test"

#: The quickstart must run in well under a minute (its promise to readers).
NOTEBOOK_BUDGET = 60.0

#: Lines the notebook's cells must print (exact, each on a line of its own).
EXPECTED_LINES = [
    "function ok [0, 1, 4, 9, 16, 25, 36, 49]",
    "lambda ok 42",
    "closure ok 101",
    "targeted ok [0, 1]",
    "progress ok True",
    "array ok True",
    "quick 0.1",
    "timeout ok TaskTimeoutError 0.5",
]
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def kernel_manager(tmp_path):
    """A KernelManager whose only kernelspec runs this very interpreter."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"mqexecutor tests ({sys.executable})",
        "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    spec = ksm.get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    try:
        yield km
    finally:
        # nbclient leaves a kernel it did not start running: stop it here.
        if km.has_kernel:
            km.shutdown_kernel(now=False)


def _tgid_and_ppid(pid: int) -> tuple[int, int] | None:
    """(process id, parent id) of a process or thread id; None when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["Tgid"]), int(fields["PPid"])
    except (OSError, KeyError, ValueError):
        return None


def _in_tree(pid: int, root: int) -> bool:
    """Is process/thread ``pid`` the process ``root`` or one of its descendants?"""
    st = _tgid_and_ppid(pid)
    for _ in range(64):
        if st is None:
            return False
        if st[0] == root:
            return True
        if st[1] <= 1:
            return False
        st = _tgid_and_ppid(st[1])
    return False


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (a pool's manager left running), but
    multiprocessing's resource tracker: tqdm's multiprocessing lock starts one
    where the default start method is forkserver (Python 3.14)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _tgid_and_ppid(int(entry))
            if st is not None and st[1] == pid and st[0] == int(entry):
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if b"multiprocessing.resource_tracker" in f.read():
                            continue
                except OSError:
                    continue
                kids.append(int(entry))
    return kids


def queues_used_by(pid: int) -> list[str]:
    """System V queues last sent to or received from by ``pid``'s process tree."""
    found = []
    with open("/proc/sysvipc/msg") as f:
        next(f)
        for line in f:
            p = line.split()
            key, msqid, lspid, lrpid = int(p[0]), int(p[1]), int(p[5]), int(p[6])
            if _in_tree(lspid, pid) or _in_tree(lrpid, pid):
                found.append(f"msqid={msqid} key=0x{key & 0xFFFFFFFF:08x}")
    return found


def stream_text(cell, name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == name)


@pytest.mark.timeout(150)
def test_quickstart_notebook_runs_top_to_bottom(kernel_manager, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(
        nb, km=kernel_manager, timeout=NOTEBOOK_BUDGET,  # per cell, seconds
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's cwd
        allow_errors=False, record_timing=True)
    t0 = time.monotonic()
    try:
        client.execute()  # CellExecutionError names the failing cell
    finally:
        elapsed = time.monotonic() - t0
        executed = tmp_path / "quickstart.executed.ipynb"
        nbformat.write(nb, str(executed))  # kept for inspection
    # Every executor was shut down by its cell: with the kernel still alive, it
    # has no worker process left and holds no queue.
    kernel_pid = kernel_manager.provisioner.pid
    assert kernel_manager.is_alive()
    assert children_of(kernel_pid) == [], "task workers still running in the kernel"
    assert queues_used_by(kernel_pid) == [], "queues left open by the notebook"

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), "a code cell did not run"
    errors = [o for c in code_cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors

    stdout_lines = [line for c in code_cells for line in stream_text(c).splitlines()]
    missing = [line for line in EXPECTED_LINES if line not in stdout_lines]
    assert not missing, (f"the notebook did not print {missing}; it printed:\n"
                         + "\n".join(stdout_lines))
    # The kernel ran this interpreter (so this venv and this mqexecutor).
    assert f"python {sys.executable}" in stdout_lines
    # What the tasks printed shows under the cell that submitted them.
    timeout_cell = next(c for c in code_cells if "TaskTimeoutError" in c.source)
    printed = stream_text(timeout_cell)
    assert re.search(r"^worker [01] sleeps 0\.1 s$", printed, re.M), printed
    assert re.search(r"^worker [01] sleeps 30 s$", printed, re.M), printed

    # The progress cell drew its bars: widgets when ipywidgets is installed,
    # else tqdm's text bars on stderr, finished at 100%.
    progress_cell = next(c for c in code_cells if "progress_map(" in c.source)
    widgets = [o for o in progress_cell.outputs
               if o.get("output_type") == "display_data" and WIDGET_MIME in o.get("data", {})]
    if importlib.util.find_spec("ipywidgets") is not None:
        assert len(widgets) >= 2, progress_cell.outputs
    else:
        text = stream_text(progress_cell, "stderr")
        assert "60/60" in text and "20/20" in text, text

    assert elapsed < NOTEBOOK_BUDGET, f"the notebook took {elapsed:.1f} s"
