"""Flood: can pasting clients stall or bloat the server for someone typing?

    python -m benchmarks.flood                      # demo model, 64 pasting clients, 20 s of flood
    python -m benchmarks.flood --hammer             # pasters retry at once, ignoring the retry advice
    python -m benchmarks.flood -- --prefill-call-tokens 128   # after --: flags for nextword serve
    python -m benchmarks.flood --quick --model DIR  # a few seconds (the test suite)

A real ``nextword serve`` subprocess. One client types one word at a time on a
Session stream (the next word as soon as the reply is in) and measures each
reply's latency: first on the idle server, then while ``--clients`` clients (in
a process of their own) send Predicts of the largest text the server takes
(``--max-request-tokens`` tokens, "a, a, ...") in a loop, waiting as long as a
RESOURCE_EXHAUSTED reply's ``grpc-retry-pushback-ms`` says (or not at all with
``--hammer``). It prints the p99 ratio (goal: at most 5) and the server's RSS
before the flood, at its peak and after it (goal: after within 1.25x of before).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.probe import PeakRss, metric_samples, rss_bytes
from benchmarks.serving.servers import nextword_server, running
from nextword.bundle import DEMO_BUNDLE
from nextword.server.config import ServerConfig
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

TYPED = (
    "it is a truth universally acknowledged that a single man in possession of a good fortune "
    "must be in want of a wife . however little known the feelings or views of such a man may be "
).split()
GOAL_RATIO, GOAL_RSS = 5.0, 1.25


def _default(name: str) -> Any:
    return next(f.default for f in fields(ServerConfig) if f.name == name)


# ---------------------------------------------------------------------------- the typing client


async def type_for(address: str, seconds: float) -> list[float]:
    """Latencies (s) of one word at a time on one Session stream, for ``seconds``."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.NextWordStub(channel).Session()
        deadline = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await call.write(pb.SessionRequest(text=TYPED[i % len(TYPED)] + " "))
            reply = await call.read()
            latencies.append(time.perf_counter() - start)
            assert isinstance(reply, pb.SessionReply), reply
            i += 1
        await call.done_writing()
    return latencies


# ---------------------------------------------------------------------------- the pasting clients


@dataclass
class FloodStats:
    answered: int = 0
    refused: int = 0  # RESOURCE_EXHAUSTED: the in-flight budget
    errors: dict[str, int] = field(default_factory=dict)  # any other status, by code


def pushback(error: grpc.aio.AioRpcError) -> float:
    """The retry advice of a refusal, in seconds (0 when there is none)."""
    metadata: Any = error.trailing_metadata() or ()  # grpc-stubs types it loosely
    advice = dict(metadata).get("grpc-retry-pushback-ms")
    return int(advice) / 1000 if advice else 0.0


async def paste_loop(
    stub: pb_grpc.NextWordStub, text: str, until: float, hammer: bool, stats: FloodStats
) -> None:
    while time.perf_counter() < until:
        try:
            await stub.Predict(pb.PredictRequest(text=text), timeout=60)
            stats.answered += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                stats.errors[exc.code().name] = stats.errors.get(exc.code().name, 0) + 1
                await asyncio.sleep(0.01)
                continue
            stats.refused += 1
            await asyncio.sleep(0 if hammer else pushback(exc))


async def flood(address: str, clients: int, tokens: int, seconds: float, hammer: bool) -> FloodStats:
    """``clients`` concurrent Predict loops of a ``tokens``-token text, over 4 connections."""
    text = "a, " * (tokens // 2) + "a " * (tokens % 2)
    stats = FloodStats()
    until = time.perf_counter() + seconds
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    stubs = [pb_grpc.NextWordStub(channels[i % len(channels)]) for i in range(clients)]
    await asyncio.gather(*(paste_loop(stub, text, until, hammer, stats) for stub in stubs))
    for channel in channels:
        await channel.close(None)
    return stats


def flooder(address: str, clients: int, tokens: int, seconds: float, hammer: bool) -> subprocess.Popen[str]:
    """The pasting clients in a process of their own, so that they do not slow the typing one."""
    cmd = [sys.executable, "-m", "benchmarks.flood", "--flooder", address, "--clients", str(clients)]
    cmd += ["--paste-tokens", str(tokens), "--flood-seconds", str(seconds)] + ["--hammer"] * hammer
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------- the server's side


def rss_mb(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def metric(metrics_port: int, name: str) -> float:
    return metric_samples(metrics_port, name)[0]


def wait_idle(metrics_port: int, timeout: float = 60) -> None:
    """Until the server has no model tokens in flight (the flood's last pastes have run)."""
    deadline = time.monotonic() + timeout
    while metric(metrics_port, "nextword_inflight_tokens") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)


# ---------------------------------------------------------------------------- the run


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.array(latencies) * 1000, q))


def measure(args: argparse.Namespace, serve_args: list[str]) -> dict[str, Any]:
    load = os.getloadavg()[0]  # other work on the machine skews every figure: say how much there was
    server = nextword_server(args.model, args.threads, serve_args)
    with running(server):
        metrics_port = int(server.match.group(2))
        asyncio.run(type_for(server.address, min(1.0, args.idle_seconds)))  # connections, first shapes
        idle = asyncio.run(type_for(server.address, args.idle_seconds))
        rss_before, words_before = rss_mb(server.pid), metric(metrics_port, "nextword_words_total")
        peak = PeakRss(server.pid)
        ramp = min(2.0, args.flood_seconds / 4)  # the pasters fill the budget before typing starts
        pasters = flooder(
            server.address, args.clients, args.paste_tokens, ramp + args.flood_seconds, args.hammer
        )
        time.sleep(ramp)
        flooded = asyncio.run(type_for(server.address, args.flood_seconds))
        out, _ = pasters.communicate(timeout=args.flood_seconds + 120)
        assert pasters.returncode == 0, f"the pasting clients failed ({pasters.returncode})"
        words = metric(metrics_port, "nextword_words_total") - words_before
        wait_idle(metrics_port)
        time.sleep(args.settle_seconds)  # what the server keeps, not what it is still releasing
        rss_peak, rss_after = peak.stop() / 2**20, rss_mb(server.pid)
    result = _result(
        args, serve_args, idle, flooded, (rss_before, rss_peak, rss_after), json.loads(out), words
    )
    return {**result, "load_average": [load, os.getloadavg()[0]]}


