"""What the benchmarks read off a running server process: its RSS and its /metrics samples."""

from __future__ import annotations

import math
import re
import threading
import urllib.request
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (VmRSS of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VmRSS for process {pid} (has it exited?)")
    return int(match.group(1)) * 1024


def metric_samples(metrics_port: int, *names: str) -> tuple[float, ...]:
    """The samples ``names`` of the server's /metrics, each summed over its labels (a server with
    workers labels every sample with its worker); NaN for one that is not there."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode("utf-8", errors="replace")
    found = (re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE) for name in names)
    return tuple(sum(map(float, values)) if values else math.nan for values in found)


class PeakRss:
    """The highest RSS of process ``pid`` (bytes), sampled in a thread until ``stop``."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid, self.peak = pid, rss_bytes(pid)
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))
        return self.peak
