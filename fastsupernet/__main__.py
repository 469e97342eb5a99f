"""``python -m fastsupernet``: see :mod:`fastsupernet.cli`."""
import sys

from fastsupernet.cli import run

if __name__ == "__main__":
    sys.exit(run())
