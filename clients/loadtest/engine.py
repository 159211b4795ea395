"""One process of a load test: opening and prefilling its streams, the closed and open loops, the watchdog.

``run_load`` runs a whole test in the calling event loop; ``run_share`` runs
the part of a test that one of several processes does (see ``processes``).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from nextword.ranking import PROBABILITY, strip_message
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

from ..channel import aio_channel
from .errors import TargetUnreachable
from .report import LoadReport, record_latency
from .spec import LoadSpec
from .text import load_words

PROGRESS_INTERVAL_S = 0.25
_ENDED = "UNAVAILABLE"  # a stream the server ended (status OK) before answering every request


@dataclass(frozen=True)
class Share:
    """Which streams of a test one process runs: ``spec.streams`` from ``first_stream`` of ``total_streams``.

    A stream's index across the whole test picks where in the text it starts and its open-loop phase.
    """

    first_stream: int
    total_streams: int


class _StreamFailed(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(eq=False)
class _Stream:
    index: int  # across the whole test (all processes): picks the text offset and the send phase
    position: int  # next word to type
    call: Any = None  # grpc.aio StreamStreamCall (the generated stubs are typed for sync)
    outstanding: int = 0  # words due or sent and not yet answered
    last_progress: float = 0.0
    timed_out: bool = False


_Loop = Callable[[_Stream, float], Awaitable[None]]


class _Load:
    """The streams of one process; ``prepare`` opens and prefills them, ``measure`` runs the test."""

    def __init__(self, spec: LoadSpec, share: Share, text: tuple[str, ...]) -> None:
        self.spec = spec
        self.text = text
        self.total_streams = share.total_streams
        self.budget = spec.words  # words still to send (None: until the deadline)
        # Streams start spread evenly over the text so they do not type the same words in step.
        first, total = share.first_stream, share.total_streams
        self.streams = [_Stream(i, i * len(text) // total) for i in range(first, first + spec.streams)]
        self.report = LoadReport(spec.target, spec.streams, spec.rate, spec.context_words, 0.0, 0)
        self.channels: list[grpc.aio.Channel] = []
        self.deadline = math.inf
        self._reported = 0  # words already passed to the progress callback
        self.last_reply = 0.0

    # ---- words ---------------------------------------------------------------
    def _next_words(self, st: _Stream, n: int) -> str:
        words = [self.text[(st.position + i) % len(self.text)] for i in range(n)]
        st.position = (st.position + n) % len(self.text)
        return " ".join(words) + " "

    def _claim(self) -> bool:
        """Take one word of the ``words`` budget; False when it is spent."""
        if self.budget is None:
            return True
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True

    def _request(self, st: _Stream, n: int, first: bool) -> pb.SessionRequest:
        # k and the strip are session settings: sent once, on the stream's first request.
        request = pb.SessionRequest(text=self._next_words(st, n), k=self.spec.k if first else 0)
        if first and (self.spec.strip is not None or self.spec.no_repeat):
            request.strip.CopyFrom(strip_message(self.spec.strip or PROBABILITY, self.spec.no_repeat))
        return request

    def _fail(self, code: str, details: str, count: int = 1) -> None:
        self.report.failed_streams += 1
        self.report.errors[code] = self.report.errors.get(code, 0) + count
        self.report.error_details.setdefault(code, details)

    # ---- setup ---------------------------------------------------------------
    async def connect(self) -> None:
        count = min(self.spec.connections, len(self.streams))
        spec = self.spec
        own = count > 1
        self.channels = [aio_channel(spec.target, spec.credentials, own_connection=own) for _ in range(count)]
        timeout = self.spec.connect_timeout
        try:
            await asyncio.wait_for(asyncio.gather(*map(_ready, self.channels)), timeout)
        except (asyncio.TimeoutError, TargetUnreachable) as exc:
            await self.close()
            why = str(exc) or f"no connection within {timeout:g} s"
            raise TargetUnreachable(f"cannot reach a server at {self.spec.target} ({why})") from None

    async def prepare(self) -> None:
        """Open every stream; with ``context_words``, send each its context in one request first."""
        assert self.channels
        stubs = [pb_grpc.NextWordStub(channel) for channel in self.channels]
        for i, st in enumerate(self.streams):
            st.call = stubs[i % len(stubs)].Session()
        if self.spec.context_words:
            results = await asyncio.gather(
                *(self._prefill(st) for st in self.streams), return_exceptions=True
            )
            for st, result in zip(self.streams, results, strict=True):
                if isinstance(result, _StreamFailed):
                    self._fail(result.code, result.details)
                    st.call.cancel()
                    st.call = None
                elif isinstance(result, BaseException):
                    raise result

    async def _prefill(self, st: _Stream) -> None:
        start = time.perf_counter()
        try:
            await st.call.write(self._request(st, self.spec.context_words, first=True))
            reply = await asyncio.wait_for(st.call.read(), self.spec.reply_timeout)
        except asyncio.TimeoutError:
            raise _StreamFailed("DEADLINE_EXCEEDED", "no reply to the context prefill") from None
        except grpc.RpcError as exc:
            raise _rpc_failure(exc) from None
        except asyncio.InvalidStateError:  # grpc.aio's write() after the server ended the call
            raise _StreamFailed(_ENDED, "the server ended the stream") from None
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise _StreamFailed(_ENDED, "the server ended the stream")
        record_latency(self.report.prefill_histogram, time.perf_counter() - start)

    # ---- the test ------------------------------------------------------------
    async def measure(self, progress: Callable[[int], None] | None = None) -> LoadReport:
        start = time.perf_counter()
        if (limit := self.spec.time_limit) is not None:
            self.deadline = start + limit
        live = [st for st in self.streams if st.call is not None]
        run = self._open_loop if self.spec.rate else self._closed_loop
        tasks = {asyncio.create_task(self._run_stream(st, run, start)): st for st in live}
        watchdog = asyncio.create_task(self._watchdog(tasks, progress))
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            for task in tasks:
                task.cancel()
        # The window ends at the last reply, or at the deadline if that is later: a stream given up
        # after a stall, or streams that failed early, neither stretch nor shorten it.
        end = self.last_reply or time.perf_counter()
        if self.deadline < math.inf:
            end = max(end, min(self.deadline, time.perf_counter()))
        self.report.duration_s = end - start
        if progress is not None:
            progress(self.report.words - self._reported)
        return self.report

    async def _run_stream(self, st: _Stream, run: _Loop, start: float) -> None:
        st.last_progress = time.perf_counter()
        try:
            await run(st, start)  # returns once every word is answered and the stream is half-closed
            # The server ends the stream after its last reply; the status tells how that went.
            code = await st.call.code()
            if code != grpc.StatusCode.OK:
                raise _StreamFailed(code.name, await st.call.details())
        except _StreamFailed as exc:
            self._fail(exc.code, exc.details, max(st.outstanding, 1))
        except grpc.RpcError as exc:
            failure = _rpc_failure(exc)
            self._fail(failure.code, failure.details, max(st.outstanding, 1))
        except asyncio.CancelledError:
            if not st.timed_out:
                raise
            self._fail(
                "DEADLINE_EXCEEDED",
                f"no reply within {self.spec.reply_timeout:g} s; the stream was given up",
                max(st.outstanding, 1),
            )
        except asyncio.InvalidStateError:
            self._fail(_ENDED, "the server ended the stream", max(st.outstanding, 1))
        finally:
            st.call.cancel()  # a no-op on a finished call; frees a stuck one

    def _sending(self) -> bool:
        return time.perf_counter() < self.deadline and self._claim()

    def _answered(self, st: _Stream, latency: float) -> None:
        record_latency(self.report.histogram, latency)
        self.report.words += 1
        st.outstanding -= 1
        st.last_progress = self.last_reply = time.perf_counter()

    async def _closed_loop(self, st: _Stream, start: float) -> None:
        first = not self.spec.context_words
        while self._sending():
            request = self._request(st, 1, first)
            first = False
            st.outstanding += 1
            sent = time.perf_counter()
            await st.call.write(request)
            reply = await st.call.read()
            if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                raise _StreamFailed(_ENDED, "the server ended the stream before answering")
            self._answered(st, time.perf_counter() - sent)
        await st.call.done_writing()

    async def _open_loop(self, st: _Stream, start: float) -> None:
        assert self.spec.rate
        interval = 1.0 / self.spec.rate
        # Streams' phases are spread over one interval: real typists are not in lockstep.
        phase = interval * st.index / self.total_streams
        intended: collections.deque[float] = collections.deque()  # due times of unanswered words

        async def read_replies() -> None:
            # Replies come in request order; the writer's half-close ends them (EOF) after the last.
            while await st.call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                if not intended:
                    raise _StreamFailed("UNKNOWN", "the server sent more replies than requests")
                self._answered(st, time.perf_counter() - intended.popleft())
            if intended:
                raise _StreamFailed(_ENDED, "the server ended the stream before answering")

        reader = asyncio.create_task(read_replies())
        try:
            first, i = not self.spec.context_words, 0
            while True:
                due = start + phase + i * interval
                # The schedule, not the clock, decides what is sent: words due before the deadline are
                # all sent even when the writer runs late, so lateness shows up as latency.
                if due >= self.deadline or not self._claim():
                    break
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.wait({reader}, timeout=wait)
                if reader.done():
                    break
                intended.append(due)
                st.outstanding += 1
                await st.call.write(self._request(st, 1, first))
                first, i = False, i + 1
            if not reader.done():
                await st.call.done_writing()
            await reader
        finally:
            reader.cancel()

    async def _watchdog(
        self, tasks: dict[asyncio.Task[None], _Stream], progress: Callable[[int], None] | None
    ) -> None:
        reply_timeout = self.spec.reply_timeout
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            now = time.perf_counter()
            if progress is not None:
                progress(self.report.words - self._reported)
                self._reported = self.report.words
            for task, st in tasks.items():
                # A stream that waits on a reply too long, or runs on past the drain time, is given up.
                stalled = st.outstanding > 0 and now - st.last_progress > reply_timeout
                if not task.done() and (stalled or now > self.deadline + reply_timeout):
                    st.timed_out = True
                    task.cancel()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)


async def _ready(channel: grpc.aio.Channel) -> None:
    """Wait until ``channel`` is connected; fail at the first failed attempt, not after its retries."""
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            raise TargetUnreachable("connection failed")
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)


def _rpc_failure(exc: grpc.RpcError) -> _StreamFailed:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return _StreamFailed(code.name if code is not None else "UNKNOWN", details or "")


async def run_load(spec: LoadSpec, progress: Callable[[int], None] | None = None) -> LoadReport:
    """Run ``spec`` in this event loop: every stream in this process.

    ``progress`` is called a few times a second with the number of words
    answered since its last call. Raises ``TargetUnreachable`` when no server
    answers; failed streams are counted in the report.
    """
    return await run_share(spec, Share(0, spec.streams), progress)


async def run_share(
    spec: LoadSpec,
    share: Share,
    progress: Callable[[int], None] | None = None,
    ready: Callable[[], object] | None = None,
) -> LoadReport:
    """``run_load`` for the ``share`` of a test that this process runs (``spec.streams`` of them).

    ``ready`` is called (in a thread) once the streams are open and prefilled, so the processes of
    one test all start measuring together.
    """
    load = _Load(spec, share, spec.text if spec.text is not None else load_words())
    try:
        await load.connect()
        await load.prepare()
        if ready is not None:
            await asyncio.to_thread(ready)
        return await load.measure(progress)
    finally:
        await load.close()
