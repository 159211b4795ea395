"""The ``nextword.v1.NextWord`` service: sessions, one-shot predictions, model info."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

import grpc
import numpy as np

from nextword.bundle import MANIFEST, Bundle
from nextword.tokenizer import split_partial
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc
from server.batcher import Batcher
from server.config import ServerConfig
from server.metrics import Metrics
from server.predictor import Predictor
from server.runtime import State
from server.session import Session as SessionRecord  # the RPC method below is named Session
from server.session import SessionTable, SessionTableFull, Stream


@dataclass
class _Advance:
    """What a text increment did to a context (committed to a session only if still owned)."""

    prediction: pb.Prediction
    state: State
    pending: str
    context_tokens: int


class NextWordServicer(pb_grpc.NextWordServicer):
    def __init__(
        self,
        *,
        config: ServerConfig,
        bundle: Bundle,
        provider: str,
        initial_state: State,
        batcher: Batcher,
        sessions: SessionTable,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._bundle = bundle
        self._provider = provider
        # The state after <eos>: training text starts after one, so every context does too.
        self._initial_state = initial_state
        self._batcher = batcher
        self._sessions = sessions
        self._metrics = metrics
        self._predictor = Predictor(bundle.vocab)
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
                self._metrics.request_duration.labels("Session").observe(time.perf_counter() - start)
        finally:
            if session is not None:
                self._sessions.detach(session, stream)

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictReply:
        start = time.perf_counter()
        await self._validate("Predict", context, request.text, request.k, request.model)
        k = request.k or self._config.default_k
        step = await self._advance(self._initial_state, "", 0, request.text, k)
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
                session = self._sessions.create(self._initial_state, self._config.default_k)
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
        if request.reset:
            state, pending, context_tokens = self._initial_state, "", 0
        else:
            state, pending, context_tokens = session.state, session.pending, session.context_tokens
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
        step = await self._advance(state, pending, context_tokens, request.text, k)
        # While the model ran, another stream may have resumed this session: it owns it now.
        if session.stream is not stream:
            await self._superseded(context)
        session.state, session.pending, session.context_tokens = step.state, step.pending, step.context_tokens
        session.k = k
        session.seq += 1
        self._sessions.touch(session)
        return pb.SessionReply(session_id=session.id, prediction=step.prediction, seq=session.seq)

    async def _advance(self, state: State, pending: str, context_tokens: int, text: str, k: int) -> _Advance:
        """Feed the complete words of ``pending + text`` in one model call; predict from the result."""
        tokens, partial = split_partial(pending + text)
        log_probs: np.ndarray
        if tokens:
            log_probs, state = await self._batcher.step(self._bundle.vocab.encode(tokens), state)
        else:
            log_probs = await self._batcher.head(state)
        context_tokens += len(tokens)
        prediction = self._predictor.predict(log_probs, partial, k, context_tokens)
        return _Advance(prediction, state, partial, context_tokens)

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