def _result(
    args: argparse.Namespace,
    serve_args: list[str],
    idle: list[float],
    flooded: list[float],
    rss: tuple[float, float, float],
    stats: dict[str, Any],
    words: float,
) -> dict[str, Any]:
    seconds = args.flood_seconds + min(2.0, args.flood_seconds / 4)
    return {
        "server": [
            "nextword",
            "serve",
            "--model",
            str(args.model),
            "--threads",
            str(args.threads),
            *serve_args,
        ],
        "cores": os.cpu_count(),
        "clients": args.clients,
        "paste_tokens": args.paste_tokens,
        "pasters": "retry at once" if args.hammer else "wait as advised",
        "idle": {"n": len(idle), "p50_ms": percentile_ms(idle, 50), "p99_ms": percentile_ms(idle, 99)},
        "flood": {
            "n": len(flooded),
            "p50_ms": percentile_ms(flooded, 50),
            "p99_ms": percentile_ms(flooded, 99),
        },
        "p99_ratio": percentile_ms(flooded, 99) / percentile_ms(idle, 99),
        "rss_mb": {"before": rss[0], "peak": rss[1], "after": rss[2]},
        "rss_ratio": rss[2] / rss[0],
        "pastes_per_s": stats["answered"] / seconds,
        "refused_per_s": stats["refused"] / seconds,
        "other_errors": stats["errors"],
        "model_tokens_per_s": words / seconds,
    }


def report(r: dict[str, Any]) -> str:
    idle, flooded, rss = r["idle"], r["flood"], r["rss_mb"]
    ratio, rss_ratio = r["p99_ratio"], r["rss_ratio"]

    def verdict(good: bool) -> str:
        return "met" if good else "MISSED"

    return "\n".join(
        [
            f"server: {' '.join(r['server'])}  ({r['cores']} cores, load average "
            f"{r['load_average'][0]:.1f} before, {r['load_average'][1]:.1f} after)",
            f"flood: {r['clients']} clients pasting {r['paste_tokens']}-token texts, {r['pasters']}",
            f"typing latency idle:  p50 {idle['p50_ms']:.2f} ms  p99 {idle['p99_ms']:.2f} ms  "
            f"({idle['n']} words)",
            f"typing latency flood: p50 {flooded['p50_ms']:.2f} ms  p99 {flooded['p99_ms']:.2f} ms  "
            f"({flooded['n']} words)",
            f"p99 flood/idle: {ratio:.2f}x  (goal <= {GOAL_RATIO:g}x: {verdict(ratio <= GOAL_RATIO)})",
            f"server RSS: before {rss['before']:.0f} MB, peak {rss['peak']:.0f} MB, "
            f"after {rss['after']:.0f} MB  (after/before {rss_ratio:.2f}x, "
            f"goal <= {GOAL_RSS:g}x: {verdict(rss_ratio <= GOAL_RSS)})",
            f"pastes: {r['pastes_per_s']:.1f} answered/s, {r['refused_per_s']:.1f} refused/s "
            f"(RESOURCE_EXHAUSTED), other errors {r['other_errors'] or 'none'}; "
            f"model {r['model_tokens_per_s']:.0f} tokens/s",
        ]
    )


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.flood", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEMO_BUNDLE, help="bundle to serve (default: the demo)")
    p.add_argument("--clients", type=int, default=64, help="pasting clients")
    p.add_argument(
        "--paste-tokens", type=int, help="tokens per paste (default: the server's --max-request-tokens)"
    )
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--flood-seconds", type=float, default=20.0)
    p.add_argument(
        "--settle-seconds", type=float, default=3.0, help="wait after the flood before RSS 'after'"
    )
    p.add_argument("--threads", type=int, default=0, help="the server's --threads (0: onnxruntime's default)")
    p.add_argument("--hammer", action="store_true", help="pasters retry at once, ignoring the retry advice")
    p.add_argument("--quick", action="store_true", help="16 clients, 1 s idle, 2 s of flood (tests)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--flooder", metavar="ADDRESS", help=argparse.SUPPRESS)  # the pasters' own process
    args = p.parse_args(own)
    if args.paste_tokens is None:
        flag = "--max-request-tokens"
        args.paste_tokens = int(serve_args[serve_args.index(flag) + 1]) if flag in serve_args else None
        args.paste_tokens = args.paste_tokens or _default("max_request_tokens")
    if args.quick:
        args.clients, args.idle_seconds, args.flood_seconds, args.settle_seconds = 16, 1.0, 2.0, 0.5
    return args, serve_args


def main(argv: list[str] | None = None) -> int:
    args, serve_args = parse(argv)
    if args.flooder:
        stats = asyncio.run(
            flood(args.flooder, args.clients, args.paste_tokens, args.flood_seconds, args.hammer)
        )
        print(json.dumps(stats.__dict__))
        return 0
    result = measure(args, serve_args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
