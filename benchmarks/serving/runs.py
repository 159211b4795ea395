"""The load runs: every server driven by the same load tester, and the raw measurements, in order."""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.serving.plan import Plan
from benchmarks.serving.profiling import py_spy
from benchmarks.serving.servers import batch_histogram, floor_server, nextword_server, running
from benchmarks.serving.worker import run_worker
from nextword.clients.loadtest import LoadSpec, LoadTestError, run_load_processes


@dataclass
class Run:
    target: str  # echo, naive, nextword
    label: str
    streams: int
    context: int
    procs: int
    result: dict[str, Any] = field(default_factory=dict)
    mean_batch: float = math.nan
    error: str = ""

    def get(self, key: str) -> float:
        value = self.result.get(key)
        return float(value) if isinstance(value, (int, float)) else math.nan

    def summary(self) -> dict[str, Any]:
        """What a run table shows of it (and what a benchmark keeps of it as JSON)."""
        return {
            "target": self.target,
            "label": self.label,
            "streams": self.streams,
            "words_per_s": self.get("words_per_s"),
            "p50_ms": self.get("p50_ms"),
            "p99_ms": self.get("p99_ms"),
            "mean_batch": self.mean_batch,
            "error": self.error,
        }


def run_table(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows, header first, of runs' ``Run.summary()``."""
    return [
        "| server | run | streams | words/s | p50 ms | p99 ms | mean batch | errors |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['target']} | {r['label']} | {r['streams']:,} | {r['words_per_s']:,.0f} "
            f"| {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_batch']:.1f} | {r['error'] or 0} |"
            for r in runs
        ),
    ]


