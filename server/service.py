"""The ``nextword.v1.NextWord`` service: sessions, one-shot predictions, model info."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import NoReturn

import grpc

from nextword.ranking import NO_CACHE, NO_USER_WORDS, Ranker, Scores, StripState, UserWords, WordCache
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

from .admission import Admission, Overloaded, Ticket, TooManyTokens, measure
from .batcher import DISCARD
from .config import ServerConfig
from .metrics import Metrics
from .model import ModelVersion
from .repository import ModelNotFound, Repository
from .security import PRINCIPAL, quote
from .session import SessionRecord, SessionTable, SessionTableFull, Stream
from .state import INITIAL
from .store import Persister, Record, StoreError

# What a client whose stream the drain ends is told; the client library acts on it (clients/client.py).
DRAINED = (
    "the server is shutting down: reconnect and resume this session by its id (session_id of its "
    "replies); if the session is gone (NOT_FOUND), start a new session and resend its text"
)
STORE_DOWN = (
    "session {id} cannot be resumed here: the session store is unreachable and this process does "
    "not hold it; start a new session and resend its text (the client library does this itself)"
)
REFUSED_DRAINING = (
    "the server is shutting down and takes no new calls: retry on another server, "
    "or here once it has restarted"
)


@dataclass(frozen=True)
class _Caller:
    """Whom a refusal goes to: the RPC, and the session its client can resume on a new stream."""

    method: str
    context: grpc.aio.ServicerContext
    session_id: str = ""


@dataclass
class _Applied:
    """What a text increment did to a context (committed to a session only if still owned)."""

    prediction: pb.Prediction
    slot: int  # where the new state is (the old slot when no word was complete)
    pending: str
    context_tokens: int
    user_words: UserWords  # with the words of this text the model cannot name
    cache: WordCache  # with this text's words of the vocabulary, when the strip learns
    strip: StripState  # with what this prediction showed


def _typed(
    session: SessionRecord | None, ranker: Ranker, tokens: list[str], ids: list[int], strip: StripState
) -> tuple[UserWords, WordCache]:
    """The user's words once ``tokens`` are typed: those the model cannot name, and (while the
    strip learns) those it can. A one-shot prediction's are its text's; a session's, every text
    it was sent."""
    user_words = (NO_USER_WORDS if session is None else session.user_words).after(ranker.unknown(tokens, ids))
    cache = NO_CACHE if session is None else session.cache
    return user_words, cache.after(ranker.cacheable(ids)) if strip.learn else cache


class NextWordServicer(pb_grpc.NextWordServicer):
    def __init__(
        self,
        *,
        config: ServerConfig,
        models: Repository,
        sessions: SessionTable,
        metrics: Metrics,
        persister: Persister | None = None,
    ) -> None:
        self._config = config
        self.models = models
        self._sessions = sessions
        self._metrics = metrics
        self._persister = persister
        if persister is not None:
            loop = asyncio.get_running_loop()

            def taken(sessions: list[tuple[str, int]]) -> None:  # on the store's writer thread
                loop.call_soon_threadsafe(self._taken, sessions)

            persister.on_taken = taken
        self._max_text, self._max_k = config.max_text_chars, config.max_k  # checked on every request
        self._lone_poll = config.lone_poll_us / 1e6
        self._session_latency = metrics.request_duration.labels("Session")  # looked up once, not per word
        # The budget of model tokens in flight; public so that tests can occupy it.
        self.admission = Admission(
            metrics,
            budget=config.max_inflight_tokens,
            short_tokens=config.prefill_chunk_tokens,
            max_request_tokens=config.max_request_tokens,
        )
        self._draining = False  # set by drain(): new calls are refused, every stream ends
        self._streams: set[Stream] = set()
        models.open_streams = self._streams.__len__  # every model's batcher reads it
        self._no_streams = asyncio.Event()
        self._no_streams.set()

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
    ) -> None:
        stream = await self._start_stream(context)
        session: SessionRecord | None = None
        try:
            while (request := await self._next(request_iterator, context, stream)) is not None:
                start = time.perf_counter()
                if len(request.text) > self._max_text or request.k > self._max_k:
                    await self._validate("Session", context, request.text, request.k)
                if session is None:
                    session = await self._open(context, request.session_id, stream, request)
                elif request.session_id:
                    await self._fail(
                        "Session",
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "session_id may only be set on the first request of a stream",
                    )
                elif request.model or request.model_version:
                    await self._same_model(context, session, request)
                reply = await self._answer(context, session, stream, request)
                await context.write(reply)
                self._session_latency.observe(time.perf_counter() - start)
                if self._persister is not None:  # a lone step's record: stored while the reply travels
                    self._persister.flush_held()
                if self._lone_poll and len(self._streams) == 1:
                    stream.poller = asyncio.get_running_loop().create_task(self._poll_for_next(stream))
        finally:
            if session is not None:
                self._sessions.detach(session, stream)
            self._end_stream(stream)

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictReply:
        start = time.perf_counter()
        await self._refuse_if_draining("Predict", context)
        await self._validate("Predict", context, request.text, request.k)
        model = await self._pick("Predict", context, request.model, request.model_version)
        k = request.k or self._config.default_k
        caller = _Caller("Predict", context)
        strip = StripState().chosen(request.strip) if request.HasField("strip") else StripState()
        step = await self._apply_text(caller, model, INITIAL, "", 0, request.text, k, keep=False, strip=strip)
        self._metrics.request_duration.labels("Predict").observe(time.perf_counter() - start)
        return pb.PredictReply(prediction=step.prediction, model_version=model.version)

    async def step(
        self,
        context: grpc.aio.ServicerContext,
        session_id: str,
        request: pb.SessionRequest,
        *,
        held: Stream,
    ) -> pb.SessionReply:
        """One request of a session outside a Session stream, for calls of other protocols (KServe
        sequences, server/kserve.py): the session (``session_id``; empty: a new one) is attached
        to the caller's ``held`` stream for this request only, with the same checks, limits and
        statuses as a Session stream's (``held.shared``: that call carries other sessions too)."""
        await self._refuse_if_draining("Session", context)
        if len(request.text) > self._max_text or request.k > self._max_k:
            await self._validate("Session", context, request.text, request.k)
        session = await self._open(context, session_id, held, request)
        try:
            return await self._answer(context, session, held, request)
        finally:
            self._sessions.detach(session, held)

    async def hold(self, context: grpc.aio.ServicerContext) -> Stream:
        """Count a call of another protocol as an open stream while it lasts (``release`` it): the
        batcher runs a step alone, inline, only when one stream is open in all."""
        return await self._start_stream(context)

    def release(self, stream: Stream) -> None:
        self._end_stream(stream)

    def holds(self, session_id: str) -> bool:
        """Whether this process keeps the session ``session_id`` now."""
        return self._sessions.find(session_id) is not None

    def forget(self, session_id: str) -> None:
        """Drop a session nobody will resume (a KServe sequence that ended)."""
        if (session := self._sessions.find(session_id)) is not None and session.stream is None:
            self._sessions.forget(session)

    @property
    def draining(self) -> bool:
        return self._draining

    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        await self._refuse_if_draining("GetModelInfo", context)
        model = await self._pick("GetModelInfo", context, request.model, request.model_version)
        return pb.ModelInfo(
            name=model.name,
            cell=model.bundle.manifest.cell,
            vocab_size=len(model.bundle.vocab),
            provider=model.provider,
            manifest_json=model.manifest_json,
            max_k=self._config.max_k,
            max_text_chars=self._config.max_text_chars,
            version=model.version,
        )

    # ---- drain ---------------------------------------------------------------
    async def drain(self, timeout: float) -> bool:
        """Refuse new calls and end every Session stream; True once all have ended within ``timeout`` s.

        An idle stream ends at once, a busy one right after the reply to the request it is
        answering, both with UNAVAILABLE and ``DRAINED``, which tells the client to resume.
        """
        self._draining = True
        for stream in self._streams:
            stream.end("drain")
        try:
            await asyncio.wait_for(self._no_streams.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _start_stream(self, context: grpc.aio.ServicerContext) -> Stream:
        await self._refuse_if_draining("Session", context)
        stream = Stream()
        self._streams.add(stream)
        self._no_streams.clear()
        return stream

    def _end_stream(self, stream: Stream) -> None:
        self._streams.discard(stream)
        if not self._streams:
            self._no_streams.set()

    async def end_idle_streams(self) -> None:
        """End, every few seconds, the streams that have waited ``--idle-stream-timeout`` for a request.

        One sweep for every stream instead of a timer per message read.
        """
        timeout = self._config.idle_stream_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            now = loop.time()
            for stream in [s for s in self._streams if s.reading and now - s.read_since >= timeout]:
                stream.end("idle")

    async def _poll_for_next(self, stream: Stream) -> None:
        """Keep the event loop polling (not sleeping) while a lone stream waits for its next request,
        for ``--lone-poll-us`` at most: the core stays awake and the model's weights in its caches,
        so the next step runs as fast as it can. Never with more than one stream open."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lone_poll
        await asyncio.sleep(0)  # the handler starts its read first
        while stream.reading and loop.time() < deadline and len(self._streams) == 1:
            await asyncio.sleep(0)

    async def _refuse_if_draining(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if self._draining:
            self._metrics.refused.labels("draining").inc()
            await self._fail(method, context, grpc.StatusCode.UNAVAILABLE, REFUSED_DRAINING)

    # ---- session steps -------------------------------------------------------
    async def _next(
        self, requests: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext, stream: Stream
    ) -> pb.SessionRequest | None:
        """The next request, None when the client is done; or the stream ends (``Stream.end``).

        Another stream took the session: ABORTED; the server drains: UNAVAILABLE, at once when
        the stream is idle, after its reply when a request was being answered (a request already
        read is still answered); no request for ``--idle-stream-timeout``: UNAVAILABLE.
        """
        if stream.ended is None:
            stream.reading, stream.read_since = True, asyncio.get_running_loop().time()
            try:
                return await anext(requests, None)
            except asyncio.CancelledError:
                if stream.ended is None:  # the client went away: grpc cancelled this call
                    raise
                if (task := asyncio.current_task()) is not None:
                    task.uncancel()  # our own wake-up, handled here
            finally:
                stream.reading = False
        if stream.ended == "superseded":
            await self._superseded(context)
        if stream.ended == "idle":
            await self._idle(context)
        await self._drained(context)

    async def _open(
        self, context: grpc.aio.ServicerContext, session_id: str, stream: Stream, request: pb.SessionRequest
    ) -> SessionRecord:
        """The session a stream's first request names (resumed) or a new one on the model it asks for."""
        principal = PRINCIPAL.get()
        if session_id:
            session = await self._resume(context, session_id, principal)
            if session is None:
                # Another principal's session gets this same answer: no way to tell it exists.
                await self._fail(
                    "Session",
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"session {quote(session_id)} is unknown, has expired or ran on another model "
                    "(idle sessions are kept "
                    f"{self._config.session_ttl:g} s, see --session-ttl); "
                    "start a new session by sending no session_id",
                )
            if request.model or request.model_version:
                await self._same_model(context, session, request)
        else:
            model = await self._pick("Session", context, request.model, request.model_version)
            try:
                session = self._sessions.create(self._config.default_k, principal)
            except SessionTableFull as exc:
                await self._fail("Session", context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            self.models.hold(session, model)
        self._sessions.attach(session, stream)
        return session

    async def _pick(
        self, method: str, context: grpc.aio.ServicerContext, name: str, version: str
    ) -> ModelVersion:
        """The model version a new session or a one-shot call asks for; NOT_FOUND if none serves it."""
        try:
            return self.models.pick(name, version)
        except ModelNotFound as exc:
            await self._fail(method, context, grpc.StatusCode.NOT_FOUND, str(exc))

    async def _same_model(
        self, context: grpc.aio.ServicerContext, session: SessionRecord, request: pb.SessionRequest
    ) -> None:
        """A request of a running session may name its model and version, but no other."""
        model = session.model
        assert model is not None
        if (request.model and request.model != model.name) or (
            request.model_version and request.model_version != model.version
        ):
            await self._fail(
                "Session",
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"session {session.id} runs on model {model.name!r} version {model.version!r} to its "
                "end; leave model and model_version empty, or start a new session for another model",
            )

    async def _resume(
        self, context: grpc.aio.ServicerContext, session_id: str, principal: str
    ) -> SessionRecord | None:
        """``principal``'s session ``session_id`` from this process or the session store, or None.

        With a store, the store is asked first and the session claimed (server/store.py): its
        record is the newest unless this process holds a newer one (written while the store
        was down). A stream of it elsewhere can no longer store steps.
        """
        local = self._sessions.get(session_id, principal)
        if self._persister is None:
            return local
        if local is not None and local.taken:  # what this process holds is not the session any more
            local = None
        try:
            record = await self._persister.run(self._persister.claim, session_id)
        except StoreError:
            if local is None:
                await self._fail(
                    "Session", context, grpc.StatusCode.NOT_FOUND, STORE_DOWN.format(id=quote(session_id))
                )
            return local
        if record is None:
            return local
        model = self.models.by_fingerprint(record.model)  # retired versions too: a session keeps its own
        if record.principal != principal or model is None:
            return None
        if local is not None and local.model is not model:  # cannot be one session: the store's wins
            self._sessions.forget(local)
            local = None
        if local is None:
            try:
                local = self._sessions.create(record.k, principal, session_id)
            except SessionTableFull as exc:
                await self._fail("Session", context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            self.models.hold(local, model)
        async with local.lock:  # a request of another stream still in flight finishes first
            if local.seq < record.seq:
                self._restore(local, record)
            local.epoch = record.epoch
            self._persister.reclaimed(session_id, record.epoch)
        return local

    def _taken(self, taken: list[tuple[str, int]]) -> None:
        """The store refused these sessions' records: another process claimed them. Their streams
        here end (ABORTED) and this process forgets them (a resume here reads the store again)."""
        for session_id, epoch in taken:
            session = self._sessions.find(session_id)
            if session is None or session.epoch != epoch or session.taken:
                continue  # gone, or claimed here again since
            session.taken = True
            if session.stream is not None:
                session.stream.end("superseded")  # forgotten when its stream ends
            else:
                self._sessions.forget(session)

    def _restore(self, session: SessionRecord, record: Record) -> None:
        """Make ``session`` what ``record`` says (its state into a slot of its own)."""
        assert session.model is not None
        pool = session.model.pool
        slot = pool.alloc()
        try:
            pool.load(slot, record.state)
        except ValueError:  # cannot happen for one fingerprint; never load a wrong state
            pool.free(slot)
            raise
        pool.free(session.slot)
        session.slot, session.pending, session.context_tokens = slot, record.pending, record.context_tokens
        session.k, session.seq = record.k, record.seq
        session.user_words = UserWords(record.user_words) if record.user_words else NO_USER_WORDS
        session.cache = WordCache(record.cache) if record.cache else NO_CACHE
        session.strip = record.strip

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        session: SessionRecord,
        stream: Stream,
        request: pb.SessionRequest,
    ) -> pb.SessionReply:
        model = session.model
        assert model is not None
        async with session.lock:  # one request of a session at a time, even across streams
            if request.reset:
                src, pending, context_tokens = INITIAL, "", 0
            else:
                src, pending, context_tokens = session.slot, session.pending, session.context_tokens
            k = request.k or session.k
            strip = session.strip.chosen(request.strip) if request.HasField("strip") else session.strip
            if request.reset:
                strip = replace(strip, passed=(), shown=())
            caller = _Caller("Session", context, session.id)
            step = await self._apply_text(
                caller,
                model,
                src,
                pending,
                context_tokens,
                request.text,
                k,
                keep=True,
                session=session,
                strip=strip,
            )
            # While the model ran, another stream may have resumed this session: it owns it now.
            if session.stream is not stream:
                if step.slot != src:
                    model.pool.free(step.slot)
                await self._superseded(context)
            if step.slot != session.slot:
                model.pool.free(session.slot)
            session.slot, session.pending, session.context_tokens = (
                step.slot,
                step.pending,
                step.context_tokens,
            )
            session.k, session.user_words, session.strip = k, step.user_words, step.strip
            session.cache = step.cache
            session.seq += 1
            self._sessions.touch(session)
            return pb.SessionReply(
                session_id=session.id,
                prediction=step.prediction,
                seq=session.seq,
                model_version=model.version,
            )

    async def _apply_text(
        self,
        caller: _Caller,
        model: ModelVersion,
        src: int,
        pending: str,
        context_tokens: int,
        text: str,
        k: int,
        *,
        keep: bool,
        session: SessionRecord | None = None,
        strip: StripState,
    ) -> _Applied:
        """Feed the complete words of ``pending + text`` to the model; predict from the result.

        With ``keep`` the new state goes to a fresh slot (returned); the caller frees the one it drops.
        With a ``session`` and a store, its record goes to the store with the new state.
        """
        start = time.perf_counter()
        try:
            tokens, partial, ticket = await self._cost(caller, pending, text)
            ids = model.bundle.vocab.encode(tokens)
            ranker = model.ranker
            user_words, cache = _typed(session, ranker, tokens, ids, strip)
            passed = strip.passing(new_word=bool(tokens), grew=partial != pending)
            record = self._record(
                session,
                model.fingerprint,
                k,
                context_tokens + len(tokens),
                partial,
                user_words,
                strip,
                passed,
                cache,
            )
            # Completions rank the whole vocabulary, and so does a k beyond what the graph ranks.
            learning = strip.learn and len(cache) > 0 and self._config.cache_weight > 0
            whole = bool(partial) or k > ranker.graph_k or learning
            scores, slot = await self._model(
                model, ids, src, ticket, keep=keep, whole=whole, record=record, lone=self._lone(session)
            )
            if learning:
                scores = cache.mix(scores, self._config.cache_weight, self._config.cache_follow_weight)
            context_tokens += len(tokens)
            prediction = ranker.predict(
                scores, partial, k, context_tokens, user_words, policy=strip.policy, passed=passed
            )
        except asyncio.CancelledError:
            raise  # the caller went away: neither answered nor refused
        except BaseException:
            model.stats.failed(time.perf_counter() - start)
            raise
        model.stats.answered(time.perf_counter() - start)
        return _Applied(
            prediction, slot, partial, context_tokens, user_words, cache, strip.after(passed, prediction)
        )

    def _lone(self, session: SessionRecord | None) -> bool:
        """Whether a session's step has nobody to share its call with: it then runs inline, with no
        thread hops. (A shared stream, KServe's carrying several sequences, has one step open at
        a time here, yet its next requests wait to share the call.)"""
        if session is None or len(self._streams) != 1:
            return False
        return session.stream is None or not session.stream.shared

    async def _model(
        self,
        model: ModelVersion,
        ids: list[int],
        src: int,
        ticket: Ticket,
        *,
        keep: bool,
        whole: bool,
        record: Record | None,
        lone: bool,
    ) -> tuple[Scores, int]:
        """Feed token ``ids`` from the state in slot ``src`` (with none, read that state): the next word's
        scores, and the slot of the new state (with ``keep`` a fresh one the caller now holds)."""
        slot = src
        pool = model.pool
        try:
            if ids:
                slot = pool.alloc() if keep else DISCARD
                scores = await model.batcher.advance(
                    ids,
                    src,
                    slot,
                    whole_distribution=whole,
                    progress=ticket.release,
                    record=record,
                    lone=lone,
                )
            else:
                scores = await model.batcher.peek(src, whole_distribution=whole, record=record, lone=lone)
                ticket.release(1)
        except BaseException:
            if keep and slot != src:
                pool.free(slot)
            raise
        finally:
            ticket.close()
        return scores, slot

    def _record(
        self,
        session: SessionRecord | None,
        fingerprint: str,
        k: int,
        context_tokens: int,
        partial: str,
        user_words: UserWords,
        strip: StripState,
        passed: tuple[str, ...],
        cache: WordCache,
    ) -> Record | None:
        """What the store keeps of ``session`` once the request being answered is done (None: no
        session, or no store). What the reply will show is not known until after the step: not kept."""
        if session is None or self._persister is None:
            return None
        strip = replace(strip, passed=passed, shown=())
        return Record(
            session.id,
            session.principal,
            fingerprint,
            k,
            session.seq + 1,
            context_tokens,
            partial,
            b"",  # the batcher fills in the state the step leaves
            session.epoch,
            tuple(user_words.words()),
            strip,
            tuple(cache.items()),
        )

    async def _cost(self, caller: _Caller, pending: str, text: str) -> tuple[list[str], str, Ticket]:
        """Tokenize within the limits, holding the request's tokens in the in-flight budget."""
        try:  # a long text holds its estimated cost first: a busy server refuses it untokenized
            held = self.admission.hold(text)
        except Overloaded as exc:
            await self._overloaded(caller, exc)
        try:
            tokens, partial = await self._measure(caller, pending, text, lane=held is not None)
            cost = max(len(tokens), 1)  # a head call costs about one token
            if held is None:
                return tokens, partial, self.admission.admit(cost)
            held.resize(cost)
            return tokens, partial, held
        except Overloaded as exc:
            if held is not None:
                held.close()
            await self._overloaded(caller, exc)
        except BaseException:  # refused or cancelled: the estimate is no longer held
            if held is not None:
                held.close()
            raise

    async def _measure(
        self, caller: _Caller, pending: str, text: str, *, lane: bool
    ) -> tuple[list[str], str]:
        """The tokens ``pending + text`` completes and the word it leaves unfinished, within the limits."""
        config = self._config
        try:
            async with self.admission.lane if lane else contextlib.nullcontext():
                measured = await measure(
                    pending, text, max_tokens=config.max_request_tokens, max_word_chars=config.max_word_chars
                )
        except TooManyTokens:
            await self._refuse(
                caller,
                "request_tokens",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this request adds more than {config.max_request_tokens} tokens once normalised "
                "(--max-request-tokens; a character such as U+FDFA becomes several words): "
                "send the text in several requests",
            )
        if len(measured.partial) > config.max_word_chars:
            # Bounds what a session keeps and re-reads on every keystroke; ending the word always works.
            await self._refuse(
                caller,
                "word_chars",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the word this request leaves unfinished is longer than {config.max_word_chars} "
                "characters once normalised (--max-word-chars): end it with a space or a punctuation "
                "mark such as . or , (a word that long is read as an unknown word), or send reset",
            )
        return measured.tokens, measured.partial

    async def _overloaded(self, caller: _Caller, exc: Overloaded) -> NoReturn:
        # gRPC's retry design names this key: a client with a retry policy waits this long by itself.
        caller.context.set_trailing_metadata(
            (("grpc-retry-pushback-ms", str(max(1, round(exc.retry_after * 1000)))),)
        )
        await self._refuse(caller, "inflight", grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def _refuse(self, caller: _Caller, reason: str, code: grpc.StatusCode, message: str) -> NoReturn:
        """Fail the call for a limit of this server, counted in ``nextword_refused{reason}``."""
        self._metrics.refused.labels(reason).inc()
        if caller.session_id:  # the error ends the stream, not the session
            message += (
                f" (this stream is closed; the session is kept: resume it on a new stream "
                f"with session_id {caller.session_id})"
            )
        await self._fail(caller.method, caller.context, code, message)

    # ---- errors --------------------------------------------------------------
    async def _validate(self, method: str, context: grpc.aio.ServicerContext, text: str, k: int) -> None:
        config = self._config
        caller = _Caller(method, context, "")
        if len(text) > config.max_text_chars:
            await self._refuse(
                caller,
                "text_chars",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text is {len(text)} characters, more than this server accepts in one request "
                f"({config.max_text_chars}, see --max-text-chars); send it in several requests",
            )
        if k > config.max_k:
            await self._refuse(
                caller,
                "k",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"k={k} is more than this server's maximum of {config.max_k} (see --max-k)",
            )

    async def _drained(self, context: grpc.aio.ServicerContext) -> NoReturn:
        # Not an error of the request (none is lost), so not counted in nextword_errors.
        await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINED)

    async def _idle(self, context: grpc.aio.ServicerContext) -> NoReturn:
        # A stream holds a connection slot and a task: one silent for this long is let go.
        self._metrics.refused.labels("idle_stream").inc()
        await self._fail(
            "Session",
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"no request on this stream for {self._config.idle_stream_timeout:g} s "
            "(--idle-stream-timeout): it is closed, the session is kept; resume it on a new stream "
            "by sending its id as session_id",
        )

    async def _superseded(self, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._fail("Session", context, grpc.StatusCode.ABORTED, "session resumed by another stream")

    async def _fail(
        self, method: str, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        self._metrics.errors.labels(method, code.name).inc()
        await context.abort(code, message)
