"""Dynamic batching: concurrent sessions' model calls share one onnxruntime run.

Callers await ``step``/``head`` with their own batch-1 state. A single worker
task takes the first waiting request, waits up to ``max_delay`` for others,
groups them (a step group needs one sequence length: padding would run pad
tokens through the recurrent state and corrupt it; head calls always group),
and runs one graph call per group in a one-thread executor, so the event loop
keeps serving while onnxruntime (which releases the GIL) computes. While a call
runs, new requests queue up, so batches grow with load on their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from server.metrics import Metrics
from server.runtime import OnnxLM, State

T = TypeVar("T")
HEAD = -1  # group key of head calls; step calls are keyed by their sequence length


@dataclass(eq=False)
class _Request:
    key: int
    tokens: Sequence[int]
    state: State
    future: asyncio.Future[tuple[np.ndarray, State]] = field(repr=False)


class Batcher:
    def __init__(
        self, lm: OnnxLM, metrics: Metrics, *, max_batch: int = 64, max_delay: float = 0.0005
    ) -> None:
        self._lm = lm
        self._metrics = metrics
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._axes = [spec.batch_axis for spec in lm.state_spec]
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def step(self, tokens: Sequence[int], state: State) -> tuple[np.ndarray, State]:
        """Feed ``tokens`` (one sequence) from ``state``: next-word log-probs [V] and the new state."""
        if not tokens:
            raise ValueError("step needs at least one token")
        return await self._submit(len(tokens), tokens, state)

    async def head(self, state: State) -> np.ndarray:
        """Next-word log-probs [V] read from ``state``."""
        log_probs, _ = await self._submit(HEAD, (), state)
        return log_probs

    async def _submit(self, key: int, tokens: Sequence[int], state: State) -> tuple[np.ndarray, State]:
        future: asyncio.Future[tuple[np.ndarray, State]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(key, tokens, state, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            self._drain(batch)
            if len(batch) < self._max_batch and self._max_delay > 0:
                await asyncio.sleep(self._max_delay)
                self._drain(batch)
            groups: dict[int, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.key, []).append(request)
            for key, group in groups.items():
                await self._run_group(key, group)

    def _drain(self, batch: list[_Request]) -> None:
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _run_group(self, key: int, group: list[_Request]) -> None:
        # A caller that went away (its RPC was cancelled) needs no answer.
        group = [r for r in group if not r.future.done()]
        if not group:
            return
        try:
            results = await self._compute(key, group)
        except Exception as exc:  # the model failed: every caller of this group gets the error
            for r in group:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        self._metrics.batch_size.observe(len(group))
        for r, result in zip(group, results, strict=True):
            if not r.future.done():
                r.future.set_result(result)

    async def _compute(self, key: int, group: list[_Request]) -> list[tuple[np.ndarray, State]]:
        """One graph call for the group: gather states along their batch axes, scatter the results."""
        state = [np.concatenate([r.state[i] for r in group], axis=axis) for i, axis in enumerate(self._axes)]
        if key == HEAD:
            log_probs = await self._call("head", self._lm.head, state)
            return [(log_probs[b].copy(), r.state) for b, r in enumerate(group)]
        tokens = np.array([r.tokens for r in group], dtype=np.int64)
        log_probs, new_state = await self._call("step", self._lm.step, tokens, state)
        self._metrics.words.inc(len(group) * key)
        # Copies, so a session does not pin the whole batch's arrays in memory.
        return [(log_probs[b].copy(), self._slice(new_state, b)) for b in range(len(group))]

    async def _call(self, graph: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the model thread, timing the graph alone (not the queueing)."""

        def timed() -> T:
            start = time.perf_counter()
            result = fn(*args)
            self._metrics.onnx_compute.labels(graph).observe(time.perf_counter() - start)
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    def _slice(self, state: State, b: int) -> State:
        return [np.take(s, [b], axis=axis) for s, axis in zip(state, self._axes, strict=True)]
