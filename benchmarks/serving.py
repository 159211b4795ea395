"""Serving benchmark: nextword against its floors and a naive server, side by side in one run.

    python benchmarks/serving.py [--bundle models/demo] [--int8-bundle PATH] [--quick] [--json OUT]

This machine is noisy, so only ratios measured in the same run mean anything;
every number a goal compares is measured here, in this run:

* raw onnxruntime (``OnnxLM`` in a process of its own): ``step`` at batch 1,
  seq 1 (latency), words/s at batch 1..256 with the state fed back, ``head``
  at batch 1; a fresh process for the first call at an unseen batch size;
* the bare grpc.aio echo server (``benchmarks/floors.py echo``): the RPC floor;
* the naive server (``benchmarks/floors.py naive``): whole context through the
  model on every request, what a careless implementation costs;
* nextword itself: ``nextword serve`` as a subprocess, its batch sizes read
  from its ``/metrics`` before and after each run;
* idle-session memory: ``start_server`` in a process of its own, sessions
  opened through the servicer's ``Session`` method (the RPC handler, without
  the network), its RSS before and after.

The client side is ``clients/loadtest.py`` for every server (same code, same
process count), closed loop, one word per request. The table of goals P1–P7 is
printed and, for a full run, written to ``benchmarks/RESULTS.md`` under
``## Serving`` (only that section is replaced).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script from anywhere: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nextword.bundle import load_bundle
from nextword.clients.loadtest import LoadTestError, run_load_processes

ROOT = Path(__file__).resolve().parent.parent

BATCH_SIZES = (1, 8, 32, 64, 128, 256)
COLD_BATCH = 37  # a batch size nothing else in the benchmark uses
SERVING = re.compile(r"nextword serving .* on [\d.]+:(\d+), metrics on :(\d+)")
FLOOR = re.compile(r"floor listening on [\d.]+:(\d+)")
BYTES_1M_LIMIT = 10e9
SECTION = "## Serving"


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


# --------------------------------------------------------------------------- worker processes
# Each runs in a fresh interpreter (``--worker``), so its timings and RSS are its own.


def _new_state(result: Any) -> Any:
    # OnnxLM.step returns the new state last (log-probs, and any in-graph top-k outputs, come first).
    return result[-1]


def _percentiles_ms(times: Sequence[float]) -> dict[str, float]:
    a = np.asarray(times) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
        "calls": len(a),
    }


def worker_raw(bundle_dir: Path, threads: int, seconds: float, latency_calls: int) -> dict[str, Any]:
    """onnxruntime alone: latency at batch 1 and words/s at each batch size, state fed back."""
    from nextword.runtime import OnnxLM

    lm = OnnxLM(load_bundle(bundle_dir), device="cpu", threads=threads)
    rng = np.random.default_rng(0)
    vocab = lm.vocab_size

    def tokens(batch: int) -> np.ndarray:
        return rng.integers(3, vocab, size=(batch, 1), dtype=np.int64)

    state = lm.zero_state(1)
    for _ in range(20):
        state = _new_state(lm.step(tokens(1), state))
    times = []
    for _ in range(latency_calls):
        t = tokens(1)
        start = time.perf_counter()
        state = _new_state(lm.step(t, state))
        times.append(time.perf_counter() - start)
    out: dict[str, Any] = {"provider": lm.provider, "step_b1": _percentiles_ms(times)}
    ranked = getattr(lm, "step_ranked", None)
    if ranked is not None:  # what the server calls: in-graph top-k, no full log-probs (informational)
        times = []
        for _ in range(latency_calls):
            t = tokens(1)
            start = time.perf_counter()
            state = ranked(t, state, full=False).state
            times.append(time.perf_counter() - start)
        out["step_ranked_b1"] = _percentiles_ms(times)
    for _ in range(20):
        lm.head(state)
    times = []
    for _ in range(latency_calls):
        start = time.perf_counter()
        lm.head(state)
        times.append(time.perf_counter() - start)
    out["head_b1"] = _percentiles_ms(times)

    throughput = {}
    for batch in BATCH_SIZES:
        state = lm.zero_state(batch)
        pool = [tokens(batch) for _ in range(16)]
        for t in pool[:3]:
            state = _new_state(lm.step(t, state))
        calls = 0
        start = time.perf_counter()
        while calls < 5 or time.perf_counter() - start < seconds:
            state = _new_state(lm.step(pool[calls % len(pool)], state))
            calls += 1
        elapsed = time.perf_counter() - start
        throughput[str(batch)] = {"words_per_s": batch * calls / elapsed, "call_ms": elapsed / calls * 1e3}
    out["throughput"] = throughput
    return out


def worker_cold(bundle_dir: Path, threads: int, calls: int) -> dict[str, Any]:
    """A fresh ``OnnxLM``: the server's startup call (batch 1), then a first call at an unseen size.

    The server always makes one batch-1 step at startup (the state after <eos>),
    so the first call at batch ``COLD_BATCH`` after it is what its first real
    batch of that size meets.
    """
    from nextword.runtime import OnnxLM

    lm = OnnxLM(load_bundle(bundle_dir), device="cpu", threads=threads)
    start = time.perf_counter()
    lm.step(np.ones((1, 1), dtype=np.int64), lm.zero_state(1))
    first_ever = time.perf_counter() - start
    tokens = np.full((COLD_BATCH, 1), 5, dtype=np.int64)
    state = lm.zero_state(COLD_BATCH)
    start = time.perf_counter()
    state = _new_state(lm.step(tokens, state))
    first = time.perf_counter() - start
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        state = _new_state(lm.step(tokens, state))
        times.append(time.perf_counter() - start)
    return {
        "batch": COLD_BATCH,
        "startup_call_ms": first_ever * 1e3,
        "first_call_ms": first * 1e3,
        "steady": _percentiles_ms(times),
    }


class _Context:
    """Just enough of ``grpc.aio.ServicerContext`` to call the servicer's ``Session`` directly."""

    def __init__(self) -> None:
        self.replies = 0

    async def write(self, message: Any) -> None:
        self.replies += 1

    async def abort(self, code: Any, details: str = "", *args: Any) -> None:
        raise RuntimeError(f"the server aborted a session: {code}: {details}")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def add_done_callback(self, callback: Any) -> None:
        pass

    def set_code(self, code: Any) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _memory(bundle_dir: Path, threads: int, sessions: int, concurrency: int = 256) -> dict[str, Any]:
    from nextword.server.app import start_server
    from nextword.server.config import ServerConfig
    from nextword.v1 import nextword_pb2 as pb

    warmup = 4 * concurrency
    config = ServerConfig(
        model=bundle_dir, port=0, metrics_port=0, threads=threads, max_sessions=sessions + warmup + 16
    )
    running = await start_server(config)
    words = "the old man sat by the river and looked at the sea".split()

    async def requests(i: int) -> AsyncIterator[Any]:
        # Two words, so each session holds a state of its own (not the shared initial one).
        yield pb.SessionRequest(text=f"{words[i % len(words)]} {words[(i * 7) % len(words)]} ", k=3)

    async def open_sessions(n: int) -> None:
        # A fixed pool of workers, not n tasks: n live tasks would themselves inflate the RSS measured.
        next_index = iter(range(n))

        async def worker() -> None:
            for i in next_index:
                await running.servicer.Session(requests(i), _Context())  # type: ignore[arg-type]

        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))

    try:
        await open_sessions(warmup)  # onnxruntime's buffers for every batch size, the table's first growth
        gc.collect()
        before = _rss_bytes()
        start = time.perf_counter()
        await open_sessions(sessions)
        elapsed = time.perf_counter() - start
        gc.collect()
        after = _rss_bytes()
        active = running.metrics.registry.get_sample_value("nextword_active_sessions")
    finally:
        await running.stop(0)
    return {
        "sessions": sessions,
        "active_sessions": active,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_session": (after - before) / sessions,
        "sessions_per_s": sessions / elapsed,
    }


