"""Real nextword servers for tests: a ``nextword serve`` process, or a server on its own event
loop in a thread of the test process (for blocking clients, which would stall the test's loop)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nextword.server.config import ServerConfig
from tests.services import free_port
from tests.typists import MAX_TEXT

ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"nextword serving \S+ \([^)]*\) on [\d.]+:(\d+), metrics on :(\d+)")
WORKER = re.compile(r"worker (\d+) \(pid (\d+)\) serving")


@contextmanager
def in_thread(config: ServerConfig) -> Iterator[str]:
    """A server started with ``config`` on its own event loop in a background thread; its HOST:PORT."""
    from nextword.server.app import start_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nextword-test-server", daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_server(config), loop).result(timeout=60)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@dataclass
class Server:
    """A ``nextword serve`` process: its port, /metrics port and (with workers) each worker's pid."""

    proc: asyncio.subprocess.Process
    port: int
    metrics_port: int
    workers: dict[int, int] = field(default_factory=dict)
    log: str = ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str) -> dict[str, float]:
        """Samples of ``name`` on /metrics, by their label text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                labels, _, value = line[len(name) :].rpartition(" ")
                found[labels] = float(value)
        return found

    async def rest_of_log(self) -> str:
        assert self.proc.stderr is not None
        return self.log + (await self.proc.stderr.read()).decode()


async def start(bundle: Path, *args: str, port: int | None = None) -> Server:
    """``nextword serve`` on ``port`` (a free one if None) with ``args``, returned once it serves."""
    port = port or free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "nextword.cli", "serve", "--model", str(bundle), "--port", str(port)),
        *("--metrics-port", "-1", "--threads", "1", "--device", "cpu", "--max-text-chars", str(MAX_TEXT)),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    server = Server(proc, port, 0)
    while (match := SERVING.search(server.log)) is None:
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=120)
        assert line, f"nextword serve exited before serving:\n{server.log}"
        server.log += line.decode()
        if (worker := WORKER.search(line.decode())) is not None:
            server.workers[int(worker.group(1))] = int(worker.group(2))
    server.metrics_port = int(match.group(2))
    return server


@asynccontextmanager
async def serving(bundle: Path, *args: str) -> AsyncIterator[Server]:
    """``nextword serve`` on a free port with ``args``, until the block ends (SIGTERM, then a wait)."""
    server = await start(bundle, *args)
    proc = server.proc
    try:
        yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), timeout=60)
