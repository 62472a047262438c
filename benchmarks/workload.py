"""Module-level task functions: the "module functions" table of the report.

The default figures call functions defined in child.py's own ``__main__``
(what a script or a notebook has); these are the same functions imported from
a module, which every executor pickles by reference. memory.py and
profile_submit.py use ``noop`` and ``noop1``.
"""
import time


def inc(x):
    """The task of the submit, latency and map figures: one argument, one result."""
    return x + 1


def ident(x):
    """Returns its argument: the 100 MB array round trip."""
    return x


def nap(fn, x, seconds):
    """Warm-up: ``fn(x)`` after a sleep, so that every worker gets one."""
    time.sleep(seconds)
    return fn(x)


def noop():
    """A no-op task without arguments (memory.py, profile_submit.py)."""
    return None


def noop1(_x):
    """A no-op task of one argument (memory.py's map)."""
    return None
