"""Prometheus metrics, on a registry of each server's own (tests run several in one process)."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

# 50 µs to 1 s: a one-word step on CPU is tens of µs to a few ms; a batch or a long prefill more.
LATENCY_BUCKETS = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


MODEL_LABELS = ["model", "version"]  # a model repository's name and version folder


class Metrics:
    """Every metric the server exports, registered on ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.request_duration = Histogram(
            "nextword_request_duration_seconds",
            "Time to answer one request (one stream message or call)",
            ["method"],
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.active_sessions = Gauge("nextword_active_sessions", "Sessions held in memory", registry=reg)
        self.errors = Counter(
            "nextword_errors",
            "Requests that ended in an error status",
            ["method", "code"],
            registry=reg,
        )
        self.refused = Counter(
            "nextword_refused",
            "Requests refused before they reach the model, by reason",
            ["reason"],
            registry=reg,
        )
        self.open_streams = Gauge("nextword_open_streams", "Session streams open now", registry=reg)
        self.inflight_tokens = Gauge(
            "nextword_inflight_tokens",
            "Model tokens queued or running (see --max-inflight-tokens)",
            registry=reg,
        )
        self.max_sessions = Gauge(
            "nextword_max_sessions", "Sessions this process may hold (--max-sessions)", registry=reg
        )
        self._model_metrics(reg)
        self._store_metrics(reg)

    def _model_metrics(self, reg: CollectorRegistry) -> None:
        """Each model version's (server/batcher.py, server/repository.py), labelled by name and version."""
        self.words = Counter("nextword_words", "Tokens run through the model", MODEL_LABELS, registry=reg)
        self.onnx_compute = Histogram(
            "nextword_onnx_compute_seconds",
            "onnxruntime time per batched graph call (compute time per batch)",
            ["graph", *MODEL_LABELS],
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "nextword_batch_size",
            "Requests served by one graph call",
            MODEL_LABELS,
            registry=reg,
            buckets=BATCH_BUCKETS,
        )
        self.queue_wait = Histogram(
            "nextword_queue_wait_seconds",
            "Time a model call waited in the batcher's queue before its batch ran",
            MODEL_LABELS,
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.model_info = Info(
            "nextword_model",
            "Each model version being served (and its sessions' till they end)",
            MODEL_LABELS,
            registry=reg,
        )
        self.model_loads = Counter(
            "nextword_model_loads",
            "Model versions loaded, or refused (files that fail their checksums, a bad manifest)",
            [*MODEL_LABELS, "result"],
            registry=reg,
        )

    def _store_metrics(self, reg: CollectorRegistry) -> None:
        """The session store's (server/store.py): every step's record is written there after its reply."""
        self.store_up = Gauge(
            "nextword_session_store_up",
            "1 while the session store answers, 0 while it is down (sessions then live in this process only)",
            ["store"],
            registry=reg,
        )
        self.store_seconds = Histogram(
            "nextword_session_store_seconds",
            "Time of one session-store operation (write: one per model call, for its whole batch)",
            ["op"],
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.store_errors = Counter(
            "nextword_session_store_errors",
            "Session-store operations that failed (the store was unreachable or refused)",
            ["op"],
            registry=reg,
        )
        self.store_conflicts = Counter(
            "nextword_session_store_conflicts",
            "Steps not stored because another stream (maybe on another worker or replica) took the session",
            registry=reg,
        )


class MetricsEndpoint:
    """``/metrics`` over HTTP in a background thread (prometheus_client's own server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
