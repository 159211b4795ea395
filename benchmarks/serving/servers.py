"""Server subprocesses: nextword itself and the reference servers, and nextword's batch sizes."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks.probe import metric_samples
from benchmarks.serving import ROOT

SERVING = re.compile(r"nextword serving .* on [\d.]+:(\d+), metrics on :(\d+)")
FLOOR = re.compile(r"floor listening on [\d.]+:(\d+)")


class Child:
    """A server subprocess: started, waited on until its log says where it listens, stopped."""

    def __init__(self, name: str, cmd: list[str], ready: re.Pattern[str], timeout: float = 120) -> None:
        self.name = name
        self.cmd = cmd
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.match = self._wait(ready, timeout)
        # Keep draining its log: a full pipe would block the server mid-benchmark.
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        """Where it serves gRPC: the first group of its ready line is the port."""
        return f"127.0.0.1:{self.match.group(1)}"

    def _wait(self, ready: re.Pattern[str], timeout: float) -> re.Match[str]:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if (match := ready.search(line)) is not None:
                return match
        self.stop()
        raise RuntimeError(f"{self.name} did not start ({shlex.join(self.cmd)}):\n{''.join(self.log)}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running(child: Child) -> Iterator[Child]:
    try:
        yield child
    finally:
        child.stop()


def nextword_server(bundle: Path, threads: int, extra: Sequence[str]) -> Child:
    cmd = [sys.executable, "-m", "nextword.cli", "serve", "--model", str(bundle.resolve()), "--port", "0"]
    # --metrics-port -1: a free port, named in the serving log line with the gRPC one.
    cmd += ["--metrics-port", "-1", "--threads", str(threads), *extra]
    return Child("nextword serve", cmd, SERVING)


def floor_server(kind: str, bundle: Path, threads: int, *, processes: int = 1) -> Child:
    """``benchmarks/floors.py KIND``: the echo server (in ``processes`` processes), or the naive one
    on ``bundle``."""
    cmd = [sys.executable, "-m", "benchmarks.floors", kind, "--port", "0", "--processes", str(processes)]
    if kind == "naive":
        cmd += ["--model", str(bundle.resolve()), "--threads", str(threads)]
    return Child(f"{kind} server", cmd, FLOOR)


def batch_histogram(metrics_port: int) -> tuple[float, float]:
    """``nextword_batch_size`` (sum, count) from the server's /metrics."""
    total, count = metric_samples(metrics_port, "nextword_batch_size_sum", "nextword_batch_size_count")
    return total, count
