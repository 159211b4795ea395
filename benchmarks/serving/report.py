"""The markdown report: the machine, the P1–P7 table, the load runs, raw onnxruntime; RESULTS.md."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import results
from benchmarks.serving import ROOT
from benchmarks.serving.goals import Row
from benchmarks.serving.plan import BATCH_SIZES
from benchmarks.serving.runs import Bench, Run

SECTION = "## Serving"


def machine() -> dict[str, Any]:
    import grpc
    import onnxruntime

    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    try:  # which server code was measured (read-only: nothing in git is changed)
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        revision = ""
    return {
        "revision": revision or "unknown",
        "nproc": os.cpu_count(),
        "cpu": model,
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
    }


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if math.isfinite(value) else "—"


def _shown(path: Path) -> str:
    """A path as the command line would give it: relative to the checkout when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _header(bench: Bench, mach: dict[str, Any], command: str) -> list[str]:
    args = bench.args
    return [
        "`python -m benchmarks.serving` measures nextword (`nextword serve`), a bare grpc.aio echo server "
        "and a naive server (`benchmarks/floors.py`: whole context through the model per request) with the "
        "same load generator, and raw onnxruntime (`OnnxLM`) in processes of their own, all in one run: "
        "this machine is noisy, so only ratios within one run are compared.",
        "",
        f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), onnxruntime {mach['onnxruntime']}, "
        f"grpcio {mach['grpcio']}, Python {mach['python']}; client and server share the CPUs, loopback only. "
        f"Code: `{mach['revision']}`; bundle `{_shown(args.bundle)}`"
        + (f", int8 bundle `{_shown(args.int8_bundle)}`. " if args.int8_bundle else ". ")
        + f"onnxruntime intra-op threads: {args.threads} (raw, naive and nextword alike). "
        f"Load: `clients/loadtest/`, closed loop, one word per request, k=3, "
        f"{args.procs} client process(es) for the multi-stream runs, 1 for one stream.",
        "",
        f"Command: `{command}`",
        "",
    ]


def _goal_table(rows: list[Row]) -> list[str]:
    lines = ["| id | measure | measured | goal | result |", "|---|---|---|---|---|"]
    return lines + [f"| {r.id} | {r.measure} | {r.measured} | {r.goal} | {r.verdict} |" for r in rows]


def _run_table(runs: list[Run]) -> list[str]:
    lines = [
        "Load runs (same client code and process count for every server):",
        "",
        "| server | run | streams | context words | client procs | words/s | p50 ms | p99 ms | max ms "
        "| mean batch | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.target} | {run.label} | {run.streams} | {run.context} | {run.procs} | "
            f"{_f(run.get('words_per_s'))} | {_f(run.get('p50_ms'), 3)} | {_f(run.get('p99_ms'), 3)} | "
            f"{_f(run.get('max_ms'), 3)} | {_f(run.mean_batch)} | {run.error or '0'} |"
        )
    return lines


def _raw_table(raw: dict[str, Any]) -> list[str]:
    header = "| onnxruntime step, seq 1 | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " |"
    lines = [header, "|---" * (len(BATCH_SIZES) + 1) + "|"]
    for name, result in raw.items():
        t = result["throughput"]
        lines.append(
            f"| {name} words/s | " + " | ".join(_f(t[str(b)]["words_per_s"], 0) for b in BATCH_SIZES) + " |"
        )
        lines.append(
            f"| {name} ms/call | " + " | ".join(_f(t[str(b)]["call_ms"], 3) for b in BATCH_SIZES) + " |"
        )
    return lines


def _notes(measured: dict[str, Any]) -> list[str]:
    fp32, cold, mem = measured["raw"]["fp32"], measured["cold"], measured["memory"]
    step, head, ranked = fp32["step_b1"], fp32["head_b1"], fp32.get("step_ranked_b1")
    ranked_note = f"; `step_ranked` (the server's call) p50 {ranked['p50_ms']:.3f} ms" if ranked else ""
    return [
        f"onnxruntime batch 1: step p50 {step['p50_ms']:.3f} ms, p99 {step['p99_ms']:.3f} ms;"
        f" head p50 {head['p50_ms']:.3f} ms, p99 {head['p99_ms']:.3f} ms{ranked_note} "
        f"({fp32['provider']}). Fresh process: startup call (batch 1) {cold['startup_call_ms']:.2f} ms, "
        f"first call at batch {cold['batch']} {cold['first_call_ms']:.2f} ms, steady p50 "
        f"{cold['steady']['p50_ms']:.2f} ms / p99 {cold['steady']['p99_ms']:.2f} ms.",
        f"Idle sessions: {mem['sessions']:,} opened in {mem['sessions'] / mem['sessions_per_s']:.1f} s "
        f"({mem['active_sessions']:,.0f} held after), RSS {mem['rss_before'] / 2**20:,.1f} → "
        f"{mem['rss_after'] / 2**20:,.1f} MiB.",
    ]


def render(
    bench: Bench, rows: list[Row], measured: dict[str, Any], mach: dict[str, Any], command: str
) -> str:
    """The body of the ``## Serving`` section."""
    lines = _header(bench, mach, command) + _goal_table(rows)
    lines += ["", *_run_table(bench.runs)]
    lines += ["", *_raw_table(measured["raw"])]
    lines += ["", *_notes(measured)]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the ``## Serving`` section of ``path``; other sections are left alone."""
    results.write_section(path, SECTION, body)
