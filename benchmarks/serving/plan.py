"""How much the benchmark measures: batch sizes, contexts, and how long each part runs."""

from __future__ import annotations

from dataclasses import dataclass

BATCH_SIZES = (1, 8, 32, 64, 128, 256)
COLD_BATCH = 37  # a batch size nothing else in the benchmark uses


@dataclass(frozen=True)
class Plan:
    """How long each part runs: the full run fits in about 8 minutes on 2 cores."""

    long_s: float  # the runs P1 and P2 rest on
    short_s: float  # every other load run
    raw_s: float  # onnxruntime, per batch size
    raw_latency_calls: int
    sessions: int  # idle sessions created for P4
    contexts: tuple[int, int, int] = (5, 100, 500)  # short, P2's naive comparison, long

    @classmethod
    def full(cls) -> Plan:
        return cls(long_s=10.0, short_s=6.0, raw_s=1.5, raw_latency_calls=2000, sessions=100_000)

    @classmethod
    def quick(cls) -> Plan:
        return cls(long_s=1.0, short_s=0.6, raw_s=0.15, raw_latency_calls=100, sessions=1000)
