"""Serving benchmark: nextword against its floors and a naive server, side by side in one run.

    python -m benchmarks.serving [--bundle models/demo] [--int8-bundle PATH] [--quick] [--json OUT]

(run from the repository root). This machine is noisy, so only ratios measured
in the same run mean anything; every number a goal compares is measured here,
in this run:

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

The client side is ``nextword.clients.loadtest`` for every server (same code,
same process count), closed loop, one word per request. The table of goals
P1–P7 is printed and, for a full run, written to ``benchmarks/RESULTS.md``
under ``## Serving`` (only that section is replaced).

Modules, one role each: ``plan`` (how long each part runs), ``ort`` and
``idle`` (the measurements made in a process of their own), ``worker`` (running
them there), ``servers`` (server subprocesses), ``profiling`` (py-spy),
``runs`` (the load runs), ``goals`` (the P1–P7 table), ``report`` (markdown),
``cli`` (the command).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout: workers and servers run here
