"""Python client for the nextword gRPC API, blocking and asyncio.

    with NextWordClient("127.0.0.1:50051") as client:
        print(client.predict("the quick brown").words)
        with client.session() as s:
            s.send("once upon a ")
            print(s.send("ti").completions)

Errors are not swallowed: every failure is a ``grpc.RpcError`` with ``code()``
and ``details()``. Failures detected on this side (a session reply that does
not come in time, a stream the server ended) are ``NextWordError``, a subclass.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
_ENDED = "the server ended the session stream"
_CLOSE_WAIT_S = 2.0  # how long close() lets the server end a stream before cancelling it


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


def _request(session_id: str | None, text: str, reset: bool, k: int, model: str) -> pb.SessionRequest:
    return pb.SessionRequest(session_id=session_id or "", text=text, reset=reset, k=k, model=model)


# --------------------------------------------------------------------------- blocking


class SyncSession:
    """One bidirectional Session stream. ``send`` writes one request and returns its reply.

    Requests go through a queue that the gRPC request iterator drains, so the
    stream stays open between calls. The server may resume the session on a
    new stream after a drop: pass ``session_id`` to ``NextWordClient.session``.
    """

    def __init__(
        self,
        stub: pb_grpc.NextWordStub,
        session_id: str | None,
        k: int | None,
        model: str,
        timeout: float | None,
    ) -> None:
        self._requests: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        # A stream-wide deadline would end long-lived sessions; `timeout` bounds each reply instead.
        self._call = stub.Session(iter(self._requests.get, None))
        self._responses: Iterator[pb.SessionReply] = self._call
        self._lock = threading.Lock()  # keeps request/reply pairs together across threads
        self._first = True
        self._resume_id = session_id
        self._k = k or 0
        self._model = model
        self._timeout = timeout
        self.session_id: str | None = session_id
        self.seq = 0
        self.closed = False

    def send(self, text: str = "", *, reset: bool = False, k: int = 0) -> Prediction:
        with self._lock:
            if self.closed:
                raise NextWordError(grpc.StatusCode.CANCELLED, "session is closed")
            first, self._first = self._first, False
            req = _request(
                self._resume_id if first else None, text, reset, k or (self._k if first else 0), self._model
            )
            self._requests.put(req)
            reply = self._next_reply()
            self.session_id, self.seq = reply.session_id, int(reply.seq)
            return Prediction.from_proto(reply.prediction)

    def _next_reply(self) -> pb.SessionReply:
        timer = None
        timed_out = threading.Event()
        if self._timeout is not None:
            # The sync response iterator has no per-read timeout: cancel the stream when it is due.
            def expire() -> None:
                timed_out.set()
                self._call.cancel()

            timer = threading.Timer(self._timeout, expire)
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
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no session reply within {self._timeout:g}s"
                ) from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _end_requests(self) -> None:
        # The sentinel ends the request iterator: half-closes a live stream, and frees the
        # gRPC thread that waits on the queue even when the call has already failed.
        self.closed = True
        self._requests.put(None)

    def close(self) -> None:
        """Half-close the stream so the server ends it cleanly; cancel it if it does not."""
        if self.closed:
            return
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
    """Blocking client. ``timeout`` (seconds) bounds each unary call and each session reply."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.NextWordStub(self._channel)

    def predict(self, text: str, k: int = 3, *, model: str = "") -> Prediction:
        reply = self._stub.Predict(pb.PredictRequest(text=text, k=k, model=model), timeout=self.timeout)
        return Prediction.from_proto(reply.prediction)

    def model_info(self) -> ModelInfo:
        return ModelInfo.from_proto(self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout))

    def session(self, session_id: str | None = None, k: int | None = None, *, model: str = "") -> SyncSession:
        """Open a session stream; ``session_id`` resumes a session the server still holds."""
        return SyncSession(self._stub, session_id, k, model, self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> NextWordClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- asyncio


class AsyncSession:
    """The asyncio twin of ``SyncSession``: ``await s.send(text)`` returns the reply to that request."""

    def __init__(
        self,
        stub: pb_grpc.NextWordStub,
        session_id: str | None,
        k: int | None,
        model: str,
        timeout: float | None,
    ) -> None:
        self._call: Any = stub.Session()  # a grpc.aio StreamStreamCall (the stubs are typed for sync)
        self._lock = asyncio.Lock()  # keeps request/reply pairs together across tasks
        self._first = True
        self._resume_id = session_id
        self._k = k or 0
        self._model = model
        self._timeout = timeout
        self.session_id: str | None = session_id
        self.seq = 0
        self.closed = False

    async def send(self, text: str = "", *, reset: bool = False, k: int = 0) -> Prediction:
        async with self._lock:
            if self.closed:
                raise NextWordError(grpc.StatusCode.CANCELLED, "session is closed")
            first, self._first = self._first, False
            req = _request(
                self._resume_id if first else None, text, reset, k or (self._k if first else 0), self._model
            )
            try:
                await self._call.write(req)
                reply = await asyncio.wait_for(self._call.read(), self._timeout)
            except asyncio.TimeoutError:
                self.closed = True
                self._call.cancel()
                raise NextWordError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no session reply within {self._timeout:g}s"
                ) from None
            except grpc.RpcError:
                self.closed = True
                raise
            except asyncio.InvalidStateError:
                # grpc.aio's write() after the server ended the call with status OK.
                self.closed = True
                raise NextWordError(grpc.StatusCode.UNAVAILABLE, _ENDED) from None
            if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                self.closed = True
                raise NextWordError(grpc.StatusCode.UNAVAILABLE, _ENDED)
            self.session_id, self.seq = reply.session_id, int(reply.seq)
            return Prediction.from_proto(reply.prediction)

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
    """asyncio client over ``grpc.aio``; create it inside the event loop that uses it."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.NextWordStub(self._channel)

    async def predict(self, text: str, k: int = 3, *, model: str = "") -> Prediction:
        call: Any = self._stub.Predict(pb.PredictRequest(text=text, k=k, model=model), timeout=self.timeout)
        reply: pb.PredictReply = await call
        return Prediction.from_proto(reply.prediction)

    async def model_info(self) -> ModelInfo:
        call: Any = self._stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout)
        return ModelInfo.from_proto(await call)

    def session(
        self, session_id: str | None = None, k: int | None = None, *, model: str = ""
    ) -> AsyncSession:
        """Open a session stream (use as ``async with``); ``session_id`` resumes a held session."""
        return AsyncSession(self._stub, session_id, k, model, self.timeout)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncNextWordClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
