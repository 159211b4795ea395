"""``benchmarks/RESULTS.md``: each benchmark rewrites its own ``## Section`` and leaves the others."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the section of ``path`` under ``heading`` (e.g. ``## Serving``) with ``body``."""
    # Others edit this file too: read it right before writing, touch only this section.
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    section = f"{heading}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
