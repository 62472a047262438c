"""Executor.map with the semantics of Python 3.14's ProcessPoolExecutor.map."""
from __future__ import annotations

import itertools
import types

import pytest

from mqexecutor import Mode

from .helpers import Gate, fail_on, gated_identity, mul, pool, sleep_return, square, task_id_of

pytestmark = pytest.mark.timeout(60)


def test_map_ordered_results():
    with pool() as ex:
        assert list(ex.map(square, range(200))) == [i * i for i in range(200)]


def test_map_returns_lazy_iterator():
    with pool() as ex:
        it = ex.map(square, range(5))
        assert isinstance(it, types.GeneratorType) or hasattr(it, "__next__")
        assert next(it) == 0
        assert list(it) == [1, 4, 9, 16]


def test_map_empty():
    with pool() as ex:
        assert list(ex.map(square, [])) == []
        assert list(ex.map(square, [], chunksize=5)) == []
        assert list(ex.map(square, [], buffersize=3)) == []


def test_map_multiple_iterables_zip_semantics():
    with pool() as ex:
        assert list(ex.map(pow, [2, 3, 4], [5, 6])) == [32, 729]
        assert list(ex.map(mul, range(10), itertools.count(1), chunksize=3)) == \
            [i * (i + 1) for i in range(10)]
        assert list(ex.map(mul, "ab", [2, 3, 4], buffersize=1)) == ["aa", "bbb"]


def test_map_lambda():
    with pool() as ex:
        assert list(ex.map(lambda x, y: x - y, [10, 20], [1, 2])) == [9, 18]


@pytest.mark.parametrize("chunksize", [1, 2, 7, 100, 1000])
def test_map_chunksize_results(chunksize):
    with pool() as ex:
        assert list(ex.map(square, range(500), chunksize=chunksize)) == \
            [i * i for i in range(500)]


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_chunksize_passes_each_item_whole(chunksize):
    """One iterable: each item is the one argument (a tuple item is not
    unpacked), whether items travel one to a task or as a chunk of items;
    several iterables: one argument from each."""
    items = [(1, 2), (3,), (), [4, 5, 6], "ab", None]
    with pool() as ex:
        assert list(ex.map(repr, items, chunksize=chunksize)) == [repr(i) for i in items]
        assert list(ex.map(pow, [2, 3, 4], [3, 2, 1], chunksize=chunksize)) == [8, 9, 4]


def test_map_chunksize_groups_items_into_tasks():
    with pool() as ex:
        ids = list(ex.map(task_id_of, range(10), chunksize=5))
        assert len(set(ids[:5])) == 1
        assert len(set(ids[5:])) == 1
        assert ids[0] != ids[5]
        ids1 = list(ex.map(task_id_of, range(4)))
        assert len(set(ids1)) == 4


