"""Server lifecycle: load the bundle, start gRPC (+ health, reflection, /metrics), stop with a drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # not in grpc-stubs
from grpc_reflection.v1alpha import reflection_pb2

from nextword.bundle import Bundle
from nextword.v1 import nextword_pb2 as pb

from . import kserve, reflection
from .config import ANY_FREE_PORT, ServerConfig
from .guard import Guard
from .health import HealthServicer
from .hugepages import huge_page_bytes
from .metrics import Metrics, MetricsEndpoint
from .model import ModelVersion
from .repository import ModelLoadError, ModelNotFound, Repository
from .security import Authenticator, SecurityError, exposure_warning, server_credentials
from .service import NextWordServicer
from .session import SessionRecord, SessionTable
from .status import WorkerStatus
from .store import Persister, StoreError, open_store

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NextWord"].full_name
# Health services of their own: a probe can ask about the store (SERVING while it answers) and,
# under a supervisor, about the workers (SERVING while every worker is up).
STORE_HEALTH = "nextword.SessionStore"
WORKERS_HEALTH = "nextword.Workers"
HEALTH_INTERVAL = 2.0  # seconds between checks of the store and the workers
log = logging.getLogger("nextword.server")


class StartupError(Exception):
    """The server cannot start; the message says what to change."""


@dataclass(eq=False)
class RunningServer:
    config: ServerConfig
    models: Repository
    port: int
    metrics_port: int  # 0: no /metrics endpoint
    servicer: NextWordServicer
    metrics: Metrics
    _server: grpc.aio.Server
    _health: health_aio.HealthServicer
    _tasks: list[asyncio.Task[None]]  # the session and idle-stream sweepers, the health watch
    _endpoint: MetricsEndpoint | None
    _persister: Persister | None

    @property
    def bundle(self) -> Bundle:
        """The bundle of the model an empty ``model`` field means (the first loaded, if none)."""
        return self.default_model.bundle

    @property
    def provider(self) -> str:
        return self.default_model.provider

    @property
    def default_model(self) -> ModelVersion:
        try:
            return self.models.pick("")
        except ModelNotFound:
            return next(iter(self.models.versions.values()))

    def rescan(self) -> None:
        """Load what the model repository holds now (SIGHUP), without waiting for it."""
        task = asyncio.get_running_loop().create_task(self.models.rescan(), name="model-repository-scan")
        self._tasks.append(task)

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
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.models.close()
        if self._persister is not None:
            await self._persister.settle()
            self._persister.close()
        if self._endpoint is not None:
            self._endpoint.close()


def run(config: ServerConfig, main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` to the end on the event loop ``--loop`` names."""
    if config.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            main.close()
            if config.loop == "uvloop":
                raise StartupError("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def serve(
    config: ServerConfig,
    workers: WorkerStatus | None = None,
    on_ready: Callable[[RunningServer], None] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, then drain and stop; 0 after a clean shutdown.

    ``workers``/``on_ready``: how a worker process tells its supervisor it serves (server/workers.py).
    """
    running = await start_server(config, workers)
    m = running.bundle.manifest
    served = (
        ",".join(f"{n}/{v}" for n, v in sorted(running.models.versions))
        if config.model_repository
        else m.name
    )
    who = "nextword" if config.worker < 0 else f"worker {config.worker} (pid {os.getpid()})"
    huge = huge_page_bytes()
    log.info(
        "%s serving %s (%s, %s, %d onnxruntime thread%s, %s) on %s:%d, metrics on :%d",
        who,
        served,
        m.cell,
        running.provider,
        config.intra_op_threads,
        "s" if config.intra_op_threads > 1 else "",
        "huge pages: unknown" if huge is None else f"{huge / 2**20:.0f} MiB in huge pages",
        config.host,
        running.port,
        running.metrics_port,
    )
    if on_ready is not None:
        on_ready(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.model_repository is not None:  # SIGHUP: look at the repository now
        loop.add_signal_handler(signal.SIGHUP, running.rescan)
    await stop.wait()
    log.info(
        "%s shutting down: health NOT_SERVING, new calls refused, session streams end after their "
        "current reply (clients resume them); stopping within %g s (--grace)",
        who,
        config.grace,
    )
    await running.stop(config.grace)
    log.info("%s stopped", who)
    return 0


async def start_server(config: ServerConfig, workers: WorkerStatus | None = None) -> RunningServer:
    """Load the models and start serving; raises BundleError/StartupError with a message to act on.

    ``workers``: what the supervisor says of every worker, when this process is one of them.
    """
    auth, credentials = _security(config)  # before the model: a bad key file fails in milliseconds
    metrics = Metrics()
    persister = _session_store(config, metrics)
    models = Repository(config, metrics, persister, config.model_repository)
    try:
        await models.start()
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from exc
    sessions = SessionTable(config.max_sessions, config.session_ttl, on_drop=_drop_session(models))
    metrics.active_sessions.set_function(lambda: len(sessions))
    metrics.max_sessions.set(config.max_sessions)
    servicer = NextWordServicer(
        config=config, models=models, sessions=sessions, metrics=metrics, persister=persister
    )
    guard = Guard(metrics, auth, config.max_message_bytes)
    server, health_servicer, port = await _grpc_server(config, servicer, guard, credentials)
    endpoint = _metrics_endpoint(config, metrics)
    tasks = _background_tasks(sessions, servicer, health_servicer, persister, workers)
    if config.model_repository is not None and config.model_control == "poll":
        tasks.append(asyncio.get_running_loop().create_task(models.watch(), name="model-repository"))
    await server.start()
    return RunningServer(
        config,
        models,
        port,
        endpoint.port if endpoint else 0,
        servicer,
        metrics,
        server,
        health_servicer,
        tasks,
        endpoint,
        persister,
    )


def _drop_session(models: Repository) -> Callable[[SessionRecord], None]:
    """What a session dropped from the table releases: its state row, and its hold on its model."""

    def drop(session: SessionRecord) -> None:
        if session.model is not None:
            session.model.pool.free(session.slot)
            models.let_go(session)

    return drop


def _background_tasks(
    sessions: SessionTable,
    servicer: NextWordServicer,
    health: health_aio.HealthServicer,
    persister: Persister | None,
    workers: WorkerStatus | None,
) -> list[asyncio.Task[None]]:
    """The sweepers of idle sessions and streams, and the health watch (with a store or workers)."""
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(sessions.sweep_forever(), name="session-sweeper"),
        loop.create_task(servicer.end_idle_streams(), name="idle-streams"),
    ]
    if persister is not None or workers is not None:
        tasks.append(loop.create_task(_watch_health(health, persister, workers), name="health"))
    return tasks


def _session_store(config: ServerConfig, metrics: Metrics) -> Persister | None:
    spec = config.store_spec
    if spec == "embedded":
        raise StartupError(
            "--session-store embedded is the file the workers of one server share (--workers 2 or "
            "more); for one process give sqlite:///PATH (sessions outlive restarts) or none"
        )
    try:
        store = open_store(spec)
    except StoreError as exc:  # a store this machine cannot open: a setting to fix
        raise StartupError(f"{exc} (see --session-store)") from exc
    if store is None:
        return None
    persister = Persister(store, metrics, config.session_ttl, interval=config.store_interval)
    # A store not answering yet (Redis still starting beside us) is no reason not to serve: the
    # server starts, says so in its log and health, and uses the store once it answers.
    persister.check()
    return persister


async def _watch_health(
    health: health_aio.HealthServicer, persister: Persister | None, workers: WorkerStatus | None
) -> None:
    """Keep the store's and the workers' health services current (balancers and probes read them)."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    while True:
        if persister is not None:
            up = await persister.run(persister.check)
            await health.set(STORE_HEALTH, serving if up else not_serving)
        if workers is not None:
            await health.set(WORKERS_HEALTH, serving if workers.all_up() else not_serving)
        await asyncio.sleep(HEALTH_INTERVAL)


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
        # gRPC's default SO_REUSEPORT lets a second server share a busy port and split its traffic:
        # only the workers of one supervisor share theirs (it holds the port for them).
        ("grpc.so_reuseport", int(config.reuse_port)),
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
        # Calls that arrived but that the event loop has not taken up yet: gRPC core cancels those past
        # 1,000 by default, so a burst of new streams (a load balancer's failover, a fleet of
        # keyboards reconnecting) lost some to CANCELLED/INTERNAL. The bound is the RPC limit's.
        ("grpc.server.max_pending_requests", config.max_concurrent_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", config.max_concurrent_rpcs),
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
    alpha, v1 = reflection.servicers((SERVICE_NAME, health.SERVICE_NAME), kserve.SERVICE)
    # Through the guard, not the generated add_*_to_server helpers: requests that do not decode get
    # INVALID_ARGUMENT instead of UNKNOWN and a traceback; NextWord calls are authenticated.
    server.add_generic_rpc_handlers(
        (
            guard.handler(pb.DESCRIPTOR.services_by_name["NextWord"], servicer),
            guard.handler(_service(health_pb2), health_servicer, public=True),
            guard.handler(_service(reflection_pb2), alpha, public=True),
            guard.handler(reflection.V1_SERVICE, v1, public=True),
            # KServe v2 (Triton's clients): the same sessions, limits and credentials as NextWord.
            guard.handler(
                kserve.SERVICE,
                kserve.KServeServicer(
                    servicer,
                    config.session_ttl,
                    explicit=config.model_control == "explicit",
                    controllers=config.controllers,
                ),
            ),
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


def _metrics_endpoint(config: ServerConfig, metrics: Metrics) -> MetricsEndpoint | None:
    if not config.metrics_port:
        return None
    port = 0 if config.metrics_port == ANY_FREE_PORT else config.metrics_port
    # A worker's own /metrics is for its supervisor only, which serves them all on one port.
    host = "127.0.0.1" if config.worker >= 0 else config.host
    try:
        return MetricsEndpoint(metrics.registry, host, port)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {config.host}:{port} ({exc}); see --metrics-port (0: off)"
        ) from exc
