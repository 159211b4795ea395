"""The command: ``python -m benchmarks.hostile`` (from the repository root)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

import benchmarks.hostile as package
from benchmarks.hostile import reference
from benchmarks.hostile.attacks import Attack, draw
from benchmarks.hostile.report import Report, examples, judge, markdown, render, tally, write_section
from benchmarks.hostile.runner import fire
from benchmarks.hostile.server import ServerProcess, scan_log
from benchmarks.probe import PeakRss
from benchmarks.serving import ROOT


@dataclass(frozen=True)
class Options:
    bundle: Path = ROOT / "models" / "demo"
    requests: int = 10_000
    seed: int = 0
    concurrency: int = 32
    timeout: float = 30.0  # per request: a server that hangs shows as DEADLINE_EXCEEDED
    budget: float = 1800.0  # no request is started after this many seconds
    threads: int = 1
    log: Path | None = None
    server_args: tuple[str, ...] = ()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.hostile",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Options()
    p.add_argument("--bundle", type=Path, default=d.bundle, help="bundle to serve (default: models/demo)")
    p.add_argument(
        "--requests", type=int, default=d.requests, help="hostile RPCs to send (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="names the requests drawn (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="in flight (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds per RPC (default: %(default)s)")
    p.add_argument(
        "--budget",
        type=float,
        default=d.budget,
        help="seconds after which no RPC is started (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="server's onnxruntime threads (default: 1)")
    p.add_argument("--log", type=Path, help="server log file (default: a new temporary directory)")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `nextword serve` argument (repeat), e.g. --server-arg=--max-text-chars=1024",
    )
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument(
        "--results", type=Path, help="replace the '## Hostile input' section of this markdown file"
    )
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be at least 1")
    return args


def run(options: Options, progress: bool = False) -> Report:
    """Start the server, attack it, measure it, stop it: the whole run, as the tests use it."""
    log = options.log or Path(tempfile.mkdtemp(prefix="nextword-hostile-")) / "server.log"
    server = ServerProcess(options.bundle, log, options.threads, options.server_args)
    try:
        attacks = draw(options.requests, options.seed)  # while the server loads its model
        server.wait_ready()
        report = asyncio.run(_attack(server, attacks, options, progress))
    finally:
        exit_status = server.stop()
    # Read after the stop: what the server logs while draining counts too.
    report.log = scan_log(server.log_text())
    report.exit_status = exit_status
    report.goals = judge(report)
    return report


async def _attack(server: ServerProcess, attacks: list[Attack], options: Options, progress: bool) -> Report:
    before = await reference.answers(server.address)
    rss_before = server.rss()
    peak = PeakRss(server.proc.pid, every=0.25)
    start = time.monotonic()
    outcomes = await fire(
        server.address,
        attacks,
        concurrency=options.concurrency,
        timeout=options.timeout,
        budget=options.budget,
        progress=_progress(len(attacks), start) if progress else lambda done: None,
    )
    seconds = time.monotonic() - start
    try:
        after, error = await reference.answers(server.address), ""
    except grpc.aio.AioRpcError as exc:
        after, error = None, f"{exc.code().name}: {exc.details()}"
    health = await reference.health(server.address)
    rss_peak = peak.stop()
    codes, by_kind = tally(outcomes)
    return Report(
        bundle=_shown(options.bundle),
        seed=options.seed,
        planned=len(attacks),
        concurrency=options.concurrency,
        seconds=seconds,
        codes=codes,
        by_kind=by_kind,
        log_path=str(server.log),
        rss_before=rss_before,
        rss_peak=rss_peak,
        rss_after=server.rss(),
        sessions_after=server.gauge("nextword_active_sessions"),
        health=health,
        references=reference.compare(before, after, error),
        examples=examples(outcomes),
    )


def _progress(total: int, start: float) -> Callable[[int], None]:
    step = max(1, total // 10)

    def show(done: int) -> None:
        if done % step == 0 or done == total:
            print(f"hostile: {done:,}/{total:,} answered, {time.monotonic() - start:.0f} s", file=sys.stderr)

    return show


def _shown(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _command(options: Options) -> str:
    """The command that repeats this run: the options that differ from the defaults (not the outputs)."""
    default, argv = Options(), ["python", "-m", "benchmarks.hostile"]
    for name in ("bundle", "requests", "seed", "concurrency", "timeout", "budget", "threads"):
        if (value := getattr(options, name)) != getattr(default, name):
            argv += [f"--{name}", _shown(value) if isinstance(value, Path) else str(value)]
    return shlex.join(argv + [f"--server-arg={a}" for a in options.server_args])


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every goal is met, 1 when one is not."""
    args = parse_args(argv)
    options = Options(
        bundle=args.bundle,
        requests=args.requests,
        seed=args.seed,
        concurrency=args.concurrency,
        timeout=args.timeout,
        budget=args.budget,
        threads=args.threads,
        log=args.log,
        server_args=tuple(args.server_arg),
    )
    report = run(options, progress=sys.stderr.isatty() or options.requests >= 1000)
    print(render(report))
    if args.json:
        data = {**dataclasses.asdict(report), "passed": report.passed}
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if args.results:
        from benchmarks.serving.report import machine  # imports onnxruntime: only when writing results

        m = machine()
        where = f"{m['nproc']} CPUs ({m['cpu']}), grpcio {m['grpcio']}, Python {m['python']}"
        where += f"; code `{m['revision']}`"
        write_section(args.results, markdown(report, _command(options), where))
    return 0 if report.passed else 1
