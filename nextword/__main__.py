"""``python -m nextword``: the same as the ``nextword`` command."""

import sys

from nextword.cli import main

sys.exit(main())
