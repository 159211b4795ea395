"""The words the streams type: a given text, else the default corpus, else a builtin paragraph."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LoadTestError

# Relative to where the command runs (the repo root); next to the checkout as a fallback.
DEFAULT_TEXT = Path("../shared/data/gutenberg/test.txt")
_CHECKOUT_TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "gutenberg" / "test.txt"
# Used when no corpus is on disk: the opening of Jane Austen's *Emma* (1815, public domain).
BUILTIN_TEXT = """\
Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition,
seemed to unite some of the best blessings of existence; and had lived nearly twenty-one
years in the world with very little to distress or vex her. She was the youngest of the two
daughters of a most affectionate, indulgent father; and had, in consequence of her sister's
marriage, been mistress of his house from a very early period. Her mother had died too long
ago for her to have more than an indistinct remembrance of her caresses; and her place had
been supplied by an excellent woman as governess, who had fallen little short of a mother in
affection. Sixteen years had Miss Taylor been in Mr. Woodhouse's family, less as a governess
than a friend, very fond of both daughters, but particularly of Emma.
"""


def load_words(text: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """The words streams type: from ``text`` (a str of text, or a path to read), else the default corpus."""
    if text is None:
        path = next((p for p in (DEFAULT_TEXT, _CHECKOUT_TEXT) if p.is_file()), None)
        content = path.read_text(encoding="utf-8") if path is not None else BUILTIN_TEXT
    elif isinstance(text, str):
        content = text
    else:
        content = Path(text).read_text(encoding="utf-8")
    words = tuple(content.split())
    if not words:
        raise LoadTestError("the load test text has no words")
    return words
