"""Server settings: one frozen object built from ``nextword serve``'s arguments."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

ANY_FREE_PORT = -1  # metrics_port value that binds a free port (tests); 0 turns metrics off


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    host: str = "127.0.0.1"
    port: int = 50051  # 0: let the OS pick a free port (the log line says which)
    metrics_port: int = 0  # 0: no /metrics endpoint; ANY_FREE_PORT: a free port
    device: str = "auto"
    max_sessions: int = 100_000
    session_ttl: float = 600.0  # seconds a session with no stream attached is kept
    max_text_chars: int = 4096
    max_k: int = 50
    default_k: int = 3
    grace: float = 10.0  # seconds open streams may run on after SIGTERM
    threads: int = 0  # onnxruntime intra-op threads; 0: its default
    max_batch: int = 64
    max_delay_ms: float = 0.5  # how long a lone model call waits for others to batch with
    max_message_bytes: int = 64 * 1024

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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """From the namespace ``nextword serve`` parses (see nextword/cli.py)."""
        return cls(
            model=Path(args.model),
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            device=args.device,
            max_sessions=args.max_sessions,
            session_ttl=args.session_ttl,
            max_text_chars=args.max_text_chars,
            max_k=args.max_k,
            grace=args.grace,
            threads=args.threads,
            max_batch=args.max_batch,
            max_delay_ms=args.max_delay_ms,
        )
