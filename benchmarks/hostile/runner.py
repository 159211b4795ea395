"""Firing the attacks: raw bytes over a generic channel, a bounded number in flight, every status kept.

Every method is called through ``channel.unary_unary``/``stream_stream`` with the
identity as serializer, so what ``attacks`` wrote is what reaches the server, byte for
byte, whatever the generated classes would have refused to build.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from benchmarks.hostile import wire
from benchmarks.hostile.attacks import BIDI, SERVER_STREAM, SESSION, Attack, Close, Resume, encode
from nextword.v1 import nextword_pb2 as pb

CLIENT_ERROR = "CLIENT_ERROR"
# A stream the server ended while a write of the client's was still in flight (blocked on flow
# control: large messages sent without reading the replies). grpc.aio then reports its own
# INTERNAL "Internal error from Core" in place of the server's status, which is lost: counted
# apart, not as the server's INTERNAL (a server-side exception still shows in its log).
ENDED_MID_WRITE = "ENDED_MID_WRITE"
CORE_INTERNAL = "Internal error from Core"
PAD_FIELD = 2047  # an unknown field: parsers keep it, so only its size can get a message refused


EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # what read() returns at the end; not in grpc-stubs


def _same(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Outcome:
    attack: Attack
    code: str  # the gRPC status name (CANCELLED where the client cancelled), or CLIENT_ERROR
    details: str  # the status message, or the client's exception
    seconds: float

    @property
    def kind(self) -> str:
        return self.attack.kind


class SessionIds:
    """Session ids the server handed out, read from replies: what ``session.resume`` reuses."""

    def __init__(self, keep: int = 1024) -> None:
        self._ids: collections.deque[str] = collections.deque(maxlen=keep)

    def add(self, reply: bytes) -> None:
        try:
            session_id = pb.SessionReply.FromString(reply).session_id
        except DecodeError:
            return
        if session_id and (not self._ids or self._ids[-1] != session_id):
            self._ids.append(session_id)

    def pick(self, index: int) -> str:
        return self._ids[index % len(self._ids)] if self._ids else ""


def resolve(attack: Attack, ids: SessionIds) -> list[bytes]:
    """The messages as sent: padded, and with another stream's session id where the attack says."""
    messages = list(attack.messages)
    if attack.pad:
        messages = [m + wire.len_field(PAD_FIELD, b"a" * attack.pad) for m in messages]
    if attack.resume is None or not messages:
        return messages
    index, how = attack.resume
    session_id = ids.pick(index)
    if how is Resume.MANGLED:
        session_id = session_id.swapcase() + "0"
    forged = encode(pb.SessionRequest, session_id=session_id)
    if how is Resume.LATER:
        messages.insert(1, forged)  # a second message naming a session: refused
    else:
        messages[0] = forged + messages[0]  # concatenated messages merge: the id joins the first turn
    return messages


class Runner:
    """Sends one attack and says how it ended; learns session ids from the replies it reads."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._callables: dict[str, Any] = {}
        self.ids = SessionIds()

    def _callable(self, method: str) -> Any:
        if method not in self._callables:
            make = (
                self._channel.stream_stream
                if method in BIDI
                else self._channel.unary_stream
                if method in SERVER_STREAM
                else self._channel.unary_unary
            )
            self._callables[method] = make(method, request_serializer=_same, response_deserializer=_same)
        return self._callables[method]

    async def run(self, attack: Attack) -> Outcome:
        start = time.perf_counter()
        messages = resolve(attack, self.ids)
        compression = grpc.Compression.Gzip if attack.gzip else None
        call = self._callable(attack.method)
        try:
            if attack.method in BIDI:
                call = call(timeout=self._timeout, compression=compression)
                learn = self.ids.add if attack.method == SESSION else _ignore
                # A write or read after the server ended the call raises; the status says how it ended.
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await _drive(call, attack.close, attack.at, messages, learn)
                code, details = await _status(call)
            elif attack.method in SERVER_STREAM:
                call = call(messages[0], timeout=self._timeout)
                for _ in range(attack.at):
                    if await call.read() is EOF:
                        break
                call.cancel()
                code, details = await _status(call)
            else:
                await call(messages[0], timeout=self._timeout, compression=compression)
                code, details = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        except Exception as exc:  # a bug of this harness, not the server's: counted apart, never fatal
            return Outcome(attack, CLIENT_ERROR, repr(exc), time.perf_counter() - start)
        name = ENDED_MID_WRITE if details == CORE_INTERNAL else code.name
        return Outcome(attack, name, details, time.perf_counter() - start)


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    code, details = await call.code(), await call.details()
    return code, details or ""


def _ignore(reply: bytes) -> None:
    return None


async def _drive(
    call: Any, close: Close, at: int, messages: list[bytes], learn: Callable[[bytes], None]
) -> None:
    """Write and read as ``close`` says; cancelling is the last thing done where it says so."""
    if close is Close.SILENT:
        await asyncio.sleep(at / 1000)
        call.cancel()
        return
    if close is Close.CANCEL_WRITTEN:
        for message in messages[:at]:
            await call.write(message)
        call.cancel()
        return
    for message in messages:
        await call.write(message)
        if close is Close.TURNS:
            learn(await _read(call))
    if close is Close.CANCEL_READ:
        # One reply per request: waiting for more than were asked would wait for the deadline.
        for _ in range(min(at, len(messages))):
            learn(await _read(call))
        call.cancel()
        return
    await call.done_writing()
    while (reply := await call.read()) is not EOF:
        learn(reply)


async def _read(call: Any) -> bytes:
    reply = await call.read()
    if reply is EOF:
        raise asyncio.InvalidStateError("the stream ended")  # as a write after the end would
    return bytes(reply)


async def fire(
    address: str,
    attacks: list[Attack],
    *,
    concurrency: int,
    timeout: float,
    budget: float,
    progress: Callable[[int], None] = lambda done: None,
) -> list[Outcome]:
    """Send ``attacks`` in order, ``concurrency`` at a time; none is started after ``budget`` seconds."""
    deadline = time.monotonic() + budget
    slots = asyncio.Semaphore(concurrency)
    done: list[Outcome] = []

    def finished(task: asyncio.Task[Outcome]) -> None:
        slots.release()
        if not task.cancelled() and task.exception() is None:
            done.append(task.result())
            progress(len(done))

    async with grpc.aio.insecure_channel(address) as channel:
        runner = Runner(channel, timeout)
        tasks = []
        for attack in attacks:
            await slots.acquire()
            if time.monotonic() > deadline:
                break
            tasks.append(asyncio.create_task(runner.run(attack)))
            tasks[-1].add_done_callback(finished)
        await asyncio.gather(*tasks)
    return done
