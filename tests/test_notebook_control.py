"""In a real Jupyter kernel (nbclient): what a task prints shows under the cell
that submitted it; interrupting the kernel during ``ex.map(...)`` leaves the
executor usable in the next cell; a kernel restart leaves no process and no
private queue behind."""
from __future__ import annotations

import time

import pytest

from .helpers import pid_alive, queue_exists, wait_until
from .test_notebook import kernel_manager  # noqa: F401 - the fixture

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.timeout(150)


def _outputs(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream")


def test_what_a_task_prints_shows_under_its_cell(kernel_manager, tmp_path):  # noqa: F811
    cells = [
        "from mqexecutor import MQExecutor\nimport sys\nex = MQExecutor(max_workers=2)",
        "def chatty(n):\n    print('printed by task', n)\n"
        "    print('to stderr', n, file=sys.stderr)\n    return n",
        "ex.submit(chatty, 1).result(timeout=30)",
        "print('cell 4 only')",
        "ex.submit(print, 'start ' + '\\u00e9' * 20000 + ' end').result(timeout=30)",
        "[f.result(timeout=30) for f in [ex.submit(chatty, i) for i in (5, 6)]]",
        # a cell's tasks keep one Context between them, not one each
        "fs = [ex.submit(abs, -i) for i in range(50)]\n"
        "print(len({id(f._context) for f in fs}), [f.result(timeout=30) for f in fs][-1])",
        "ex.shutdown()",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nbclient.NotebookClient(nb, km=kernel_manager, timeout=60, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert "printed by task 1" in _outputs(nb.cells[2])
    assert "to stderr 1" in _outputs(nb.cells[2])
    assert _outputs(nb.cells[3]) == "cell 4 only\n"
    # longer than a message: relayed in pieces, whole
    assert _outputs(nb.cells[4]) == "start " + "\u00e9" * 20000 + " end\n"
    assert "printed by task 5" in _outputs(nb.cells[5])
    assert "printed by task 6" in _outputs(nb.cells[5])
    assert _outputs(nb.cells[6]) == "1 49\n"


def test_interrupting_a_map_leaves_the_executor_usable(kernel_manager, tmp_path):  # noqa: F811
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in [
        "import time\nfrom mqexecutor import MQExecutor\nex = MQExecutor(max_workers=2)\n"
        "def nap(s):\n    time.sleep(s)\n    return s",
        "list(ex.map(nap, [3] * 6))",
        "print('after', ex.submit(pow, 2, 5).result(timeout=30))",
        "ex.shutdown()",
    ]]
    client = nbclient.NotebookClient(nb, km=kernel_manager, timeout=60, allow_errors=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        started = time.monotonic()
        interrupter = __import__("threading").Timer(1.0, kernel_manager.interrupt_kernel)
        interrupter.start()
        try:
            client.execute_cell(nb.cells[1], 1)
        finally:
            interrupter.join()
        assert time.monotonic() - started < 10
        errors = [o for o in nb.cells[1].outputs if o.get("output_type") == "error"]
        assert errors and errors[0]["ename"] == "KeyboardInterrupt", nb.cells[1].outputs
        client.execute_cell(nb.cells[2], 2)
        assert "after 32" in _outputs(nb.cells[2])
        client.execute_cell(nb.cells[3], 3)


def test_a_kernel_restart_leaves_no_process_and_no_private_queue(kernel_manager, tmp_path):  # noqa: F811,E501
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import json\nfrom mqexecutor import MQExecutor\nex = MQExecutor(max_workers=2)\n"
        "ex.submit(abs, -1).result(timeout=30)\n"
        "print(json.dumps({'manager': ex._state.manager.pid, 'workers': list(ex._processes),"
        " 'keys': [ex.key, ex.reply_key]}))")]
    client = nbclient.NotebookClient(nb, km=kernel_manager, timeout=60, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        import json
        info = json.loads(_outputs(nb.cells[0]).strip().splitlines()[-1])
        kernel_manager.restart_kernel(now=True)
    pids = [info["manager"], *info["workers"]]
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 20), pids
    assert wait_until(lambda: not any(queue_exists(k) for k in info["keys"]), 10)
