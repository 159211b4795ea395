"""Idle-session memory, measured in a process of its own (``--worker memory``).

``start_server`` in this process, sessions opened through the servicer's
``Session`` method (the RPC handler, without the network) with a stand-in for
grpc's ServicerContext, and the process's RSS before and after.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from nextword.server.app import start_server
from nextword.server.config import ServerConfig
from nextword.server.service import NextWordServicer
from nextword.v1 import nextword_pb2 as pb

WORDS = "the old man sat by the river and looked at the sea".split()


class _Context:
    """Just enough of ``grpc.aio.ServicerContext`` to call the servicer's ``Session`` directly."""

    def __init__(self) -> None:
        self.replies = 0

    async def write(self, message: Any) -> None:
        self.replies += 1

    async def abort(self, code: Any, details: str = "", *args: Any) -> None:
        raise RuntimeError(f"the server aborted a session: {code}: {details}")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def add_done_callback(self, callback: Any) -> None:
        pass

    def set_code(self, code: Any) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _requests(i: int) -> AsyncIterator[Any]:
    # Two words, so each session holds a state of its own (not the shared initial one).
    yield pb.SessionRequest(text=f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} ", k=3)


async def _open_sessions(servicer: NextWordServicer, n: int, concurrency: int) -> None:
    # A fixed pool of workers, not n tasks: n live tasks would themselves inflate the RSS measured.
    next_index = iter(range(n))

    async def worker() -> None:
        for i in next_index:
            await servicer.Session(_requests(i), _Context())  # type: ignore[arg-type]

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))


async def _memory(bundle_dir: Path, threads: int, sessions: int, concurrency: int = 256) -> dict[str, Any]:
    warmup = 4 * concurrency
    config = ServerConfig(
        model=bundle_dir, port=0, metrics_port=0, threads=threads, max_sessions=sessions + warmup + 16
    )
    running = await start_server(config)
    try:
        # onnxruntime's buffers for every batch size, the table's first growth.
        await _open_sessions(running.servicer, warmup, concurrency)
        gc.collect()
        before = _rss_bytes()
        start = time.perf_counter()
        await _open_sessions(running.servicer, sessions, concurrency)
        elapsed = time.perf_counter() - start
        gc.collect()
        after = _rss_bytes()
        active = running.metrics.registry.get_sample_value("nextword_active_sessions")
    finally:
        await running.stop(0)
    return {
        "sessions": sessions,
        "active_sessions": active,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_session": (after - before) / sessions,
        "sessions_per_s": sessions / elapsed,
    }


def worker_memory(bundle_dir: Path, threads: int, sessions: int) -> dict[str, Any]:
    return asyncio.run(_memory(bundle_dir, threads, sessions))
