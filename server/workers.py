"""``nextword serve --workers N``: a supervisor and N worker processes sharing one port.

One event loop is one core's worth of Python, so one process cannot use a
second core. The supervisor starts N workers, each a whole server (its own
event loop, batcher and onnxruntime session) listening on the same port with
SO_REUSEPORT, so the kernel spreads connections over them. The supervisor
itself serves no gRPC; it

* holds the port from startup to shutdown (bound, never listening), so a
  restarting worker always gets it back and nothing else can take it;
* keeps the session store (``--session-store``, ``embedded`` by default: a
  SQLite file in a temporary folder) that every worker writes each step to, so
  a session continues on any worker;
* restarts a worker that dies, after a pause that grows while it keeps dying
  at startup; its clients' streams fail UNAVAILABLE, reconnect to the port and
  resume on whichever worker takes the new connection;
* keeps a folder where every worker counts what each model version did, so that
  KServe's ``ModelStatistics`` sums all workers whichever answers (server/stats.py);
* serves one ``/metrics`` for all: each worker's own registry (on a loopback
  port only it knows), every sample labelled ``worker``, plus its own gauges;
* on SIGTERM or SIGINT tells every worker to drain (they end their streams
  with the resume status) and waits for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from nextword.bundle import load_bundle

from .app import RunningServer, StartupError, run, serve
from .config import ANY_FREE_PORT, ServerConfig
from .metrics import MetricsEndpoint
from .status import WorkerStatus

log = logging.getLogger("nextword.server")
STARTUP_TIMEOUT = 300.0  # seconds a worker may take to load the model and listen
RESTART_PAUSE, MAX_RESTART_PAUSE = 0.5, 30.0  # seconds; doubled while a worker keeps dying young
YOUNG = 10.0  # seconds: a worker that dies sooner than this after its start died "young"


def worker_main(config: ServerConfig, ports: Any, ready: Any) -> None:
    """A worker process: one server on the shared port until the supervisor says stop."""
    _die_with_parent()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a rescan asked for while loading: it loads anyway
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {config.worker}]: %(message)s",
    )
    status = WorkerStatus(ports)

    def on_ready(running: RunningServer) -> None:
        status.ready(config.worker, running.metrics_port)
        ready.put((config.worker, running.provider, ""))

    try:
        run(config, serve(config, status, on_ready))
    except Exception as exc:  # the supervisor prints it once, not a traceback per worker
        ready.put((config.worker, "", str(exc)))
        raise SystemExit(2) from None


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the supervisor dies without stopping it (kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkersCollector:
    """Every worker's metrics, read from its own endpoint, each sample labelled with its worker."""

    def __init__(self, status: WorkerStatus) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index, port in enumerate(self._status.ports()):
            if port <= 0:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
                    text = reply.read().decode("utf-8")
            except OSError:  # the worker died since: its metrics are gone with it
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                worker = {"worker": str(index)}
                merged.samples += [s._replace(labels={**s.labels, **worker}) for s in family.samples]
        yield from families.values()


