"""``python -m mqexecutor``: the command line (see :mod:`mqexecutor.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
