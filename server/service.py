"""The ``nextword.v1.NextWord`` service: sessions, one-shot predictions, model info."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

import grpc

from nextword.bundle import MANIFEST, Bundle
from nextword.ranking import Ranker
from nextword.tokenizer import split_partial
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

from .batcher import DISCARD, Batcher
from .config import ServerConfig
from .metrics import Metrics
from .session import SessionRecord, SessionTable, SessionTableFull, Stream
from .state import INITIAL, StatePool


@dataclass
class _Applied:
    """What a text increment did to a context (committed to a session only if still owned)."""

    prediction: pb.Prediction
    slot: int  # where the new state is (the old slot when no word was complete)
    pending: str
    context_tokens: int


class NextWordServicer(pb_grpc.NextWordServicer):
    def __init__(
        self,
        *,
        config: ServerConfig,
        bundle: Bundle,
        provider: str,
        pool: StatePool,
        batcher: Batcher,
        sessions: SessionTable,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._bundle = bundle
        self._provider = provider
        self._pool = pool
        self._batcher = batcher
        self._sessions = sessions
        self._metrics = metrics
        self._session_latency = metrics.request_duration.labels("Session")  # looked up once, not per word
        self._ranker = Ranker(bundle.vocab, graph_k=bundle.manifest.topk.get("k", 0))
        self._manifest_json = (bundle.path / MANIFEST).read_text(encoding="utf-8")

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
    ) -> None:
        stream = Stream()
        session: SessionRecord | None = None
        try:
            while (request := await self._next(request_iterator, context, stream)) is not None:
                start = time.perf_counter()
                await self._validate("Session", context, request.text, request.k, request.model)
                if session is None:
                    session = await self._open(context, request.session_id, stream)
                elif request.session_id:
                    await self._fail(
                        "Session",
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "session_id may only be set on the first request of a stream",
                    )
                reply = await self._answer(context, session, stream, request)
                await context.write(reply)
                self._session_latency.observe(time.perf_counter() - start)
        finally:
            if session is not None:
                self._sessions.detach(session, stream)

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictReply:
        start = time.perf_counter()
        await self._validate("Predict", context, request.text, request.k, request.model)
        k = request.k or self._config.default_k
        step = await self._apply_text(INITIAL, "", 0, request.text, k, keep=False)
        self._metrics.request_duration.labels("Predict").observe(time.perf_counter() - start)
        return pb.PredictReply(prediction=step.prediction)

    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        m = self._bundle.manifest
        return pb.ModelInfo(
            name=m.name,
            cell=m.cell,
            vocab_size=len(self._bundle.vocab),
            provider=self._provider,
            manifest_json=self._manifest_json,
            max_k=self._config.max_k,
            max_text_chars=self._config.max_text_chars,
        )

    # ---- session steps -------------------------------------------------------
    async def _next(
        self, requests: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext, stream: Stream
    ) -> pb.SessionRequest | None:
        """The next request, None when the client is done, or ABORTED if another stream took the session."""
        read = asyncio.ensure_future(anext(requests, None))
        try:
            await asyncio.wait((read, stream.superseded), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: leave no read behind
            read.cancel()
            raise
        if not read.done():
            read.cancel()
            await self._superseded(context)
        return read.result()

    async def _open(
        self, context: grpc.aio.ServicerContext, session_id: str, stream: Stream
    ) -> SessionRecord:
        if session_id:
            session = self._sessions.get(session_id)
            if session is None:
                await self._fail(
                    "Session",
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"session {session_id!r} is unknown or has expired (idle sessions are kept "
                    f"{self._config.session_ttl:g} s, see --session-ttl); "
                    "start a new session by sending no session_id",
                )
        else:
            try:
                session = self._sessions.create(self._config.default_k)
            except SessionTableFull as exc:
                await self._fail("Session", context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        self._sessions.attach(session, stream)
        return session

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        session: SessionRecord,
        stream: Stream,
        request: pb.SessionRequest,
    ) -> pb.SessionReply:
        async with session.lock:  # one request of a session at a time, even across streams
            if request.reset:
                src, pending, context_tokens = INITIAL, "", 0
            else:
                src, pending, context_tokens = session.slot, session.pending, session.context_tokens
            total, limit = len(pending) + len(request.text), self._config.max_text_chars
            if total > limit:
                # A word typed without end would otherwise grow the context we re-tokenize without bound.
                await self._fail(
                    "Session",
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"this text and the unfinished word before it ({len(pending)} characters) "
                    f"come to {total} characters, more than --max-text-chars {limit}; "
                    "finish the word with a space, or send reset",
                )
            k = request.k or session.k
            step = await self._apply_text(src, pending, context_tokens, request.text, k, keep=True)
            # While the model ran, another stream may have resumed this session: it owns it now.
            if session.stream is not stream:
                if step.slot != src:
                    self._pool.free(step.slot)
                await self._superseded(context)
            if step.slot != session.slot:
                self._pool.free(session.slot)
            session.slot, session.pending, session.context_tokens = (
                step.slot,
                step.pending,
                step.context_tokens,
            )
            session.k = k
            session.seq += 1
            self._sessions.touch(session)
            return pb.SessionReply(session_id=session.id, prediction=step.prediction, seq=session.seq)

    async def _apply_text(
        self, src: int, pending: str, context_tokens: int, text: str, k: int, *, keep: bool
    ) -> _Applied:
        """Feed the complete words of ``pending + text`` in one model call; predict from the result.

        With ``keep`` the new state goes to a fresh slot (returned); the caller frees the one it drops.
        """
        tokens, partial = split_partial(pending + text)
        # Completions rank the whole vocabulary, and so does a k beyond what the graph ranks.
        whole = bool(partial) or k > self._ranker.graph_k
        slot = src
        if tokens:
            slot = self._pool.alloc() if keep else DISCARD
            try:
                scores = await self._batcher.advance(
                    self._bundle.vocab.encode(tokens), src, slot, whole_distribution=whole
                )
            except BaseException:
                if keep:
                    self._pool.free(slot)
                raise
        else:
            scores = await self._batcher.peek(src, whole_distribution=whole)
        context_tokens += len(tokens)
        prediction = self._ranker.predict(scores, partial, k, context_tokens)
        return _Applied(prediction, slot, partial, context_tokens)

    # ---- errors --------------------------------------------------------------
    async def _validate(
        self, method: str, context: grpc.aio.ServicerContext, text: str, k: int, model: str
    ) -> None:
        config, name = self._config, self._bundle.manifest.name
        if model and model != name:
            await self._fail(
                method,
                context,
                grpc.StatusCode.NOT_FOUND,
                f"model {model!r} is not served here; this server serves {name!r} "
                "(leave model empty for the default)",
            )
        if len(text) > config.max_text_chars:
            await self._fail(
                method,
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text is {len(text)} characters, more than this server accepts in one request "
                f"({config.max_text_chars}, see --max-text-chars); send it in several requests",
            )
        if k > config.max_k:
            await self._fail(
                method,
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"k={k} is more than this server's maximum of {config.max_k} (see --max-k)",
            )

    async def _superseded(self, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._fail("Session", context, grpc.StatusCode.ABORTED, "session resumed by another stream")

    async def _fail(
        self, method: str, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        self._metrics.errors.labels(method, code.name).inc()
        await context.abort(code, message)
