"""The model's memory in transparent huge pages (Linux, glibc 2.35 or later).

A one-word step reads every weight of the model once (14.5 MB for the demo): in 4 KB pages
that is some 3,500 pages, more than the TLB holds, so every step walks page tables as well
as reading the weights, and the walk grows slower when other work has taken the caches.
In 2 MB pages the same weights are eight. Linux gives a process huge pages where it asks
for them (``madvise``, the kernels' usual setting) and glibc asks for every allocation it
makes when its tunable ``glibc.malloc.hugetlb=1`` is set; onnxruntime allocates its weights
(and their pre-packed copies) through it. Tunables are read only when a process starts, so
``nextword serve`` restarts itself once, in place (same pid, arguments and descriptors),
with the tunable added to ``GLIBC_TUNABLES``. Workers inherit it.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_MODE) -> str:
    """The kernel's transparent huge page setting (always, madvise or never; "" where there is none)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def _glibc_takes_the_tunable() -> bool:
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def environment(env: dict[str, str], mode: str) -> dict[str, str] | None:
    """The environment to restart with so that malloc asks for huge pages, or None when there is
    nothing to do: the tunable is already set (either way: the operator's choice stands), or the
    kernel gives huge pages everywhere (always) or nowhere (never, or no such setting)."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables or mode != "madvise":
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def restart_with_huge_pages() -> None:
    """Replace this process by itself with the tunable set (returns only when there is nothing to do)."""
    if not sys.platform.startswith("linux") or not _glibc_takes_the_tunable():
        return
    env = environment(dict(os.environ), thp_mode())
    if env is None or not sys.executable:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as exc:  # the process goes on as it is, in 4 KB pages
        print(
            f"nextword serve: cannot restart for huge pages ({exc.strerror}); serving without",
            file=sys.stderr,
        )


def huge_page_bytes() -> int | None:
    """Bytes of this process's memory in transparent huge pages (None where the kernel does not say)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