@pytest.mark.parametrize("bad", [0, -1])
def test_map_chunksize_below_one_is_value_error(bad):
    with pool() as ex:
        with pytest.raises(ValueError):
            ex.map(square, range(3), chunksize=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_map_buffersize_below_one_is_value_error(bad):
    with pool() as ex:
        with pytest.raises(ValueError):
            ex.map(square, range(3), buffersize=bad)


@pytest.mark.parametrize("bad", [1.5, "4", None.__class__])
def test_map_buffersize_not_int_is_type_error(bad):
    with pool() as ex:
        with pytest.raises(TypeError):
            ex.map(square, range(3), buffersize=bad)


def test_map_buffersize_true_is_one():
    """Python 3.14 checks ``isinstance(buffersize, int)``: True is taken as 1."""
    with pool() as ex:
        it = ex.map(square, range(5), buffersize=True)
        assert ex.stats().running + ex.stats().completed == 1
        assert list(it) == [0, 1, 4, 9, 16]


def test_map_exception_raised_when_its_item_is_reached():
    with pool() as ex:
        it = ex.map(fail_on, range(6), [3] * 6)
        assert [next(it), next(it), next(it)] == [0, 10, 20]
        with pytest.raises(ValueError, match="bad item 3"):
            next(it)


def test_map_exception_in_chunk():
    with pool() as ex:
        it = ex.map(fail_on, range(10), [7] * 10, chunksize=4)
        got = [next(it) for _ in range(4)]
        assert got == [0, 10, 20, 30]
        # items 4..7 share a chunk: the chunk's error comes when it is reached
        with pytest.raises(ValueError, match="bad item 7"):
            next(it)


def test_map_timeout(tmp_path):
    gate = Gate(tmp_path)
    with pool() as ex:
        try:
            it = ex.map(gated_identity, [gate.path] * 3, range(3), timeout=0.5)
            with pytest.raises(TimeoutError):
                next(it)
        finally:
            gate.open()


def test_map_timeout_not_hit():
    with pool() as ex:
        assert list(ex.map(square, range(20), timeout=30)) == [i * i for i in range(20)]


def test_map_buffersize_infinite_iterator():
    with pool() as ex:
        it = ex.map(square, itertools.count(), buffersize=4)
        assert list(itertools.islice(it, 25)) == [i * i for i in range(25)]
        it.close()


def test_map_buffersize_with_chunks_infinite_iterator():
    with pool() as ex:
        it = ex.map(square, itertools.count(), buffersize=2, chunksize=3)
        assert list(itertools.islice(it, 20)) == [i * i for i in range(20)]
        it.close()


def test_map_buffersize_bounds_read_ahead():
    consumed = []

    def source():
        for i in itertools.count():
            consumed.append(i)
            yield i

    with pool() as ex:
        it = ex.map(square, source(), buffersize=4)
        # nothing beyond the buffer is submitted before results are read
        assert len(consumed) <= 4 + 1
        for k in range(1, 21):
            assert next(it) == (k - 1) ** 2
            assert len(consumed) <= k + 4 + 1, (k, len(consumed))
        assert len(consumed) >= 20
        it.close()


def test_map_without_buffersize_submits_everything_eagerly():
    consumed = []

    def source():
        for i in range(50):
            consumed.append(i)
            yield i

    with pool() as ex:
        it = ex.map(square, source())
        assert len(consumed) == 50  # as ProcessPoolExecutor.map: eager submit
        assert list(it) == [i * i for i in range(50)]


def test_map_targeted_mode():
    with pool(mode=Mode.TARGETED) as ex:
        assert list(ex.map(square, range(100), chunksize=7)) == [i * i for i in range(100)]


def test_map_iterator_closed_early_pool_stays_usable():
    with pool() as ex:
        it = ex.map(square, range(1000))
        assert next(it) == 0
        it.close()
        assert ex.submit(square, 4).result(timeout=10) == 16


def test_map_results_survive_executor_shutdown_when_done():
    with pool() as ex:
        it = ex.map(sleep_return, [0.05] * 10, range(10))
    # shutdown(wait=True) waited for every task: the results can be read now
    assert list(it) == list(range(10))


def add3(*args):
    return sum(args) * 3


@pytest.mark.timeout(120)
def test_map_matches_builtin_map_property():
    """Random iterables, chunk sizes and buffer sizes: the same items, in the
    same order, as the builtin map (zip semantics for several iterables)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    with pool() as ex:
        @hypothesis.settings(max_examples=60, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(
            lists=st.lists(st.lists(st.integers(-10**6, 10**6), max_size=40),
                           min_size=1, max_size=3),
            chunksize=st.integers(1, 12),
            buffersize=st.one_of(st.none(), st.integers(1, 6)),
            as_iterators=st.booleans())
        def check(lists, chunksize, buffersize, as_iterators):
            iterables = [iter(x) if as_iterators else x for x in lists]
            got = list(ex.map(add3, *iterables, chunksize=chunksize,
                              buffersize=buffersize))
            assert got == list(map(add3, *lists))

        check()
