"""Triton's perf_analyzer against nextword's KServe v2 service, beside ``nextword loadtest``.

    python -m benchmarks.kserve_perf [--bundle models/demo] [--concurrency 1 4 16] [--results FILE]

One server; for each concurrency, in turn: perf_analyzer (``--streaming --sequence-length``:
each of its sequences is a nextword session, one word a request, over ``ModelStreamInfer``)
and ``nextword loadtest`` with as many streams (one word a request over ``Session``). Both
send one word per request to the same model on the same server; the ratio says what the
KServe door costs against nextword's own. perf_analyzer comes from
``benchmarks/perf_analyzer/fetch.sh``. Writes ``## KServe v2 (perf_analyzer)`` into
``benchmarks/RESULTS.md`` (a full run).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.results import write_section
from benchmarks.serving import ROOT
from benchmarks.serving.report import machine
from benchmarks.serving.servers import nextword_server, running
from nextword.bundle import load_bundle

SECTION = "## KServe v2 (perf_analyzer)"
WORDS = "it was the best of times it was the worst of times it was the age of wisdom it was".split()


def perf_analyzer() -> tuple[str, str]:
    """The library folder perf_analyzer needs and its path (fetched once)."""
    fetch = ROOT / "benchmarks" / "perf_analyzer" / "fetch.sh"
    out = subprocess.run([str(fetch)], check=True, stdout=subprocess.PIPE, text=True).stdout.split()
    return out[0], out[1]


def run_perf_analyzer(
    tool: tuple[str, str], target: str, model: str, concurrency: int, seconds: float
) -> dict[str, float]:
    lib, binary = tool
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "input.json"
        data.write_text(json.dumps({"data": [{"TEXT": {"content": [w + " "], "shape": [1]}} for w in WORDS]}))
        report = Path(folder) / "report.csv"
        cmd = [binary, "-m", model, "-u", target, "-i", "grpc", "--streaming", "--sequence-length", "20"]
        cmd += ["--concurrency-range", str(concurrency), "--input-data", str(data), "-f", str(report)]
        cmd += ["--measurement-interval", str(round(seconds * 1000)), "--percentile", "50"]
        env = {**os.environ, "LD_LIBRARY_PATH": lib}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=300)
        row = next(csv.DictReader(io.StringIO(report.read_text())))
    return {"per_s": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000}


def run_loadtest(target: str, streams: int, seconds: float) -> dict[str, float]:
    cmd = [sys.executable, "-m", "nextword.cli", "loadtest", "--target", target, "--streams", str(streams)]
    cmd += ["--duration", str(seconds), "--json"]
    out = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, timeout=300).stdout)
    return {"per_s": float(out["words_per_s"]), "p50_ms": float(out["p50_ms"])}


def render(rows: list[dict[str, Any]], command: str, bundle: Path) -> str:
    m = machine()
    lines = [
        f"`{command}` at {m['revision']} on {m['cpu']}, {m['nproc']} cores, onnxruntime "
        f"{m['onnxruntime']}, grpcio {m['grpcio']}: one `nextword serve --model {bundle}` (one worker); "
        "for each "
        "concurrency, Triton's perf_analyzer 2.41.0 (`--streaming --sequence-length 20`: a sequence is "
        "a nextword session, a word a request, over `ModelStreamInfer`) and then `nextword loadtest` "
        "with as many `Session` streams, one word a request. Ratios compare the two in this run.",
        "",
        "| concurrency | perf_analyzer infer/s | p50 ms | nextword loadtest words/s | p50 ms "
        "| throughput ratio | p50 ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pa, lt = r["perf_analyzer"], r["loadtest"]
        lines.append(
            f"| {r['concurrency']} | {pa['per_s']:,.0f} | {pa['p50_ms']:.3f} | {lt['per_s']:,.0f} | "
            f"{lt['p50_ms']:.3f} | **{pa['per_s'] / lt['per_s']:.2f}×** | "
            f"{pa['p50_ms'] / lt['p50_ms']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=8.0, help="each measurement")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    tool = perf_analyzer()
    model = load_bundle(args.bundle).manifest.name
    rows = []
    with running(nextword_server(args.bundle, 0, [])) as server:
        for concurrency in args.concurrency:
            pa = run_perf_analyzer(tool, server.address, model, concurrency, args.seconds)
            lt = run_loadtest(server.address, concurrency, args.seconds)
            rows.append({"concurrency": concurrency, "perf_analyzer": pa, "loadtest": lt})
            print(f"concurrency {concurrency}: perf_analyzer {pa}, loadtest {lt}", flush=True)
    command = "python -m benchmarks.kserve_perf " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = render(rows, command.strip(), args.bundle)
    print(body)
    write_section(args.results, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
