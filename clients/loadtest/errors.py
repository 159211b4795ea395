"""Why a load test could not run at all."""

from __future__ import annotations


class LoadTestError(Exception):
    """The load test could not run at all (bad spec, refused target, no server); the message says why."""


class TargetUnreachable(LoadTestError):
    """No server answered at the target."""
