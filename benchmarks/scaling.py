"""Scaling out: one worker's latency, several workers' throughput, and what the session store costs.

    python -m benchmarks.scaling [--bundle models/demo] [--workers 2] [--quick] [--results FILE]

(run from the repository root; Redis rows need ``redis-server``: scripts/install-services.sh redis).
Every ratio compares numbers measured in this run, on this machine:

* S1  one stream, one worker, no store: p50 per word against the floor, a raw
      onnxruntime step (batch 1, in a process of its own) plus the bare grpc.aio
      echo server's round trip;
* S1b for information, what that floor leaves out: the same raw step made an echo
      round trip apart (the server's steps are never back to back), the
      server's own mean onnxruntime call during S1's run (from its /metrics), and
      the raw step back to back with its memory in huge pages, as the server
      keeps it (server/hugepages.py; the floor is onnxruntime as it runs by default);
* S2  ``--workers N``: 256 closed-loop streams' words/s against the combined
      floor (echo messages/s and raw onnxruntime words/s at the batch the server
      formed, as the serving benchmark's P2), three times, each beside its own
      echo run: the median of the three ratios;
* S3  ``--workers N``: mean batch at 64 streams against half the streams a
      worker holds (64 / N: one onnxruntime call holds only its own worker's streams;
      the ratio to all 64 is shown too);
* S2b for information, the CPU a word costs each kind of thread of the servers at 256
      streams: event loop, onnxruntime, session store, gRPC core's own (/proc);
* S4  event-loop CPU per reply: the CPU time of the servers' main threads (where
      the event loop runs; /proc/PID/task/TID/stat) divided by the replies,
      nextword's N workers against the echo server run as N processes sharing its
      port the same way, both offered the same load: 256 open-loop streams at
      ``EVEN_RATE`` words/s each, so every event loop of either answers the same
      share. Like for like matters because what a reply costs a loop falls with the
      rate it answers at (the loop finds more work per wake-up): the echo server's
      own cost per reply doubles between its closed-loop rate and this one;
* S4b the same closed loop, for information (what earlier runs called S4): 256
      streams as fast as each answers, nextword's N workers against one echo
      process, which then answers about twice as many messages a second;
* S5  one stream p50 with ``--session-store redis://`` against no store,
      alternated (none, redis, embedded, none, ...: five of each), the ratio
      taken within each repeat and the median of them compared;
* S6  the same for the embedded store (a SQLite file), for information.

S7 (N workers against N × one worker's, on a machine with many cores) is
measured by ``python -m benchmarks.gpu``, with the GPU machine's other rows.

The load is ``nextword.clients.loadtest`` (closed loop, one word per request,
k=3) for every server, each process's streams spread over ``--connections``
connections: SO_REUSEPORT gives each worker connections, not streams, and two
connections land on one worker half the time. A full run writes its table into ``benchmarks/RESULTS.md``
under ``## Scaling`` (only that section).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.probe import metric_samples
from benchmarks.results import write_section
from benchmarks.serving import ROOT
from benchmarks.serving.goals import INFORMATION, Row, _ge, _le, raw_call_s
from benchmarks.serving.goals import _div as _ratio
from benchmarks.serving.plan import Plan
from benchmarks.serving.report import machine
from benchmarks.serving.runs import Bench, Run, run_table
from benchmarks.serving.servers import Child, floor_server, nextword_server, running
from benchmarks.serving.worker import run_worker
from nextword.server.batcher import MODEL_THREAD
from nextword.server.hugepages import environment, thp_mode
from nextword.server.store import WRITER_THREAD

SECTION = "## Scaling"
REPEATS = 5  # one-stream runs per store setting; the median p50 of each setting is compared
THROUGHPUT_REPEATS = 3  # 256-stream runs of echo and of nextword, alternating; S2 is the median ratio
EVEN_RATE = 12.0  # words/s per stream of the open-loop runs: 256 streams offer 3,072 words/s to each server
TICK = os.sysconf("SC_CLK_TCK")


ROLES = {MODEL_THREAD: "onnxruntime", WRITER_THREAD: "session store"}  # threads named by the server
ROLE_ORDER = ("event loop", "onnxruntime", "session store", "gRPC", "other")  # every role threads_cpu_s gives


def threads_cpu_s(pids: list[int]) -> defaultdict[str, float]:
    """CPU seconds (user + system) of the threads of ``pids`` by role: ``event loop`` (the main
    thread), ``onnxruntime`` and ``session store`` (named so by the server), ``gRPC`` (gRPC
    core's own threads) and ``other``."""
    by_role: defaultdict[str, float] = defaultdict(float)
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (task / "stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                if task.name == str(pid):
                    role = "event loop"
                elif comm in ROLES:
                    role = ROLES[comm]
                else:
                    role = "gRPC" if comm.startswith(("event_engine", "grpc")) else "other"
                by_role[role] += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return by_role


def _per_thread(seconds: dict[str, float]) -> str:
    return ", ".join(f"{r} {seconds[r] * 1e3:.3f} ms" for r in ROLE_ORDER if seconds.get(r, 0) > 0)


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (a supervisor's workers, and its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@contextlib.contextmanager
def redis(port: int) -> Iterator[str]:
    """A throwaway ``redis-server`` on loopback (no persistence); its URL."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")
    if binary is None:
        raise SystemExit("redis-server is missing: scripts/install-services.sh redis")
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=folder,
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                    break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scaling:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = Plan.quick() if args.quick else Plan.full()
        self.bench = Bench(
            argparse.Namespace(
                procs=args.procs, profile=None, bundle=args.bundle, threads=1, connections=args.connections
            ),
            self.plan,
        )
        self.by_thread: dict[str, dict[str, float]] = {}  # CPU seconds per reply by thread role, by run

    def nextword(self, *extra: str) -> Child:
        return nextword_server(self.args.bundle, 1, list(extra))

    def one_stream(self, server: Child, label: str) -> tuple[Run, float]:
        """One stream's run, and the server's mean onnxruntime call during it (ms, from /metrics)."""
        port = int(server.match.group(2))
        calls = ("nextword_onnx_compute_seconds_sum", "nextword_onnx_compute_seconds_count")
        before = metric_samples(port, *calls)
        run = self.bench.load(
            "nextword", server.address, label, streams=1, context=5, duration=self.plan.long_s
        )
        after = metric_samples(port, *calls)
        return run, _ratio(after[0] - before[0], after[1] - before[1]) * 1e3

    def loaded(
        self, target: str, server: Child, label: str, streams: int, pids: list[int], rate: float | None = None
    ) -> Run:
        """A multi-stream run (open loop at ``rate`` words/s per stream if given), with the CPU its
        main threads spent per reply."""
        metrics = int(server.match.group(2)) if target == "nextword" else 0
        before = threads_cpu_s(pids)
        run = self.bench.load(
            target,
            server.address,
            label,
            streams=streams,
            context=5,
            duration=self.plan.long_s,
            metrics_port=metrics,
            rate=rate,
        )
        replies = run.get("words")
        spent = threads_cpu_s(pids)
        self.by_thread[label] = {role: _ratio(t - before[role], replies) for role, t in spent.items()}
        return run

    def loop_cpu(self, label: str) -> float:
        """Event-loop CPU seconds per reply of the run ``label``."""
        return self.by_thread[label].get("event loop", math.nan)

    def raw(self, seconds: float, gap_ms: float = 0.0, *, huge_pages: bool = False) -> dict[str, Any]:
        """The raw onnxruntime worker, as onnxruntime runs by default, or (``huge_pages``) with its
        memory in huge pages as ``nextword serve`` keeps it (server/hugepages.py), where it can."""
        timing = ("--seconds", str(seconds), "--calls", str(self.plan.raw_latency_calls))
        env = environment(dict(os.environ), thp_mode()) if huge_pages else None
        return run_worker("raw", self.args.bundle, 1, *timing, "--gap-us", str(gap_ms * 1e3), env=env)

    def run(self) -> tuple[list[Row], dict[str, float]]:
        """Latency first, each repeat in turn: raw step, echo, nextword without and with each store
        (the machine's speed drifts: each ratio is taken within a repeat, then the median of them).
        Then throughput: echo, and nextword with workers."""
        args, bench = self.args, self.bench
        latency: list[dict[str, float]] = []
        with (
            running(floor_server("echo", args.bundle, 1)) as echo,
            redis(free_port()) as url,
            tempfile.TemporaryDirectory() as folder,
        ):
            specs = {"none": "none", "redis": url, "embedded": f"sqlite://{folder}/sessions.db"}
            for rep in range(REPEATS):
                bench.log(f"repeat {rep + 1}: echo, raw onnxruntime step, nextword with each store")
                run = bench.load(
                    "echo",
                    echo.address,
                    f"echo 1 #{rep + 1}",
                    streams=1,
                    context=5,
                    duration=self.plan.long_s,
                )
                got = {"echo": run.get("p50_ms")}
                # The raw step back to back (the floor), and the server's call as far apart as
                # an echo round trip (S1b, for information).
                raw = self.raw(self.plan.raw_s / 5, gap_ms=got["echo"])
                got["step"] = raw["step_b1"]["p50_ms"]
                got["step_apart"] = raw.get("step_ranked_gap_b1", {}).get("p50_ms", math.nan)
                got["step_huge"] = self.raw(self.plan.raw_s / 5, huge_pages=True)["step_b1"]["p50_ms"]
                for kind, spec in specs.items():
                    with running(self.nextword("--session-store", spec)) as server:
                        label = f"1 worker, {kind} store #{rep + 1}"
                        run, got[f"{kind}_call"] = self.one_stream(server, label)
                        got[kind] = run.get("p50_ms")
                latency.append(got)
            raw = self.raw(self.plan.raw_s)
            n = args.workers
            # 256 streams, each repeat the echo floor then nextword's workers (S2 is their median
            # ratio, as S1's and S5's are: the machine's speed drifts).
            with running(self.nextword("--workers", str(n))) as server:
                pids = children(server.pid)
                pairs = [
                    (
                        self.loaded("echo", echo, f"echo 256 #{rep}", 256, [echo.pid]),
                        self.loaded("nextword", server, f"{n} workers 256 #{rep}", 256, pids),
                    )
                    for rep in range(1, THROUGHPUT_REPEATS + 1)
                ]
                sixty_four = self.loaded("nextword", server, f"{n} workers 64", 64, pids)
                self.loaded("nextword", server, f"{n} workers open loop", 256, pids, rate=EVEN_RATE)
        with running(floor_server("echo", args.bundle, 1, processes=n)) as echo:
            self.loaded("echo", echo, "echo open loop", 256, [echo.pid, *children(echo.pid)], rate=EVEN_RATE)
        return self.rows(raw, latency, pairs, sixty_four)

    def rows(
        self,
        raw: dict[str, Any],
        latency: list[dict[str, float]],
        pairs: list[tuple[Run, Run]],
        sixty_four: Run,
    ) -> tuple[list[Row], dict[str, float]]:
        n = self.args.workers
        mid = sorted(latency, key=lambda got: _ratio(got["none"], got["step"] + got["echo"]))[
            len(latency) // 2
        ]

        def floor(pair: tuple[Run, Run]) -> tuple[float, float, float]:
            """(E, R, the combined floor) of one repeat: echo's msg/s, raw onnxruntime's words/s
            at the mean batch nextword ran."""
            m = pair[1].mean_batch
            r = _ratio(m, raw_call_s(raw["throughput"], m))
            e = pair[0].get("words_per_s")
            return e, r, _ratio(1, _ratio(1, e) + _ratio(1, r))

        s2 = [_ratio(pair[1].get("words_per_s"), floor(pair)[2]) for pair in pairs]
        echo256, many = sorted(pairs, key=lambda pair: _ratio(pair[1].get("words_per_s"), floor(pair)[2]))[
            len(pairs) // 2
        ]
        e, r, combined = floor((echo256, many))
        m = many.mean_batch
        d = {
            "s1_ratio": _ratio(mid["none"], mid["step"] + mid["echo"]),
            "s2_ratio": _median(s2),
            "s3_ratio": _ratio(sixty_four.mean_batch, 64 / n),
            "s4_ratio": _ratio(self.loop_cpu(f"{n} workers open loop"), self.loop_cpu("echo open loop")),
            "s4b_ratio": _ratio(self.loop_cpu(many.label), self.loop_cpu(echo256.label)),
        }
        rows = [
            Row(
                "S1",
                "1 stream, 1 worker, p50 per word",
                f"{mid['none']:.3f} ms = **{d['s1_ratio']:.2f}×** floor ({mid['step']:.3f} ORT step + "
                f"{mid['echo']:.3f} echo RTT; the median repeat of {len(latency)}: "
                + ", ".join(f"{_ratio(g['none'], g['step'] + g['echo']):.2f}×" for g in latency)
                + ")",
                "≤ 1.5× floor",
                _le(d["s1_ratio"], 1.5),
            ),
            Row(
                "S1b",
                "what S1's floor leaves out: the step as a server makes it",
                f"raw step {mid['step_apart']:.3f} ms made {mid['echo']:.3f} ms apart (one echo round "
                f"trip) against {mid['step']:.3f} back to back; the server's mean onnxruntime call "
                f"in S1's run {mid['none_call']:.3f} ms; S1's p50 against the step made apart + echo "
                f"RTT: **{_ratio(mid['none'], mid['step_apart'] + mid['echo']):.2f}×**; the raw step "
                f"with its memory in huge pages as the server keeps it, back to back: "
                f"{mid['step_huge']:.3f} ms (S1's p50 against it + echo RTT: "
                f"{_ratio(mid['none'], mid['step_huge'] + mid['echo']):.2f}×)",
                INFORMATION,
                None,
            ),
            Row(
                "S2",
                f"256 streams, {n} workers, words/s vs combined floor",
                f"{many.get('words_per_s'):.0f} = **{d['s2_ratio']:.2f}×** floor {combined:.0f} "
                f"(E {e:.0f} echo msg/s, R {r:.0f} ORT words/s at mean batch {m:.1f}; the median "
                f"repeat of {len(s2)}: " + ", ".join(f"{x:.2f}×" for x in s2) + ")",
                "≥ 0.8× floor",
                _ge(d["s2_ratio"], 0.8),
            ),
            Row(
                "S2b",
                f"CPU per word by thread, 256 streams, {n} workers",
                _per_thread(self.by_thread[many.label])
                + f"; echo: {_per_thread(self.by_thread[echo256.label])}",
                INFORMATION,
                None,
            ),
            Row(
                "S3",
                f"64 streams, {n} workers, mean batch",
                f"{sixty_four.mean_batch:.1f} = **{d['s3_ratio']:.2f}×** the {64 / n:g} streams a worker "
                f"holds ({_ratio(sixty_four.mean_batch, 64):.2f}× all 64)",
                "≥ 0.5× streams",
                _ge(d["s3_ratio"], 0.5),
            ),
            Row(
                "S4",
                f"event-loop CPU per reply, 256 open-loop streams × {EVEN_RATE:g} words/s to both, "
                f"{n} workers vs echo in {n} processes",
                f"{self.loop_cpu(f'{n} workers open loop') * 1e3:.3f} ms vs echo "
                f"{self.loop_cpu('echo open loop') * 1e3:.3f} ms = **{d['s4_ratio']:.2f}×**",
                "≤ 2× echo",
                _le(d["s4_ratio"], 2),
            ),
            Row(
                "S4b",
                f"event-loop CPU per reply, 256 closed-loop streams, {n} workers vs echo in 1 process",
                f"{self.loop_cpu(many.label) * 1e3:.3f} ms vs echo "
                f"{self.loop_cpu(echo256.label) * 1e3:.3f} ms = "
                f"**{d['s4b_ratio']:.2f}×** (echo answers {echo256.get('words_per_s'):.0f} msg/s, "
                f"nextword {many.get('words_per_s'):.0f} words/s)",
                INFORMATION,
                None,
            ),
        ]
        for kind, sid, goal, limit in (
            ("redis", "S5", "≤ 1.2×", 1.2),
            ("embedded", "S6", INFORMATION, None),
        ):
            ratios = [_ratio(g[kind], g["none"]) for g in latency]
            d[f"{sid.lower()}_ratio"] = ratio = _median(ratios)
            rows.append(
                Row(
                    sid,
                    f"1 stream p50, {kind} store vs none",
                    f"**{ratio:.2f}×** (median of {len(ratios)} repeats: "
                    + ", ".join(f"{x:.2f}×" for x in ratios)
                    + ")",
                    goal,
                    None if limit is None else _le(ratio, limit),
                )
            )
        return rows, d


def _median(values: Iterable[float]) -> float:
    items = sorted(v for v in values if math.isfinite(v))
    return items[len(items) // 2] if items else math.nan


def render(rows: list[Row], runs: list[Run], command: str) -> str:
    mach = machine()
    lines = [
        f"`{command}` at {mach['revision']} on {mach['cpu']}, {mach['nproc']} cores, "
        f"onnxruntime {mach['onnxruntime']}, grpcio {mach['grpcio']}, {time.strftime('%Y-%m-%d')}; "
        "the load generator on the same machine. Ratios compare numbers of this run only.",
        "",
        "| id | measure | measured | goal | result |",
        "|---|---|---|---|---|",
        *(f"| {r.id} | {r.measure} | {r.measured} | {r.goal} | {r.verdict} |" for r in rows),
        "",
        *run_table([r.summary() for r in runs]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--workers", type=int, default=2, help="workers of the multi-stream runs")
    p.add_argument("--procs", type=int, default=2, help="load-test client processes for multi-stream runs")
    p.add_argument(
        "--connections",
        type=int,
        default=8,
        help="connections per load process: the kernel gives each worker connections, not streams",
    )
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test, not a measurement")
    p.add_argument(
        "--results", type=Path, help="default: benchmarks/RESULTS.md for a full run, none for --quick"
    )
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.scaling", *(sys.argv[1:] if argv is None else argv)])
    scaling = Scaling(args)
    rows, _ = scaling.run()
    body = render(rows, scaling.bench.runs, command)
    print(body)
    results = args.results or (None if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    if results is not None:
        write_section(results, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
