"""Rolling restarts: a server that drains on SIGTERM, sessions that type through a restart unharmed,
and ``nextword loadtest`` failing when requests fail."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextword.cli import build_parser
from nextword.clients.client import AsyncNextWordClient, NextWordClient, Prediction, Reconnect
from nextword.clients.loadtest.cli import main as loadtest_main
from nextword.server.app import SERVICE_NAME, start_server
from nextword.server.config import ServerConfig
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.conftest import serve_process
from tests.servers import start
from tests.typists import Typist, assert_same, pieces

ROOT = Path(__file__).resolve().parent.parent
SESSIONS = 32
DRAINED = re.compile(r"shutting down: reconnect and resume this session by its id")
REFUSED = re.compile(r"shutting down and takes no new calls")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(bundle: Path, port: int) -> asyncio.subprocess.Process:
    """``nextword serve`` on ``port``, returned once it serves (its stderr is read again at the end)."""
    return (await start(bundle, "--grace", "10", port=port)).proc


@pytest.mark.slow
async def test_sessions_type_through_a_restart_without_an_error(tiny_bundle: Path, tiny_corpus: Path) -> None:
    words = (tiny_corpus / "test.txt").read_text(encoding="utf-8").split()
    port = _free_port()
    first = await _serve(tiny_bundle, port)
    second: asyncio.subprocess.Process | None = None
    try:
        async with AsyncNextWordClient(f"127.0.0.1:{port}", timeout=10) as client:
            typists = [
                Typist(client, pieces(words[i * 40 : i * 40 + 400], random.Random(i)))
                for i in range(SESSIONS)
            ]
            sigterm, restarted = asyncio.Event(), asyncio.Event()
            tasks = [asyncio.create_task(t.run(sigterm, restarted, after=5)) for t in typists]
            while min(len(t.typed) for t in typists) < 5:  # everyone is typing
                await asyncio.sleep(0.05)
            first.send_signal(signal.SIGTERM)
            sigterm.set()
            start = time.monotonic()
            assert await asyncio.wait_for(first.wait(), timeout=15) == 0
            drain_s = time.monotonic() - start
            second = await _serve(tiny_bundle, port)  # the same port: the old server has let it go
            restarted.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)  # no caller saw an error

            await asyncio.gather(*(t.check() for t in typists))
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()
    assert drain_s < 5, f"the drain took {drain_s:.1f} s"
    assert all(t.reconnects >= 1 and t.last_id != t.first_id for t in typists)  # rebuilt: sessions were lost
    assert first.stderr is not None
    assert b"Traceback" not in await first.stderr.read()


def test_a_sync_session_resumes_on_the_same_server_when_its_connection_is_recycled(
    tiny_bundle: Path, tiny_corpus: Path
) -> None:
    # --max-connection-age ends every stream still open a moment after it: UNAVAILABLE, with the
    # server still holding the session, which is then resumed by its id (not rebuilt).
    words = (tiny_corpus / "test.txt").read_text(encoding="utf-8").split()[:40]
    age = ("--max-connection-age", "0.4", "--connection-age-grace", "0.1")
    with serve_process(tiny_bundle, *age) as target, NextWordClient(target, timeout=10) as client:
        typed: list[tuple[str, Prediction]] = []
        with client.session(k=3) as session:
            typed.append((words[0] + " ", session.send(words[0] + " ")))
            first_id = session.session_id
            for word in words[1:]:
                time.sleep(0.02)
                typed.append((word + " ", session.send(word + " ")))
            assert session.reconnects >= 1 and session.session_id == first_id
            assert session.seq > len(words)  # the resumes counted too: the same session all along
        text = ""
        for piece, got in typed:
            text += piece
            assert_same(got, client.predict(text, k=3), f"after {text[-40:]!r}")


# ---------------------------------------------------------------------------- what is retried

_Step = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]  # how one stream is ended
DRAIN: _Step = (grpc.StatusCode.UNAVAILABLE, "the server is shutting down", ())
BUSY: _Step = (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("grpc-retry-pushback-ms", "200"),))


class _Scripted(pb_grpc.NextWordServicer):
    """Ends the first streams as ``script`` says, at their first request; answers the ones after."""

    def __init__(self, script: list[_Step]) -> None:
        self.script = script
        self.streams = 0
        self.lock = threading.Lock()

    def Session(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.streams += 1
            step = self.script.pop(0) if self.script else None
        for request in request_iterator:
            if step is not None:
                context.set_trailing_metadata(step[2])
                context.abort(step[0], step[1])
            yield pb.SessionReply(session_id="s1", seq=1, prediction=pb.Prediction(partial=request.text))


@contextmanager
def _scripted(*script: _Step) -> Iterator[tuple[str, _Scripted]]:
    servicer = _Scripted(list(script))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_NextWordServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


FAST = Reconnect(attempts=3, backoff=0.01)


@pytest.mark.parametrize(
    ("script", "code", "details", "streams"),
    [
        ((DRAIN, BUSY), None, "", 3),  # a busy server's pushback is waited out while reconnecting
        ((DRAIN, DRAIN, DRAIN), None, "", 4),
        ((DRAIN,) * 4, grpc.StatusCode.UNAVAILABLE, "could not reconnect (3 attempts", 4),
        ((DRAIN, (*BUSY[:2], ())), grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", 2),  # no pushback
        (((grpc.StatusCode.INVALID_ARGUMENT, "bad k", ()),), grpc.StatusCode.INVALID_ARGUMENT, "bad k", 1),
        (((grpc.StatusCode.PERMISSION_DENIED, "not yours", ()),), grpc.StatusCode.PERMISSION_DENIED, "", 1),
        (((grpc.StatusCode.ABORTED, "taken over", ()),), grpc.StatusCode.ABORTED, "taken over", 1),
    ],
)
async def test_only_the_servers_failures_are_retried(
    script: tuple[_Step, ...], code: grpc.StatusCode | None, details: str, streams: int
) -> None:
    with _scripted(*script) as (target, servicer):
        async with AsyncNextWordClient(target, timeout=5) as client, client.session(reconnect=FAST) as s:
            start = time.monotonic()
            if code is None:
                assert (await s.send("the ca")).partial == "the ca"
                assert s.reconnects == streams - 1 and not s.closed
            else:
                with pytest.raises(grpc.RpcError) as err:
                    await s.send("the ca")
                assert err.value.code() == code and details in (err.value.details() or "") and s.closed
        assert servicer.streams == streams
    if BUSY in script:
        assert time.monotonic() - start >= 0.2  # waited as long as the server asked


def test_a_sync_session_waits_out_a_busy_server_too() -> None:
    with _scripted(DRAIN, BUSY) as (target, servicer), NextWordClient(target, timeout=5) as client:
        with client.session(reconnect=FAST) as s:
            start = time.monotonic()
            assert s.send("the ca").partial == "the ca" and s.reconnects == 2
            assert time.monotonic() - start >= 0.2
        servicer.script.append(DRAIN)
        with client.session(reconnect=Reconnect(attempts=0)) as s:
            with pytest.raises(grpc.RpcError) as err:
                s.send("the ")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and s.reconnects == 0


# ---------------------------------------------------------------------------- the drain itself


@asynccontextmanager
async def _in_process_server(bundle: Path) -> AsyncIterator[Any]:
    running = await start_server(
        ServerConfig(model=bundle, port=0, metrics_port=0, device="cpu", threads=1, log_level="warning")
    )
    try:
        yield running
    finally:
        await running.stop(None)


async def _until_end(call: Any) -> tuple[list[Any], grpc.StatusCode, str]:
    """The replies a stream still has, then how it ended."""
    replies = []
    try:
        while (reply := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            replies.append(reply)
    except grpc.aio.AioRpcError as exc:
        return replies, exc.code(), exc.details() or ""
    return replies, await call.code(), await call.details()


async def test_drain_answers_requests_in_flight_then_ends_streams(tiny_bundle: Path) -> None:
    async with (
        _in_process_server(tiny_bundle) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub, health = pb_grpc.NextWordStub(channel), health_pb2_grpc.HealthStub(channel)
        watch: Any = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        idle: Any = stub.Session()
        await idle.write(pb.SessionRequest(text="the "))
        assert (await idle.read()).seq == 1
        # Busy streams: requests queued behind each other, some being answered when the drain starts.
        long_text = "the cat sat on the mat . " * 150  # about 1,000 tokens a request
        busy: list[Any] = [stub.Session() for _ in range(8)]
        for call in busy:
            for _ in range(20):
                await call.write(pb.SessionRequest(text=long_text))
        first = [await call.read() for call in busy]

        assert await running.drain(5.0)  # every stream ended well within its time

        ends = [await _until_end(call) for call in busy]
        # A request the server had read got its reply, the ones it had not none; none went missing.
        for reply, (more, _, _) in zip(first, ends, strict=True):
            assert [r.seq for r in [reply, *more]] == list(range(1, len(more) + 2))
        assert any(more for more, _, _ in ends), "no reply came after the drain began"
        code, details = ends[0][1:]
        assert code == grpc.StatusCode.UNAVAILABLE and DRAINED.search(details), details
        assert all(end[1:] == (code, details) for end in ends)
        assert await _until_end(idle) == ([], code, details)
        # Health said NOT_SERVING at once, and still answers while the server drains.
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        # New calls are refused with a message to retry elsewhere or later.
        for call in (
            stub.Predict(pb.PredictRequest(text="the ")),
            stub.GetModelInfo(pb.ModelInfoRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert REFUSED.search(refused.value.details() or "")
        # A new stream is refused as it opens, before any request (a write could race the refusal).
        _, code, details = await _until_end(stub.Session())
        assert code == grpc.StatusCode.UNAVAILABLE and REFUSED.search(details), details


# ---------------------------------------------------------------------------- nextword loadtest


class _Refusing(pb_grpc.NextWordServicer):
    """Answers every request of some streams; ends the others at their first request, as a drain does."""

    def __init__(self, refuse_every: int) -> None:
        self.refuse_every = refuse_every
        self.streams = 0

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self.streams += 1
        refused = self.streams % self.refuse_every == 0
        seq = 0
        async for _ in request_iterator:
            if refused:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            seq += 1
            await context.write(pb.SessionReply(seq=seq))


@asynccontextmanager
async def _refusing_server(refuse_every: int) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_NextWordServicer_to_server(_Refusing(refuse_every), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_loadtest_exits_1_when_any_request_failed() -> None:
    async with _refusing_server(refuse_every=2) as target:
        # The command itself, in a process of its own (this loop keeps serving meanwhile).
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "nextword.cli", "loadtest", "--target", target),
            *("--streams", "4", "--duration", "0.5", "--json"),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1, err.decode()
    report = json.loads(out)
    assert report["words"] > 0 and report["failed_streams"] == 2
    assert report["errors"] == {"UNAVAILABLE": 2} and report["failed_requests"] == 2
    assert "failed requests: 2 (UNAVAILABLE 2) in 2 of 4 streams" in err.decode()


async def test_loadtest_table_names_failures_by_code(capsys: pytest.CaptureFixture[str]) -> None:
    async with _refusing_server(refuse_every=1) as target:
        args = build_parser("loadtest").parse_args(
            ["loadtest", "--target", target, "--streams", "2", "--duration", "0.3"]
        )
        code = await asyncio.to_thread(loadtest_main, args)  # its own event loop, in a thread
    out, err = capsys.readouterr()
    assert code == 1
    assert "failed requests by status code:\n  UNAVAILABLE: 2 (the server is shutting down)" in out
    assert "2 of 2 streams failed" in out
    assert "failed requests: 2 (UNAVAILABLE 2)" in err and "no word was answered" in err
