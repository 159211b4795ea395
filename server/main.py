"""``nextword serve``: run the server until SIGTERM or Ctrl-C, then drain and stop."""

from __future__ import annotations

import argparse
import logging
import sys

from nextword.bundle import BundleError
from nextword.options import from_args

from .config import ServerConfig
from .hugepages import restart_with_huge_pages

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(args: argparse.Namespace) -> int:
    """Exit 0 after a clean shutdown, 2 when the server cannot start."""
    try:
        config = from_args(ServerConfig, args)
    except ValueError as exc:  # an out-of-range flag
        return _startup_failed(exc)
    if config.huge_pages:
        restart_with_huge_pages()  # returns only when there is nothing to do
    # Imported after that restart: grpc and onnxruntime load once.
    from .app import StartupError, run, serve
    from .workers import Supervisor

    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    try:
        if config.worker_count > 1:
            return Supervisor(config).run()
        return run(config, serve(config))
    except (BundleError, StartupError) as exc:
        return _startup_failed(exc)


def _startup_failed(exc: Exception) -> int:
    # The message says what to fix; a traceback would only bury it.
    print(f"nextword serve: error: {exc}", file=sys.stderr)
    return 2
