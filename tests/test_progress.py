"""mqexecutor.progress: progress() and progress_map() drive real tqdm bars over
real MQExecutor pools. The bars write to an io.StringIO, which the tests read."""
from __future__ import annotations

import concurrent.futures
import io
import re
import sys
import threading
import time

import pytest

from mqexecutor.progress import progress, progress_map

from .helpers import Gate, fail_on, gated_identity, pool, square

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tqdm_installed():
    return pytest.importorskip("tqdm", reason="tqdm not installed: pip install "
                                              "mqexecutor[progress]")


def bar_counts(text: str) -> list[tuple[int, int]]:
    """Every 'n/total' a tqdm bar printed, in order."""
    return [(int(n), int(t)) for n, t in re.findall(r"(\d+)/(\d+) \[", text)]


def final_state(text: str) -> str:
    """The last refresh of a text bar (tqdm separates refreshes with '\\r')."""
    return text.strip().split("\r")[-1]


def slow_square(x, delay):
    time.sleep(delay)
    return x * x


# --------------------------------------------------------------------------
# progress(): as_completed with a bar
# --------------------------------------------------------------------------

def test_progress_yields_every_future_and_bar_reaches_total(tqdm_installed):
    out = io.StringIO()
    with pool() as ex:
        fs = [ex.submit(square, i) for i in range(30)]
        seen = list(progress(fs, desc="squares", file=out))
    assert len(seen) == 30 and set(seen) == set(fs)
    assert sorted(f.result() for f in seen) == [i * i for i in range(30)]
    last = final_state(out.getvalue())
    assert last.startswith("squares: 100%"), last
    assert "30/30" in last


def test_progress_yields_in_completion_order(tqdm_installed, tmp_path):
    gate = Gate(tmp_path)
    out = io.StringIO()
    with pool() as ex:
        slow = ex.submit(gated_identity, gate.path, "slow")
        fast = [ex.submit(square, i) for i in range(5)]
        it = progress([slow, *fast], file=out, mininterval=0, miniters=1)
        first = [next(it) for _ in range(5)]  # the gated task cannot be done yet
        assert set(first) == set(fast)
        assert not slow.done()
        assert bar_counts(out.getvalue())[-1] == (5, 6)
        gate.open()
        assert next(it) is slow and slow.result() == "slow"
        with pytest.raises(StopIteration):
            next(it)
    assert "6/6" in final_state(out.getvalue())


def test_progress_total_and_duplicates(tqdm_installed):
    out = io.StringIO()
    with pool() as ex:
        f1, f2 = ex.submit(square, 3), ex.submit(square, 4)
        seen = list(progress([f1, f2, f1], total=2, file=out))
    assert sorted(f.result() for f in seen) == [9, 16]
    assert "2/2" in final_state(out.getvalue())


def test_progress_yields_failed_futures(tqdm_installed):
    out = io.StringIO()
    with pool() as ex:
        fs = [ex.submit(fail_on, i, 3) for i in range(6)]
        results, errors = [], []
        for f in progress(fs, file=out):
            try:
                results.append(f.result())
            except ValueError as exc:
                errors.append(str(exc))
    assert sorted(results) == [0, 10, 20, 40, 50]
    assert errors == ["bad item 3"]
    assert "6/6" in final_state(out.getvalue())


def test_progress_timeout(tqdm_installed, tmp_path):
    gate = Gate(tmp_path)
    out = io.StringIO()
    with pool() as ex:
        try:
            slow = ex.submit(gated_identity, gate.path, 1)
            it = progress([slow], timeout=0.3, file=out)
            t0 = time.monotonic()
            with pytest.raises(concurrent.futures.TimeoutError):
                next(it)
            assert time.monotonic() - t0 < 5
        finally:
            gate.open()
        assert slow.result(timeout=30) == 1


# --------------------------------------------------------------------------
# progress_map(): ordered map with a bar
# --------------------------------------------------------------------------

def test_progress_map_ordered_results_and_full_bar(tqdm_installed):
    out = io.StringIO()
    n = 12
    with pool() as ex:
        # later items finish first, results still come in input order
        delays = [0.02 * (n - i) for i in range(n)]
        got = list(progress_map(ex, slow_square, range(n), delays, desc="map", file=out))
    assert got == [i * i for i in range(n)]
    last = final_state(out.getvalue())
    assert last.startswith("map: 100%"), last
    assert f"{n}/{n}" in last


