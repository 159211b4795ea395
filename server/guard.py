"""How services are registered with gRPC: every request decoded safely, NextWord calls authenticated.

gRPC's generated registration decodes requests with ``FromString``; bytes that
do not decode then end the call with UNKNOWN and a traceback in the log. Here
each method is registered from its service descriptor with a decoder that never
raises: undecodable bytes become ``MALFORMED`` and the call ends with
INVALID_ARGUMENT and one rate-limited log line. This holds for every service
the server offers (NextWord, health, reflection). Calls of a service registered
with ``public=False`` (NextWord) are authenticated before its servicer sees
them (security.py): the principal is set in ``PRINCIPAL``, and a call without
an acceptable credential ends with UNAUTHENTICATED. Health and reflection are
public, so balancers can probe them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from .metrics import Metrics
from .security import PRINCIPAL, Authenticator, Unauthenticated

log = logging.getLogger("nextword.server")
_GRPC_LOG = logging.getLogger("grpc._cython.cygrpc")

MALFORMED: Any = object()  # what the decoder returns for bytes that are not the request message
_EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # what read() gives at the end; grpc's stubs omit it
LOG_INTERVAL_S = 10.0  # at most one line per interval about malformed requests

_HANDLERS = {  # (client streaming, server streaming) -> grpc's handler factory
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Oversized:
    """What the decoder returns for a message over the size limit (its size, for the message)."""

    def __init__(self, size: int) -> None:
        self.size = size


def _decoder(message: Any, limit: int) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if len(data) > limit:
            return Oversized(len(data))
        try:
            return message.FromString(data)
        except Exception:  # DecodeError, bad UTF-8 in a string field, nesting too deep: all malformed
            return MALFORMED

    return decode


class _Checked:
    """A call's request stream as its servicer reads it: every message checked before it is seen.

    Read with ``context.read()`` by a plain coroutine, not through grpc's request iterator and
    an async generator of our own: two generator layers fewer on every message of a stream.
    """

    __slots__ = ("_context", "_guard", "_method")

    def __init__(self, guard: Guard, method: MethodDescriptor, context: grpc.aio.ServicerContext) -> None:
        self._guard, self._method, self._context = guard, method, context

    def __aiter__(self) -> _Checked:
        return self

    async def __anext__(self) -> Any:
        request = await self._context.read()
        if request is _EOF:
            raise StopAsyncIteration
        if request is MALFORMED or type(request) is Oversized:  # else nothing to check: no await
            await self._guard._check(self._method, request, self._context)
        return request


class _RateLimitedLog:
    """One line per interval; the lines left out are counted in the next one."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self._interval = interval
        self._last = -interval
        self._left_out = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._left_out += 1
            return
        more = f" ({self._left_out} more in the last {now - self._last:.0f} s)" if self._left_out else ""
        log.warning(message + more, *args)
        self._last, self._left_out = now, 0


class CoreEndedCall(logging.Filter):
    """gRPC's traceback for a reply to a call its core had already ended, as one warning line.

    When gRPC core ends a call itself (a message it will not take, a stream reset
    mid-message), the handler still returns normally and grpc.aio's attempt to send
    its status fails: grpc logs that at ERROR with a traceback, though the client
    already has core's status and nothing of ours went wrong. This filter, on grpc's
    logger, keeps the line and drops the traceback; every other record passes as it is.
    """

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        original = record.getMessage()
        if original.startswith(self.PREFIX):
            record.msg = "%s: the call had already ended in gRPC core (its client has core's status)"
            record.args = (original,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class Guard:
    """Wraps servicers' methods: decode, authenticate (unless public), count open streams."""

    def __init__(self, metrics: Metrics, auth: Authenticator, max_message_bytes: int) -> None:
        if not any(isinstance(f, CoreEndedCall) for f in _GRPC_LOG.filters):
            _GRPC_LOG.addFilter(CoreEndedCall())
        self._metrics = metrics
        self._auth = auth
        self._max_message_bytes = max_message_bytes
        self._log_malformed = _RateLimitedLog()

    def handler(
        self, service: ServiceDescriptor, servicer: object, *, public: bool = False
    ) -> grpc.GenericRpcHandler:
        """``servicer``'s methods of ``service``, guarded; for ``server.add_generic_rpc_handlers``.

        ``public``: no authentication, and its streams are not counted in ``nextword_open_streams``.
        """
        methods = {m.name: self._method(m, getattr(servicer, m.name), public) for m in service.methods}
        return grpc.method_handlers_generic_handler(service.full_name, methods)

    def _method(self, method: MethodDescriptor, behavior: Any, public: bool) -> grpc.RpcMethodHandler:
        make: Any = _HANDLERS[method.client_streaming, method.server_streaming]
        return make(
            self._wrap(method, behavior, public),
            request_deserializer=_decoder(
                message_factory.GetMessageClass(method.input_type), self._max_message_bytes
            ),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )

    def _wrap(self, method: MethodDescriptor, behavior: Any, public: bool) -> Any:
        # grpc.aio tells streaming replies written with context.write (a coroutine) from yielded ones
        # (an async generator function): the wrapper must be of the same kind as what it wraps.
        if inspect.isasyncgenfunction(behavior):

            async def replies(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with self._admitted(method, request, context, public) as checked:
                    async for reply in behavior(checked, context):
                        yield reply

            return replies

        async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._admitted(method, request, context, public) as checked:
                return await behavior(checked, context)

        return answer

    @contextlib.asynccontextmanager
    async def _admitted(
        self, method: MethodDescriptor, request: Any, context: grpc.aio.ServicerContext, public: bool
    ) -> AsyncIterator[Any]:
        """The request (or request stream) the servicer may see, once the call is let in."""
        if not public:
            await self._authenticate(method.name, context)
        if not method.client_streaming:
            await self._check(method, request, context)
            yield request
            return
        counted = not public and method.server_streaming
        if counted:
            self._metrics.open_streams.inc()
        try:
            yield self._decoded(method, request, context)
        finally:
            if counted:
                self._metrics.open_streams.dec()

    def _decoded(
        self, method: MethodDescriptor, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        return _Checked(self, method, context)

    async def _check(self, method: MethodDescriptor, request: Any, context: grpc.aio.ServicerContext) -> None:
        """End the call unless ``request`` decoded into a message of acceptable size."""
        if request is MALFORMED:
            await self._malformed(method, context)
        if isinstance(request, Oversized):
            await self._refuse(
                method.name,
                context,
                "oversized",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request is {request.size:,} bytes, more than the {self._max_message_bytes:,} this "
                "server accepts in one message; send the text in several requests",
            )

    async def _authenticate(self, name: str, context: grpc.aio.ServicerContext) -> None:
        try:
            principal = self._auth.principal(context.invocation_metadata() or (), context.auth_context)
        except Unauthenticated as exc:
            await self._refuse(name, context, "unauthenticated", grpc.StatusCode.UNAUTHENTICATED, str(exc))
        PRINCIPAL.set(principal)

    async def _malformed(self, method: MethodDescriptor, context: grpc.aio.ServicerContext) -> NoReturn:
        self._log_malformed(
            "refused a malformed %s request from %s (INVALID_ARGUMENT)", method.full_name, context.peer()
        )
        await self._refuse(
            method.name,
            context,
            "malformed",
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {method.input_type.full_name} (protobuf decoding failed); "
            "send messages built from its .proto",
        )

    async def _refuse(
        self, name: str, context: grpc.aio.ServicerContext, reason: str, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        self._metrics.refused.labels(reason).inc()
        self._metrics.errors.labels(name, code.name).inc()
        await context.abort(code, message)
