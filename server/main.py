"""``nextword serve``: run the server until SIGTERM or Ctrl-C, then drain and stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from nextword.bundle import BundleError
from nextword.options import from_args

from .app import StartupError, start_server
from .config import ServerConfig

log = logging.getLogger("nextword.server")


async def serve(config: ServerConfig) -> int:
    running = await start_server(config)
    m = running.bundle.manifest
    log.info(
        "nextword serving %s (%s, %s) on %s:%d, metrics on :%d",
        m.name,
        m.cell,
        running.provider,
        config.host,
        running.port,
        running.metrics_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "shutting down: health NOT_SERVING, new calls refused, session streams end after their "
        "current reply (clients resume them); stopping within %g s (--grace)",
        config.grace,
    )
    await running.stop(config.grace)
    log.info("stopped")
    return 0


def main(args: argparse.Namespace) -> int:
    """Exit 0 after a clean shutdown, 2 when the server cannot start."""
    try:
        config = from_args(ServerConfig, args)
    except ValueError as exc:  # an out-of-range flag
        return _startup_failed(exc)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(serve(config))
    except (BundleError, StartupError) as exc:
        return _startup_failed(exc)


def _startup_failed(exc: Exception) -> int:
    # The message says what to fix; a traceback would only bury it.
    print(f"nextword serve: error: {exc}", file=sys.stderr)
    return 2