def worker_memory(bundle_dir: Path, threads: int, sessions: int) -> dict[str, Any]:
    return asyncio.run(_memory(bundle_dir, threads, sessions))


def _run_worker(kind: str, bundle: Path, threads: int, *extra: str, timeout: float = 300) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--bundle", str(bundle)]
    cmd += ["--threads", str(threads), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- servers


class Child:
    """A server subprocess: started, waited on until its log says where it listens, stopped."""

    def __init__(self, name: str, cmd: list[str], ready: re.Pattern[str], timeout: float = 120) -> None:
        self.name = name
        self.cmd = cmd
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.match = self._wait(ready, timeout)
        # Keep draining its log: a full pipe would block the server mid-benchmark.
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait(self, ready: re.Pattern[str], timeout: float) -> re.Match[str]:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if (match := ready.search(line)) is not None:
                return match
        self.stop()
        raise RuntimeError(f"{self.name} did not start ({shlex.join(self.cmd)}):\n{''.join(self.log)}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running(child: Child) -> Iterator[Child]:
    try:
        yield child
    finally:
        child.stop()


def nextword_server(bundle: Path, threads: int, extra: Sequence[str]) -> Child:
    cmd = [sys.executable, "-m", "nextword.cli", "serve", "--model", str(bundle), "--port", "0"]
    # --metrics-port -1: a free port, named in the serving log line with the gRPC one.
    cmd += ["--metrics-port", "-1", "--threads", str(threads), *extra]
    return Child("nextword serve", cmd, SERVING)


def floor_server(kind: str, bundle: Path, threads: int) -> Child:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "floors.py"), kind, "--port", "0"]
    if kind == "naive":
        cmd += ["--model", str(bundle), "--threads", str(threads)]
    return Child(f"{kind} server", cmd, FLOOR)


