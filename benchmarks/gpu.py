"""What a machine with a GPU and many cores measures: cores (S7) and the GPU (G1-G3).

    python -m benchmarks.gpu [--bundle models/demo] [--text DIR] [--workers 4] [--quick] [--results FILE]

Run from the repository root on a machine with onnxruntime-gpu and a CUDA GPU
(``--device cpu`` runs the same code on a CPU, as a smoke test). Every ratio
compares numbers of this run:

* S7  words/s with N CPU workers (``--device cpu --threads 1``) against N × one
      worker's, N = 1, 2, 4, 8 up to half the cores; the server is pinned to
      cores 0..N-1 and the load generator to the rest, 128 streams per worker,
      no session store (so the workers share nothing); the default store
      (embedded SQLite) is measured beside the largest N;
* G1  raw onnxruntime words/s at batch 1 … 4,096 (in-graph top-k, the server's
      call), for the fp32 and the fp16 bundle, each plainly (the state in host
      memory, as the server holds it: copied in and out every call) and with
      IOBinding (the state stays on the device from call to call: the ceiling a
      device-resident state pool would reach); the CPU with all its cores beside;
* G2  the fp16 bundle (``nextword quantize --precision fp16``): its perplexity
      against the fp32 bundle's on the same text (``--text DIR`` with valid.txt
      and test.txt);
* G3  ``nextword serve --device cuda --workers W`` at 256, 1,024 and 4,096 closed-loop
      streams (fp32; fp16 at the largest), beside ``--device cpu`` with the same
      workers; server pinned to W cores, the load generator on the rest.

It writes its tables under ``## GPU machine`` in ``--results`` (default:
benchmarks/RESULTS.md for a full run) and everything it measured as JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.results import write_section
from benchmarks.serving import ROOT
from benchmarks.serving.goals import _div as _ratio
from benchmarks.serving.plan import Plan
from benchmarks.serving.report import machine
from benchmarks.serving.runs import Bench, Run, run_table
from benchmarks.serving.servers import SERVING, Child, running
from nextword.bundle import Bundle, load_bundle
from nextword.export.quantize import quantize_bundle
from nextword.runtime import OnnxLM, choose_providers

SECTION = "## GPU machine"
BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
STREAMS = (256, 1024, 4096)
CORE_COUNTS = (1, 2, 4, 8)
STREAMS_PER_WORKER = 128


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- G1: onnxruntime alone -------------------------------------------------------------------


def _calls_per_s(call: Any, seconds: float) -> float:
    for _ in range(3):  # warm-up: the first calls at a new batch size allocate
        call()
    calls, start = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - start < seconds:
        call()
        calls += 1
    return calls / (time.perf_counter() - start)


def plain_words_per_s(lm: OnnxLM, batch: int, seconds: float) -> float:
    """The server's call: state in, state and top-k out, all through host memory."""
    rng = np.random.default_rng(batch)
    tokens = [rng.integers(3, lm.vocab_size, size=(batch, 1), dtype=np.int64) for _ in range(8)]
    state, i = lm.zero_state(batch), 0

    def call() -> None:
        nonlocal state, i
        i += 1
        state = lm.step_ranked(tokens[i % 8], state, whole_distribution=False).state

    return batch * _calls_per_s(call, seconds)


def bound_words_per_s(bundle: Bundle, device: str, batch: int, seconds: float) -> float:
    """The same call with IOBinding: the state stays on the device, only tokens and top-k cross."""
    m = bundle.manifest
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(bundle.step_path), opts, providers=choose_providers(device))
    where = "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    zero = [np.zeros(s.concrete_shape(batch), dtype=np.dtype(s.dtype)) for s in m.state]
    state = [ort.OrtValue.ortvalue_from_numpy(z, where, 0) for z in zero]
    top = [m.topk["values"], m.topk["ids"]]
    rng = np.random.default_rng(batch)
    tokens = [rng.integers(3, len(bundle.vocab), size=(batch, 1), dtype=np.int64) for _ in range(8)]
    binding = sess.io_binding()
    i = 0

    def call() -> None:
        nonlocal state, i
        i += 1
        binding.bind_cpu_input(m.step.inputs[0], tokens[i % 8])
        for spec, value in zip(m.state, state, strict=True):
            binding.bind_ortvalue_input(spec.input, value)
        for spec in m.state:
            binding.bind_output(spec.output, where)
        for name in top:
            binding.bind_output(name, "cpu")
        sess.run_with_iobinding(binding)
        state = binding.get_outputs()[: len(m.state)]

    return batch * _calls_per_s(call, seconds)


