"""Which servers a load test may aim at: this machine only, unless told otherwise."""

from __future__ import annotations

from ..channel import is_loopback_target  # also decides where a token may go without TLS
from .errors import LoadTestError

__all__ = ["check_target", "is_loopback_target"]


def check_target(target: str, *, allow_remote: bool = False) -> None:
    """Raise ``LoadTestError`` for a target that is not loopback, unless ``allow_remote``."""
    if not allow_remote and not is_loopback_target(target):
        raise LoadTestError(
            f"refusing to load-test {target!r}: not a loopback address (127.0.0.0/8, ::1, localhost); "
            "pass --allow-remote to load a server on another host"
        )
