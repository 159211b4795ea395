"""Server settings: one frozen object, whose fields are ``nextword serve``'s options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nextword.bundle import DEMO_BUNDLE
from nextword.options import option

ANY_FREE_PORT = -1  # metrics_port value that binds a free port (tests); 0 turns metrics off
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerConfig:
    model: Path = option(DEMO_BUNDLE, "bundle directory to serve (the demo model ships with nextword)")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(50051, "gRPC port (0: a free port, named in the log)")
    metrics_port: int = option(9100, "Prometheus /metrics port (0: off, -1: a free port)")
    device: str = option(
        "auto", "where the model runs (auto: CUDA when a GPU is there)", choices=("auto", "cpu", "cuda")
    )
    max_sessions: int = option(100_000, "sessions held at once; the least recently used idle one makes room")
    session_ttl: float = option(600.0, "seconds a session with no stream attached is kept for a resume")
    max_text_chars: int = option(4096, "longest text accepted in one request, and longest unfinished word")
    max_k: int = option(50, "most suggestions one request may ask for")
    default_k: int = option(3, "suggestions given when a request does not say", cli=False)
    grace: float = option(10.0, "seconds open streams may finish after SIGTERM")
    threads: int = option(0, "onnxruntime intra-op threads (0: its default)")
    max_batch: int = option(64, "most session steps run in one onnxruntime call")
    max_delay_ms: float = option(
        0.5, "how long a step waits under load for others to share its call (0: never)"
    )
    max_message_bytes: int = option(64 * 1024, "", cli=False)
    log_level: str = option("info", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        # Fail at startup with the flag to fix, not at the first request.
        checks = {
            "--max-sessions": self.max_sessions >= 1,
            "--session-ttl": self.session_ttl > 0,
            "--max-text-chars": self.max_text_chars >= 1,
            "--max-k": self.max_k >= 1,
            "--grace": self.grace >= 0,
            "--threads": self.threads >= 0,
        }
        bad = [flag for flag, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {', '.join(bad)}: must be positive (--grace and --threads may be 0)")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default k {self.default_k} must be between 1 and --max-k {self.max_k}")
        if self.max_batch < 1 or self.max_delay_ms < 0:
            raise ValueError("need --max-batch >= 1 and --max-delay-ms >= 0")
