"""Progress bars for the commands that run longer than a few seconds: on a terminal only."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, **kwargs: Any) -> Iterator[T]:
    """``items``, with a tqdm bar on stderr when it is a terminal; silent in pipes, logs and tests."""
    return iter(
        tqdm(items, desc=desc, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)
    )