class Supervisor:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.count = config.worker_count
        self._ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited gRPC state
        self._ports = self._ctx.Array("i", self.count)  # shared with the workers
        self._status = WorkerStatus(self._ports)
        self._ready: Any = self._ctx.Queue()
        self._procs: list[BaseProcess | None] = [None] * self.count
        self._started = [0.0] * self.count
        self._pause = [RESTART_PAUSE] * self.count
        self._due: dict[int, float] = {}  # worker -> when it is restarted
        self._stopping = False
        self.registry = CollectorRegistry()
        Gauge("nextword_workers", "Worker processes configured (--workers)", registry=self.registry).set(
            self.count
        )
        alive = Gauge("nextword_workers_alive", "Worker processes up and serving", registry=self.registry)
        alive.set_function(lambda: sum(p > 0 for p in self._status.ports()))
        self._restarts = Counter(
            "nextword_worker_restarts", "Workers restarted after dying", ["worker"], registry=self.registry
        )
        self.registry.register(WorkersCollector(self._status))

    def run(self) -> int:
        """Start the workers, keep them running until SIGTERM/SIGINT, stop them; the exit code."""
        repository = self.config.model_repository
        if repository is None:
            served = load_bundle(self.config.model).manifest  # a bad --model fails here, once
            name, cell = served.name, served.cell
        else:  # each worker loads the repository itself, and refuses to start when nothing loads
            name, cell = f"repository:{repository}", "models"
        holder, port = _hold_port(self.config.host, self.config.port)
        store_dir, spec = self._store()
        stats_dir = tempfile.mkdtemp(prefix="nextword-stats-")  # every worker's ModelStatistics
        worker = self.worker_config(port, spec, stats_dir)
        endpoint = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._rescan)
        try:
            for index in range(self.count):
                self._start(worker, index)
            provider = self._await_ready()
            endpoint = self._metrics_endpoint()
            log.info(
                "nextword serving %s (%s, %s, %s) on %s:%d, metrics on :%d, %d workers",
                name,
                cell,
                provider,
                _threads(self.config.intra_op_threads),
                self.config.host,
                port,
                endpoint.port if endpoint else 0,
                self.count,
            )
            self._supervise(worker)
        finally:
            self._stop_all()
            if endpoint is not None:
                endpoint.close()
            holder.close()
            if store_dir is not None:
                shutil.rmtree(store_dir, ignore_errors=True)
            shutil.rmtree(stats_dir, ignore_errors=True)
        log.info("stopped")
        return 0

    def worker_config(self, port: int, store: str, stats_dir: str = "") -> ServerConfig:
        """What every worker runs with (``_start`` adds its number).

        ``--workers`` stays as given: each worker's share of the cores (its onnxruntime threads,
        which do not spin) follows from how many workers there are. (A worker told it was alone
        ran a spinning pool as large as the machine: on 2 cores, 2 workers × 2 threads, and 30%
        fewer words/s than with a thread each.)
        """
        return dataclasses.replace(
            self.config,
            port=port,
            metrics_port=ANY_FREE_PORT,
            session_store=store,
            reuse_port=True,
            stats_dir=stats_dir,
        )

    def _store(self) -> tuple[Path | None, str]:
        spec = self.config.store_spec
        if spec != "embedded":
            return None, spec
        folder = Path(tempfile.mkdtemp(prefix="nextword-sessions-"))
        return folder, f"sqlite://{folder / 'sessions.db'}#embedded"

    def _start(self, worker: ServerConfig, index: int) -> None:
        config = dataclasses.replace(worker, worker=index)
        args = (config, self._ports, self._ready)
        proc = self._ctx.Process(target=worker_main, args=args, name=f"nextword-worker-{index}")
        proc.start()
        self._procs[index], self._started[index] = proc, time.monotonic()

    def _await_ready(self) -> str:
        """Wait until every worker serves; StartupError with the first failure's message."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        waiting, provider = set(range(self.count)), ""
        while waiting:
            if self._stopping:
                raise StartupError("stopped while the workers were starting")
            try:
                index, provider_, error = self._ready.get(timeout=0.2)
            except queue.Empty:
                dead = [i for i in waiting if not self._alive(i)]
                if dead or time.monotonic() > deadline:
                    raise StartupError(
                        f"worker {dead[0] if dead else min(waiting)} did not start (its log is above)"
                    ) from None
                continue
            if error:
                raise StartupError(f"worker {index} could not start: {error}")
            waiting.discard(index)
            provider = provider_
        return provider

    def _supervise(self, worker: ServerConfig) -> None:
        while not self._stopping:
            sentinels = [p.sentinel for p in self._procs if p is not None]
            multiprocessing.connection.wait(sentinels, timeout=0.25)
            with contextlib.suppress(queue.Empty):
                while True:  # readiness of restarted workers (their ports are in the status already)
                    self._ready.get_nowait()
            now = time.monotonic()
            for index, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive() and not self._stopping:
                    self._died(index, proc, now)
            for index, due in list(self._due.items()):
                if now >= due and not self._stopping:
                    del self._due[index]
                    self._start(worker, index)

    def _died(self, index: int, proc: BaseProcess, now: float) -> None:
        self._status.down(index)
        self._procs[index] = None
        young = now - self._started[index] < YOUNG
        pause = self._pause[index] if young else RESTART_PAUSE
        self._pause[index] = min(pause * 2, MAX_RESTART_PAUSE) if young else RESTART_PAUSE
        self._restarts.labels(str(index)).inc()
        code = proc.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        log.warning(
            "worker %d (pid %s) died (%s); restarting it in %.1f s. Its clients reconnect and "
            "resume their sessions on the other workers meanwhile",
            index,
            proc.pid,
            how,
            pause,
        )
        self._due[index] = now + pause

    def _alive(self, index: int) -> bool:
        proc = self._procs[index]
        return proc is not None and proc.is_alive()

    def _stop(self, signum: int, frame: object) -> None:
        if not self._stopping:
            log.info("stopping %d workers (each drains within --grace %g s)", self.count, self.config.grace)
        self._stopping = True

    def _rescan(self, signum: int, frame: object) -> None:
        """SIGHUP: every worker looks at the model repository now."""
        for proc in self._procs:
            if proc is not None and proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGHUP)

    def _stop_all(self) -> None:
        procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace + 10
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker %s did not stop in time: killed", proc.name)
                proc.kill()
                proc.join()

    def _metrics_endpoint(self) -> MetricsEndpoint | None:
        if not self.config.metrics_port:
            return None
        port = 0 if self.config.metrics_port == ANY_FREE_PORT else self.config.metrics_port
        try:
            return MetricsEndpoint(self.registry, self.config.host, port)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {self.config.host}:{port} ({exc}); see --metrics-port (0: off)"
            ) from exc


def _hold_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind the port with SO_REUSEPORT and keep it bound (never listening: it takes no connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError as exc:
        holder.close()
        raise StartupError(f"cannot listen on {host}:{port} ({exc}); is the port in use? see --port") from exc
    return holder, holder.getsockname()[1]


def _threads(count: int) -> str:
    """How many onnxruntime threads each worker runs, for the log line."""
    return f"{count} onnxruntime thread{'s' if count > 1 else ''} each"
