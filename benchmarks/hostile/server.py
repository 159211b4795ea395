"""The server under attack: ``nextword serve`` as a subprocess, its log in a file, its RSS from /proc."""

from __future__ import annotations

import collections
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.probe import metric_samples, rss_bytes
from benchmarks.serving import ROOT
from benchmarks.serving.servers import SERVING

# "%(asctime)s %(levelname)s %(name)s: %(message)s", the format `nextword serve` logs with.
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) (?P<rest>.*)$")
TRACEBACK = "Traceback (most recent call last):"


class ServerProcess:
    """``nextword serve BUNDLE`` on a free loopback port; stdout and stderr go to ``log``."""

    def __init__(self, bundle: Path, log: Path, threads: int, extra: Sequence[str] = ()) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "nextword.cli", "serve", "--model", str(bundle.resolve())]
        cmd += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--threads", str(threads)]
        self.cmd = [*cmd, *extra]
        log.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: nothing has to drain it, and the whole log is there to count afterwards.
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.port = self.metrics_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the log names the ports; raises with the log's tail if the server exits or stalls."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (match := SERVING.search(self.log_text())) is not None:
                self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nextword serve did not start ({' '.join(self.cmd)}):\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def gauge(self, name: str) -> float | None:
        """A sample of the server's /metrics without labels, or None when it is not there."""
        if not self.metrics_port:
            return None
        try:
            (value,) = metric_samples(self.metrics_port, name)
        except OSError:
            return None
        return None if math.isnan(value) else value

    def stop(self) -> int | None:
        """SIGTERM (the server drains), then SIGKILL if it hangs; its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class LogScan:
    tracebacks: int = 0
    errors: int = 0  # ERROR and CRITICAL records
    warnings: int = 0
    # What was logged at ERROR or raised, grouped by its text: the first thing to read in a failed run.
    top: list[tuple[int, str]] = field(default_factory=list)


def _grouped(message: str) -> str:
    """A log message without what differs between two occurrences of one problem."""
    message = re.sub(r"0x[0-9a-f]+", "0x...", message)  # object addresses
    return re.sub(r"ipv[46]:\S+?:\d+", "PEER", message)  # the client's address and port


def scan_log(text: str, top: int = 12) -> LogScan:
    scan, seen = LogScan(), collections.Counter[str]()
    in_traceback = False
    for line in text.splitlines():
        if line.startswith(TRACEBACK):
            scan.tracebacks += 1
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            seen[_grouped(f"raised {line}")] += 1  # the exception line that ends the traceback
            in_traceback = False
        elif (record := RECORD.match(line)) is not None:
            level = record["level"]
            scan.errors += level in ("ERROR", "CRITICAL")
            scan.warnings += level == "WARNING"
            if level in ("ERROR", "CRITICAL", "WARNING"):
                seen[_grouped(f"{level} {record['rest']}")] += 1
    # Hostile text ends up in messages: ascii() keeps control characters out of terminals and tables.
    scan.top = [(n, ascii(message[:200])[1:-1]) for message, n in seen.most_common(top)]
    return scan
