"""The package's layout: one module per concern, none much over 600 lines, no
import cycle between its modules (imports inside functions and under
TYPE_CHECKING included), and a manager process that does not import the
producer's modules."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import mqexecutor

from .helpers import REPO

PACKAGE = os.path.dirname(mqexecutor.__file__)
#: "none much over 600 lines" (docs/architecture.md)
MAX_LINES = 650


def _modules() -> dict[str, str]:
    found = {}
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    is_package = path.endswith("__init__.py")
    parts = module.split(".") if is_package else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[:len(parts) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
    out.discard("mqexecutor")  # the package's names load lazily (PEP 562)
    return out & set(modules)


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cycles = []

    def visit(node, stack):
        for nxt in graph[node]:
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    done: set[str] = set()
    for module in graph:
        if module not in done:
            visit(module, [module])
    assert not cycles, cycles


def test_no_module_much_over_600_lines():
    long = {m: n for m, p in _modules().items()
            if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, long


def test_the_manager_process_imports_no_producer_module():
    """A manager started as a fresh interpreter imports what it needs only:
    not the executor, the producer side, concurrent.futures or multiprocessing,
    nor what its start-up does not use (json, shutil with bz2 and lzma, random,
    tempfile: 5-6 ms of the start-up of a pool in a threaded process)."""
    code = ("import sys; from mqexecutor.manager.process import main; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO}, check=True).stdout.split()
    unwanted = [m for m in out if m.startswith(("mqexecutor.producer", "mqexecutor.executor",
                                                "concurrent", "multiprocessing", "cloudpickle",
                                                "mqexecutor.deadletter", "mqexecutor.ipcinfo",
                                                "json", "shutil", "bz2", "lzma", "random",
                                                "tempfile"))]
    assert not unwanted, unwanted
