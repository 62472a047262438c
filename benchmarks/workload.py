"""Task functions run by the workers of every executor under test.

They live in their own importable module (not in ``__main__``) so that every
executor can pickle them by reference, including ProcessPoolExecutor's plain
pickle and loky's spawned workers.
"""


def noop():
    """The no-op task of the submit and latency figures."""
    return None


def noop1(_x):
    """The no-op task of map (one argument, returns None)."""
    return None


def ident(x):
    """Returns its argument: map of small ints, 100 MB array round trip."""
    return x
