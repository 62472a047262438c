"""Functions sent by value (``__main__``, notebook cells, lambdas, closures)
are pickled once while what they refer to is unchanged (mqexecutor.functions):
a task still sees what its function saw at submit time. A global or a closure
variable rebound between two submits, a function redefined, a helper it calls
redefined: the next task sees it. An object changed in place is not seen (the
workers keep the copy they got), as documented in docs/guide.md."""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from mqexecutor import functions, spill

from .helpers import REPO, pool, producer_subdir, run_script
from .test_notebook import kernel_manager  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(60)

SCENARIO = textwrap.dedent("""
    import json, sys
    from mqexecutor import MQExecutor

    x = 1
    items = [1]

    def helper():
        return "helper 1"

    def f():
        return x, helper(), len(items)

    def make_counter(start):
        n = start
        def counter():
            return n
        def set_n(v):
            nonlocal n
            n = v
        return counter, set_n

    if __name__ == "__main__":
        seen = []
        with MQExecutor(max_workers=int(sys.argv[1])) as ex:
            run = lambda fn: ex.submit(fn).result(timeout=30)
            seen.append(run(f))                      # as defined
            x = 2                                    # a global rebound
            seen.append(run(f))
            def helper():                            # a function it calls, redefined
                return "helper 2"
            seen.append(run(f))
            def f():                                 # the function itself, redefined
                return "new code", x
            seen.append(run(f))
            counter, set_n = make_counter(10)
            seen.append(run(counter))
            set_n(11)                                # a closure variable rebound
            seen.append(run(counter))
            def g():
                return len(items)
            seen.append(run(g))
            items.append(2)                          # changed in place: not seen
            seen.append(run(g))
            items = [1, 2, 3]                        # rebound: seen
            seen.append(run(g))
            seen.append([run(lambda i=i: i * 2) for i in range(3)])  # new lambdas
        print(json.dumps(seen))
""")

EXPECTED = [[1, "helper 1", 1], [2, "helper 1", 1], [2, "helper 2", 1], ["new code", 2],
            10, 11, 1, 1, 3, [0, 2, 4]]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_sees_what_its_function_saw_at_submit_time(tmp_path, workers):
    proc = run_script(SCENARIO, tmp_path, str(workers), env={"PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == EXPECTED


def test_a_function_is_pickled_once_while_unchanged():
    """FnInfo.value() gives the same pickle while nothing it refers to is
    rebound, a new one after, and gives up (None) after MAX_REBUILDS."""
    namespace: dict = {}
    exec("y = 1\ndef h():\n    return y\n", namespace)
    h = namespace["h"]
    info = functions.fn_info(h)
    assert info.by_value and info.reference is None
    first = info.value(h)
    assert info.value(h) is first
    namespace["y"] = 2
    second = info.value(h)
    assert second is not first and second.digest != first.digest
    for i in range(functions.FnInfo.MAX_REBUILDS):
        namespace["y"] = 100 + i
        info.value(h)
    namespace["y"] = -1
    assert info.value(h) is None  # what it refers to keeps changing


def test_a_pool_writes_one_file_per_function_content(tmp_path):
    """The pickle of a __main__-like function goes once to a file of the pool;
    tasks carry its reference; the file goes at shutdown (leak check)."""
    namespace: dict = {"__name__": "__main__"}
    exec("def twice(v):\n    return 2 * v\n", namespace)
    twice = namespace["twice"]
    def function_files(ex):
        return [p for p in spill.list_files(producer_subdir(ex))
                if os.path.basename(p).startswith("f")]

    with pool(max_workers=2) as ex:
        assert function_files(ex) == []
        assert [f.result(timeout=30) for f in [ex.submit(twice, i) for i in range(50)]] \
            == [2 * i for i in range(50)]
        assert len(function_files(ex)) == 1
        assert list(ex.map(twice, range(5))) == [0, 2, 4, 6, 8]
        assert len(function_files(ex)) == 1
        namespace["twice"] = lambda v: v  # a new object under its name: a new pickle
        exec("def thrice(v):\n    return twice(v) * 3\n", namespace)
        assert ex.submit(namespace["thrice"], 2).result(timeout=30) == 6
        assert len(function_files(ex)) == 2


NOTEBOOK_CELLS = [
    "from mqexecutor import MQExecutor\nex = MQExecutor(max_workers=2)\nx = 1",
    "def f():\n    return x",
    "print('cell', ex.submit(f).result(timeout=30))",
    "x = 2",
    "print('cell', ex.submit(f).result(timeout=30))",
    "def f():\n    return -x",
    "print('cell', ex.submit(f).result(timeout=30))",
    "items = [1]\ndef g():\n    return len(items)\nprint('cell', ex.submit(g).result(timeout=30))",
    "items.append(2)\nprint('cell', ex.submit(g).result(timeout=30))",
    "ex.shutdown()",
]


@pytest.mark.timeout(150)
def test_in_a_notebook_a_rebound_global_and_a_redefined_function_are_seen(
        kernel_manager, tmp_path):
    """The same in a real Jupyter kernel: cells rebind a global and redefine
    the function between submits."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    nbclient.NotebookClient(nb, km=kernel_manager, timeout=60, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = [line for c in nb.cells for o in c.get("outputs", [])
               if o.get("output_type") == "stream" for line in o["text"].splitlines()
               if line.startswith("cell ")]
    assert printed == ["cell 1", "cell 2", "cell -2", "cell 1", "cell 1"]
