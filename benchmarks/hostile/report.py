"""What a hostile-input run found: status counts, the server's log, memory, health, the goals."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from benchmarks import results
from benchmarks.hostile.attacks import ABOUT
from benchmarks.hostile.reference import Comparison
from benchmarks.hostile.runner import CLIENT_ERROR, ENDED_MID_WRITE, Outcome
from benchmarks.hostile.server import LogScan

SECTION = "## Hostile input"
RSS_GROWTH = 1.25  # RSS after / before the attacks
MIB = 1 << 20
# Status names in gRPC's own order, then the harness's own failures.
ORDER = [code.name for code in grpc.StatusCode] + [ENDED_MID_WRITE, CLIENT_ERROR]
# Statuses a refusal should never have: each is shown with the requests that got it.
SUSPECT = ("UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED", "UNAVAILABLE", "DATA_LOSS", CLIENT_ERROR)


@dataclass(frozen=True)
class Example:
    """A request that got a suspect status, as much of it as a server engineer needs to replay it."""

    code: str
    kind: str
    method: str
    details: str
    messages: list[str]  # ascii() of each message's first bytes
    close: str
    at: int
    pad: int
    gzip: bool


@dataclass(frozen=True)
class Goal:
    name: str
    measured: str
    target: str
    passed: bool


@dataclass
class Report:
    bundle: str
    seed: int
    planned: int
    concurrency: int
    seconds: float
    codes: dict[str, int]
    by_kind: dict[str, dict[str, int]]
    log_path: str
    rss_before: int
    rss_peak: int
    rss_after: int
    sessions_after: float | None
    health: str
    references: Comparison
    examples: list[Example] = field(default_factory=list)
    log: LogScan = field(default_factory=LogScan)  # read once the server has stopped
    exit_status: int | None = None
    goals: list[Goal] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.codes.values())

    @property
    def passed(self) -> bool:
        return all(goal.passed for goal in self.goals)


def tally(outcomes: Sequence[Outcome]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Counts by status, and by kind then status, each in gRPC's order."""
    codes = collections.Counter(o.code for o in outcomes)
    kinds: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        kinds[o.kind][o.code] += 1
    return _ordered(codes), {kind: _ordered(kinds[kind]) for kind in sorted(kinds)}


def examples(outcomes: Sequence[Outcome], per_code: int = 4) -> list[Example]:
    """A few requests for each suspect status, of as many kinds as there are."""
    chosen: list[Outcome] = []
    for code in SUSPECT:
        hits = [o for o in outcomes if o.code == code]
        first_of_kind = list({o.kind: o for o in reversed(hits)}.values())
        chosen += (first_of_kind + [o for o in hits if o not in first_of_kind])[:per_code]
    return [
        Example(
            o.code,
            o.kind,
            o.attack.method,
            ascii(o.details[:300])[1:-1],
            [
                ascii(m[:120]) + (f" (+{len(m) - 120} bytes)" if len(m) > 120 else "")
                for m in o.attack.messages
            ],
            o.attack.close.value,
            o.attack.at,
            o.attack.pad,
            o.attack.gzip,
        )
        for o in chosen
    ]


def _ordered(counts: collections.Counter[str]) -> dict[str, int]:
    return {code: counts[code] for code in sorted(counts, key=ORDER.index)}


def judge(r: Report) -> list[Goal]:
    """The goals a server safe to expose meets; each with what this run measured."""
    growth = r.rss_after / r.rss_before if r.rss_before else float("inf")
    unknown, internal = r.codes.get("UNKNOWN", 0), r.codes.get("INTERNAL", 0)
    complete = r.sent == r.planned and CLIENT_ERROR not in r.codes
    return [
        Goal("requests sent and answered", f"{r.sent:,} of {r.planned:,}", "all", complete),
        Goal("UNKNOWN statuses", f"{unknown:,}", "0", unknown == 0),
        Goal("INTERNAL statuses", f"{internal:,}", "0", internal == 0),
        Goal("tracebacks in the server log", f"{r.log.tracebacks:,}", "0", r.log.tracebacks == 0),
        Goal("health after", r.health, "SERVING", r.health == "SERVING"),
        Goal("reference answers after", r.references.detail, "identical", r.references.identical),
        Goal(
            "RSS after / before",
            f"{r.rss_after / MIB:.1f} / {r.rss_before / MIB:.1f} MiB = {growth:.3f}×",
            f"≤ {RSS_GROWTH}×",
            growth <= RSS_GROWTH,
        ),
    ]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*row) for row in rows)]