def raw(bundles: dict[str, Path], device: str, seconds: float) -> list[dict[str, Any]]:
    rows = []
    cpu = OnnxLM(load_bundle(bundles["fp32"]), device="cpu")
    for name, path in bundles.items():
        try:  # one bundle failing on this device still leaves the other's figures
            bundle = load_bundle(path)
            lm = OnnxLM(bundle, device=device, spin=False)
            log(f"G1 {name} on {lm.provider}")
            for batch in BATCHES:
                row = {
                    "bundle": name,
                    "batch": batch,
                    "plain": plain_words_per_s(lm, batch, seconds),
                    "iobinding": bound_words_per_s(bundle, device, batch, seconds),
                }
                if name == "fp32":
                    row["cpu"] = plain_words_per_s(cpu, batch, seconds)
                log(f"  {row}")
                rows.append(row)
        except Exception as exc:
            log(f"G1 {name} failed: {exc!r}")
    return rows


# ---- G2: the fp16 bundle ---------------------------------------------------------------------


def fp16_bundle(src: Path, out: Path, text: Path | None) -> dict[str, Any]:
    """``nextword quantize --precision fp16``; its perplexity change where ``text`` is given."""
    data = text if text is not None else out.parent / "no-text"
    data.mkdir(exist_ok=True)  # without valid.txt or test.txt the bundle is written, not scored
    log(f"fp16 bundle of {src}, scored on {data}")
    metrics = quantize_bundle(src, out, calibration=data, precision="fp16").metrics
    return {k: v for k, v in metrics.items() if k.endswith(("_perplexity", "_perplexity_change"))}


# ---- S7 and G3: the server under load, pinned -----------------------------------------------


