"""The measurements that need a process of their own: run here, each in a fresh interpreter.

The parent calls ``run_worker``, which runs ``python -m benchmarks.serving
--worker KIND`` at the repository root; that process calls ``worker_main``,
which prints its result as one line of JSON. A fresh interpreter per
measurement keeps its timings and RSS its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.serving import ROOT

KINDS = ("raw", "cold", "memory")


def run_worker(
    kind: str,
    bundle: Path,
    threads: int,
    *extra: str,
    timeout: float = 300,
    env: dict[str, str] | None = None,  # the worker's environment (default: this process's)
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.serving", "--worker", kind, "--bundle", str(bundle.resolve())]
    cmd += ["--threads", str(threads), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def worker_main(args: argparse.Namespace) -> int:
    """In the worker process: measure what ``args.worker`` names, print it as JSON."""
    # Imported here: each worker loads only what it measures.
    if args.worker == "raw":
        from benchmarks.serving.ort import worker_raw

        result = worker_raw(args.bundle, args.threads, args.seconds, args.calls, args.gap_us / 1e6)
    elif args.worker == "cold":
        from benchmarks.serving.ort import worker_cold

        result = worker_cold(args.bundle, args.threads, args.calls)
    else:
        from benchmarks.serving.idle import worker_memory

        result = worker_memory(args.bundle, args.threads, args.sessions)
    print(json.dumps(result))
    return 0
