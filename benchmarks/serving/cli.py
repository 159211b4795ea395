"""The command: ``python -m benchmarks.serving`` (from the repository root)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import benchmarks.serving as package
from benchmarks.serving import ROOT
from benchmarks.serving.goals import Row, goals
from benchmarks.serving.plan import Plan
from benchmarks.serving.profiling import summarize_profile
from benchmarks.serving.report import machine, render, write_section
from benchmarks.serving.runs import Bench
from benchmarks.serving.worker import KINDS, worker_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--int8-bundle", type=Path, help="default: BUNDLE-int8 when it exists (models/demo-int8)")
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test, not a measurement")
    p.add_argument("--json", type=Path, help="write every number measured to this file")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads for raw ORT, naive and nextword (client shares the CPUs)",
    )
    p.add_argument("--procs", type=int, default=2, help="load-test client processes for multi-stream runs")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `nextword serve` argument (repeat), e.g. --server-arg=--max-batch=256",
    )
    p.add_argument(
        "--results",
        type=Path,
        help="markdown file whose '## Serving' section is replaced "
        "(default: benchmarks/RESULTS.md for a full run, none for --quick)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        help="py-spy the nextword server during its 1- and 256-stream runs into this directory "
        "(costs CPU: the numbers of a profiled run are not the ones to report)",
    )
    # Internal: the measurements that need a process of their own (benchmarks.serving.worker).
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--gap-us", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--sessions", type=int, default=1000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.int8_bundle is None and not args.worker:
        default = args.bundle.parent / f"{args.bundle.name}-int8"
        args.int8_bundle = default if (default / "manifest.json").is_file() else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    plan = Plan.quick() if args.quick else Plan.full()
    bench = Bench(args, plan)
    command = shlex.join(["python", "-m", "benchmarks.serving", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    measured = bench.run_all()
    rows, derived = goals(bench, measured, args.bundle, args.int8_bundle)
    mach = machine()
    body = render(bench, rows, measured, mach, command)
    print(body)
    for profile in bench.profiles:
        print(summarize_profile(profile) + "\n")
    bench.log(f"done in {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        report = _json_report(args, bench, rows, derived, measured, mach, command)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    results = args.results or (None if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    if results is not None:
        write_section(results, body)
    return 0


def _json_report(
    args: argparse.Namespace,
    bench: Bench,
    rows: list[Row],
    derived: dict[str, float],
    measured: dict[str, Any],
    mach: dict[str, Any],
    command: str,
) -> dict[str, Any]:
    """Every number measured, for ``--json``."""
    return {
        "command": command,
        "machine": mach,
        "quick": args.quick,
        "goals": [{**r.__dict__, "result": r.verdict} for r in rows],
        "derived": derived,
        "runs": [r.__dict__ for r in bench.runs],
        **measured,
    }
