"""docs/scaling.md: the same code on MQExecutor and on dask.distributed.

The task function of the main example (``send_chunk`` of examples/sms_fanout.py,
imported unchanged from the examples directory) runs through ``fan_out``, a
function that only knows the ``concurrent.futures.Executor`` interface: once on
an MQExecutor, once on a dask ``LocalCluster`` through ``Client.get_executor()``.
Both runs must write the same files and report the same rows.
"""
from __future__ import annotations

import concurrent.futures
import filecmp
import importlib.util
import io
import os
import sys

import pytest

from mqexecutor import MQExecutor, Mode
from mqexecutor.progress import progress_map

from .helpers import shutdown_or_fail

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed not installed: pip install mqexecutor[dask]")

pytestmark = pytest.mark.timeout(120)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
ROWS = 3000
CHUNKS = 8


def load_example():
    """examples/sms_fanout.py as the module ``sms_fanout``, imported with
    examples/ on sys.path (before any pool starts: task workers import it by
    name, as pickle sends its functions by reference)."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module("sms_fanout")


sms = load_example()


# The function of docs/scaling.md: it takes any concurrent.futures executor.
def fan_out(executor: concurrent.futures.Executor, db: str, out_dir: str,
            rows: int, chunks: int) -> list[dict]:
    """Send every customer's SMS through ``executor``; the chunks' reports."""
    futures = [executor.submit(sms.send_chunk, i, lo, hi, db, out_dir)
               for i, (lo, hi) in enumerate(sms.split(rows, chunks))]
    return [f.result() for f in futures]


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sms") / "customers.sqlite3")
    sms.ensure_database(path, ROWS)
    return path


@pytest.fixture
def dask_executor(tmp_path):
    """A concurrent.futures executor backed by a one-process dask cluster."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None,
                                  local_directory=str(tmp_path / "dask")) as cluster, \
            distributed.Client(cluster) as client:
        with client.get_executor(pure=False) as executor:  # tasks with side effects
            yield executor


def outcome(reports: list[dict], out_dir: str) -> list[tuple]:
    """What must not depend on the executor: chunk, rows, file name."""
    return [(r["chunk"], r["rows"], os.path.relpath(r["path"], out_dir)) for r in reports]


def test_sms_task_same_outcome_on_mqexecutor_and_dask(database, dask_executor, tmp_path):
    mq_out = tmp_path / "mq"
    dask_out = tmp_path / "dask-out"
    mq_out.mkdir()
    dask_out.mkdir()

    ex = MQExecutor(max_workers=2)
    try:
        mq_reports = fan_out(ex, database, str(mq_out), ROWS, CHUNKS)
    finally:
        shutdown_or_fail(ex)
    dask_reports = fan_out(dask_executor, database, str(dask_out), ROWS, CHUNKS)

    assert outcome(mq_reports, str(mq_out)) == outcome(dask_reports, str(dask_out))
    assert sum(r["rows"] for r in mq_reports) == ROWS
    # MQExecutor's task workers know their id; dask's threads are not task workers.
    assert {r["worker"] for r in mq_reports} <= {0, 1}
    assert {r["worker"] for r in dask_reports} == {None}
    assert {r["pid"] for r in dask_reports} == {os.getpid()}  # processes=False
    assert os.getpid() not in {r["pid"] for r in mq_reports}
    # Byte-identical output files, and each run passes the example's own check.
    names = sorted(os.listdir(mq_out))
    assert names == sorted(os.listdir(dask_out)) and len(names) == CHUNKS
    match, mismatch, errors = filecmp.cmpfiles(mq_out, dask_out, names, shallow=False)
    assert (mismatch, errors) == ([], [])
    for out in (mq_out, dask_out):
        ok, detail = sms.check_output(str(out), ROWS)
        assert ok, detail


def test_sms_task_targeted_mqexecutor_matches_dask(database, dask_executor, tmp_path):
    """The targeted run of the example (submit_to) writes what dask writes."""
    mq_out = tmp_path / "mq"
    dask_out = tmp_path / "dask-out"
    mq_out.mkdir()
    dask_out.mkdir()
    ex = MQExecutor(max_workers=2, mode=Mode.TARGETED)
    try:
        futures = [ex.submit_to(i % 2, sms.send_chunk, i, lo, hi, database, str(mq_out))
                   for i, (lo, hi) in enumerate(sms.split(ROWS, CHUNKS))]
        mq_reports = [f.result(timeout=60) for f in futures]
    finally:
        shutdown_or_fail(ex)
    assert [r["worker"] for r in mq_reports] == [i % 2 for i in range(CHUNKS)]
    dask_reports = fan_out(dask_executor, database, str(dask_out), ROWS, CHUNKS)
    assert outcome(mq_reports, str(mq_out)) == outcome(dask_reports, str(dask_out))
    names = sorted(os.listdir(mq_out))
    assert filecmp.cmpfiles(mq_out, dask_out, names, shallow=False)[1:] == ([], [])


def test_progress_map_on_dask(dask_executor):
    """mqexecutor.progress_map takes a dask executor too."""
    pytest.importorskip("tqdm")
    out = io.StringIO()
    got = list(progress_map(dask_executor, pow, range(20), [2] * 20, chunksize=3, file=out))
    assert got == [i * i for i in range(20)]
    assert "20/20" in out.getvalue().strip().split("\r")[-1]


def test_dask_exception_propagates_like_mqexecutor(dask_executor):
    """A task's exception reaches the caller the same way on both."""
    ex = MQExecutor(max_workers=1)
    try:
        with pytest.raises(sms.sqlite3.OperationalError):
            ex.submit(sms.read_rows, "/nonexistent/db.sqlite3", 0, 10).result(timeout=30)
    finally:
        shutdown_or_fail(ex)
    with pytest.raises(sms.sqlite3.OperationalError):
        dask_executor.submit(sms.read_rows, "/nonexistent/db.sqlite3", 0, 10).result(
            timeout=30)
