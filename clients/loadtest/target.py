"""Which servers a load test may aim at: this machine only, unless told otherwise."""

from __future__ import annotations

import ipaddress

from .errors import LoadTestError


def is_loopback_target(target: str) -> bool:
    """Whether HOST:PORT (or [V6]:PORT, or a bare host) names this machine: 127.0.0.0/8, ::1, localhost.

    Host names other than ``localhost`` are not resolved: a name is refused even
    if it happens to point here, which errs on the safe side.
    """
    host = target
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        host = host.removeprefix(scheme)
    if host.startswith("["):  # [::1]:50051
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:  # 127.0.0.1:50051 (more than one colon: a bare IPv6 address)
        host = host.rsplit(":", 1)[0]
    host = host.strip().lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(target: str, *, allow_remote: bool = False) -> None:
    """Raise ``LoadTestError`` for a target that is not loopback, unless ``allow_remote``."""
    if not allow_remote and not is_loopback_target(target):
        raise LoadTestError(
            f"refusing to load-test {target!r}: not a loopback address (127.0.0.0/8, ::1, localhost); "
            "pass --allow-remote to load a server on another host"
        )
