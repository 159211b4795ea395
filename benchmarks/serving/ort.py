"""Raw onnxruntime, measured in a process of its own (``--worker raw`` and ``--worker cold``).

``OnnxLM`` alone, no server: step latency at batch 1, words/s at each batch
size with the state fed back, and the first call at a batch size never seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serving.plan import BATCH_SIZES, COLD_BATCH
from nextword.bundle import load_bundle
from nextword.runtime import OnnxLM, State

Tokens = Callable[[int], np.ndarray]  # a batch of random token ids, shape (batch, 1)


def _new_state(result: Any) -> Any:
    # OnnxLM.step returns the new state last (log-probs, and any in-graph top-k outputs, come first).
    return result[-1]


def percentiles_ms(times: Sequence[float]) -> dict[str, float]:
    a = np.asarray(times) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
        "calls": len(a),
    }


def _step_latency(lm: OnnxLM, tokens: Tokens, state: State, calls: int) -> tuple[list[float], State]:
    times = []
    for _ in range(calls):
        t = tokens(1)
        start = time.perf_counter()
        state = _new_state(lm.step(t, state))
        times.append(time.perf_counter() - start)
    return times, state


def _ranked_latency(
    lm: OnnxLM, tokens: Tokens, state: State, calls: int, gap_s: float = 0.0
) -> tuple[list[float], State]:
    """What the server calls: in-graph top-k, no full log-probs. ``gap_s``: spin that long before
    each call, as a server's calls are apart (a reply out, the next request in): the step then
    no longer finds what the one before left in the caches, as it does back to back."""
    times = []
    for _ in range(calls):
        t = tokens(1)
        until = time.perf_counter() + gap_s
        while time.perf_counter() < until:
            pass
        start = time.perf_counter()
        state = lm.step_ranked(t, state, whole_distribution=False).state
        times.append(time.perf_counter() - start)
    return times, state


def _head_latency(lm: OnnxLM, state: State, calls: int) -> list[float]:
    for _ in range(20):
        lm.head(state)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        lm.head(state)
        times.append(time.perf_counter() - start)
    return times


def _throughput(lm: OnnxLM, tokens: Tokens, seconds: float) -> dict[str, dict[str, float]]:
    """Words/s and ms per call at each batch size, the state fed back from call to call."""
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
    return throughput


def worker_raw(
    bundle_dir: Path, threads: int, seconds: float, latency_calls: int, gap_s: float = 0.0
) -> dict[str, Any]:
    """onnxruntime alone: latency at batch 1 and words/s at each batch size, state fed back
    (with ``gap_s``, also the server's call at batch 1 made ``gap_s`` apart)."""
    lm = OnnxLM(load_bundle(bundle_dir), device="cpu", threads=threads)
    rng = np.random.default_rng(0)
    vocab = lm.vocab_size

    def tokens(batch: int) -> np.ndarray:
        return rng.integers(3, vocab, size=(batch, 1), dtype=np.int64)

    state = lm.zero_state(1)
    for _ in range(20):
        state = _new_state(lm.step(tokens(1), state))
    times, state = _step_latency(lm, tokens, state, latency_calls)
    out: dict[str, Any] = {"provider": lm.provider, "step_b1": percentiles_ms(times)}
    if getattr(lm, "step_ranked", None) is not None:  # informational: the server's call
        times, state = _ranked_latency(lm, tokens, state, latency_calls)
        out["step_ranked_b1"] = percentiles_ms(times)
        if gap_s > 0:
            times, state = _ranked_latency(lm, tokens, state, latency_calls, gap_s)
            out["step_ranked_gap_b1"] = {**percentiles_ms(times), "gap_ms": gap_s * 1e3}
    out["head_b1"] = percentiles_ms(_head_latency(lm, state, latency_calls))
    out["throughput"] = _throughput(lm, tokens, seconds)
    return out


def worker_cold(bundle_dir: Path, threads: int, calls: int) -> dict[str, Any]:
    """A fresh ``OnnxLM``: the server's startup call (batch 1), then a first call at an unseen size.

    The server always makes one batch-1 step at startup (the state after <eos>),
    so the first call at batch ``COLD_BATCH`` after it is what its first real
    batch of that size meets.
    """
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
        "steady": percentiles_ms(times),
    }
