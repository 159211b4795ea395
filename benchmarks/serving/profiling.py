"""py-spy profiles of the nextword server during its load runs (``--profile DIR``)."""

from __future__ import annotations

import collections
import contextlib
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None, seconds: float) -> Iterator[None]:
    """``py-spy record`` of ``pid`` while the block runs (collapsed stacks, one thread per root)."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, math.ceil(seconds)))]
    # --nonblocking: sample without pausing the server, so it is slowed as little as possible.
    cmd += ["--rate", "200", "--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize_profile(path: Path, top: int = 15) -> str:
    """The functions with the most samples: on-CPU in them (self) and with what they call (total)."""
    if not path.is_file():
        return f"{path}: no profile (is py-spy installed and allowed to ptrace?)"
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        samples += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            total[frame] += n
    if not samples:
        return f"{path.name}: no samples"
    by_thread = ", ".join(f"{t} {n / samples:.0%}" for t, n in threads.most_common(4))
    lines = [f"{path.name}: {samples} samples; by thread: {by_thread}", "  self%  total%  function"]
    lines += [f"  {n / samples:5.1%}  {total[f] / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("  (by total)")
    lines += [f"  {own[f] / samples:5.1%}  {n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)