@contextlib.contextmanager
def pinned(cores: Sequence[int]) -> Iterator[None]:
    """This process, and the load processes it starts meanwhile, on ``cores`` only."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def server(bundle: Path, workers: int, *extra: str) -> Child:
    """``nextword serve`` with ``workers`` workers, pinned to cores 0..workers-1 (they inherit it)."""
    cmd = [sys.executable, "-m", "nextword.cli", "serve", "--model", str(bundle.resolve()), "--port", "0"]
    cmd += ["--metrics-port", "-1", "--workers", str(workers), "--threads", "1", *extra]
    with pinned(range(workers)):
        return Child("nextword serve", cmd, SERVING, timeout=300)


def loaded(bench: Bench, child: Child, workers: int, label: str, streams: int, duration: float) -> Run:
    """A closed-loop run against ``child`` (its ``workers`` on the first cores), the load on the rest."""
    cores = os.cpu_count() or 1
    bench.args.procs = max(1, cores - workers)
    with pinned(range(workers, cores)):
        return bench.load(
            "nextword",
            child.address,
            label,
            streams=streams,
            context=5,
            duration=duration,
            metrics_port=int(child.match.group(2)),
        )


def cores(bench: Bench, bundle: Path, duration: float, most: int) -> list[Run]:
    runs = []
    for n in (n for n in CORE_COUNTS if n <= most):
        with running(server(bundle, n, "--device", "cpu", "--session-store", "none")) as child:
            runs.append(loaded(bench, child, n, f"S7 cpu {n} workers", STREAMS_PER_WORKER * n, duration))
    n = max(n for n in CORE_COUNTS if n <= most)
    with (
        tempfile.TemporaryDirectory(prefix="nextword-store-") as folder,
        running(server(bundle, n, "--device", "cpu", "--session-store", f"sqlite://{folder}/s.db")) as child,
    ):
        label = f"S7 cpu {n} workers, embedded store"
        runs.append(loaded(bench, child, n, label, STREAMS_PER_WORKER * n, duration))
    return runs


def serving(bench: Bench, bundles: dict[str, Path], device: str, workers: int, duration: float) -> list[Run]:
    runs = []
    flags = ("--session-store", "none", "--max-batch", str(max(STREAMS) // workers))
    for dev, name, streams in (
        ("cpu", "fp32", STREAMS),
        (device, "fp32", STREAMS),
        (device, "fp16", STREAMS[-1:]),
    ):
        try:
            with running(server(bundles[name], workers, "--device", dev, *flags)) as child:
                for n in streams:
                    runs.append(
                        loaded(bench, child, workers, f"G3 {dev} {name} {workers} workers", n, duration)
                    )
        except RuntimeError as exc:  # a server that did not start: the others still run
            log(f"G3 {dev} {name} failed: {exc}")
    return runs


# ---- the report --------------------------------------------------------------------------------


def gpu_name() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if out:
            return out
    return "no GPU"


def render(found: dict[str, Any], command: str) -> str:
    mach, runs = found["machine"], found["runs"]
    lines = [
        f"`{command}` at {mach['revision']} on {found['gpu']}, {mach['cpu']}, {mach['nproc']} cores, "
        f"onnxruntime {mach['onnxruntime']} ({found['provider']}), {time.strftime('%Y-%m-%d')}. "
        "Ratios compare numbers of this run only.",
        "",
    ]
    s7 = {r["label"]: r for r in runs if r["label"].startswith("S7")}
    one = s7.get("S7 cpu 1 workers")
    if one:
        lines += [
            "**S7: CPU workers on many cores** (one worker pinned per core, the load generator on the rest; "
            "goal: N workers ≥ 0.7 × N × one worker's words/s, N up to half the cores)",
            "",
            "| workers | streams | words/s | × one worker | / (N × one) | p50 ms | p99 ms | mean batch "
            "| goal |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, r in s7.items():
            n = int(label.split()[2])
            scale = _ratio(r["words_per_s"], one["words_per_s"])
            eff = scale / n
            goal = "—" if "store" in label else ("pass" if eff >= 0.7 else "FAIL")
            name = f"{n}" + (" (embedded store)" if "store" in label else "")
            lines.append(
                f"| {name} | {r['streams']} | {r['words_per_s']:,.0f} | {scale:.2f}× | **{eff:.2f}** | "
                f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_batch']:.1f} | {goal} |"
            )
        lines.append("")
    if found["raw"]:
        lines += [
            f"**G1: raw onnxruntime words/s by batch** ({found['provider']}; plain: state through host "
            "memory every call, as the server holds it; IOBinding: state kept on the device; CPU: "
            f"{mach['nproc']} cores, fp32, plain)",
            "",
            "| batch | fp32 plain | fp32 IOBinding | fp16 plain | fp16 IOBinding | CPU fp32 "
            "| GPU fp32 plain / CPU |",
            "|---|---|---|---|---|---|---|",
        ]
        by = {(r["bundle"], r["batch"]): r for r in found["raw"]}
        for b in BATCHES:
            f32, f16 = by.get(("fp32", b), {}), by.get(("fp16", b), {})
            cells = [
                f32.get("plain"),
                f32.get("iobinding"),
                f16.get("plain"),
                f16.get("iobinding"),
                f32.get("cpu"),
            ]
            text = " | ".join(f"{c:,.0f}" if c else "—" for c in cells)
            lines.append(f"| {b:,} | {text} | {_ratio(f32.get('plain', 0), f32.get('cpu', 0)):.2f}× |")
        lines.append("")
    if found["fp16"]:
        f = found["fp16"]
        lines += [
            "**G2: the fp16 bundle** (`nextword quantize --precision fp16`, scored on the GPU): "
            + ", ".join(
                f"{split} perplexity {f[f'{split}_perplexity']:.2f} "
                f"({f[f'{split}_perplexity_change']:+.3%} vs fp32)"
                for split in ("valid", "test")
                if f"{split}_perplexity" in f
            ),
            "",
        ]
    g3 = [r for r in runs if r["label"].startswith("G3")]
    if g3:
        lines += [
            "**G3: `nextword serve` on the GPU against the CPU** (closed loop, one word per request, k=3; "
            "server pinned to its workers' cores, the load generator on the rest)",
            "",
            *run_table([{**r, "label": r["label"][3:]} for r in g3]),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo")
    p.add_argument(
        "--text", type=Path, help="directory with valid.txt and test.txt to score the fp16 bundle on"
    )
    p.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test of this script"
    )
    p.add_argument("--workers", type=int, default=4, help="workers of the G3 serving runs")
    p.add_argument("--connections", type=int, default=8, help="connections per load process")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: s7, g1, g3")
    p.add_argument("--revision", default="", help="the revision measured, where the tree has no .git")
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test, not a measurement")
    p.add_argument(
        "--results", type=Path, help="default: benchmarks/RESULTS.md for a full run, none for --quick"
    )
    p.add_argument("--json", type=Path, help="also write everything measured here")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.gpu", *(sys.argv[1:] if argv is None else argv)])
    skip = set(filter(None, args.skip.split(",")))
    plan = Plan.quick() if args.quick else Plan.full()
    bench = Bench(
        argparse.Namespace(
            procs=1, profile=None, bundle=args.bundle, threads=1, connections=args.connections
        ),
        plan,
    )
    mach = machine()
    if args.revision:
        mach["revision"] = args.revision
    found: dict[str, Any] = {"machine": mach, "gpu": gpu_name(), "raw": [], "fp16": {}, "runs": []}
    found["provider"] = OnnxLM(load_bundle(args.bundle), device=args.device).provider
    log(f"{found['gpu']}; onnxruntime {ort.__version__} {ort.get_available_providers()}; {found['provider']}")
    with tempfile.TemporaryDirectory(prefix="nextword-gpu-") as tmp:
        bundles = {"fp32": args.bundle, "fp16": Path(tmp) / "fp16"}
        found["fp16"] = fp16_bundle(args.bundle, bundles["fp16"], args.text)
        log(f"G2 {found['fp16']}")
        try:
            if "g1" not in skip:
                found["raw"] = raw(bundles, args.device, plan.raw_s / 3)
            most = (os.cpu_count() or 1) // 2
            if "s7" not in skip:
                cores(bench, args.bundle, plan.short_s, most)
            if "g3" not in skip:
                serving(bench, bundles, args.device, min(args.workers, most), plan.short_s)
        finally:
            found["runs"] = [r.summary() for r in bench.runs]
            if args.json:
                args.json.write_text(json.dumps(found, indent=1))
    body = render(found, command)
    print(body)
    results = args.results or (None if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    if results is not None:
        write_section(results, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
