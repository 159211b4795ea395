"""What a load test measured: ``LoadReport``, its HDR histograms, merging, wire format and table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

# Histogram range, in microseconds.
LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_FIGURES = 3


def new_histogram() -> HdrHistogram:
    """An empty latency histogram: 1 µs .. 60 s, 3 significant digits."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def record_latency(hist: HdrHistogram, seconds: float) -> None:
    """Add one latency to ``hist``, clamped into its range (hdrh drops out-of-range values silently)."""
    hist.record_value(min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US))


def _ms(hist: HdrHistogram, percentile: float) -> float:
    return hist.get_value_at_percentile(percentile) / 1000 if hist.get_total_count() else 0.0


@dataclass
class LoadReport:
    """What a load run measured. Latencies are in ``histogram`` (µs); ``words`` counts answered words."""

    target: str
    streams: int
    rate: float | None  # words/s per stream (open loop); None: closed loop
    context_words: int
    duration_s: float  # from the common start to the last reply (or the deadline, if later)
    words: int
    histogram: HdrHistogram = field(default_factory=new_histogram, repr=False)
    prefill_histogram: HdrHistogram = field(default_factory=new_histogram, repr=False)
    # Failed requests by gRPC status code name (a stream that fails counts its unanswered requests).
    errors: dict[str, int] = field(default_factory=dict)
    error_details: dict[str, str] = field(default_factory=dict)  # code -> the first details seen
    failed_streams: int = 0
    procs: int = 1

    @property
    def failed_requests(self) -> int:
        return sum(self.errors.values())

    @property
    def words_per_s(self) -> float:
        return self.words / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, percentile: float) -> float:
        return _ms(self.histogram, percentile)

    def to_json_dict(self) -> dict[str, Any]:
        h = self.histogram
        out: dict[str, Any] = {
            "target": self.target,
            "streams": self.streams,
            "procs": self.procs,
            "rate": self.rate,
            "context_words": self.context_words,
            "duration_s": round(self.duration_s, 3),
            "words": self.words,
            "words_per_s": round(self.words_per_s, 1),
            "p50_ms": _ms(h, 50),
            "p95_ms": _ms(h, 95),
            "p99_ms": _ms(h, 99),
            "max_ms": h.get_max_value() / 1000 if h.get_total_count() else 0.0,
            "mean_ms": round(h.get_mean_value() / 1000, 3) if h.get_total_count() else 0.0,
            "errors": dict(sorted(self.errors.items())),  # failed requests by status code
            "failed_requests": self.failed_requests,
            "failed_streams": self.failed_streams,
        }
        if self.error_details:
            out["error_details"] = dict(sorted(self.error_details.items()))
        if self.prefill_histogram.get_total_count():
            p = self.prefill_histogram
            out["prefill_p50_ms"] = _ms(p, 50)
            out["prefill_max_ms"] = p.get_max_value() / 1000
        return out

    def to_wire(self) -> dict[str, Any]:
        """Plain data to send across processes: the fields, with hdrh's compressed histograms."""
        wire = {k: v for k, v in self.__dict__.items() if k not in ("histogram", "prefill_histogram")}
        wire["histogram"] = self.histogram.encode()
        wire["prefill_histogram"] = self.prefill_histogram.encode()
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> LoadReport:
        """The report ``to_wire`` sent."""
        wire = dict(wire)
        hist, prefill = new_histogram(), new_histogram()
        hist.decode_and_add(wire.pop("histogram"))
        prefill.decode_and_add(wire.pop("prefill_histogram"))
        return cls(**wire, histogram=hist, prefill_histogram=prefill)

    def merge(self, other: LoadReport) -> None:
        """Add ``other`` (a run over other streams of the same test, at the same time) into this one."""
        self.histogram.add(other.histogram)
        self.prefill_histogram.add(other.prefill_histogram)
        self.streams += other.streams
        self.words += other.words
        self.duration_s = max(self.duration_s, other.duration_s)  # they started together
        self.failed_streams += other.failed_streams
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        for code, details in other.error_details.items():
            self.error_details.setdefault(code, details)


def format_table(report: LoadReport) -> str:
    """The report for a terminal: a heading, one table row, the prefill and any errors."""
    j = report.to_json_dict()
    mode = f"open loop, {report.rate:g} words/s per stream" if report.rate else "closed loop"
    header = ("streams", "duration_s", "words", "words/s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "failed")
    row = (
        str(report.streams),
        f"{report.duration_s:.2f}",
        str(report.words),
        f"{report.words_per_s:.1f}",
        f"{j['p50_ms']:.3f}",
        f"{j['p95_ms']:.3f}",
        f"{j['p99_ms']:.3f}",
        f"{j['max_ms']:.3f}",
        str(report.failed_requests),
    )
    widths = [max(len(h), len(v)) for h, v in zip(header, row, strict=True)]
    lines = [
        f"nextword loadtest against {report.target}: {mode}, {report.context_words} context words, "
        f"{report.procs} process(es)",
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)),
    ]
    if "prefill_p50_ms" in j:
        lines.append(
            f"prefill of {report.context_words} words: p50 {j['prefill_p50_ms']:.3f} ms, "
            f"max {j['prefill_max_ms']:.3f} ms"
        )
    if report.errors:
        lines.append("failed requests by status code:")
    for code, n in sorted(report.errors.items()):
        lines.append(f"  {code}: {n} ({report.error_details.get(code, '')})")
    if report.failed_streams:
        lines.append(f"{report.failed_streams} of {report.streams} streams failed")
    return "\n".join(lines)
