"""``python -m benchmarks.hostile``: the hostile-input harness (see the package's docstring)."""

import sys

from benchmarks.hostile.cli import main

if __name__ == "__main__":
    sys.exit(main())
