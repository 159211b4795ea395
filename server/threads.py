"""Threads named for the operating system, so ``top -H``, ``ps -L`` and /proc say what each one does.

Python's thread names stay inside Python: every thread of a worker shows up as ``python``.
"""

from __future__ import annotations

import ctypes
import sys

_PR_SET_NAME = 15  # prctl(2)
# The process's own symbols, libc's among them: no library search (find_library runs ldconfig).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def name_this_thread(name: str) -> None:
    """Name the calling thread ``name`` (the kernel keeps 15 bytes); nothing where there is no prctl."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
