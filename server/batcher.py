"""Dynamic batching: concurrent sessions' model calls share one onnxruntime run.

Callers await ``advance``/``peek`` naming the state slot to read (``server/state.py``)
and, for a step, the slot to write the new state into (or ``DISCARD``). A single
worker task takes the first waiting request, waits up to ``max_delay`` for
others, groups them (a step group needs one sequence length: padding would run
pad tokens through the recurrent state and corrupt it; head calls always
group), gathers the group's states from the pool with one ``np.take`` per state
tensor, runs one graph call in a one-thread executor (onnxruntime releases the
GIL, so the event loop keeps serving), and scatters the new states back with
one indexed write per tensor. While a call runs, new requests queue up, so
batches grow with load on their own.

Gather and scatter run on the event-loop thread: the pool may grow (reallocate)
there when a session needs a slot, so its arrays are only touched from that
thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from nextword.ranking import Scores
from nextword.runtime import OnnxLM, Ranked

from .metrics import Metrics
from .state import StatePool

T = TypeVar("T")
HEAD = -1  # group key of head calls; step calls are keyed by their sequence length
DISCARD = -1  # destination slot of a step whose new state nobody keeps


@dataclass(eq=False)
class _Request:
    key: int
    tokens: Sequence[int]
    src: int
    dst: int
    whole_distribution: bool
    future: asyncio.Future[Scores] = field(repr=False)
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        lm: OnnxLM,
        pool: StatePool,
        metrics: Metrics,
        *,
        max_batch: int,  # ServerConfig.max_batch
        max_delay: float,  # seconds: ServerConfig.max_delay_ms / 1000
    ) -> None:
        self._lm = lm
        self._pool = pool
        self._metrics = metrics
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._worker: asyncio.Task[None] | None = None
        self._last_batch = 0
        # Label children looked up once, not per call.
        self._compute_time = {g: metrics.onnx_compute.labels(g).observe for g in ("step", "head")}

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def advance(self, tokens: Sequence[int], src: int, dst: int, *, whole_distribution: bool) -> Scores:
        """Feed ``tokens`` from the state in slot ``src`` (new state into ``dst``): the next word's scores."""
        if not tokens:
            raise ValueError("advance needs at least one token")
        return await self._submit(len(tokens), tokens, src, dst, whole_distribution)

    async def peek(self, src: int, *, whole_distribution: bool) -> Scores:
        """The next word's scores read from the state in slot ``src``, which stays as it is."""
        return await self._submit(HEAD, (), src, DISCARD, whole_distribution)

    async def _submit(
        self, key: int, tokens: Sequence[int], src: int, dst: int, whole_distribution: bool
    ) -> Scores:
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(key, tokens, src, dst, whole_distribution, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            self._drain(batch)
            # Wait for company only under load (the last call was shared): a lone stream's
            # step runs at once instead of paying max_delay for batch-mates that never come.
            if self._last_batch > 1 and len(batch) < self._max_batch and self._max_delay > 0:
                await asyncio.sleep(self._max_delay)
                self._drain(batch)
            self._last_batch = len(batch)
            groups: dict[int, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.key, []).append(request)
            for key, group in groups.items():
                await self._run_group(key, group)

    def _drain(self, batch: list[_Request]) -> None:
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _run_group(self, key: int, group: list[_Request]) -> None:
        # A caller that went away (its RPC was cancelled) needs no answer; its slot is freed by it.
        group = [r for r in group if not r.future.done()]
        if not group:
            return
        start = time.perf_counter()
        for r in group:
            self._metrics.queue_wait.observe(start - r.enqueued)
        try:
            answers = await self._compute(key, group)
        except Exception as exc:  # the model failed: every caller of this group gets the error
            for r in group:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        self._metrics.batch_size.observe(len(group))
        for r, answer in zip(group, answers, strict=True):
            if not r.future.done():
                r.future.set_result(answer)

    async def _compute(self, key: int, group: list[_Request]) -> list[Scores]:
        """One graph call for the group: gather its states, run, scatter the new states."""
        n = len(group)
        state = self._pool.gather(np.fromiter((r.src for r in group), dtype=np.intp, count=n))
        whole = any(r.whole_distribution for r in group)
        if key == HEAD:
            ranked = await self._call("head", self._lm.head_ranked, state, whole_distribution=whole)
        else:
            tokens = np.array([r.tokens for r in group], dtype=np.int64)
            ranked = await self._call("step", self._lm.step_ranked, tokens, state, whole_distribution=whole)
            dst = np.fromiter((r.dst for r in group), dtype=np.intp, count=n)
            keep = dst != DISCARD
            self._pool.scatter(dst[keep], np.flatnonzero(keep), ranked.state)
            self._metrics.words.inc(n * key)
        return [self._scores(ranked, b, r.whole_distribution) for b, r in enumerate(group)]

    @staticmethod
    def _scores(ranked: Ranked, b: int, whole_distribution: bool) -> Scores:
        return Scores(
            None if ranked.top_values is None else ranked.top_values[b],
            None if ranked.top_ids is None else ranked.top_ids[b],
            ranked.log_probs[b] if whole_distribution and ranked.log_probs is not None else None,
        )

    async def _call(self, graph: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the model thread, timing the graph alone (not the queueing)."""

        observe = self._compute_time[graph]

        def timed() -> T:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            observe(time.perf_counter() - start)
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)