@pytest.mark.parametrize("chunksize", [1, 4, 7, 100])
def test_progress_map_chunksize_counts_items(tqdm_installed, chunksize):
    out = io.StringIO()
    with pool() as ex:
        got = list(progress_map(ex, lambda a, b: a * b, range(23), range(100, 200),
                                chunksize=chunksize, file=out))
    assert got == [a * b for a, b in zip(range(23), range(100, 200))]
    assert "23/23" in final_state(out.getvalue())


def test_progress_map_bar_advances_as_items_complete(tqdm_installed, tmp_path):
    """Item 0 is held back; the bar must count items 1..4 while the caller is
    still waiting for item 0's result."""
    gate = Gate(tmp_path)
    out = io.StringIO()
    first: list = []
    with pool() as ex:
        try:
            paths = [gate.path] + [str(tmp_path)] * 4  # tmp_path exists: no wait
            it = progress_map(ex, gated_identity, paths, range(5), file=out,
                              mininterval=0, miniters=1)
            reader = threading.Thread(target=lambda: first.append(next(it)))
            reader.start()
            deadline = time.monotonic() + 20
            while (not bar_counts(out.getvalue())
                   or bar_counts(out.getvalue())[-1] != (4, 5)):
                assert time.monotonic() < deadline, out.getvalue()
                time.sleep(0.01)
            assert first == []  # item 0 not returned yet
        finally:
            gate.open()
        reader.join(30)
        assert first == [0]
        assert list(it) == [1, 2, 3, 4]
    assert "5/5" in final_state(out.getvalue())


def test_progress_map_exception_propagates(tqdm_installed):
    out = io.StringIO()
    with pool() as ex:
        it = progress_map(ex, fail_on, range(10), [4] * 10, file=out)
        got = []
        with pytest.raises(ValueError, match="bad item 4"):
            for value in it:
                got.append(value)
        assert got == [0, 10, 20, 30]
        # the pool still works afterwards
        assert list(progress_map(ex, square, range(3), file=io.StringIO())) == [0, 1, 4]


def test_progress_map_exception_in_chunk(tqdm_installed):
    with pool() as ex:
        it = progress_map(ex, fail_on, range(10), [7] * 10, chunksize=3,
                          file=io.StringIO())
        got = []
        with pytest.raises(ValueError, match="bad item 7"):
            for value in it:
                got.append(value)
        assert got == [0, 10, 20, 30, 40, 50]  # chunk [6, 7, 8] fails whole


def test_progress_map_timeout_cancels_the_rest(tqdm_installed, tmp_path):
    gate = Gate(tmp_path)
    with pool(max_workers=1) as ex:
        try:
            it = progress_map(ex, gated_identity, [gate.path] * 4, range(4),
                              timeout=0.3, file=io.StringIO())
            with pytest.raises(concurrent.futures.TimeoutError):
                next(it)
        finally:
            gate.open()


def test_progress_map_empty_and_bad_chunksize(tqdm_installed):
    out = io.StringIO()
    with pool() as ex:
        assert list(progress_map(ex, square, [], file=out)) == []
        with pytest.raises(ValueError):
            progress_map(ex, square, range(3), chunksize=0)
    assert final_state(out.getvalue()).startswith("0it")  # tqdm's empty bar


def test_progress_map_any_executor(tqdm_installed):
    """Nothing MQExecutor-specific: a ThreadPoolExecutor works the same way."""
    out = io.StringIO()
    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        got = list(progress_map(ex, slow_square, range(8), [0.01] * 8, chunksize=3,
                                file=out))
    assert got == [i * i for i in range(8)]
    assert "8/8" in final_state(out.getvalue())


def test_progress_map_submits_eagerly(tqdm_installed, tmp_path):
    """Like Executor.map, the tasks run even before the iterator is read."""
    with pool() as ex:
        marker = tmp_path / "ran"
        it = progress_map(ex, lambda p: open(p, "w").close(), [str(marker)],
                          file=io.StringIO())
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert list(it) == [None]


# --------------------------------------------------------------------------
# tqdm missing
# --------------------------------------------------------------------------

def test_missing_tqdm_names_the_extra(monkeypatch):
    """With tqdm not importable (None in sys.modules makes the import fail, as
    if it were not installed), both functions raise ImportError at the call."""
    for name in [m for m in sys.modules if m == "tqdm" or m.startswith("tqdm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        f = ex.submit(square, 2)
        with pytest.raises(ImportError, match=re.escape("pip install mqexecutor[progress]")):
            progress([f])
        with pytest.raises(ImportError, match=re.escape("pip install mqexecutor[progress]")):
            progress_map(ex, square, range(3))
        assert f.result() == 4