def batch_histogram(metrics_port: int) -> tuple[float, float]:
    """``nextword_batch_size`` (sum, count) from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {}
    for name in ("nextword_batch_size_sum", "nextword_batch_size_count"):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        values[name] = float(match.group(1)) if match else math.nan
    return values["nextword_batch_size_sum"], values["nextword_batch_size_count"]


# --------------------------------------------------------------------------- profiles


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None, seconds: float) -> Iterator[None]:
    """``py-spy record`` of ``pid`` while the block runs (collapsed stacks, one thread per root)."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, math.ceil(seconds)))]
    # --nonblocking: sample without pausing the server, so it is slowed as little as possible.
    cmd += ["--rate", "200", "--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize_profile(path: Path, top: int = 15) -> str:
    """The functions with the most samples: on-CPU in them (self) and with what they call (total)."""
    if not path.is_file():
        return f"{path}: no profile (is py-spy installed and allowed to ptrace?)"
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        samples += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            total[frame] += n
    if not samples:
        return f"{path.name}: no samples"
    by_thread = ", ".join(f"{t} {n / samples:.0%}" for t, n in threads.most_common(4))
    lines = [f"{path.name}: {samples} samples; by thread: {by_thread}", "  self%  total%  function"]
    lines += [f"  {n / samples:5.1%}  {total[f] / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("  (by total)")
    lines += [f"  {own[f] / samples:5.1%}  {n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- load runs


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


class Bench:
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
    ) -> Run:
        run = Run(target, label, streams, context, self.procs_for(streams))
        before = batch_histogram(metrics_port) if metrics_port else (math.nan, math.nan)
        name = re.sub(r"\W+", "-", f"{target}-{label}").strip("-")
        out = self.args.profile / f"{name}.txt" if self.args.profile and profile_pid else None
        try:
            with py_spy(profile_pid, out, (duration or 5) + 2):
                report = run_load_processes(
                    address,
                    procs=run.procs,
                    streams=streams,
                    duration=duration,
                    words=words,
                    # Every argument spelled out: the multi-process path passes only what it is given.
                    rate=None,
                    context_words=context,
                    k=3,
                    allow_remote=False,
                )
            run.result = report.to_json_dict()
            if report.errors:
                run.error = ", ".join(f"{c} x{n}" for c, n in sorted(report.errors.items()))
                self.log(f"{target} {label}: errors {report.error_details}")
        except LoadTestError as exc:
            run.error = str(exc)
        if out is not None:
            self.profiles.append(out)
        if metrics_port:
            after = batch_histogram(metrics_port)
            calls = after[1] - before[1]
            run.mean_batch = (after[0] - before[0]) / calls if calls > 0 else math.nan
        self.runs.append(run)
        self.log(
            f"{target:8s} {label:22s} streams={streams:3d} ctx={context:3d}: "
            f"{run.get('words_per_s'):9.1f} words/s  p50 {run.get('p50_ms'):8.3f} ms  "
            f"p99 {run.get('p99_ms'):8.3f} ms  max {run.get('max_ms'):8.3f} ms"
            + (f"  mean batch {run.mean_batch:.1f}" if metrics_port else "")
            + (f"  ERRORS {run.error}" if run.error else "")
        )
        return run

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
        args, plan = self.args, self.plan
        short = plan.contexts[0]
        raw: dict[str, Any] = {}
        self.log(f"raw onnxruntime: {args.bundle}")
        raw["fp32"] = _run_worker(
            "raw",
            args.bundle,
            args.threads,
            "--seconds",
            str(plan.raw_s),
            "--calls",
            str(plan.raw_latency_calls),
        )
        if args.int8_bundle is not None:
            self.log(f"raw onnxruntime: {args.int8_bundle}")
            raw["int8"] = _run_worker(
                "raw",
                args.int8_bundle,
                args.threads,
                "--seconds",
                str(plan.raw_s),
                "--calls",
                str(plan.raw_latency_calls),
            )
        self.log("raw onnxruntime: first call at an unseen batch size, fresh process")
        cold = _run_worker(
            "cold", args.bundle, args.threads, "--calls", str(max(100, plan.raw_latency_calls // 10))
        )

        with running(floor_server("echo", args.bundle, args.threads)) as echo:
            address = f"127.0.0.1:{echo.match.group(1)}"
            self.load("echo", address, "1@ctx5", streams=1, context=short, duration=plan.long_s)
            self.load("echo", address, "256@ctx5", streams=256, context=short, duration=plan.long_s)

        with running(floor_server("naive", args.bundle, args.threads)) as naive:
            self.common_runs("naive", f"127.0.0.1:{naive.match.group(1)}")

        with running(nextword_server(args.bundle, args.threads, args.server_arg)) as server:
            address, metrics = f"127.0.0.1:{server.match.group(1)}", int(server.match.group(2))
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
                context=short,
                duration=plan.long_s,
                metrics_port=metrics,
                profile_pid=server.pid,
            )
            self.common_runs("nextword", address, metrics, server.pid)

        self.log(f"idle sessions: {plan.sessions} through the servicer, in a process of its own")
        memory = _run_worker(
            "memory", args.bundle, args.threads, "--sessions", str(plan.sessions), timeout=900
        )
        return {"raw": raw, "cold": cold, "memory": memory}


# --------------------------------------------------------------------------- goals


@dataclass
class Row:
    id: str
    measure: str
    measured: str
    goal: str
    ok: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "not measured" if self.ok is None else ("pass" if self.ok else "**fail**")


def _le(value: float, limit: float) -> bool:
    return math.isfinite(value) and value <= limit


def _ge(value: float, limit: float) -> bool:
    return math.isfinite(value) and value >= limit


def raw_call_s(throughput: dict[str, Any], batch: float) -> float:
    """Seconds per step call at ``batch``: linear between the measured sizes (clamped to their range)."""
    sizes = [int(b) for b in throughput]
    calls = [throughput[str(b)]["call_ms"] / 1e3 for b in sizes]
    return float(np.interp(batch, sizes, calls))


def _div(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is 0 (a failed run shows as a failed goal, not a crash)."""
    return a / b if math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan


def goals(
    bench: Bench, measured: dict[str, Any], bundle: Path, int8: Path | None
) -> tuple[list[Row], dict[str, float]]:
    raw, cold, memory = measured["raw"], measured["cold"], measured["memory"]
    fp32 = raw["fp32"]
    short, mid, long_ = bench.plan.contexts
    rows: list[Row] = []
    d: dict[str, float] = {}  # every ratio a goal rests on, for --json

    def nw(label: str) -> Run:
        return bench.find("nextword", label)

    def nv(label: str) -> Run:
        return bench.find("naive", label)

    # P1: one stream against a raw step plus a bare RPC round trip.
    one = nw(f"1@ctx{short}")
    ort_p50, echo_p50 = fp32["step_b1"]["p50_ms"], bench.find("echo", f"1@ctx{short}").get("p50_ms")
    floor = ort_p50 + echo_p50
    p50, p99 = one.get("p50_ms"), one.get("p99_ms")
    d.update(p1_floor_ms=floor, p1_ratio=_div(p50, floor), p1_tail=_div(p99, p50))
    rows.append(
        Row(
            "P1",
            "1 stream, p50 per word",
            f"{p50:.3f} ms = **{d['p1_ratio']:.2f}×** floor "
            f"({ort_p50:.3f} ORT step + {echo_p50:.3f} echo RTT)",
            "≤ 1.5× floor",
            _le(d["p1_ratio"], 1.5),
        )
    )
    rows.append(
        Row(
            "P1",
            "1 stream, p99 / p50",
            f"{p99:.3f} / {p50:.3f} ms = **{d['p1_tail']:.2f}×**",
            "≤ 3×",
            _le(d["p1_tail"], 3),
        )
    )

    # P2: 256 streams against the combined floor (echo and raw ORT at the batch the server formed).
    full = nw(f"256@ctx{short}")
    e, m = bench.find("echo", f"256@ctx{short}").get("words_per_s"), full.mean_batch
    r = _div(m, raw_call_s(fp32["throughput"], m)) if math.isfinite(m) else math.nan
    combined = _div(1, _div(1, e) + _div(1, r))
    got = full.get("words_per_s")
    d.update(p2_E=e, p2_R=r, p2_mean_batch=m, p2_floor=combined, p2_ratio=_div(got, combined))
    rows.append(
        Row(
            "P2",
            "256 streams, words/s vs combined floor",
            f"{got:.0f} = **{d['p2_ratio']:.2f}×** floor {combined:.0f} "
            f"(E {e:.0f} echo msg/s, R {r:.0f} ORT words/s at mean batch {m:.1f})",
            "≥ 0.8× floor",
            _ge(d["p2_ratio"], 0.8),
        )
    )
    a, b = nw(f"256@ctx{mid}").get("words_per_s"), nv(f"256@ctx{mid}").get("words_per_s")
    d["p2_vs_naive"] = _div(a, b)
    rows.append(
        Row(
            "P2",
            f"256 streams, {mid}-word contexts, vs naive",
            f"{a:.0f} vs {b:.0f} words/s = **{d['p2_vs_naive']:.1f}×**",
            "≥ 10× naive",
            _ge(d["p2_vs_naive"], 10),
        )
    )

    # P3: per-word cost at a long vs a short context (1 stream: latency; 64 streams: 1 / throughput).
    def p3(get: Any) -> tuple[float, float]:
        latency = _div(get(f"1@ctx{long_}").get("p50_ms"), get(f"1@ctx{short}").get("p50_ms"))
        cost = _div(get(f"64@ctx{short}").get("words_per_s"), get(f"64@ctx{long_}").get("words_per_s"))
        return latency, cost

    (lat, cost), (nlat, ncost) = p3(nw), p3(nv)
    d.update(p3_latency=lat, p3_cost64=cost, p3_naive_latency=nlat, p3_naive_cost64=ncost)
    rows.append(
        Row(
            "P3",
            f"1 stream p50, {long_}- vs {short}-word context",
            f"**{lat:.2f}×** (naive {nlat:.1f}×)",
            "≤ 1.1×",
            _le(lat, 1.1),
        )
    )
    rows.append(
        Row(
            "P3",
            f"64 streams, cost per word, {long_}- vs {short}-word context",
            f"**{cost:.2f}×** (naive {ncost:.1f}×)",
            "≤ 1.1×",
            _le(cost, 1.1),
        )
    )

    # P4: idle-session memory against the bytes of the state itself.
    manifest = load_bundle(bundle).manifest
    state_bytes = sum(int(np.prod(s.concrete_shape(1))) * np.dtype(s.dtype).itemsize for s in manifest.state)
    per = memory["bytes_per_session"]
    million = memory["rss_before"] + per * 1e6
    d.update(p4_state_bytes=state_bytes, p4_bytes_per_session=per, p4_ratio=per / state_bytes, p4_1m=million)
    rows.append(
        Row(
            "P4",
            f"RSS per idle session ({memory['sessions']:,} sessions)",
            f"{per:,.0f} B = **{d['p4_ratio']:.2f}×** state ({state_bytes:,} B)",
            "≤ 2× state",
            # Too few sessions (--quick) to move the RSS past the allocator's slack: no verdict.
            _le(d["p4_ratio"], 2) if per > 0 else None,
        )
    )
    rows.append(
        Row(
            "P4",
            "1M idle sessions (RSS, extrapolated)",
            f"**{million / 1e9:.2f} GB**",
            "< 10 GB",
            _le(million, BYTES_1M_LIMIT) if per > 0 else None,
        )
    )

    # P5: the int8 bundle against fp32, raw onnxruntime.
    if int8 is None or "int8" not in raw:
        rows.append(Row("P5", "int8 vs fp32", "not measured: no int8 bundle", "≥ 2×, ppl ≤ +2%", None))
    else:
        q, f = raw["int8"]["throughput"], fp32["throughput"]
        ratios = {bs: _div(q[bs]["words_per_s"], f[bs]["words_per_s"]) for bs in q}
        best = max(ratios, key=lambda bs: ratios[bs])
        ppl32 = float(manifest.metrics.get("test_perplexity", math.nan))
        ppl8 = float(load_bundle(int8).manifest.metrics.get("test_perplexity", math.nan))
        d.update(p5_ratio64=ratios.get("64", math.nan), p5_best=ratios[best], p5_ppl=_div(ppl8, ppl32))
        rows.append(
            Row(
                "P5",
                "int8 / fp32 step words/s (raw ORT)",
                f"batch 64 **{d['p5_ratio64']:.2f}×**, best {ratios[best]:.2f}× (batch {best})",
                "≥ 2× (batch 64)",
                _ge(d["p5_ratio64"], 2),
            )
        )
        rows.append(
            Row(
                "P5",
                "int8 / fp32 test perplexity",
                f"{ppl8:.2f} / {ppl32:.2f} = **{(d['p5_ppl'] - 1) * 100:+.2f}%**",
                "≤ +2%",
                _le(d["p5_ppl"], 1.02),
            )
        )

    # P6: batch formation under closed-loop load.
    for streams in (64, 256):
        mb = nw(f"{streams}@ctx{short}").mean_batch
        d[f"p6_mean_batch_{streams}"] = mb
        rows.append(
            Row(
                "P6",
                f"{streams} closed-loop streams, mean batch",
                f"**{mb:.1f}** ({mb / streams:.2f}× streams)",
                f"≥ {streams // 2}",
                _ge(mb, streams / 2),
            )
        )

    # P7: cold shapes, raw and through a fresh server.
    first, steady = cold["first_call_ms"], cold["steady"]["p99_ms"]
    burst, steady_srv = nw("burst 256 (fresh)").get("max_ms"), full.get("p99_ms")
    d.update(p7_raw=_div(first, steady), p7_server=_div(burst, steady_srv))
    rows.append(
        Row(
            "P7",
            f"raw ORT, first call at batch {cold['batch']} / steady p99",
            f"{first:.2f} / {steady:.2f} ms = **{d['p7_raw']:.2f}×**",
            "≤ 3×",
            _le(d["p7_raw"], 3),
        )
    )
    rows.append(
        Row(
            "P7",
            "fresh server, first 256-stream burst max / steady p99",
            f"{burst:.1f} / {steady_srv:.1f} ms = **{d['p7_server']:.2f}×**",
            "≤ 3×",
            _le(d["p7_server"], 3),
        )
    )
    return rows, d


# --------------------------------------------------------------------------- report


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


def render(
    bench: Bench, rows: list[Row], measured: dict[str, Any], mach: dict[str, Any], command: str
) -> str:
    args = bench.args
    lines = [
        "`benchmarks/serving.py` measures nextword (`nextword serve`), a bare grpc.aio echo server and a "
        "naive server (`benchmarks/floors.py`: whole context through the model per request) with the same "
        "load generator, and raw onnxruntime (`OnnxLM`) in processes of their own, all in one run: this "
        "machine is noisy, so only ratios within one run are compared.",
        "",
        f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), onnxruntime {mach['onnxruntime']}, "
        f"grpcio {mach['grpcio']}, Python {mach['python']}; client and server share the CPUs, loopback only. "
        f"Code: `{mach['revision']}`; bundle `{_shown(args.bundle)}`"
        + (f", int8 bundle `{_shown(args.int8_bundle)}`. " if args.int8_bundle else ". ")
        + f"onnxruntime intra-op threads: {args.threads} (raw, naive and nextword alike). "
        f"Load: `clients/loadtest.py`, closed loop, one word per request, k=3, "
        f"{args.procs} client process(es) for the multi-stream runs, 1 for one stream.",
        "",
        f"Command: `{command}`",
        "",
        "| id | measure | measured | goal | result |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.id} | {r.measure} | {r.measured} | {r.goal} | {r.verdict} |" for r in rows]
    lines += [
        "",
        "Load runs (same client code and process count for every server):",
        "",
        "| server | run | streams | context words | client procs | words/s | p50 ms | p99 ms | max ms "
        "| mean batch | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in bench.runs:
        lines.append(
            f"| {run.target} | {run.label} | {run.streams} | {run.context} | {run.procs} | "
            f"{_f(run.get('words_per_s'))} | {_f(run.get('p50_ms'), 3)} | {_f(run.get('p99_ms'), 3)} | "
            f"{_f(run.get('max_ms'), 3)} | {_f(run.mean_batch)} | {run.error or '0'} |"
        )
    raw = measured["raw"]
    header = "| onnxruntime step, seq 1 | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " |"
    lines += ["", header, "|---" * (len(BATCH_SIZES) + 1) + "|"]
    for name, result in raw.items():
        t = result["throughput"]
        lines.append(
            f"| {name} words/s | " + " | ".join(_f(t[str(b)]["words_per_s"], 0) for b in BATCH_SIZES) + " |"
        )
        lines.append(
            f"| {name} ms/call | " + " | ".join(_f(t[str(b)]["call_ms"], 3) for b in BATCH_SIZES) + " |"
        )
    fp32, cold, mem = raw["fp32"], measured["cold"], measured["memory"]
    step, head, ranked = fp32["step_b1"], fp32["head_b1"], fp32.get("step_ranked_b1")
    ranked_note = f"; `step_ranked` (the server's call) p50 {ranked['p50_ms']:.3f} ms" if ranked else ""
    lines += [
        "",
        f"onnxruntime batch 1: step p50 {step['p50_ms']:.3f} ms, p99 {step['p99_ms']:.3f} ms;"
        f" head p50 {head['p50_ms']:.3f} ms, p99 {head['p99_ms']:.3f} ms{ranked_note} "
        f"({fp32['provider']}). Fresh process: startup call (batch 1) {cold['startup_call_ms']:.2f} ms, "
        f"first call at batch {cold['batch']} {cold['first_call_ms']:.2f} ms, steady p50 "
        f"{cold['steady']['p50_ms']:.2f} ms / p99 {cold['steady']['p99_ms']:.2f} ms.",
        f"Idle sessions: {mem['sessions']:,} opened in {mem['sessions'] / mem['sessions_per_s']:.1f} s "
        f"({mem['active_sessions']:,.0f} held after), RSS {mem['rss_before'] / 2**20:,.1f} → "
        f"{mem['rss_after'] / 2**20:,.1f} MiB.",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the ``## Serving`` section of ``path``; other sections are left as they are."""
    # Others edit this file too: read it right before writing, touch only our section.
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    section = f"{SECTION}\n\n{body}"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    # Internal: the measurements that need a process of their own.
    p.add_argument("--worker", choices=["raw", "cold", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--sessions", type=int, default=1000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.int8_bundle is None and not args.worker:
        default = args.bundle.parent / f"{args.bundle.name}-int8"
        args.int8_bundle = default if (default / "manifest.json").is_file() else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.worker == "raw":
            result = worker_raw(args.bundle, args.threads, args.seconds, args.calls)
        elif args.worker == "cold":
            result = worker_cold(args.bundle, args.threads, args.calls)
        else:
            result = worker_memory(args.bundle, args.threads, args.sessions)
        print(json.dumps(result))
        return 0

    plan = Plan.quick() if args.quick else Plan.full()
    bench = Bench(args, plan)
    command = shlex.join(["python", "benchmarks/serving.py", *(sys.argv[1:] if argv is None else argv)])
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
        out = {
            "command": command,
            "machine": mach,
            "quick": args.quick,
            "goals": [{**r.__dict__, "result": r.verdict} for r in rows],
            "derived": derived,
            "runs": [r.__dict__ for r in bench.runs],
            **measured,
        }
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    results = args.results or (None if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    if results is not None:
        write_section(results, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
