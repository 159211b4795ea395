"""Server lifecycle: load the bundle, start gRPC (+ health, reflection, /metrics), stop with a drain."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # not in grpc-stubs
from grpc_reflection.v1alpha import reflection

from nextword.bundle import Bundle, load_bundle
from nextword.runtime import OnnxLM
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

from .batcher import Batcher
from .config import ANY_FREE_PORT, ServerConfig
from .metrics import Metrics, MetricsEndpoint
from .service import NextWordServicer
from .session import SessionTable
from .state import StatePool

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NextWord"].full_name


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

    async def stop(self, grace: float | None) -> None:
        """Stop taking RPCs, let open ones finish for ``grace`` seconds, then release everything."""
        # Load balancers watching health stop sending traffic here first.
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
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
    bundle, lm = _load_model(config)
    metrics = Metrics()
    m = bundle.manifest
    metrics.model_info.info({"name": m.name, "cell": m.cell, "provider": lm.provider})
    pool = StatePool(m.state, lm.start_state())
    sessions = SessionTable(config.max_sessions, config.session_ttl, on_drop=lambda s: pool.free(s.slot))
    metrics.active_sessions.set_function(lambda: len(sessions))
    batcher = Batcher(lm, pool, metrics, max_batch=config.max_batch, max_delay=config.max_delay_ms / 1000)
    servicer = NextWordServicer(
        config=config,
        bundle=bundle,
        provider=lm.provider,
        pool=pool,
        batcher=batcher,
        sessions=sessions,
        metrics=metrics,
    )
    server, health_servicer, port = await _grpc_server(config, servicer)
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


async def _grpc_server(
    config: ServerConfig, servicer: NextWordServicer
) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
    """The gRPC server with the NextWord, health and reflection services, bound but not started."""
    server = grpc.aio.server(
        options=[
            # Oversized messages are refused by gRPC itself (RESOURCE_EXHAUSTED) before reaching us.
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # gRPC's default SO_REUSEPORT lets a second server share a busy port and split its traffic.
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_NextWordServicer_to_server(servicer, server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address} ({exc}); is the port in use? see --port") from exc
    return server, health_servicer, port


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
