"""Python client for the nextword gRPC API, blocking and asyncio.

    with NextWordClient("127.0.0.1:50051") as client:
        print(client.predict("the quick brown").words)
        with client.session() as s:
            s.send("once upon a ")
            print(s.send("ti").completions)

Errors are not swallowed: every failure is a ``grpc.RpcError`` with ``code()``
and ``details()``. Failures detected on this side (a session reply that does
not come in time, a stream the server ended) are ``NextWordError``, a subclass.

Restarts of the server do not reach the user of a session (rolling restarts).
When a session's stream fails with UNAVAILABLE (a server shutting down ends
its streams so; a lost connection looks the same), is reset on its way (a
balancer whose backend died resets it: INTERNAL "RST_STREAM"), or the server
ends it,
``send`` reconnects and answers the request anyway:

* new streams, with ``wait_for_ready`` so that they wait for a restarting
  server, after pauses with exponential backoff and jitter; at most
  ``Reconnect.attempts`` of them within ``Reconnect.within`` seconds
  (``client.session(reconnect=...)``; ``Reconnect(attempts=0)``: never);
* the session is resumed by its id if the server still holds it (the reply's
  ``seq`` tells whether the failed request was applied before its reply was
  lost, so it is never applied twice); a server that resumes it from a stored
  copy a step or so older than the last reply (its process died before storing
  it) gets the requests after that copy again, from a log of the last 256;
* otherwise (NOT_FOUND: the server restarted and lost it) a new session gets
  the text sent since the last reset, which the session keeps for this (send
  ``reset`` to start afresh), in pieces the server accepts, and the session's
  k; then the failed request is sent again. A server busy with everyone's
  replays may ask for a wait (RESOURCE_EXHAUSTED with grpc-retry-pushback-ms):
  it is waited out.

``send`` then returns what an uninterrupted session would have (same words,
same probabilities up to float rounding); ``session_id`` and ``seq`` may
change, and ``reconnects`` counts these events. A session resumed from an id
given to ``session()`` cannot be rebuilt (its earlier text is unknown here)
until it has sent a reset: its NOT_FOUND is raised. Errors that are the
caller's (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED,
RESOURCE_EXHAUSTED, ...), ABORTED (another stream took the session) and a
reply that does not come within ``timeout`` are raised at once, never retried;
so is UNAVAILABLE once the attempts are spent. Unary calls (``predict``,
``model_info``) are not retried.
"""

from __future__ import annotations

import asyncio
import collections
import json
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

from .channel import Credentials, aio_channel, sync_channel

DEFAULT_TARGET = "127.0.0.1:50051"
_ENDED = "the server ended the session stream"
_ENDED_AS_SENT = "the session stream ended as a request was sent on it"
_CLOSE_WAIT_S = 2.0  # how long close() lets the server end a stream before cancelling it
# Most characters of one replayed request; fewer if the server's --max-text-chars is lower.
_REPLAY_CHARS = 1024
# Requests a session remembers with their seq, to resend those a server's stored copy lacks.
_RESEND_LOG = 256
# What may fail an attempt to reconnect and still leave the next attempt worth making.
_RETRY_WHILE_RECONNECTING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_PUSHBACK = "grpc-retry-pushback-ms"  # the wait a busy server asks for (gRPC's retry design)


Metadata = tuple[tuple[str, str], ...]  # gRPC call metadata: (key, value) pairs


