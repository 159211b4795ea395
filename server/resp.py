"""The event loop's own connection to Redis: commands written straight to its socket.

A lone stream's session record is written from the event loop after each reply
(``Persister.flush_held``), so whatever a write costs the loop is time the next
request of that stream may wait. redis-py's asyncio client spent about 130 µs of
the loop's CPU on one write of a 4 KB record (its connection pool, retry wrappers
and stream reader); this connection spends about 70 µs: redis-py still encodes the command
(``pack_command``), the reply is parsed from the bytes as they arrive, and
replies are matched to calls in order (Redis answers a connection's commands in
the order it sent them). Only what the store sends is parsed: simple strings,
errors, integers, bulk strings and arrays of them (RESP2).

A call not answered within ``timeout`` drops the connection, failing every call
still waiting on it: a Redis that hangs costs a bounded wait, and the next write
connects again. ``rediss://`` (TLS, with redis-py's many options) is not served
here: the store then writes from its writer thread with redis-py's own client.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast


class ReplyError(Exception):
    """Redis answered a command with an error (its message, e.g. ``NOSCRIPT ...``)."""


_INCOMPLETE = object()  # what _parse returns while a reply has not fully arrived


def _parse(buf: bytearray, at: int) -> tuple[Any, int]:
    """The reply starting at ``at`` and where the next one starts; (_INCOMPLETE, at) if cut short."""
    end = buf.find(b"\r\n", at)
    if end < 0:
        return _INCOMPLETE, at
    kind, line, after = buf[at], bytes(buf[at + 1 : end]), end + 2
    if kind == ord("+"):
        return line.decode(), after
    if kind == ord("-"):
        return ReplyError(line.decode(errors="replace")), after
    if kind == ord(":"):
        return int(line), after
    if kind == ord("$"):
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, at
        return bytes(buf[after : after + size]), after + size + 2
    if kind == ord("*"):
        items = []
        for _ in range(max(int(line), 0)):
            item, after = _parse(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, at
            items.append(item)
        return (items if int(line) >= 0 else None), after
    raise ConnectionError(f"unexpected reply from Redis: {bytes(buf[at : at + 40])!r}")


class RedisConnection(asyncio.Protocol):
    """One connection to Redis, for calls made from the event loop it was opened on."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._waiting: collections.deque[tuple[asyncio.Future[Any], asyncio.TimerHandle]] = (
            collections.deque()
        )
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None
        from redis.connection import Connection  # redis is imported by servers that use it only

        self._encoder = Connection()  # never connected: redis-py's command encoding only

    @classmethod
    async def open(cls, url: str, timeout: float) -> RedisConnection:
        """A connection to ``redis://`` or ``unix://`` ``url``, logged in and on its database."""
        from redis.connection import SSLConnection, parse_url

        params = parse_url(url)
        if params.get("connection_class") is SSLConnection:
            raise ValueError("rediss:// is served by redis-py's own client")
        loop = asyncio.get_running_loop()
        connect = (
            loop.create_unix_connection(lambda: cls(timeout), params["path"])
            if "path" in params
            else loop.create_connection(
                lambda: cls(timeout), params.get("host", "localhost"), params.get("port", 6379)
            )
        )
        _, conn = await asyncio.wait_for(connect, timeout)
        try:
            if params.get("password"):
                who = [params["username"]] if params.get("username") else []
                await conn.call("AUTH", *who, params["password"])
            if params.get("db"):
                await conn.call("SELECT", params["db"])
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def open_now(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and self._lost is None

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command; a future of its reply (ReplyError, ConnectionError or TimeoutError
        if it fails)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        transport = self._transport
        if transport is None or not self.open_now:
            future.set_exception(self._lost or ConnectionError("not connected to Redis"))
            return future
        transport.writelines(self._encoder.pack_command(*args))
        self._waiting.append((future, loop.call_later(self._timeout, self._expire, future)))
        return future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ---- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, but behave as one)
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        at = 0
        while self._waiting and at < len(buf):
            reply, after = _parse(buf, at)
            if reply is _INCOMPLETE:
                break
            at = after
            future, timer = self._waiting.popleft()
            timer.cancel()
            if future.done():  # timed out; the connection is being dropped anyway
                continue
            if isinstance(reply, ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        del buf[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = ConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self._waiting:
            future, timer = self._waiting.popleft()
            timer.cancel()
            if not future.done():
                future.set_exception(self._lost)

    def _expire(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            future.set_exception(TimeoutError(f"Redis did not answer within {self._timeout:g} s"))
            if self._transport is not None:
                self._transport.abort()  # the replies still due would be matched to the wrong calls
