"""``nextword gateway``: the browser's door, HTTP/JSON and a WebSocket in front of a nextword server.

A browser cannot open a gRPC bidirectional stream, so the gateway (aiohttp) speaks
JSON to it and gRPC to the server, with the client library any Python program uses:

* ``POST /v1/predict`` ``{"text": "...", "k": 3}``: one prediction, no state kept (``"model"``
  names one of a repository's models; empty or absent: the server's default);
* ``GET /v1/session``, a WebSocket: each message ``{"text": "...", "k": 3, "reset": false}``
  is one request of one nextword session (the text is appended to what the session has
  read; ``reset`` starts over with it), answered by one message with the prediction and
  the session's id and seq; the first message may name a ``session_id`` to resume, a
  ``model``, and ask with ``"learn": true`` for a session that learns its user (``Strip.learn``);
* ``GET /`` the demo page and ``GET /nextword.js`` its client (an ES module, no build step);
* ``GET /metrics``: the gateway's own, for Prometheus (requests by route and answer, sockets).

Every WebSocket is one ``AsyncSession`` of ``clients/client.py``, which resumes the
session on another stream when the server restarts or a balancer moves it, replaying
what a stored copy lacks: a page keeps working across a server restart without knowing.
A caller's bearer token (an ``Authorization: Bearer`` header, or ``"token"`` in a socket's
first message, since a browser cannot set a WebSocket's headers) goes on to the server as
that call's own, so the server authenticates every user as it authenticates gRPC clients
(``Passing``). What the server refuses comes back as ``{"error": {"code": "INVALID_ARGUMENT", "message":
...}}`` with gRPC's status name and the server's own words; the socket stays open. The
server's limits apply as they are (text length, k, the cost of a request in tokens);
the gateway adds its own bound on a message's size and on how many sockets it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nextword.options import from_args, option
from nextword.v1 import nextword_pb2 as pb

from .channel import Credentials, CredentialsError
from .client import AsyncNextWordClient, AsyncSession, Metadata, Prediction
from .connection import ConnectionOptions

log = logging.getLogger("nextword.gateway")
WEB = Path(__file__).resolve().parent / "web"  # index.html, nextword.js
CLIENT_KEY: web.AppKey[AsyncNextWordClient] = web.AppKey("client", AsyncNextWordClient)
PASS_KEY: web.AppKey[Passing] = web.AppKey("passing", object)  # type: ignore[arg-type]
OPTIONS_KEY: web.AppKey[GatewayOptions] = web.AppKey("options", object)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GatewayOptions:
    host: str = option("127.0.0.1", "address to listen on for browsers (0.0.0.0: every interface)")
    port: int = option(8080, "HTTP port (0: a free port, named in the log)")
    max_message_bytes: int = option(16 * 1024, "largest JSON message a browser may send")
    max_sockets: int = option(1000, "WebSocket sessions held at once; more are refused (503)")
    timeout: float = option(10.0, "seconds a request may wait for the server")


def _prediction(p: Prediction) -> dict[str, Any]:
    """``nextword predict --json``'s object, with ``completions`` always there (empty between words)."""
    out = p.to_json_dict()
    out.setdefault("completions", [])
    return out


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _rpc_error(exc: grpc.RpcError) -> dict[str, Any]:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    return _error(code.name if code is not None else "UNKNOWN", details or str(exc))


