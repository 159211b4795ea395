"""Dynamic batching: concurrent sessions' model calls share one onnxruntime run.

Callers await ``advance``/``peek`` naming the state slot to read (``server/state.py``)
and, for a step, the slot to write the new state into (or ``DISCARD``). A single
worker task groups waiting requests (a step group needs one sequence length:
padding would run pad tokens through the recurrent state and corrupt it; head
calls always group). So that typists' steps share one call whatever their
length, an interactive request of several tokens runs a token a call, each
beside the other streams' one-token steps (with at most one stream open it runs
whole: nobody would share those calls). The worker gathers the group's states from the pool with one
``np.take`` per state tensor, runs one graph call on the model thread
(onnxruntime releases the GIL, so the event loop keeps serving), and scatters
the new states back with one indexed write per tensor. While a call runs, new
requests queue up, so batches grow with load on their own.

Two queues, so that one user's paste cannot hold the model for long:

* *interactive*: head calls and steps of at most ``chunk_tokens`` tokens (a
  word or a few typed at a time), run together, up to ``max_batch`` of them;
* *prefill*: a longer step runs as chunks of ``chunk_tokens`` tokens, one after
  the other (each reads the state the previous one wrote). Chunks of different
  requests share a call, at most ``prefill_call_tokens`` tokens of them.

The worker alternates: every interactive request waiting, then one prefill
call. A typed word therefore waits for at most one bounded prefill call, never
for a whole paste, and call shapes stay bounded, so onnxruntime's memory arena
does too. Only a request's last chunk is ranked; the earlier ones write into
one slot of their own (the request's destination, or a private slot when
nobody keeps the state), which is safe because a call gathers its states
before it scatters the new ones.

Gather and scatter run on the event-loop thread: the pool may grow (reallocate)
there when a session needs a slot, so its arrays are only touched from that
thread.

With a session store (``server/store.py``) a request may carry its session's
record: right after the graph ran, the records of the call, with the states
they leave, go to the store's writer (which never holds up a reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from nextword.ranking import Scores
from nextword.runtime import OnnxLM, Ranked

from .metrics import Metrics
from .state import StatePool
from .stats import ModelStats
from .store import Persister, Record
from .threads import name_this_thread

T = TypeVar("T")
MODEL_THREAD = "nextword-onnx"  # the model thread's name in the OS (top -H, /proc/PID/task/TID/comm)
HEAD = -1  # group key of head calls; step calls are keyed by their sequence length
DISCARD = -1  # destination slot of a step whose new state nobody keeps


def _ignore(tokens: int) -> None:
    pass


def _settle(future: asyncio.Future[Any], result: Any = None) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class ModelThread:
    """The thread the graph calls run on: a call goes in through a queue, its answer comes back to
    the event loop with one ``call_soon_threadsafe``.

    ``run_in_executor`` did the same through concurrent.futures (a Future, its condition, a
    callback chained onto an asyncio future): about 20 µs more of event-loop CPU per call,
    measured on a server with nothing else to do, which is the loop's time every reply waits on.
    """

    def __init__(self, name: str = "onnx") -> None:  # Python's name; the OS's is MODEL_THREAD
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()`` on the thread, calls in the order they were made; a future on the running loop."""
        if self._thread.ident is None:  # started by the first call: a lone stream never makes one
            self._thread.start()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.put((fn, future))
        return future

    def close(self) -> None:
        """Finish the calls made so far, then end the thread."""
        if self._thread.ident is not None:
            self._calls.put(None)
            self._thread.join()

    def _serve(self) -> None:
        name_this_thread(MODEL_THREAD)
        while (call := self._calls.get()) is not None:
            fn, future = call
            try:
                result = fn()
            except BaseException as exc:  # the caller gets it, as from an executor
                self._answer(future, _fail, exc)
            else:
                self._answer(future, _settle, result)

    @staticmethod
    def _answer(
        future: asyncio.Future[Any], how: Callable[[asyncio.Future[Any], Any], None], what: Any
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for this answer
            future.get_loop().call_soon_threadsafe(how, future, what)


@dataclass(eq=False)
class _Request:
    key: int
    tokens: Sequence[int]
    src: int
    dst: int
    whole_distribution: bool
    future: asyncio.Future[Scores] = field(repr=False)
    record: Record | None = None  # goes to the session store with the new state (filled in here)
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
        chunk_tokens: int = 16,  # ServerConfig.prefill_chunk_tokens
        prefill_call_tokens: int = 64,  # ServerConfig.prefill_call_tokens
        persister: Persister | None = None,  # the session store, if the server has one
        model: tuple[str, str] = ("", ""),  # name and version: its metrics' labels
        stats_dir: Path | None = None,  # ServerConfig.stats_dir: the workers' shared statistics
    ) -> None:
        if chunk_tokens < 1 or prefill_call_tokens < chunk_tokens:
            raise ValueError("need 1 <= chunk_tokens <= prefill_call_tokens")
        self._lm = lm
        self._pool = pool
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._chunk = chunk_tokens
        self._prefill_call_tokens = prefill_call_tokens
        self._persister = persister
        self._interactive: deque[_Request] = deque()
        self._prefill: deque[_Request] = deque()
        self._work = asyncio.Event()  # set while either queue may hold something
        self._model = ModelThread()
        self._worker: asyncio.Task[None] | None = None
        self._last_batch = 0
        self._busy = False  # the worker is running calls (a lone step must not run beside them)
        self._filled: asyncio.Future[None] | None = None  # set while the worker waits for company
        self._fill_at = 0
        # Session streams open now (the servicer sets it): a batch cannot grow past them.
        self.open_streams: Callable[[], int] = lambda: self._max_batch
        # Label children looked up once, not per call.
        self._compute_time = {g: metrics.onnx_compute.labels(g, *model).observe for g in ("step", "head")}
        self._queue_wait = metrics.queue_wait.labels(*model).observe
        self._batch_size = metrics.batch_size.labels(*model).observe
        self._words = metrics.words.labels(*model).inc
        self.stats = ModelStats(max_batch, stats_dir, model)  # the same times, for KServe's ModelStatistics

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._model.close()
        self.stats.close()

    async def advance(
        self,
        tokens: Sequence[int],
        src: int,
        dst: int,
        *,
        whole_distribution: bool,
        progress: Callable[[int], None] = _ignore,
        record: Record | None = None,
        lone: bool = False,
    ) -> Scores:
        """Feed ``tokens`` from the state in slot ``src`` (new state into ``dst``): the next word's scores.

        ``progress`` is told how many tokens each finished call ran (the server's in-flight count).
        ``record`` goes to the session store with the new state.
        ``lone``: the caller is the only one who could share a call now (one stream open): a step that
        finds the model idle runs at once on this thread, without the two thread hops of a call.
        """
        if not tokens:
            raise ValueError("advance needs at least one token")
        # With another stream open, a request of several tokens runs a token a call (below); with
        # none, nobody would share those calls: it runs whole.
        if len(tokens) == 1 or (len(tokens) <= self._chunk and self.open_streams() <= 1):
            scores = await self._submit(
                self._interactive, len(tokens), tokens, src, dst, whole_distribution, record, lone
            )
            progress(len(tokens))
            return scores
        if len(tokens) <= self._chunk:  # a token a call, beside everyone else's one-token steps
            return await self._in_pieces(True, 1, tokens, src, dst, whole_distribution, progress, record)
        return await self._in_pieces(
            False, self._chunk, tokens, src, dst, whole_distribution, progress, record
        )

    async def peek(
        self, src: int, *, whole_distribution: bool, record: Record | None = None, lone: bool = False
    ) -> Scores:
        """The next word's scores read from the state in slot ``src``, which stays as it is.

        ``record`` goes to the session store with that state.
        """
        return await self._submit(self._interactive, HEAD, (), src, DISCARD, whole_distribution, record, lone)

    async def _in_pieces(
        self,
        interactive: bool,
        size: int,
        tokens: Sequence[int],
        src: int,
        dst: int,
        whole_distribution: bool,
        progress: Callable[[int], None],
        record: Record | None,
    ) -> Scores:
        """Run a step as pieces of ``size`` tokens, each from the state the previous one left, in the
        interactive queue or the prefill one; rank the last only."""
        # Intermediate states need a slot even when nobody keeps the final one (a one-shot Predict).
        work = self._pool.alloc() if dst == DISCARD else dst
        try:
            for start in range(0, len(tokens) - size, size):
                chunk = tokens[start : start + size]
                await self._submit(self._queue(interactive), size, chunk, src, work, False)
                progress(size)
                src = work
            last = tokens[(len(tokens) - 1) // size * size :]
            scores = await self._submit(
                self._queue(interactive), len(last), last, src, dst, whole_distribution, record
            )
            progress(len(last))
            return scores
        finally:
            if dst == DISCARD:
                self._pool.free(work)

    def _queue(self, interactive: bool) -> deque[_Request]:
        # Looked up at each submit: _run_prefill replaces the prefill deque.
        return self._interactive if interactive else self._prefill

    async def _submit(
        self,
        queue: deque[_Request],
        key: int,
        tokens: Sequence[int],
        src: int,
        dst: int,
        whole_distribution: bool,
        record: Record | None = None,
        lone: bool = False,
    ) -> Scores:
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        request = _Request(key, tokens, src, dst, whole_distribution, future, record)
        if lone and not self._busy and not self._interactive and not self._prefill:
            # Nobody to share a call with: run it here and now. It runs to the end without
            # yielding to the loop, so the worker cannot start a call meanwhile.
            self._last_batch = 1
            await self._run_group(key, [request], inline=True)
            return future.result()
        queue.append(request)
        self._work.set()
        if self._filled is not None and len(self._interactive) >= self._fill_at:
            _settle(self._filled)
        return await future

    async def _run(self) -> None:
        while True:
            await self._work.wait()
            self._busy = True
            try:
                if self._interactive:
                    await self._run_interactive()
                if self._prefill:
                    await self._run_prefill()
            finally:
                self._busy = False
            if not self._interactive and not self._prefill:
                self._work.clear()

    async def _run_interactive(self) -> None:
        """Every interactive request waiting (up to ``max_batch``), one call per group."""
        batch = self._take_interactive([])
        # Wait for company only under load (the last call was shared): a lone stream's step
        # runs at once instead of paying max_delay for batch-mates that never come. Under
        # load, wait (max_delay at most) for one more request than the last call had: batches
        # grow while the requests keep coming, to as many streams as are typing, and a call
        # of many steps costs the model far less per word than several small ones.
        target = min(self._max_batch, self.open_streams(), self._last_batch + 1)
        if self._last_batch > 1 and len(batch) < target and self._max_delay > 0:
            await self._fill(target - len(batch))
            self._take_interactive(batch)
        self._last_batch = len(batch)
        groups: dict[int, list[_Request]] = {}
        for request in batch:
            groups.setdefault(request.key, []).append(request)
        for key, group in groups.items():
            await self._run_group(key, group)

    async def _fill(self, wanted: int) -> None:
        """Until ``wanted`` interactive requests are queued, or ``max_delay`` has passed."""
        loop = asyncio.get_running_loop()
        self._filled, self._fill_at = loop.create_future(), wanted
        timer = loop.call_later(self._max_delay, _settle, self._filled)
        try:
            await self._filled
        finally:
            timer.cancel()
            self._filled = None

    def _take_interactive(self, batch: list[_Request]) -> list[_Request]:
        while len(batch) < self._max_batch and self._interactive:
            batch.append(self._interactive.popleft())
        return batch

    async def _run_prefill(self) -> None:
        """One call of chunks: the oldest chunk's length, with as many more as the token bound allows."""
        key = self._prefill[0].key
        rows = max(1, min(self._max_batch, self._prefill_call_tokens // key))
        group: list[_Request] = []
        rest: deque[_Request] = deque()
        for request in self._prefill:
            (group if request.key == key and len(group) < rows else rest).append(request)
        self._prefill = rest
        await self._run_group(key, group)

    async def _run_group(self, key: int, group: list[_Request], *, inline: bool = False) -> None:
        # A caller that went away (its RPC was cancelled) needs no answer; its slot is freed by it.
        group = [r for r in group if not r.future.done()]
        if not group:
            return
        start = time.perf_counter()
        for r in group:
            self._queue_wait(start - r.enqueued)
            self.stats.waited(start - r.enqueued)
        try:
            answers = await self._compute(key, group, inline)
        except Exception as exc:  # the model failed: every caller of this group gets the error
            for r in group:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        self._batch_size(len(group))
        for r, answer in zip(group, answers, strict=True):
            if not r.future.done():
                r.future.set_result(answer)

    async def _compute(self, key: int, group: list[_Request], inline: bool) -> list[Scores]:
        """One graph call for the group: gather its states, run, store records, scatter the new states."""
        state = self._pool.gather([r.src for r in group])
        whole = any(r.whole_distribution for r in group)
        if key == HEAD:
            ranked = await self._call(
                "head", group, lambda: self._lm.head_ranked(state, whole_distribution=whole), inline, state
            )
        else:
            tokens = np.array([r.tokens for r in group], dtype=np.int64)
            ranked = await self._call(
                "step", group, lambda: self._lm.step_ranked(tokens, state, whole_distribution=whole), inline
            )
            # A caller cancelled while the graph ran has freed its slot (maybe already handed to
            # another session): its new state must not land there.
            self._pool.scatter([DISCARD if r.future.done() else r.dst for r in group], ranked.state)
            self._words(len(group) * key)
        return [self._scores(ranked, b, r.whole_distribution) for b, r in enumerate(group)]

    @staticmethod
    def _scores(ranked: Ranked, b: int, whole_distribution: bool) -> Scores:
        return Scores(
            None if ranked.top_values is None else ranked.top_values[b],
            None if ranked.top_ids is None else ranked.top_ids[b],
            ranked.log_probs[b] if whole_distribution and ranked.log_probs is not None else None,
        )

    async def _call(
        self,
        graph: str,
        group: list[_Request],
        fn: Callable[[], Ranked],
        inline: bool,
        state_in: Sequence[np.ndarray] | None = None,
    ) -> Ranked:
        """Run the graph on the model thread (timing it alone, not the queueing), then hand the
        group's records to the store with the state they leave (``state_in`` for a head call).
        ``inline``: on this thread instead (a lone step, see ``_submit``)."""

        observe = self._compute_time[graph]
        took = 0.0

        def timed() -> Ranked:
            nonlocal took
            start = time.perf_counter()
            ranked = fn()
            took = time.perf_counter() - start
            observe(took)
            self._store(group, ranked.state if state_in is None else state_in, inline)
            return ranked

        ranked = timed() if inline else await self._model.run(timed)
        self.stats.called(len(group), took)  # here, on the event loop's thread
        return ranked

    def _store(self, group: list[_Request], state: Sequence[np.ndarray], inline: bool) -> None:
        """Hand the group's records, with their rows of ``state``, to the store's writer (a lone
        step's to its servicer, which flushes them once it has replied: ``Persister.submit``)."""
        if self._persister is None:
            return
        kept = [(b, r.record) for b, r in enumerate(group) if r.record is not None]
        if not kept:
            return
        states = self._pool.rows_bytes(state, [b for b, _ in kept])  # one copy for the whole call
        records = [record.with_state(s) for (_, record), s in zip(kept, states, strict=True)]
        self._persister.submit(records, wake=not inline)
