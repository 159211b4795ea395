"""``python -m benchmarks.serving``: the serving benchmark (see the package's docstring)."""

import sys

from benchmarks.serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