def status_tables(r: Report, markdown: bool) -> list[str]:
    codes = list(r.codes)
    rows = [
        [kind, *(f"{counts.get(code, 0):,}" for code in codes), f"{sum(counts.values()):,}"]
        for kind, counts in r.by_kind.items()
    ]
    rows.append(["all", *(f"{r.codes[code]:,}" for code in codes), f"{r.sent:,}"])
    if markdown:
        rows[-1] = [f"**{x}**" for x in rows[-1]]
    return _table(["kind", *codes, "total"], rows, markdown)


def observations(r: Report, markdown: bool) -> list[str]:
    growth = r.rss_after / r.rss_before if r.rss_before else float("inf")
    sessions = "unknown" if r.sessions_after is None else f"{r.sessions_after:,.0f}"
    where = "" if markdown else f" ({r.log_path})"  # a temporary path means nothing in RESULTS.md
    lines = [
        f"Server log: {r.log.tracebacks:,} tracebacks, {r.log.errors:,} ERROR lines, "
        f"{r.log.warnings:,} WARNING lines{where}.",
        *(f"  - `{n:,}× {_code(text)}`" if markdown else f"    {n:,}× {text}" for n, text in r.log.top),
        f"RSS: {r.rss_before / MIB:.1f} MiB before, {r.rss_peak / MIB:.1f} peak, "
        f"{r.rss_after / MIB:.1f} after ({growth:.3f}×); sessions held after: {sessions}.",
        f"Health after: {r.health}. Reference answers: {r.references.detail}. "
        f"Server exit status after SIGTERM: {r.exit_status}.",
    ]
    if r.examples:
        lines.append("Requests that got a status no refusal should have (a few of each):")
    for e in r.examples:
        sent = ", ".join(_code(m) if not markdown else f"`{_code(m)}`" for m in e.messages[:4])
        lines.append(
            f"  - {e.code} for {e.kind} ({e.method}, {e.close}{f' at {e.at}' if e.at else ''}"
            f"{f', padded {e.pad:,} B' if e.pad else ''}{', gzip' if e.gzip else ''}): "
            f"{e.details!r}; sent {sent or 'no message'}"
        )
    if markdown:  # the nested lines stay nested under the line before them
        return [line if line.startswith("  - ") else f"- {line}" for line in lines]
    return lines


def _code(text: str) -> str:
    return text.replace("`", "'")  # a backtick would end the code span early


def goal_table(r: Report, markdown: bool) -> list[str]:
    rows = [[g.name, g.measured, g.target, "pass" if g.passed else "FAIL"] for g in r.goals]
    if markdown:
        rows = [[*row[:3], "pass" if row[3] == "pass" else "**fail**"] for row in rows]
    return _table(["goal", "measured", "target", "result"], rows, markdown)


def render(r: Report) -> str:
    head = (
        f"nextword hostile input: {r.sent:,} requests (seed {r.seed}, {r.concurrency} in flight) "
        f"against {r.bundle} in {r.seconds:.1f} s"
    )
    verdict = "all goals met" if r.passed else "GOALS FAILED"
    parts = [
        head,
        "",
        *status_tables(r, False),
        "",
        *observations(r, False),
        "",
        *goal_table(r, False),
        "",
        verdict,
    ]
    return "\n".join(parts)


def markdown(r: Report, command: str, machine: str) -> str:
    lines = [
        f"`{command}` starts `nextword serve` on a free loopback port, asks reference answers, "
        "sends hostile requests drawn by hypothesis (seeded: the same requests every run) with "
        "a bounded number in flight, then asks the references again and reads the server's log, "
        "RSS and health.",
        "",
        f"Machine: {machine}. Bundle `{r.bundle}`, seed {r.seed}, {r.concurrency} in flight, "
        f"{r.sent:,} requests in {r.seconds:.1f} s.",
        "",
        *status_tables(r, True),
        "",
        "Kinds: " + "; ".join(f"`{kind}` {about}" for kind, about in ABOUT.items()) + ". "
        f"`{ENDED_MID_WRITE}`: the server ended a stream while a write of the client's was still "
        "in flight (large messages, pipelined); grpc.aio then reports its own INTERNAL "
        '"Internal error from Core" in place of the server\'s status, so this is counted apart.',
        "",
        *observations(r, True),
        "",
        *goal_table(r, True),
    ]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the ``## Hostile input`` section of ``path``; other sections are left alone."""
    results.write_section(path, SECTION, body)
