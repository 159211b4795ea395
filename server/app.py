"""Server lifecycle: load the bundle, start gRPC (+ health, reflection, /metrics), stop with a drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # not in grpc-stubs
from grpc_reflection.v1alpha import reflection, reflection_pb2

from nextword.bundle import Bundle, load_bundle
from nextword.runtime import OnnxLM
from nextword.v1 import nextword_pb2 as pb

from .batcher import Batcher
from .config import ANY_FREE_PORT, ServerConfig
from .guard import Guard
from .health import HealthServicer
from .metrics import Metrics, MetricsEndpoint
from .security import Authenticator, SecurityError, exposure_warning, server_credentials
from .service import NextWordServicer
from .session import SessionTable
from .state import StatePool

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NextWord"].full_name
log = logging.getLogger("nextword.server")


class StartupError(Exception):
    """The server cannot start; the message says what to change."""


@dataclass(eq=False)
class RunningServer:
    config: ServerConfig
    bundle: Bundle
    provider: str
    port: int
    metrics_port: int  # 0: no /metrics endpoint
    servicer: NextWordServicer
    metrics: Metrics
    _server: grpc.aio.Server
    _health: health_aio.HealthServicer
    _batcher: Batcher
    _sweeper: asyncio.Task[None]
    _endpoint: MetricsEndpoint | None

    async def drain(self, timeout: float) -> bool:
        """The first half of ``stop``: health NOT_SERVING, new calls refused, Session streams ended.

        Streams end with UNAVAILABLE and a message to resume (idle ones at once, busy ones after
        their reply). Returns True once every stream has ended, False if some still run after
        ``timeout`` seconds. The server still answers health checks (NOT_SERVING) meanwhile.
        """
        # Load balancers watching health stop sending traffic here first.
        await self._health.enter_graceful_shutdown()
        return await self.servicer.drain(timeout)

    async def stop(self, grace: float | None) -> None:
        """Drain, let calls still open finish within ``grace`` seconds in all, then release everything.

        ``grace`` None: cancel every call at once (tests).
        """
        # grpc's own stop would keep streams open to the end of grace and then cancel them
        # ("Cancelling all calls"), which a client cannot tell from a crash: end them ourselves first.
        loop = asyncio.get_running_loop()
        start = loop.time()
        if not await self.drain(grace or 0.0) and grace:
            log.warning(
                "session streams still answering after --grace %g s are cancelled; their clients "
                "see UNAVAILABLE and resend (a longer --grace lets them finish)",
                grace,
            )
        left = None if grace is None else max(0.0, grace - (loop.time() - start))
        await self._server.stop(left)
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper
        await self._batcher.close()
        if self._endpoint is not None:
            self._endpoint.close()


def warm_up(lm: OnnxLM, max_batch: int) -> None:
    """Run every batch size the batcher can form once, so no user meets a cold shape.

    onnxruntime sizes its buffers on the first call of each shape; doing that now
    costs a few milliseconds here instead of a slow first reply there.
    """
    for n in range(1, max_batch + 1):
        state = lm.zero_state(n)
        for seq in (1, 2) if n == 1 else (1,):
            lm.step_ranked(np.ones((n, seq), dtype=np.int64), state, whole_distribution=True)
        lm.head_ranked(state, whole_distribution=True)


async def start_server(config: ServerConfig) -> RunningServer:
    """Load the model and start serving; raises BundleError/StartupError with a message to act on."""
    auth, credentials = _security(config)  # before the model: a bad key file fails in milliseconds
    bundle, lm = _load_model(config)
    metrics = Metrics()
    m = bundle.manifest
    metrics.model_info.info({"name": m.name, "cell": m.cell, "provider": lm.provider})
    pool = StatePool(m.state, lm.start_state())
    sessions = SessionTable(config.max_sessions, config.session_ttl, on_drop=lambda s: pool.free(s.slot))
    metrics.active_sessions.set_function(lambda: len(sessions))
    batcher = Batcher(
        lm,
        pool,
        metrics,
        max_batch=config.max_batch,
        max_delay=config.max_delay_ms / 1000,
        chunk_tokens=config.prefill_chunk_tokens,
        prefill_call_tokens=config.prefill_call_tokens,
    )
    servicer = NextWordServicer(
        config=config,
        bundle=bundle,
        provider=lm.provider,
        pool=pool,
        batcher=batcher,
        sessions=sessions,
        metrics=metrics,
    )
    guard = Guard(metrics, auth, config.max_message_bytes)
    server, health_servicer, port = await _grpc_server(config, servicer, guard, credentials)
    endpoint = _metrics_endpoint(config, metrics)
    batcher.start()
    sweeper = asyncio.get_running_loop().create_task(sessions.sweep_forever(), name="session-sweeper")
    await server.start()
    return RunningServer(
        config,
        bundle,
        lm.provider,
        port,
        endpoint.port if endpoint else 0,
        servicer,
        metrics,
        server,
        health_servicer,
        batcher,
        sweeper,
        endpoint,
    )


def _load_model(config: ServerConfig) -> tuple[Bundle, OnnxLM]:
    bundle = load_bundle(config.model)
    try:
        lm = OnnxLM(bundle, device=config.device, threads=config.threads)
    except RuntimeError as exc:  # e.g. --device cuda without CUDA
        raise StartupError(str(exc)) from exc
    if config.device == "cuda" and lm.provider != "CUDAExecutionProvider":
        # onnxruntime falls back to CPU silently when CUDA's libraries fail to load.
        raise StartupError(
            f"--device cuda: onnxruntime could not start CUDA and fell back to {lm.provider} "
            "(its log above says why); use --device auto or cpu to serve on the CPU"
        )
    warm_up(lm, config.max_batch)
    return bundle, lm


def _security(config: ServerConfig) -> tuple[Authenticator, grpc.ServerCredentials | None]:
    try:
        return Authenticator.from_config(config), server_credentials(config)
    except SecurityError as exc:
        raise StartupError(str(exc)) from exc


CORE_MESSAGE_FACTOR = 16  # gRPC core's receive limit, in multiples of the guard's


def _grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    return [
        # A message over max_message_bytes is refused by the guard (RESOURCE_EXHAUSTED, guard.py);
        # gRPC core itself refuses only what is far larger. When core refuses a message (one that
        # inflates past its limit once decompressed) it ends the call itself, and the handler's
        # normal return then fails to send a status: a traceback in the log for a call that was
        # answered. Keeping core's limit well above ours leaves that to messages past it.
        ("grpc.max_receive_message_length", config.max_message_bytes * CORE_MESSAGE_FACTOR),
        # gRPC's default SO_REUSEPORT lets a second server share a busy port and split its traffic.
        ("grpc.so_reuseport", 0),
        # One client connection cannot hold more than its share of streams.
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # Connections are asked to go away now and then, so clients spread over new replicas;
        # streams still open after the grace end UNAVAILABLE and their sessions are resumed.
        ("grpc.max_connection_age_ms", ms(config.max_connection_age)),
        ("grpc.max_connection_age_grace_ms", ms(config.connection_age_grace)),
        # Pings find dead peers (a laptop closed mid-stream) so their streams do not linger ...
        ("grpc.keepalive_time_ms", ms(config.keepalive_time)),
        ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout)),
        # ... and a client may ping too, idle or not, but not more often than this (else GOAWAY).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(config.min_client_ping_interval)),
    ]


async def _grpc_server(
    config: ServerConfig,
    servicer: NextWordServicer,
    guard: Guard,
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
    """The gRPC server with the NextWord, health and reflection services, bound but not started."""
    server = grpc.aio.server(
        options=_grpc_options(config), maximum_concurrent_rpcs=config.max_concurrent_rpcs
    )
    health_servicer = HealthServicer()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    # Through the guard, not the generated add_*_to_server helpers: requests that do not decode get
    # INVALID_ARGUMENT instead of UNKNOWN and a traceback; NextWord calls are authenticated.
    server.add_generic_rpc_handlers(
        (
            guard.handler(pb.DESCRIPTOR.services_by_name["NextWord"], servicer),
            guard.handler(_service(health_pb2), health_servicer, public=True),
            guard.handler(_service(reflection_pb2), _reflection(names), public=True),
        )
    )
    address = f"{config.host}:{config.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address} ({exc}); is the port in use? see --port") from exc
    if (warning := exposure_warning(config, port)) is not None:
        log.warning(warning)
    return server, health_servicer, port


def _service(module: Any) -> ServiceDescriptor:
    """The one service a generated ``*_pb2`` module declares."""
    (service,) = module.DESCRIPTOR.services_by_name.values()
    return service


def _reflection(names: tuple[str, ...]) -> object:
    # What enable_server_reflection registers on an asyncio server (public; missing in the stubs).
    return reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]


def _metrics_endpoint(config: ServerConfig, metrics: Metrics) -> MetricsEndpoint | None:
    if not config.metrics_port:
        return None
    port = 0 if config.metrics_port == ANY_FREE_PORT else config.metrics_port
    try:
        return MetricsEndpoint(metrics, config.host, port)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {config.host}:{port} ({exc}); see --metrics-port (0: off)"
        ) from exc
