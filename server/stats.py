"""What one model version has done, as KServe's ``ModelStatistics`` reports it (Triton's
statistics extension: perf_analyzer reads it to split a request's time on the server).

Requests are the API's (a ``Predict``, one message of a ``Session`` stream, one KServe
inference): each succeeds or fails, with its time on the server. Queue and compute times
are the model calls' (server/batcher.py): each step a call ran is charged the time it
waited in the queue and the whole call's time, as Triton charges every request of a batch,
and each call is counted once more by its batch size. Prometheus' histograms
(server/metrics.py) hold the same times as distributions.

The counts are a row of 64-bit integers, written on the event loop's thread only, a few
additions a request. Under ``--workers`` each worker keeps its row in a file of a folder
the supervisor made (``ServerConfig.stats_dir``), mapped into memory, and whichever
worker answers ``ModelStatistics`` sums every worker's file of that version: the figures
are the whole server's, whoever asks, and a worker that died still counts what it did
(as the totals since the server started must).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

NS = 1_000_000_000
# The row: (count, ns) of successes, failures, queue waits and computed steps, then model
# calls and when a request last succeeded, then (calls, ns) for each batch size 1..max_batch.
SUCCESS, FAIL, QUEUE, COMPUTE = 0, 2, 4, 6
EXECUTIONS, LAST_INFERENCE_MS = 8, 9
BATCHES = 10
SUFFIX = ".stats"


@dataclass
class Duration:
    """A count and the nanoseconds it took in all (KServe's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0


@dataclass
class Totals:
    """Everything a version has done, summed over the workers (what ``ModelStatistics`` shows)."""

    success: Duration = field(default_factory=Duration)  # requests answered, and their time
    fail: Duration = field(default_factory=Duration)  # requests refused or failed
    queue: Duration = field(default_factory=Duration)  # steps' waits for their model call
    compute: Duration = field(default_factory=Duration)  # steps run, each charged its whole call
    executions: int = 0  # model calls
    last_inference_ms: int = 0  # when a request last succeeded (ms since the epoch)
    # Batch size -> the calls of that size and their time (sizes that ran at least once).
    batches: dict[int, Duration] = field(default_factory=dict)


class ModelStats:
    """One version's counts in this process; ``totals()`` adds the other workers'."""

    def __init__(self, max_batch: int, folder: Path | None = None, model: tuple[str, str] = ("", "")) -> None:
        size = 8 * (BATCHES + 2 * max_batch)
        self._folder = folder
        self._buffer: bytearray | mmap.mmap
        if folder is None:
            self._buffer, self._prefix, self._file = bytearray(size), "", ""
        else:
            # Named by a digest of the version: any name fits a file name, and none holds a glob character.
            self._prefix = hashlib.sha256("\0".join(model).encode()).hexdigest()[:32] + "-"
            # A file of its own for each load in each process: a reloaded version counts from zero.
            self._file = f"{self._prefix}{os.getpid()}-{time.monotonic_ns()}{SUFFIX}"
            with (folder / self._file).open("w+b") as f:
                f.truncate(size)
                self._buffer = mmap.mmap(f.fileno(), size)
        self._row = memoryview(self._buffer).cast("q")

    def answered(self, seconds: float) -> None:
        self._add(SUCCESS, seconds)
        self._row[LAST_INFERENCE_MS] = time.time_ns() // 1_000_000

    def failed(self, seconds: float) -> None:
        self._add(FAIL, seconds)

    def waited(self, seconds: float) -> None:
        """One step's wait in the queue for its model call."""
        self._add(QUEUE, seconds)

    def called(self, size: int, seconds: float) -> None:
        """One model call of ``size`` steps that took ``seconds``."""
        self._row[EXECUTIONS] += 1
        self._add(COMPUTE, seconds * size, size)
        self._add(BATCHES + 2 * (size - 1), seconds)

    def _add(self, at: int, seconds: float, count: int = 1) -> None:
        row = self._row
        row[at] += count
        row[at + 1] += round(seconds * NS)

    def close(self) -> None:
        """The version is unloaded here: its counts leave the totals (a new load starts at zero)."""
        if self._folder is not None:
            (self._folder / self._file).unlink(missing_ok=True)

    def totals(self) -> Totals:
        """This version's counts in every process that served it (just this one without a folder)."""
        rows = [self._row.tolist()]
        if self._folder is not None:
            for path in self._folder.glob(f"{self._prefix}*{SUFFIX}"):
                data = path.read_bytes() if path.name != self._file else b""
                if len(data) == len(self._buffer):  # not one still being made
                    rows.append(memoryview(data).cast("q").tolist())
        return _sum(rows)


def _sum(rows: list[list[int]]) -> Totals:
    total = [sum(column) for column in zip(*rows, strict=True)]

    def pair(at: int) -> Duration:
        return Duration(total[at], total[at + 1])

    batches = {size: pair(at) for size, at in enumerate(range(BATCHES, len(total), 2), start=1) if total[at]}
    return Totals(
        success=pair(SUCCESS),
        fail=pair(FAIL),
        queue=pair(QUEUE),
        compute=pair(COMPUTE),
        executions=total[EXECUTIONS],
        last_inference_ms=max(row[LAST_INFERENCE_MS] for row in rows),
        batches=batches,
    )