_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404}
_HTTP_STATUS |= {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


class TokenRefused(ValueError):
    """A caller's token that this gateway will not pass on; the message says why."""


@dataclass(frozen=True)
class Passing:
    """Whether callers' bearer tokens may go on to the server, and why not.

    A token goes on as the call's ``authorization`` metadata, so the server authenticates
    the caller exactly as it would a gRPC client. Only over TLS or to this machine (the
    client library's own rule: never a token in clear over a network), and not by a gateway
    that signs in with a token of its own (``--token-file``: it serves as that principal).
    """

    refused: str = ""  # why tokens are not passed on; empty: they are

    @classmethod
    def of(cls, target: str, own: Credentials) -> Passing:
        if own.token is not None:
            return cls("this gateway calls the server as its own principal (--token-file): send no token")
        try:  # the client library's own rule for where a token may go
            replace(own, token="any").channel_credentials(target)
        except CredentialsError as exc:
            return cls(f"this gateway passes no token on: {exc}")
        return cls()

    def metadata(self, token: str | None) -> Metadata:
        """The call metadata carrying ``token``; TokenRefused if it may not go on or is malformed."""
        if not token:
            return ()
        if self.refused:
            raise TokenRefused(self.refused)
        try:
            token = Credentials(token=token).token
        except CredentialsError as exc:
            raise TokenRefused(str(exc)) from exc
        return (("authorization", f"Bearer {token}"),)


def _bearer(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _request(data: Any) -> tuple[str, int, bool, str]:
    """``text``, ``k``, ``reset`` and ``model`` of a JSON request; ValueError with what is wrong."""
    if not isinstance(data, dict):
        raise ValueError('send a JSON object such as {"text": "it is a truth ", "k": 3}')
    text, k, reset = data.get("text", ""), data.get("k", 3), data.get("reset", False)
    model = data.get("model", "")
    if not isinstance(text, str):
        raise ValueError('"text" must be a string')
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError('"k" must be a whole number, 0 or more')
    if not isinstance(reset, bool):
        raise ValueError('"reset" must be true or false')
    if not isinstance(model, str):
        raise ValueError('"model" must be a string: the name of a model the server serves')
    return text, k, reset, model


async def predict(request: web.Request) -> web.Response:
    start = time.perf_counter()
    body, status = await _predicted(request)
    request.app[METRICS_KEY].answered("predict", body["error"]["code"] if "error" in body else "OK", start)
    return web.json_response(body, status=status)


async def _predicted(request: web.Request) -> tuple[dict[str, Any], int]:
    if (request.content_length or 0) > request.app[OPTIONS_KEY].max_message_bytes:
        return _error("INVALID_ARGUMENT", "request too large"), 413
    try:
        text, k, _, model = _request(await request.json())
        metadata = request.app[PASS_KEY].metadata(_bearer(request))
    except (ValueError, json.JSONDecodeError) as exc:  # TokenRefused is a ValueError
        return _error("INVALID_ARGUMENT", str(exc)), 400
    try:
        prediction = await request.app[CLIENT_KEY].predict(text, k, model=model, metadata=metadata)
    except grpc.RpcError as exc:
        body = _rpc_error(exc)
        return body, _HTTP_STATUS.get(body["error"]["code"], 502)
    return _prediction(prediction), 200


class GatewayMetrics:
    """The gateway's own ``/metrics``: requests by route and answer, their time, sockets held."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.open = 0  # WebSocket sessions held (``--max-sockets``)
        self._answers = Counter(
            "nextword_gateway_requests",
            "Requests answered, by route and gRPC status name (OK, INVALID_ARGUMENT, ...)",
            ["route", "code"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "nextword_gateway_request_duration_seconds",
            "Time from a request's arrival to its answer, by route",
            ["route"],
            registry=self.registry,
        )
        sockets = Gauge("nextword_gateway_sockets", "WebSocket sessions held", registry=self.registry)
        sockets.set_function(lambda: self.open)

    def answered(self, route: str, code: str, start: float) -> None:
        self._answers.labels(route, code).inc()
        self._seconds.labels(route).observe(time.perf_counter() - start)


METRICS_KEY: web.AppKey[GatewayMetrics] = web.AppKey("metrics", GatewayMetrics)


async def session(request: web.Request) -> web.StreamResponse:
    options, sockets = request.app[OPTIONS_KEY], request.app[METRICS_KEY]
    if sockets.open >= options.max_sockets:
        return web.json_response(
            _error("RESOURCE_EXHAUSTED", "the gateway holds all the sessions it may"), status=503
        )
    ws = web.WebSocketResponse(max_msg_size=options.max_message_bytes, heartbeat=30)
    await ws.prepare(request)
    sockets.open += 1
    stream: AsyncSession | None = None
    resume: str | None = None  # the session to take up again: named by the page, or one that failed
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break  # a binary frame, an error or a close: nothing more to answer
            start = time.perf_counter()
            try:
                data = json.loads(msg.data)
                text, k, reset, model = _request(data)
                if stream is None:  # a socket's first message may carry the caller's token
                    token = data.get("token") if isinstance(data.get("token"), str) else _bearer(request)
                    metadata = request.app[PASS_KEY].metadata(token)
            except (ValueError, json.JSONDecodeError) as exc:
                await ws.send_json(_error("INVALID_ARGUMENT", str(exc)))
                sockets.answered("session", "INVALID_ARGUMENT", start)
                continue
            if stream is None:
                named = data.get("session_id")
                strip = pb.Strip(learn=True) if data.get("learn") is True else None
                stream = request.app[CLIENT_KEY].session(
                    named if isinstance(named, str) and named else resume,
                    k or None,
                    model=model,
                    metadata=metadata,
                    strip=strip,
                )
            try:
                prediction = await stream.send(text, reset=reset, k=k)
            except grpc.RpcError as exc:
                error = _rpc_error(exc)
                await ws.send_json(error)
                sockets.answered("session", error["error"]["code"], start)
                if stream.closed:  # the server ended this stream: the next message resumes the session
                    resume, stream = stream.session_id, None
                continue
            await ws.send_json(_prediction(prediction) | {"session_id": stream.session_id, "seq": stream.seq})
            sockets.answered("session", "OK", start)
    finally:
        sockets.open -= 1
        if stream is not None:
            await stream.close()
    return ws


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[METRICS_KEY].registry), content_type="text/plain")


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB / "index.html")


async def script(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB / "nextword.js", headers={"Content-Type": "text/javascript"})


def make_app(client: AsyncNextWordClient, options: GatewayOptions, passing: Passing) -> web.Application:
    app = web.Application(client_max_size=options.max_message_bytes)
    app[CLIENT_KEY], app[OPTIONS_KEY], app[PASS_KEY], app[METRICS_KEY] = (
        client,
        options,
        passing,
        GatewayMetrics(),
    )
    app.router.add_get("/", page)
    app.router.add_get("/nextword.js", script)
    app.router.add_post("/v1/predict", predict)
    app.router.add_get("/v1/session", session)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(options: GatewayOptions, connection: ConnectionOptions) -> None:
    own = connection.credentials()
    client = AsyncNextWordClient(connection.target, timeout=options.timeout, credentials=own)
    runner = web.AppRunner(make_app(client, options, Passing.of(connection.target, own)))
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    port = runner.addresses[0][1]
    log.info("nextword gateway on http://%s:%d/ for the server at %s", options.host, port, connection.target)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping: open sockets are closed (pages open new ones and resume their sessions)")
    finally:
        await runner.cleanup()
        await client.close()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options, connection = from_args(GatewayOptions, args), from_args(ConnectionOptions, args)
    try:
        asyncio.run(serve(options, connection))
    except CredentialsError as exc:
        print(f"nextword gateway: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"nextword gateway: error: cannot listen on {options.host}:{options.port} ({exc})",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        pass
    return 0