class NextWordError(grpc.RpcError):
    """A gRPC failure raised by this client itself; same ``code()``/``details()`` as grpc's own."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@dataclass(frozen=True)
class Suggestion:
    word: str
    prob: float


def _json(s: Suggestion) -> dict[str, Any]:
    # Probabilities travel as float32: 7 significant digits is all they hold (and never rounds to 0).
    return {"word": s.word, "prob": float(f"{s.prob:.7g}")}


@dataclass(frozen=True)
class Prediction:
    """One answer of the server: next words, and completions of the partial word being typed."""

    suggestions: tuple[Suggestion, ...]
    completions: tuple[Suggestion, ...] = ()
    partial: str = ""
    context_tokens: int = 0

    @classmethod
    def from_proto(cls, msg: pb.Prediction) -> Prediction:
        return cls(
            suggestions=tuple(Suggestion(s.word, float(s.prob)) for s in msg.suggestions),
            completions=tuple(Suggestion(s.word, float(s.prob)) for s in msg.completions),
            partial=msg.partial,
            context_tokens=int(msg.context_tokens),
        )

    @property
    def words(self) -> list[str]:
        return [s.word for s in self.suggestions]

    def to_json_dict(self) -> dict[str, Any]:
        """The ``nextword predict --json`` object; ``completions`` only when a word is being typed."""
        out: dict[str, Any] = {"suggestions": [_json(s) for s in self.suggestions]}
        if self.partial:
            out["completions"] = [_json(s) for s in self.completions]
        out["partial"] = self.partial
        return out


@dataclass(frozen=True)
class ModelInfo:
    name: str
    cell: str
    vocab_size: int
    provider: str
    manifest_json: str
    max_k: int
    max_text_chars: int

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            msg.name, msg.cell, msg.vocab_size, msg.provider, msg.manifest_json, msg.max_k, msg.max_text_chars
        )

    @property
    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.manifest_json) if self.manifest_json else {}
        return data


def _request(
    session_id: str | None, text: str, reset: bool, k: int, model: str, strip: pb.Strip | None = None
) -> pb.SessionRequest:
    request = pb.SessionRequest(session_id=session_id or "", text=text, reset=reset, k=k, model=model)
    if strip is not None:
        request.strip.CopyFrom(strip)
    return request


@dataclass(frozen=True)
class Reconnect:
    """How a session rides out a restart of its server (see the module docstring).

    ``attempts`` new streams at most for one request, all within ``within`` seconds (a stream
    waiting for a restarting server included); before each, a pause of ``backoff`` seconds,
    doubled each time up to ``max_backoff``, times a random 0.5..1 so that sessions dropped
    together do not come back in lockstep. ``Reconnect(attempts=0)``: never reconnect.
    """

    attempts: int = 10
    within: float = 30.0
    backoff: float = 0.05
    max_backoff: float = 2.0

    def pause(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (0 for the first)."""
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RECONNECT = Reconnect()


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)  # grpc.RpcError itself declares no code(); its subclasses do
    return code() if callable(code) else None


def _reconnects_after(exc: grpc.RpcError, policy: Reconnect) -> bool:
    """Whether a failed stream is the server's or the network's doing, not the request's."""
    return policy.attempts > 0 and (_code(exc) == grpc.StatusCode.UNAVAILABLE or _reset_in_transit(exc))


def _reset_in_transit(exc: grpc.RpcError) -> bool:
    """A stream reset on its way, by a balancer whose backend died (nginx resets it so), not a status
    a server sent: gRPC reports it as INTERNAL "Received RST_STREAM"."""
    return _code(exc) == grpc.StatusCode.INTERNAL and "RST_STREAM" in _details(exc)


def _retry_wait(exc: grpc.RpcError) -> float | None:
    """Seconds to wait at least before the next attempt to reconnect after ``exc``; None: give up.

    A server busy with the replays of every session a restart dropped refuses some with
    RESOURCE_EXHAUSTED and the wait it asks for: that is worth waiting out too.
    """
    code = _code(exc)
    if code in _RETRY_WHILE_RECONNECTING:
        return 0.0
    trailing = getattr(exc, "trailing_metadata", None)
    metadata = (trailing() if callable(trailing) else None) or ()
    pushback = next((value for key, value in metadata if key == _PUSHBACK), None)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback is not None:
        return int(pushback) / 1000
    return None


def _gave_up(error: grpc.RpcError, policy: Reconnect) -> NextWordError:
    code = _code(error)
    return NextWordError(
        grpc.StatusCode.UNAVAILABLE,
        f"the session could not reconnect ({policy.attempts} attempts within {policy.within:g} s, "
        f"see Reconnect); last: {code.name if code else 'UNKNOWN'}: {_details(error)}",
    )


def _details(exc: grpc.RpcError) -> str:
    details = getattr(exc, "details", None)
    return str(details() if callable(details) else exc)


