"""Server settings: one frozen object, whose fields are ``nextword serve``'s options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nextword.bundle import DEMO_BUNDLE
from nextword.options import option, switch
from nextword.ranking import CACHE_WEIGHT, FOLLOW_WEIGHT

ANONYMOUS = "anonymous"  # the principal of every caller of a server that authenticates nobody
ANY_FREE_PORT = -1  # metrics_port value that binds a free port (tests); 0 turns metrics off
LOG_LEVELS = ("debug", "info", "warning", "error")


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class ServerConfig:
    model: Path = option(DEMO_BUNDLE, "bundle directory to serve (the demo model ships with nextword)")
    model_repository: Path | None = option(
        None,
        "serve every bundle under DIR/NAME/VERSION/ instead of --model (VERSION a whole number); new "
        "versions are loaded without a restart, open sessions finish on the version they began on",
        metavar="DIR",
    )
    model_versions: int = option(1, "newest versions of each repository model that take new sessions")
    model_control: str = option(
        "poll",
        "how the repository is reloaded: poll (every --repository-poll seconds, and on SIGHUP) or "
        "explicit (on SIGHUP and KServe RepositoryModelLoad/Unload only)",
        choices=("poll", "explicit"),
    )
    repository_poll: float = option(2.0, "seconds between looks at --model-repository (poll)")
    default_model: str = option(
        "", "the model a request that names none gets (default: the only one served)", metavar="NAME"
    )
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(50051, "gRPC port (0: a free port, named in the log)")
    metrics_port: int = option(9100, "Prometheus /metrics port (0: off, -1: a free port)")
    device: str = option(
        "auto", "where the model runs (auto: CUDA when a GPU is there)", choices=("auto", "cpu", "cuda")
    )
    max_sessions: int = option(100_000, "sessions held at once; the least recently used idle one makes room")
    session_ttl: float = option(600.0, "seconds a session with no stream attached is kept for a resume")
    max_text_chars: int = option(
        4096, "longest text accepted in one request, in characters as sent (cost is counted in tokens)"
    )
    max_k: int = option(50, "most suggestions one request may ask for")
    default_k: int = option(3, "suggestions given when a request does not say", cli=False)
    grace: float = option(
        10.0, "seconds requests in progress may take after SIGTERM (streams then end, clients resume)"
    )
    threads: int = option(
        0, "onnxruntime intra-op threads per worker (0: the cores this process may use, shared among workers)"
    )
    huge_pages: bool = switch(
        "keep the model's memory in 4 KB pages (by default, on Linux with glibc 2.35+ and huge pages on "
        "madvise, the server restarts itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: the "
        "weights each step reads then sit in 2 MB pages; server/hugepages.py)",
        off="--no-huge-pages",
    )
    max_batch: int = option(64, "most session steps run in one onnxruntime call")
    max_delay_ms: float = option(
        5.0,
        "most a step waits under load for others to share its call; the wait ends as soon as one "
        "more step than the last call had is queued (0: never wait)",
    )
    lone_poll_us: float = option(
        2000.0,
        "microseconds the event loop polls for a lone stream's next request after each reply instead "
        "of sleeping: the core and caches stay warm for one typist (costs that much CPU; 0: off)",
    )
    cache_weight: float = option(
        CACHE_WEIGHT,
        "share of the cache of a user's own words in the next-word distribution of a session "
        "that asks to learn (Strip.learn; 0: learning sessions behave as others)",
    )
    cache_follow_weight: float = option(
        FOLLOW_WEIGHT,
        "share, beside --cache-weight's, of the words that followed the user's latest word earlier "
        "in a learning session (a cache of the user's word pairs; 0: words alone)",
    )
    max_message_bytes: int = option(64 * 1024, "", cli=False)
    log_level: str = option("info", "log level", choices=LOG_LEVELS)
    loop: str = option(
        "auto",
        "event loop: uvloop (less CPU per reply than asyncio's own) or asyncio (auto: uvloop when installed)",
        choices=("auto", "asyncio", "uvloop"),
    )

    # ---- processes and where sessions live (server/workers.py, server/store.py)
    workers: str = option(
        "1",
        "worker processes sharing the port, each with its own model and batcher; one /metrics for "
        "all, a worker that dies is restarted (auto: one per core)",
        metavar="N|auto",
    )
    session_store: str = option(
        "auto",
        "where every session is kept so it resumes on any worker or replica and outlives any "
        "process: none, embedded (a SQLite file the workers of this machine share), sqlite:///PATH, "
        "or redis://HOST:PORT/DB for replicas (auto: embedded with several workers, else none)",
        metavar="STORE",
    )
    store_interval: float = option(
        0.005,
        "least seconds between two writes to the session store: a session that advances faster is "
        "stored as it stands then (one write for several words); what a killed process had not "
        "written yet the client library resends on resume (it keeps its last 256 requests)",
    )
    # Set by the supervisor for the processes it starts (server/workers.py).
    worker: int = option(-1, "", cli=False)  # this process's worker number; -1: no supervisor
    reuse_port: bool = option(False, "", cli=False)  # share the port with the other workers
    # A folder where every worker keeps its ModelStatistics counts (server/stats.py); "": in memory.
    stats_dir: str = option("", "", cli=False)

    # ---- transport security and identity (server/security.py)
    tls_cert: Path | None = option(None, "PEM certificate chain: serve TLS (with --tls-key)")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = option(
        None,
        "PEM CA bundle: require client certificates it signed (mutual TLS); the principal is the cert's name",
    )
    tokens_file: Path | None = option(
        None, "bearer tokens: lines 'SHA256-HEX PRINCIPAL' (re-read when it changes; see nextword token)"
    )
    control_principals: str = option(
        "",
        "principals that may load and unload models with --model-control explicit, comma-separated "
        "(default: every caller when the server authenticates nobody, nobody when it does)",
        metavar="NAME,...",
    )
    expose_manifest: bool = switch(
        "GetModelInfo returns the whole manifest, local paths and commands included"
    )

    # ---- cost, counted in model tokens (server/admission.py, server/batcher.py)
    max_request_tokens: int = option(2048, "most tokens one request may add, after normalisation")
    max_word_chars: int = option(
        100, "longest unfinished word a session may hold, in characters after normalisation"
    )
    max_inflight_tokens: int = option(
        65536, "model tokens queued or running on the whole server; past it requests get RESOURCE_EXHAUSTED"
    )
    prefill_chunk_tokens: int = option(
        16, "a long request runs in chunks of this many tokens between others' steps"
    )
    prefill_call_tokens: int = option(
        64, "most tokens of long requests' chunks run in one onnxruntime call (a typed word waits for one)"
    )

    # ---- connections and streams (grpc core settings; server/app.py)
    max_concurrent_rpcs: int = option(10_000, "calls and streams open at once; more get RESOURCE_EXHAUSTED")
    # Not HTTP/2's customary 100: the load tester and proxies carry hundreds of sessions on one
    # connection, and streams opened before the client has the limit are refused (UNAVAILABLE).
    max_streams_per_connection: int = option(1000, "concurrent streams one HTTP/2 connection may open")
    idle_stream_timeout: float = option(
        300.0, "seconds a stream may wait for its next message (also bounds a half-written one)"
    )
    max_connection_age: float = option(
        1800.0, "seconds before a connection is asked to go away (rebalancing)"
    )
    connection_age_grace: float = option(30.0, "seconds calls may finish on a connection past its age")
    keepalive_time: float = option(60.0, "seconds between server pings on an idle connection")
    keepalive_timeout: float = option(
        20.0, "seconds to wait for a ping's answer before closing the connection"
    )
    min_client_ping_interval: float = option(
        10.0, "fewest seconds allowed between a client's keepalive pings"
    )

    def __post_init__(self) -> None:
        # Fail at startup with the flag to fix, not at the first request.
        checks = {
            "--max-sessions": self.max_sessions >= 1,
            "--session-ttl": self.session_ttl > 0,
            "--max-text-chars": self.max_text_chars >= 1,
            "--max-k": self.max_k >= 1,
            "--grace": self.grace >= 0,
            "--threads": self.threads >= 0,
            "--store-interval": self.store_interval >= 0,
            "--model-versions": self.model_versions >= 1,
            "--repository-poll": self.repository_poll > 0,
        }
        bad = [flag for flag, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid {', '.join(bad)}: must be positive (or 0: --grace, --threads, --store-interval)"
            )
        if not 0 <= self.cache_weight < 1:
            raise ValueError(f"invalid --cache-weight {self.cache_weight:g}: a share, from 0 up to (not) 1")
        if not 0 <= self.cache_follow_weight < 1 - self.cache_weight:
            raise ValueError(
                f"invalid --cache-follow-weight {self.cache_follow_weight:g}: a share, from 0, with "
                "--cache-weight less than 1"
            )
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default k {self.default_k} must be between 1 and --max-k {self.max_k}")
        if self.max_batch < 1 or self.max_delay_ms < 0 or self.lone_poll_us < 0:
            raise ValueError("need --max-batch >= 1, --max-delay-ms >= 0 and --lone-poll-us >= 0")
        self._check_network()
        self._check_cost()
        self.worker_count  # noqa: B018  # raises for a bad --workers

    @property
    def worker_count(self) -> int:
        """How many worker processes ``--workers`` asks for (auto: the cores this process may use)."""
        if self.workers == "auto":
            return usable_cores()
        try:
            count = int(self.workers)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"invalid --workers {self.workers!r}: a number of processes (1 or more) or auto")
        return count

    @property
    def intra_op_threads(self) -> int:
        """onnxruntime threads per worker: ``--threads``, else the cores split among the workers.

        onnxruntime's own default is a pool as large as the machine in every process, whose
        threads spin between calls: N workers would spin N pools on cores their event loops need.
        """
        return self.threads or max(1, usable_cores() // self.worker_count)

    @property
    def onnx_spin(self) -> bool:
        """Whether onnxruntime's threads spin while waiting for work: only a lone worker's, and only
        within a call (server/repository.py); several workers share the cores, and a spinning pool
        would take them from the others' event loops."""
        return self.worker_count == 1

    @property
    def store_spec(self) -> str:
        """``--session-store`` with auto resolved (embedded stays for the supervisor to place)."""
        if self.session_store == "auto":
            return "embedded" if self.worker_count > 1 else "none"
        return self.session_store

    def _check_cost(self) -> None:
        """The limits counted in model tokens (server/admission.py, server/batcher.py)."""
        sizes = {
            "--max-request-tokens": self.max_request_tokens,
            "--max-word-chars": self.max_word_chars,
            "--prefill-chunk-tokens": self.prefill_chunk_tokens,
        }
        bad = [flag for flag, value in sizes.items() if value < 1]
        if bad:
            raise ValueError(f"invalid {', '.join(bad)}: must be at least 1")
        if self.prefill_call_tokens < self.prefill_chunk_tokens:
            raise ValueError("--prefill-call-tokens must be at least --prefill-chunk-tokens")
        if self.max_inflight_tokens < self.max_request_tokens:
            raise ValueError("--max-inflight-tokens must be at least --max-request-tokens (one must fit)")

    @property
    def authenticates(self) -> bool:
        """Whether callers have principals of their own (bearer tokens or client certificates)."""
        return self.tokens_file is not None or self.tls_client_ca is not None

    @property
    def controllers(self) -> frozenset[str]:
        """The principals ``--control-principals`` lets load and unload models (its default: every
        caller, all anonymous, where nobody is authenticated; none where callers are)."""
        named = frozenset(p.strip() for p in self.control_principals.split(",") if p.strip())
        return named or (frozenset() if self.authenticates else frozenset({ANONYMOUS}))

    def _check_network(self) -> None:
        """The security and connection settings (the files themselves are read at startup)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both, or neither for plaintext")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        positive = {
            "--max-concurrent-rpcs": self.max_concurrent_rpcs,
            "--max-streams-per-connection": self.max_streams_per_connection,
            "--idle-stream-timeout": self.idle_stream_timeout,
            "--max-connection-age": self.max_connection_age,
            "--keepalive-time": self.keepalive_time,
            "--keepalive-timeout": self.keepalive_timeout,
        }
        may_be_zero = {
            "--connection-age-grace": self.connection_age_grace,
            "--min-client-ping-interval": self.min_client_ping_interval,
        }
        bad = [flag for flag, value in positive.items() if not value > 0]
        bad += [flag for flag, value in may_be_zero.items() if not value >= 0]
        if bad:
            raise ValueError(
                f"invalid {', '.join(bad)}: must be positive "
                "(--connection-age-grace and --min-client-ping-interval may be 0)"
            )
