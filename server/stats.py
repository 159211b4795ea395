"""What one model version has done, as KServe's ``ModelStatistics`` reports it (Triton's
statistics extension: perf_analyzer reads it to split a request's time on the server).

Requests are the API's (a ``Predict``, one message of a ``Session`` stream, one KServe
inference): each succeeds or fails, with its time on the server. Queue and compute times
are the model calls' (server/batcher.py): each step a call ran is charged the time it
waited in the queue and the whole call's time, as Triton charges every request of a batch,
and each call is counted once more by its batch size. Written on the event loop's thread
only, a few additions each; Prometheus' histograms (server/metrics.py) hold the same
times as distributions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

NS = 1_000_000_000


@dataclass
class Duration:
    """A count and the nanoseconds it took in all (KServe's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += round(seconds * NS)


@dataclass
class ModelStats:
    success: Duration = field(default_factory=Duration)  # requests answered, and their time
    fail: Duration = field(default_factory=Duration)  # requests refused or failed
    queue: Duration = field(default_factory=Duration)  # steps' waits for their model call
    compute: Duration = field(default_factory=Duration)  # steps run, each charged its whole call
    executions: int = 0  # model calls
    last_inference_ms: int = 0  # when a request last succeeded (ms since the epoch)
    # Batch size -> the calls of that size and their time.
    batches: dict[int, Duration] = field(default_factory=dict)

    def answered(self, seconds: float) -> None:
        self.success.add(seconds)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def failed(self, seconds: float) -> None:
        self.fail.add(seconds)

    def called(self, size: int, seconds: float) -> None:
        """One model call of ``size`` steps that took ``seconds``."""
        self.executions += 1
        self.compute.add(seconds * size, size)
        self.batches.setdefault(size, Duration()).add(seconds)