def _pieces(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, each cut after whitespace where it can be.

    Any cut gives the server the same tokens (a partial word waits for the next piece); a cut
    after whitespace leaves no partial word, which the server would count with the next piece.
    """
    pieces = []
    while len(text) > limit:
        cut = next((i for i in range(limit, 0, -1) if text[i - 1].isspace()), limit)
        pieces.append(text[:cut])
        text = text[cut:]
    return [*pieces, text] if text else pieces


class _Resumable:
    """What a session keeps to be rebuilt after a restart, and the requests that do it (no I/O here)."""

    def __init__(
        self,
        session_id: str | None,
        k: int | None,
        model: str,
        timeout: float | None,
        reconnect: Reconnect,
        strip: pb.Strip | None = None,
    ) -> None:
        self.session_id: str | None = session_id
        self._strip = strip  # sent on every stream's first request, as k is
        self.seq = 0
        self.closed = False
        self.reconnects = 0  # times a failed stream was replaced (resumed or rebuilt)
        self._k = k or 0
        self._model = model
        self._timeout = timeout
        self._reconnect = reconnect
        self._text = ""  # the session's context: the text sent since the last reset
        self._text_known = session_id is None  # not for a caller's session resumed by id, until a reset
        self._seq_known = False  # whether self.seq is the server's (a reply was seen)
        self._first = True  # the next request is its stream's first: it names the session and its k
        # The last requests answered, by the seq of their reply: a server that resumes the session
        # from a stored copy older than the last reply gets the ones after it again (same id).
        self._log: collections.deque[tuple[int, pb.SessionRequest]] = collections.deque()
        self._log_floor = 0  # requests answered with this seq or lower are no longer in the log

    def _request(self, text: str, reset: bool, k: int) -> pb.SessionRequest:
        first, self._first = self._first, False
        k = k or (self._k if first else 0)
        strip = self._strip if first else None
        return _request(self.session_id if first else None, text, reset, k, self._model, strip)

    def _answered(self, req: pb.SessionRequest, reply: pb.SessionReply) -> Prediction:
        """Record what ``req`` did to the session (``reply`` tells its id and seq); the prediction."""
        self.session_id, self.seq, self._seq_known = reply.session_id, int(reply.seq), True
        self._remember(req)
        self._k = req.k or self._k
        if req.reset:
            self._text, self._text_known = req.text, True
        else:
            self._text += req.text
        return Prediction.from_proto(reply.prediction)

    def _remember(self, req: pb.SessionRequest) -> None:
        self._log.append((self.seq, _request(None, req.text, req.reset, req.k, self._model)))
        if len(self._log) > _RESEND_LOG:
            self._log_floor = self._log.popleft()[0]

    def _missing(self, resumed: pb.SessionReply) -> list[pb.SessionRequest] | None:
        """The answered requests the resumed copy lacks, to send again; None if the log no longer
        reaches back that far (then the session is rebuilt from its text).

        A stored copy may end a step or so before the last reply (the server stores after
        replying); the resume request itself counts one, so the copy ends at ``resumed.seq - 1``.
        """
        if not self._seq_known:
            return []
        stored = int(resumed.seq) - 1
        if stored >= self.seq:
            return []
        if stored < self._log_floor:
            return None
        return [req for seq, req in self._log if seq > stored]

    def _resent(self, req: pb.SessionRequest, reply: pb.SessionReply) -> None:
        """``req`` was sent again after a resume: only its new seq is news (its text is counted)."""
        self.seq = int(reply.seq)
        self._log = collections.deque((seq, r) for seq, r in self._log if r is not req)
        self._log.append((self.seq, req))

    def _forget_log(self, seq: int) -> None:
        """A rebuilt session: what was answered up to ``seq`` is not in the log."""
        self._log.clear()
        self._log_floor = seq

    def _resume_request(self) -> pb.SessionRequest:
        # No text and k=0 change nothing; the reply's seq counts the requests the server applied.
        self._first = False
        return _request(self.session_id, "", False, 0, self._model)

    def _was_applied(self, resumed: pb.SessionReply) -> bool:
        """Whether the server applied the request whose reply was lost (then the resume counts 2).

        Unknown for a first request resuming a caller's id (the seq before it is not known here):
        taken as not applied.
        """
        return self._seq_known and int(resumed.seq) == self.seq + 2

    def _cannot_rebuild_if_text_unknown(self) -> None:
        if not self._text_known:
            raise NextWordError(
                grpc.StatusCode.DATA_LOSS,
                f"the server resumed session {self.session_id} from an older copy than this client saw, "
                "and its earlier text is not known here to rebuild it: send a reset",
            )

    def _rebuild_requests(self, text: str, reset: bool, k: int, limit: int) -> list[pb.SessionRequest]:
        """A new session with this one's context: its text in pieces of ``limit`` characters at most,
        the first with the session's k, then the request that failed."""
        pieces = [] if reset else _pieces(self._text, limit)
        requests = [_request(None, piece, False, 0, self._model) for piece in pieces]
        requests.append(_request(None, text, reset, k, self._model))
        requests[0].k = requests[0].k or self._k
        if self._strip is not None:
            requests[0].strip.CopyFrom(self._strip)
        return requests

    def _replays(self, reset: bool) -> bool:
        return bool(self._text) and not reset

    def _time_left(self, deadline: float) -> float:
        """Seconds one reply may take while reconnecting: the session's timeout, within the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise NextWordError(grpc.StatusCode.DEADLINE_EXCEEDED, "no time left to reconnect")
        return left if self._timeout is None else min(self._timeout, left)


# --------------------------------------------------------------------------- blocking


class SyncSession(_Resumable):
    """One bidirectional Session stream. ``send`` writes one request and returns its reply.

    Requests go through a queue that the gRPC request iterator drains, so the
    stream stays open between calls. The server may resume the session on a
    new stream after a drop: pass ``session_id`` to ``NextWordClient.session``.
    A failed stream is replaced as the module docstring says.
    """

    def __init__(
        self,
        client: NextWordClient,
        session_id: str | None,
        k: int | None,
        model: str,
        timeout: float | None,
        reconnect: Reconnect = DEFAULT_RECONNECT,
        strip: pb.Strip | None = None,
    ) -> None:
        super().__init__(session_id, k, model, timeout, reconnect, strip)
        self._client = client
        self._lock = threading.Lock()  # keeps request/reply pairs together across threads
        self._call: Any = None
        self._requests: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._open(wait_for_ready=False)

    def _open(self, *, wait_for_ready: bool) -> None:
        """A new stream for this session, opened by its client (so the client's credentials apply)."""
        self._retire()
        self._requests = queue.Queue()
        # A stream-wide deadline would end long-lived sessions; `timeout` bounds each reply instead.
        self._call = self._client._session_call(iter(self._requests.get, None), wait_for_ready=wait_for_ready)
        self._responses: Iterator[pb.SessionReply] = self._call
        self._first = True

    def _retire(self) -> None:
        """End the current stream, if any (a no-op on one that has failed already)."""
        if self._call is not None:
            self._end_requests()
            self._call.cancel()

    def send(self, text: str = "", *, reset: bool = False, k: int = 0) -> Prediction:
        with self._lock:
            if self.closed:
                raise NextWordError(grpc.StatusCode.CANCELLED, "session is closed")
            req = self._request(text, reset, k)
            try:
                return self._answered(req, self._roundtrip(req, self._timeout))
            except grpc.RpcError as exc:
                if not _reconnects_after(exc, self._reconnect):
                    self.closed = True
                    raise
                error = exc
            try:
                return self._recover(text, reset, k, error)
            except BaseException:
                self.closed = True
                self._retire()  # a stream opened by the last attempt, if it is still there
                raise

    def _recover(self, text: str, reset: bool, k: int, error: grpc.RpcError) -> Prediction:
        """Answer the request that failed with ``error`` on a new stream, or raise why it cannot be."""
        policy, wait = self._reconnect, 0.0
        deadline = time.monotonic() + policy.within
        for attempt in range(policy.attempts):
            time.sleep(max(0.0, min(max(wait, policy.pause(attempt)), deadline - time.monotonic())))
            if self.closed:  # by close() from another thread meanwhile
                raise NextWordError(grpc.StatusCode.CANCELLED, "session is closed")
            if time.monotonic() >= deadline:
                break
            try:
                return self._rebuild(text, reset, k, deadline)
            except grpc.RpcError as exc:
                if (retry_wait := _retry_wait(exc)) is None:
                    raise
                error, wait = exc, retry_wait
        raise _gave_up(error, policy)

    def _rebuild(self, text: str, reset: bool, k: int, deadline: float) -> Prediction:
        """One attempt: resume the session on a new stream, or rebuild it if the server lost it."""
        self.reconnects += 1
        if self.session_id and not reset:
            self._open(wait_for_ready=True)
            try:
                resumed = self._roundtrip(self._resume_request(), self._time_left(deadline))
            except grpc.RpcError as exc:
                # Lost in a restart: rebuilt below, if this session knows all of its text.
                if _code(exc) != grpc.StatusCode.NOT_FOUND or not self._text_known:
                    raise
            else:
                missing = self._missing(resumed)
                if missing is not None:
                    for again in missing:
                        self._resent(again, self._roundtrip(again, self._time_left(deadline)))
                    req = _request(None, text, reset, k, self._model)
                    if not missing and self._was_applied(resumed):
                        return self._answered(req, resumed)
                    return self._answered(req, self._roundtrip(req, self._time_left(deadline)))
                self._cannot_rebuild_if_text_unknown()  # else rebuilt below, as if it were lost
        limit = _REPLAY_CHARS
        if self._replays(reset):
            limit = min(limit, self._client.model_info().max_text_chars)
        requests = self._rebuild_requests(text, reset, k, limit)
        self._open(wait_for_ready=True)
        self._first = False
        for req in requests[:-1]:
            self._forget_log(int(self._roundtrip(req, self._time_left(deadline)).seq))
        return self._answered(requests[-1], self._roundtrip(requests[-1], self._time_left(deadline)))

    def _roundtrip(self, req: pb.SessionRequest, limit: float | None) -> pb.SessionReply:
        """Send ``req`` on the stream and return its reply, waiting ``limit`` seconds at most."""
        self._requests.put(req)
        timer = None
        timed_out = threading.Event()
        if limit is not None:
            # The sync response iterator has no per-read timeout: cancel the stream when it is due.
            def expire() -> None:
                timed_out.set()
                self._call.cancel()

            timer = threading.Timer(limit, expire)
            timer.daemon = True
            timer.start()
        try:
            return next(self._responses)
        except StopIteration:
            self._end_requests()
            raise NextWordError(grpc.StatusCode.UNAVAILABLE, _ENDED) from None
        except grpc.RpcError:
            self._end_requests()
            if timed_out.is_set():
                raise NextWordError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no session reply within {limit:g}s"
                ) from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _end_requests(self) -> None:
        # The sentinel ends the request iterator: half-closes a live stream, and frees the
        # gRPC thread that waits on the queue even when the call has already failed.
        self._requests.put(None)

    def close(self) -> None:
        """Half-close the stream so the server ends it cleanly; cancel it if it does not."""
        if self.closed:
            return
        self.closed = True
        done = threading.Event()
        self._call.add_done_callback(lambda *_: done.set())
        self._end_requests()
        if not done.wait(_CLOSE_WAIT_S):
            self._call.cancel()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NextWordClient:
    """Blocking client. ``timeout`` (seconds) bounds each unary call and each session reply.

    ``credentials`` (TLS, a client certificate, a bearer token; see ``channel.Credentials``)
    apply to every call, Session streams included; None: plaintext, no token.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = sync_channel(target, credentials)
        self._stub = pb_grpc.NextWordStub(self._channel)

    def predict(self, text: str, k: int = 3, *, model: str = "") -> Prediction:
        reply = self._stub.Predict(pb.PredictRequest(text=text, k=k, model=model), timeout=self.timeout)
        return Prediction.from_proto(reply.prediction)

    def model_info(self) -> ModelInfo:
        return ModelInfo.from_proto(self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout))

    def session(
        self,
        session_id: str | None = None,
        k: int | None = None,
        *,
        model: str = "",
        reconnect: Reconnect = DEFAULT_RECONNECT,
        strip: pb.Strip | None = None,
    ) -> SyncSession:
        """Open a session stream; ``session_id`` resumes a session the server still holds.
        ``strip``: how its slots are filled (``pb.Strip``: policy, no_repeat)."""
        return SyncSession(self, session_id, k, model, self.timeout, reconnect, strip)

    def _session_call(self, requests: Iterator[pb.SessionRequest], *, wait_for_ready: bool) -> Any:
        """A new Session stream on this client's channel: every stream of its sessions starts here."""
        return self._stub.Session(requests, wait_for_ready=wait_for_ready)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> NextWordClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- asyncio


class AsyncSession(_Resumable):
    """The asyncio twin of ``SyncSession``: ``await s.send(text)`` returns the reply to that request."""

    def __init__(
        self,
        client: AsyncNextWordClient,
        session_id: str | None,
        k: int | None,
        model: str,
        timeout: float | None,
        reconnect: Reconnect = DEFAULT_RECONNECT,
        strip: pb.Strip | None = None,
        metadata: Metadata = (),
    ) -> None:
        super().__init__(session_id, k, model, timeout, reconnect, strip)
        self._client = client
        self._metadata = metadata  # sent on every stream of this session
        self._lock = asyncio.Lock()  # keeps request/reply pairs together across tasks
        self._call: Any = None
        self._open(wait_for_ready=False)

    def _open(self, *, wait_for_ready: bool) -> None:
        """A new stream for this session, opened by its client (so the client's credentials apply)."""
        self._retire()
        self._call = self._client._session_call(wait_for_ready=wait_for_ready, metadata=self._metadata)
        self._first = True

    def _retire(self) -> None:
        """End the current stream, if any (a no-op on one that has failed already)."""
        if self._call is not None:
            self._call.cancel()

    async def send(self, text: str = "", *, reset: bool = False, k: int = 0) -> Prediction:
        async with self._lock:
            if self.closed:
                raise NextWordError(grpc.StatusCode.CANCELLED, "session is closed")
            req = self._request(text, reset, k)
            try:
                return self._answered(req, await self._roundtrip(req, self._timeout))
            except grpc.RpcError as exc:
                if not _reconnects_after(exc, self._reconnect):
                    self.closed = True
                    raise
                error = exc
            try:
                return await self._recover(text, reset, k, error)
            except BaseException:
                self.closed = True
                self._retire()  # a stream opened by the last attempt, if it is still there
                raise

    async def _recover(self, text: str, reset: bool, k: int, error: grpc.RpcError) -> Prediction:
        """Answer the request that failed with ``error`` on a new stream, or raise why it cannot be."""
        policy, wait = self._reconnect, 0.0
        deadline = time.monotonic() + policy.within
        for attempt in range(policy.attempts):
            await asyncio.sleep(max(0.0, min(max(wait, policy.pause(attempt)), deadline - time.monotonic())))
            if self.closed:  # by close() from another task meanwhile
                raise NextWordError(grpc.StatusCode.CANCELLED, "session is closed")
            if time.monotonic() >= deadline:
                break
            try:
                return await self._rebuild(text, reset, k, deadline)
            except grpc.RpcError as exc:
                if (retry_wait := _retry_wait(exc)) is None:
                    raise
                error, wait = exc, retry_wait
        raise _gave_up(error, policy)

    async def _rebuild(self, text: str, reset: bool, k: int, deadline: float) -> Prediction:
        """One attempt: resume the session on a new stream, or rebuild it if the server lost it."""
        self.reconnects += 1
        if self.session_id and not reset:
            self._open(wait_for_ready=True)
            try:
                resumed = await self._roundtrip(self._resume_request(), self._time_left(deadline))
            except grpc.RpcError as exc:
                # Lost in a restart: rebuilt below, if this session knows all of its text.
                if _code(exc) != grpc.StatusCode.NOT_FOUND or not self._text_known:
                    raise
            else:
                missing = self._missing(resumed)
                if missing is not None:
                    for again in missing:
                        self._resent(again, await self._roundtrip(again, self._time_left(deadline)))
                    req = _request(None, text, reset, k, self._model)
                    if not missing and self._was_applied(resumed):
                        return self._answered(req, resumed)
                    return self._answered(req, await self._roundtrip(req, self._time_left(deadline)))
                self._cannot_rebuild_if_text_unknown()  # else rebuilt below, as if it were lost
        limit = _REPLAY_CHARS
        if self._replays(reset):
            limit = min(limit, (await self._client.model_info()).max_text_chars)
        requests = self._rebuild_requests(text, reset, k, limit)
        self._open(wait_for_ready=True)
        self._first = False
        for req in requests[:-1]:
            self._forget_log(int((await self._roundtrip(req, self._time_left(deadline))).seq))
        return self._answered(requests[-1], await self._roundtrip(requests[-1], self._time_left(deadline)))

    async def _roundtrip(self, req: pb.SessionRequest, limit: float | None) -> pb.SessionReply:
        """Send ``req`` on the stream and return its reply, waiting ``limit`` seconds at most."""
        try:
            reply = await asyncio.wait_for(self._exchange(req), limit)
        except asyncio.TimeoutError:
            self._call.cancel()
            raise NextWordError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no session reply within {limit:g}s"
            ) from None
        except asyncio.InvalidStateError:
            # grpc.aio's write() on a call that has already ended: its status says how.
            code = await self._call.code()
            if code == grpc.StatusCode.OK:
                raise NextWordError(grpc.StatusCode.UNAVAILABLE, _ENDED) from None
            raise NextWordError(code, await self._call.details()) from None
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise NextWordError(grpc.StatusCode.UNAVAILABLE, _ENDED)
        reply_: pb.SessionReply = reply
        return reply_

    async def _exchange(self, req: pb.SessionRequest) -> Any:
        try:
            await self._call.write(req)
        except grpc.RpcError as exc:
            # A write that meets a stream the server is just ending (a drain) fails inside gRPC,
            # which then reports INTERNAL "Internal error from Core" in place of the server's status.
            if _code(exc) != grpc.StatusCode.INTERNAL:
                raise
            raise NextWordError(grpc.StatusCode.UNAVAILABLE, _ENDED_AS_SENT) from None
        return await self._call.read()

    async def close(self) -> None:
        """Half-close the stream so the server ends it cleanly; cancel it if it does not."""
        if self.closed:
            return
        self.closed = True
        try:
            await self._call.done_writing()
            await asyncio.wait_for(self._call.code(), _CLOSE_WAIT_S)  # resolves when the call has ended
        except (asyncio.TimeoutError, grpc.RpcError, asyncio.InvalidStateError):
            self._call.cancel()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncNextWordClient:
    """asyncio client over ``grpc.aio``; create it inside the event loop that uses it.

    ``credentials`` as for ``NextWordClient``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = aio_channel(target, credentials)
        self._stub = pb_grpc.NextWordStub(self._channel)

    async def predict(self, text: str, k: int = 3, *, model: str = "", metadata: Metadata = ()) -> Prediction:
        """``metadata``: sent with the call (e.g. a caller's own ``authorization``, as the gateway does)."""
        request = pb.PredictRequest(text=text, k=k, model=model)
        call: Any = self._stub.Predict(request, timeout=self.timeout, metadata=metadata or None)
        reply: pb.PredictReply = await call
        return Prediction.from_proto(reply.prediction)

    async def model_info(self) -> ModelInfo:
        call: Any = self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout)
        return ModelInfo.from_proto(await call)

    def session(
        self,
        session_id: str | None = None,
        k: int | None = None,
        *,
        model: str = "",
        reconnect: Reconnect = DEFAULT_RECONNECT,
        strip: pb.Strip | None = None,
        metadata: Metadata = (),
    ) -> AsyncSession:
        """Open a session stream (use as ``async with``); ``session_id`` resumes a held session.
        ``strip``: how its slots are filled (``pb.Strip``: policy, no_repeat). ``metadata``: sent
        with every stream of the session."""
        return AsyncSession(self, session_id, k, model, self.timeout, reconnect, strip, metadata)

    def _session_call(self, *, wait_for_ready: bool, metadata: Metadata = ()) -> Any:
        """A new Session stream on this client's channel: every stream of its sessions starts here."""
        return self._stub.Session(wait_for_ready=wait_for_ready, metadata=metadata or None)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncNextWordClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