class Bench:
    """Runs everything the goals compare, in one fixed order, and keeps each load run."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.runs: list[Run] = []
        self.profiles: list[Path] = []

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def procs_for(self, streams: int) -> int:
        return 1 if streams == 1 else self.args.procs

    def load(
        self,
        target: str,
        address: str,
        label: str,
        *,
        streams: int,
        context: int,
        duration: float | None,
        words: int | None = None,
        metrics_port: int = 0,
        profile_pid: int = 0,
        rate: float | None = None,
    ) -> Run:
        """One run against ``address``, closed loop unless ``rate`` (words/s per stream, open loop);
        nextword's mean batch from its /metrics around it."""
        run = Run(target, label, streams, context, self.procs_for(streams))
        before = batch_histogram(metrics_port) if metrics_port else (math.nan, math.nan)
        name = re.sub(r"\W+", "-", f"{target}-{label}").strip("-")
        out = self.args.profile / f"{name}.txt" if self.args.profile and profile_pid else None
        with py_spy(profile_pid, out, (duration or 5) + 2):
            self._drive(run, address, duration, words, rate)
        if out is not None:
            self.profiles.append(out)
        if metrics_port:
            after = batch_histogram(metrics_port)
            calls = after[1] - before[1]
            run.mean_batch = (after[0] - before[0]) / calls if calls > 0 else math.nan
        self.runs.append(run)
        self._log_run(run, metrics_port)
        return run

    def _drive(
        self, run: Run, address: str, duration: float | None, words: int | None, rate: float | None
    ) -> None:
        try:
            # One word per request, k=3, closed loop unless told: spelled out, not the load tester's defaults.
            spec = LoadSpec(
                target=address,
                streams=run.streams,
                duration=duration,
                words=words,
                rate=rate,
                context_words=run.context,
                k=3,
                allow_remote=False,
                connections=getattr(self.args, "connections", 1),
            )
            report = run_load_processes(spec, procs=run.procs)
        except LoadTestError as exc:
            run.error = str(exc)
            return
        run.result = report.to_json_dict()
        if report.errors:
            run.error = ", ".join(f"{c} x{n}" for c, n in sorted(report.errors.items()))
            self.log(f"{run.target} {run.label}: errors {report.error_details}")

    def _log_run(self, run: Run, metrics_port: int) -> None:
        self.log(
            f"{run.target:8s} {run.label:22s} streams={run.streams:3d} ctx={run.context:3d}: "
            f"{run.get('words_per_s'):9.1f} words/s  p50 {run.get('p50_ms'):8.3f} ms  "
            f"p99 {run.get('p99_ms'):8.3f} ms  max {run.get('max_ms'):8.3f} ms"
            + (f"  mean batch {run.mean_batch:.1f}" if metrics_port else "")
            + (f"  ERRORS {run.error}" if run.error else "")
        )

    def find(self, target: str, label: str) -> Run:
        return next(r for r in self.runs if r.target == target and r.label == label)

    # The same sequence of runs for the naive server and nextword, so P2/P3 compare like with like.
    def common_runs(self, target: str, address: str, metrics_port: int = 0, pid: int = 0) -> None:
        p, short, mid, long_ = self.plan, *self.plan.contexts
        self.load(
            target,
            address,
            "256@ctx100",
            streams=256,
            context=mid,
            duration=p.short_s,
            metrics_port=metrics_port,
        )
        for streams in (64, 1):
            for ctx in (short, long_):
                self.load(
                    target,
                    address,
                    f"{streams}@ctx{ctx}",
                    streams=streams,
                    context=ctx,
                    duration=p.long_s if streams == 1 and ctx == short else p.short_s,
                    metrics_port=metrics_port,
                    profile_pid=pid if (streams, ctx) == (1, short) else 0,
                )

    def run_all(self) -> dict[str, Any]:
        """Raw onnxruntime, the echo and naive servers, nextword, idle memory: in that order."""
        raw, cold = self.raw_runs()
        self.floor_runs()
        self.nextword_runs()
        self.log(f"idle sessions: {self.plan.sessions} through the servicer, in a process of its own")
        memory = run_worker(
            "memory", self.args.bundle, self.args.threads, "--sessions", str(self.plan.sessions), timeout=900
        )
        return {"raw": raw, "cold": cold, "memory": memory}

    def raw_runs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """({"fp32": ..., "int8": ...}, cold): each in a process of its own."""
        args, plan = self.args, self.plan
        timing = ("--seconds", str(plan.raw_s), "--calls", str(plan.raw_latency_calls))
        raw: dict[str, Any] = {}
        self.log(f"raw onnxruntime: {args.bundle}")
        raw["fp32"] = run_worker("raw", args.bundle, args.threads, *timing)
        if args.int8_bundle is not None:
            self.log(f"raw onnxruntime: {args.int8_bundle}")
            raw["int8"] = run_worker("raw", args.int8_bundle, args.threads, *timing)
        self.log("raw onnxruntime: first call at an unseen batch size, fresh process")
        calls = str(max(100, plan.raw_latency_calls // 10))
        cold = run_worker("cold", args.bundle, args.threads, "--calls", calls)
        return raw, cold

    def floor_runs(self) -> None:
        """The echo server (the RPC floor), then the naive server through the common runs."""
        args, plan = self.args, self.plan
        short = plan.contexts[0]
        with running(floor_server("echo", args.bundle, args.threads)) as echo:
            self.load("echo", echo.address, "1@ctx5", streams=1, context=short, duration=plan.long_s)
            self.load("echo", echo.address, "256@ctx5", streams=256, context=short, duration=plan.long_s)
        with running(floor_server("naive", args.bundle, args.threads)) as naive:
            self.common_runs("naive", naive.address)

    def nextword_runs(self) -> None:
        """A fresh ``nextword serve``: a first burst, the long 256-stream run, the common runs."""
        args, plan = self.args, self.plan
        with running(nextword_server(args.bundle, args.threads, args.server_arg)) as server:
            address, metrics = server.address, int(server.match.group(2))
            # First, while the server is fresh: one word from each of 256 streams at once.
            self.load(
                "nextword",
                address,
                "burst 256 (fresh)",
                streams=256,
                context=0,
                duration=None,
                words=256,
                metrics_port=metrics,
            )
            self.load(
                "nextword",
                address,
                "256@ctx5",
                streams=256,
                context=plan.contexts[0],
                duration=plan.long_s,
                metrics_port=metrics,
                profile_pid=server.pid,
            )
            self.common_runs("nextword", address, metrics, server.pid)
