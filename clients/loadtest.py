"""``nextword loadtest``: many concurrent typing sessions against a server, with latency percentiles.

Each stream is one ``NextWord.Session``: it types words of a text, one request
(``"word "``) per word, and the server answers each request with one reply.

* Closed loop (default): a stream sends its next word when the previous reply
  arrives; latency is write-to-reply.
* Open loop (``rate``): a stream sends ``rate`` words/s whatever the server
  does; requests pipeline on the stream, and latency is measured from each
  word's *intended* send time, so a server that falls behind shows it in the
  percentiles instead of silently slowing the test down (coordinated omission).

Latencies go into an HDR histogram (1 µs .. 60 s, 3 significant digits).
Only the reply *count* is used, never its contents, so any server of the
``Session`` RPC can be measured (the benchmarks point it at stand-ins too):

    report = await run_load("127.0.0.1:50051", streams=64, duration=10)
    print(report.to_json_dict())

``run_load_processes`` spreads the streams over several client processes
(one Python process saturates a core long before a server with 256 streams
does) and merges their histograms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import ipaddress
import json
import math
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from hdrh.histogram import HdrHistogram

from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

# Histogram range, in microseconds.
LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_FIGURES = 3

DEFAULT_DURATION_S = 10.0
# Relative to where the command runs (the repo root); next to the checkout as a fallback.
DEFAULT_TEXT = Path("../shared/data/gutenberg/test.txt")
_CHECKOUT_TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gutenberg" / "test.txt"
# Used when no corpus is on disk: the opening of Jane Austen's *Emma* (1815, public domain).
BUILTIN_TEXT = """\
Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition,
seemed to unite some of the best blessings of existence; and had lived nearly twenty-one
years in the world with very little to distress or vex her. She was the youngest of the two
daughters of a most affectionate, indulgent father; and had, in consequence of her sister's
marriage, been mistress of his house from a very early period. Her mother had died too long
ago for her to have more than an indistinct remembrance of her caresses; and her place had
been supplied by an excellent woman as governess, who had fallen little short of a mother in
affection. Sixteen years had Miss Taylor been in Mr. Woodhouse's family, less as a governess
than a friend, very fond of both daughters, but particularly of Emma.
"""

CONNECT_TIMEOUT_S = 5.0
# A stream with requests out and no reply for this long is given up (counted DEADLINE_EXCEEDED);
# after a --duration run, the in-flight replies get this long to arrive.
REPLY_TIMEOUT_S = 30.0
_PROGRESS_INTERVAL_S = 0.25
_ENDED = "UNAVAILABLE"  # a stream the server ended (status OK) before answering every request


class LoadTestError(Exception):
    """The load test could not run at all (bad target, unreachable server); the message says why."""


class TargetUnreachable(LoadTestError):
    pass


# --------------------------------------------------------------------------- target


def is_loopback_target(target: str) -> bool:
    """Whether HOST:PORT (or [V6]:PORT, or a bare host) names this machine: 127.0.0.0/8, ::1, localhost.

    Host names other than ``localhost`` are not resolved: a name is refused even
    if it happens to point here, which errs on the safe side.
    """
    host = target
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        host = host.removeprefix(scheme)
    if host.startswith("["):  # [::1]:50051
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:  # 127.0.0.1:50051 (more than one colon: a bare IPv6 address)
        host = host.rsplit(":", 1)[0]
    host = host.strip().lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(target: str, *, allow_remote: bool = False) -> None:
    """Raise ``LoadTestError`` for a target that is not loopback, unless ``allow_remote``."""
    if not allow_remote and not is_loopback_target(target):
        raise LoadTestError(
            f"refusing to load-test {target!r}: not a loopback address (127.0.0.0/8, ::1, localhost); "
            "pass --allow-remote to load a server on another host"
        )


# --------------------------------------------------------------------------- text


def load_words(text: str | os.PathLike[str] | None = None) -> list[str]:
    """The words streams type: from ``text`` (a str of text, or a path to read), else the default corpus."""
    if text is None:
        path = next((p for p in (DEFAULT_TEXT, _CHECKOUT_TEXT) if p.is_file()), None)
        content = path.read_text(encoding="utf-8") if path is not None else BUILTIN_TEXT
    elif isinstance(text, str):
        content = text
    else:
        content = Path(text).read_text(encoding="utf-8")
    words = content.split()
    if not words:
        raise LoadTestError("the load test text has no words")
    return words


# --------------------------------------------------------------------------- report


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def _record(hist: HdrHistogram, seconds: float) -> None:
    # Clamp into the trackable range: hdrh drops out-of-range values silently.
    hist.record_value(min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US))


def _ms(hist: HdrHistogram, percentile: float) -> float:
    return hist.get_value_at_percentile(percentile) / 1000 if hist.get_total_count() else 0.0


@dataclass
class LoadReport:
    """What a load run measured. Latencies are in ``histogram`` (µs); ``words`` counts answered words."""

    target: str
    streams: int
    rate: float | None  # words/s per stream (open loop); None: closed loop
    context_words: int
    duration_s: float  # from the common start to the last reply (or the deadline, if later)
    words: int
    histogram: HdrHistogram = field(default_factory=new_histogram, repr=False)
    prefill_histogram: HdrHistogram = field(default_factory=new_histogram, repr=False)
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status code name -> count
    error_details: dict[str, str] = field(default_factory=dict)  # code -> the first details seen
    failed_streams: int = 0
    procs: int = 1

    @property
    def words_per_s(self) -> float:
        return self.words / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, percentile: float) -> float:
        return _ms(self.histogram, percentile)

    def to_json_dict(self) -> dict[str, Any]:
        h = self.histogram
        out: dict[str, Any] = {
            "target": self.target,
            "streams": self.streams,
            "procs": self.procs,
            "rate": self.rate,
            "context_words": self.context_words,
            "duration_s": round(self.duration_s, 3),
            "words": self.words,
            "words_per_s": round(self.words_per_s, 1),
            "p50_ms": _ms(h, 50),
            "p95_ms": _ms(h, 95),
            "p99_ms": _ms(h, 99),
            "max_ms": h.get_max_value() / 1000 if h.get_total_count() else 0.0,
            "mean_ms": round(h.get_mean_value() / 1000, 3) if h.get_total_count() else 0.0,
            "errors": dict(sorted(self.errors.items())),
            "failed_streams": self.failed_streams,
        }
        if self.error_details:
            out["error_details"] = dict(sorted(self.error_details.items()))
        if self.prefill_histogram.get_total_count():
            p = self.prefill_histogram
            out["prefill_p50_ms"] = _ms(p, 50)
            out["prefill_max_ms"] = p.get_max_value() / 1000
        return out

    # Across processes: plain data plus hdrh's compressed encoding of each histogram.
    def _to_wire(self) -> dict[str, Any]:
        wire = {k: v for k, v in self.__dict__.items() if k not in ("histogram", "prefill_histogram")}
        wire["histogram"] = self.histogram.encode()
        wire["prefill_histogram"] = self.prefill_histogram.encode()
        return wire

    @classmethod
    def _from_wire(cls, wire: dict[str, Any]) -> LoadReport:
        wire = dict(wire)
        hist, prefill = new_histogram(), new_histogram()
        hist.decode_and_add(wire.pop("histogram"))
        prefill.decode_and_add(wire.pop("prefill_histogram"))
        return cls(**wire, histogram=hist, prefill_histogram=prefill)

    def merge(self, other: LoadReport) -> None:
        """Add ``other`` (a run over other streams of the same test, at the same time) into this one."""
        self.histogram.add(other.histogram)
        self.prefill_histogram.add(other.prefill_histogram)
        self.streams += other.streams
        self.words += other.words
        self.duration_s = max(self.duration_s, other.duration_s)  # they started together
        self.failed_streams += other.failed_streams
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        for code, details in other.error_details.items():
            self.error_details.setdefault(code, details)


# --------------------------------------------------------------------------- one process


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


class _Load:
    """The streams of one process; ``prepare`` opens and prefills them, ``measure`` runs the test."""

    def __init__(
        self,
        target: str,
        *,
        streams: int,
        first_stream: int,
        total_streams: int,
        duration: float | None,
        words: int | None,
        rate: float | None,
        context_words: int,
        text: list[str],
        k: int,
        reply_timeout: float,
    ) -> None:
        self.target = target
        self.duration = duration
        self.budget = words  # words still to send (None: until the deadline)
        self.rate = rate
        self.total_streams = total_streams
        self.context_words = context_words
        self.text = text
        self.k = k
        self.reply_timeout = reply_timeout
        # Streams start spread evenly over the text so they do not type the same words in step.
        self.streams = [
            _Stream(i, i * len(text) // total_streams) for i in range(first_stream, first_stream + streams)
        ]
        self.report = LoadReport(target, streams, rate, context_words, 0.0, 0)
        self.channel: grpc.aio.Channel | None = None
        self.deadline = math.inf
        self._reported = 0  # words already passed to the progress callback
        self.last_reply = 0.0

    # ---- words ---------------------------------------------------------------
    def _next_words(self, st: _Stream, n: int) -> str:
        words = [self.text[(st.position + i) % len(self.text)] for i in range(n)]
        st.position = (st.position + n) % len(self.text)
        return " ".join(words) + " "

    def _claim(self) -> bool:
        """Take one word of the ``--words`` budget; False when it is spent."""
        if self.budget is None:
            return True
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True

    def _request(self, st: _Stream, n: int, first: bool) -> pb.SessionRequest:
        # k is a session setting: sent once, on the stream's first request.
        return pb.SessionRequest(text=self._next_words(st, n), k=self.k if first else 0)

    def _fail(self, code: str, details: str, count: int = 1) -> None:
        self.report.failed_streams += 1
        self.report.errors[code] = self.report.errors.get(code, 0) + count
        self.report.error_details.setdefault(code, details)

    # ---- setup ---------------------------------------------------------------
    async def connect(self, connect_timeout: float) -> None:
        self.channel = grpc.aio.insecure_channel(self.target)
        try:
            await asyncio.wait_for(_ready(self.channel), connect_timeout)
        except (asyncio.TimeoutError, TargetUnreachable) as exc:
            await self.channel.close(None)
            why = str(exc) or f"no connection within {connect_timeout:g} s"
            raise TargetUnreachable(f"cannot reach a server at {self.target} ({why})") from None

    async def prepare(self) -> None:
        """Open every stream; with ``context_words``, send each its context in one request first."""
        assert self.channel is not None
        stub = pb_grpc.NextWordStub(self.channel)
        for st in self.streams:
            st.call = stub.Session()
        if self.context_words:
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
            await st.call.write(self._request(st, self.context_words, first=True))
            reply = await asyncio.wait_for(st.call.read(), self.reply_timeout)
        except asyncio.TimeoutError:
            raise _StreamFailed("DEADLINE_EXCEEDED", "no reply to the context prefill") from None
        except grpc.RpcError as exc:
            raise _rpc_failure(exc) from None
        except asyncio.InvalidStateError:  # grpc.aio's write() after the server ended the call
            raise _StreamFailed(_ENDED, "the server ended the stream") from None
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise _StreamFailed(_ENDED, "the server ended the stream")
        _record(self.report.prefill_histogram, time.perf_counter() - start)

    # ---- the test ------------------------------------------------------------
    async def measure(self, progress: Callable[[int], None] | None = None) -> LoadReport:
        start = time.perf_counter()
        if self.duration is not None:
            self.deadline = start + self.duration
        live = [st for st in self.streams if st.call is not None]
        run = self._open_loop if self.rate else self._closed_loop
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

    async def _run_stream(self, st: _Stream, run: Callable[..., Any], start: float) -> None:
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
                f"no reply within {self.reply_timeout:g} s; the stream was given up",
                max(st.outstanding, 1),
            )
        except asyncio.InvalidStateError:
            self._fail(_ENDED, "the server ended the stream", max(st.outstanding, 1))
        finally:
            st.call.cancel()  # a no-op on a finished call; frees a stuck one

    def _sending(self) -> bool:
        return time.perf_counter() < self.deadline and self._claim()

    def _answered(self, st: _Stream, latency: float) -> None:
        _record(self.report.histogram, latency)
        self.report.words += 1
        st.outstanding -= 1
        st.last_progress = self.last_reply = time.perf_counter()

    async def _closed_loop(self, st: _Stream, start: float) -> None:
        first = not self.context_words
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
        assert self.rate
        interval = 1.0 / self.rate
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
            first, i = not self.context_words, 0
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
        while True:
            await asyncio.sleep(_PROGRESS_INTERVAL_S)
            now = time.perf_counter()
            if progress is not None:
                progress(self.report.words - self._reported)
                self._reported = self.report.words
            for task, st in tasks.items():
                # A stream that waits on a reply too long, or runs on past the drain time, is given up.
                stalled = st.outstanding > 0 and now - st.last_progress > self.reply_timeout
                if not task.done() and (stalled or now > self.deadline + self.reply_timeout):
                    st.timed_out = True
                    task.cancel()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)


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


def _validate(
    streams: int, duration: float | None, words: int | None, rate: float | None, context_words: int, k: int
) -> None:
    if streams < 1:
        raise LoadTestError("streams must be at least 1")
    if duration is not None and duration <= 0:
        raise LoadTestError("duration must be positive")
    if words is not None and words < 1:
        raise LoadTestError("words must be at least 1")
    if rate is not None and rate <= 0:
        raise LoadTestError("rate must be positive")
    if context_words < 0 or k < 0:
        raise LoadTestError("context words and k must not be negative")


async def run_load(
    target: str,
    *,
    streams: int,
    duration: float | None = None,
    words: int | None = None,
    rate: float | None = None,
    context_words: int = 0,
    text: str | os.PathLike[str] | Sequence[str] | None = None,
    k: int = 3,
    allow_remote: bool = False,
    progress: Callable[[int], None] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    reply_timeout: float = REPLY_TIMEOUT_S,
) -> LoadReport:
    """Run ``streams`` concurrent sessions against ``target`` in this event loop; see the module doc.

    Stops after ``duration`` seconds or ``words`` answered words (``duration``
    defaults to 10 s when neither is given). ``rate``: words/s per stream, open
    loop; None: closed loop. ``text``: what to type — a str of text, a path to
    read, or a list of words; None: the default corpus. ``progress`` is called
    a few times a second with the number of words answered since its last call.
    Raises ``LoadTestError`` (a non-loopback target without ``allow_remote``)
    or ``TargetUnreachable``; failed streams are counted in the report.
    """
    return await _run_share(
        target,
        streams=streams,
        first_stream=0,
        total_streams=streams,
        duration=duration,
        words=words,
        rate=rate,
        context_words=context_words,
        text=text,
        k=k,
        allow_remote=allow_remote,
        progress=progress,
        connect_timeout=connect_timeout,
        reply_timeout=reply_timeout,
    )


async def _run_share(
    target: str,
    *,
    streams: int,
    first_stream: int,
    total_streams: int,
    duration: float | None,
    words: int | None,
    rate: float | None,
    context_words: int,
    text: str | os.PathLike[str] | Sequence[str] | None,
    k: int,
    allow_remote: bool,
    progress: Callable[[int], None] | None,
    connect_timeout: float,
    reply_timeout: float,
    ready: Callable[[], Any] | None = None,
) -> LoadReport:
    """``run_load`` for streams ``first_stream ..`` of a test of ``total_streams`` (several processes).

    ``ready`` is awaited (in a thread) once the streams are open and prefilled, so the processes of
    one test all start measuring together.
    """
    check_target(target, allow_remote=allow_remote)
    _validate(streams, duration, words, rate, context_words, k)
    if duration is None and words is None:
        duration = DEFAULT_DURATION_S
    word_list = list(text) if isinstance(text, (list, tuple)) else load_words(text)  # type: ignore[arg-type]
    load = _Load(
        target,
        streams=streams,
        first_stream=first_stream,
        total_streams=total_streams,
        duration=duration,
        words=words,
        rate=rate,
        context_words=context_words,
        text=word_list,
        k=k,
        reply_timeout=reply_timeout,
    )
    try:
        await load.connect(connect_timeout)
        await load.prepare()
        if ready is not None:
            await asyncio.to_thread(ready)
        return await load.measure(progress)
    finally:
        await load.close()


# --------------------------------------------------------------------------- several processes

_RUN_LOAD_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(run_load).parameters.items()
    if p.default is not inspect.Parameter.empty and name != "progress"
}


def _worker(
    slot: int,
    share: dict[str, Any],
    barrier: Any,  # multiprocessing.Barrier
    counts: Any,  # multiprocessing.Array("q"), one progress counter per process
    results: Any,  # multiprocessing.Queue
) -> None:
    """One client process: runs its share of the streams and sends back its report (or its error)."""

    def progress(n: int) -> None:
        counts[slot] += n  # one writer per slot: no lock needed

    def ready() -> None:
        barrier.wait(timeout=share["reply_timeout"] * 4)

    try:
        report = asyncio.run(_run_share(**share, progress=progress, ready=ready))
        results.put((slot, report._to_wire(), None))
    except threading.BrokenBarrierError:
        results.put((slot, None, None))  # another process failed to start: it reports why
    except Exception as exc:
        barrier.abort()  # do not leave the others waiting for this process
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, LoadTestError) else str(exc)
        results.put((slot, None, error))


def run_load_processes(
    target: str,
    *,
    procs: int,
    streams: int,
    progress: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> LoadReport:
    """``run_load`` with the streams spread over ``procs`` spawned processes; blocks until done.

    Takes ``run_load``'s keyword arguments; ``words`` is split between the
    processes. The processes start measuring together (after every stream is
    open and prefilled) and their histograms are merged.
    """
    procs = max(1, min(procs, streams))
    if procs == 1:
        return asyncio.run(run_load(target, streams=streams, progress=progress, **kwargs))
    kwargs = {**_RUN_LOAD_DEFAULTS, **kwargs}  # run_load's signature is the one source of defaults
    check_target(target, allow_remote=kwargs["allow_remote"])
    _validate(
        streams, kwargs["duration"], kwargs["words"], kwargs["rate"], kwargs["context_words"], kwargs["k"]
    )
    # Read the text once here and ship the words: the children may run elsewhere than the cwd allows.
    text = kwargs.pop("text", None)
    kwargs["text"] = list(text) if isinstance(text, (list, tuple)) else load_words(text)
    words = kwargs.pop("words", None)
    if kwargs.get("duration") is None and words is None:
        kwargs["duration"] = DEFAULT_DURATION_S

    ctx = mp.get_context("spawn")  # fork would copy grpc's threads and state, which grpc forbids
    barrier = ctx.Barrier(procs)
    counts = ctx.Array("q", procs, lock=False)
    results = ctx.Queue()
    workers = []
    first = 0
    for slot in range(procs):
        n = streams // procs + (slot < streams % procs)
        share = {
            **kwargs,
            "target": target,
            "streams": n,
            "first_stream": first,
            "total_streams": streams,
            "words": None if words is None else words // procs + (slot < words % procs),
        }
        first += n
        workers.append(ctx.Process(target=_worker, args=(slot, share, barrier, counts, results), daemon=True))
    for w in workers:
        w.start()

    reports: list[LoadReport] = []
    errors: list[str] = []
    seen = 0
    try:
        pending = procs
        while pending:
            try:
                _, wire, error = results.get(timeout=_PROGRESS_INTERVAL_S)
            except queue.Empty:
                if not any(w.is_alive() for w in workers) and results.empty():
                    errors.append("a load test process died without a report")
                    break
            else:
                pending -= 1
                if wire is not None:
                    reports.append(LoadReport._from_wire(wire))
                if error is not None:
                    errors.append(error)
            if progress is not None:
                total = sum(counts)
                progress(total - seen)
                seen = total
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
    if errors or not reports:
        if not errors:
            raise LoadTestError("the load test processes did not start together (timed out waiting)")
        raise TargetUnreachable(errors[0]) if "cannot reach" in errors[0] else LoadTestError(errors[0])
    report = reports[0]
    for other in reports[1:]:
        report.merge(other)
    report.procs = procs
    return report


# --------------------------------------------------------------------------- command


def format_table(report: LoadReport) -> str:
    j = report.to_json_dict()
    mode = f"open loop, {report.rate:g} words/s per stream" if report.rate else "closed loop"
    header = ("streams", "duration_s", "words", "words/s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "errors")
    row = (
        str(report.streams),
        f"{report.duration_s:.2f}",
        str(report.words),
        f"{report.words_per_s:.1f}",
        f"{j['p50_ms']:.3f}",
        f"{j['p95_ms']:.3f}",
        f"{j['p99_ms']:.3f}",
        f"{j['max_ms']:.3f}",
        str(sum(report.errors.values())),
    )
    widths = [max(len(h), len(v)) for h, v in zip(header, row, strict=True)]
    lines = [
        f"nextword loadtest against {report.target}: {mode}, {report.context_words} context words, "
        f"{report.procs} process(es)",
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)),
    ]
    if "prefill_p50_ms" in j:
        lines.append(
            f"prefill of {report.context_words} words: p50 {j['prefill_p50_ms']:.3f} ms, "
            f"max {j['prefill_max_ms']:.3f} ms"
        )
    for code, n in sorted(report.errors.items()):
        lines.append(f"error {code}: {n} ({report.error_details.get(code, '')})")
    if report.failed_streams:
        lines.append(f"{report.failed_streams} of {report.streams} streams failed")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``nextword loadtest``: 0 after a run, 1 when nothing could be measured, 2 for a refused target."""
    try:
        check_target(args.target, allow_remote=args.allow_remote)
        _validate(args.streams, args.duration, args.words, args.rate, args.context_words, args.k)
        if args.procs < 1:
            raise LoadTestError("procs must be at least 1")
    except LoadTestError as exc:
        print(f"nextword loadtest: error: {exc}", file=sys.stderr)
        return 2
    text: Path | None = args.text
    if text is not None and not text.is_file():
        print(f"nextword loadtest: error: no text file {text}", file=sys.stderr)
        return 2

    from tqdm import tqdm  # only the command shows progress; the library API takes a callback

    bar = tqdm(
        total=args.words,
        unit="word",
        desc="loadtest",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    try:
        report = run_load_processes(
            args.target,
            procs=args.procs,
            streams=args.streams,
            duration=args.duration,
            words=args.words,
            rate=args.rate,
            context_words=args.context_words,
            text=text,
            k=args.k,
            allow_remote=args.allow_remote,
            progress=bar.update,
        )
    except LoadTestError as exc:
        bar.close()
        print(f"nextword loadtest: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("nextword loadtest: interrupted", file=sys.stderr)
        return 130
    bar.close()
    if args.json:
        print(json.dumps(report.to_json_dict()))
    else:
        print(format_table(report))
    if report.words == 0 and report.errors:
        print("nextword loadtest: error: no word was answered", file=sys.stderr)
        return 1
    return 0
