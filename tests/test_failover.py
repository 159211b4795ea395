"""Processes die, sessions do not: workers and replicas share the session store, so a session whose
process is SIGKILLed continues on another, and every suggestion is what an uninterrupted session
gives. Real servers, a real Redis and a real nginx balancer on loopback."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextword.bundle import load_bundle
from nextword.clients.client import AsyncNextWordClient, Reconnect
from nextword.server.config import ServerConfig, usable_cores
from nextword.server.workers import Supervisor
from tests.servers import Server, serving
from tests.services import nginx_grpc, redis_server
from tests.typists import Typist, assert_same, pieces

STREAMS = 64


@contextmanager
def _redis(tmp_path: Path, store: str) -> Iterator[str]:
    """The ``--session-store`` value: a real Redis for ``redis``, else ``store`` as it is."""
    if store != "redis":
        yield store
        return
    with redis_server(tmp_path) as redis:
        yield redis.url


async def _health(channel: grpc.aio.Channel, service: str = "nextword.SessionStore") -> int:
    """The server's health status of ``service`` (the session store's unless told)."""
    request = health_pb2.HealthCheckRequest(service=service)
    return int((await health_pb2_grpc.HealthStub(channel).Check(request)).status)


async def _type_through(typists: list[Typist], kill: asyncio.Event, killer: Awaitable[object]) -> None:
    """Everyone types; once all have typed a few pieces ``kill`` is set; everyone types 8 more."""
    killed = asyncio.Event()
    tasks = [asyncio.create_task(t.run(killed, killed, after=8)) for t in typists]
    while min(len(t.typed) for t in typists) < 5:
        await asyncio.sleep(0.05)
    kill.set()
    await killer
    killed.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)  # no caller saw an error


def _typists(client: AsyncNextWordClient, corpus: Path) -> list[Typist]:
    words = (corpus / "test.txt").read_text(encoding="utf-8").split()
    return [Typist(client, pieces(words[i * 20 : i * 20 + 300], random.Random(i))) for i in range(STREAMS)]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["embedded", "redis"])
async def test_a_worker_killed_with_sigkill_loses_no_session(
    tiny_bundle: Path, tiny_corpus: Path, tmp_path: Path, store: str
) -> None:
    with _redis(tmp_path, store) as spec:
        async with serving(tiny_bundle, "--workers", "2", "--session-store", spec) as server:
            assert sorted(server.workers) == [0, 1]
            async with AsyncNextWordClient(server.target, timeout=10) as client:
                typists = _typists(client, tiny_corpus)
                kill = asyncio.Event()
                killer = asyncio.ensure_future(_kill_busiest_worker(server, kill))
                await _type_through(typists, kill, killer)
                victim = killer.result()
                await asyncio.gather(*(t.check() for t in typists))
            # One connection, so one worker held every stream: all moved, none was rebuilt.
            assert all(t.reconnects >= 1 for t in typists)
            assert all(t.last_id == t.first_id for t in typists), "a session was lost, not resumed"
            await _until(lambda: server.metric("nextword_workers_alive")[""] == 2)  # restarted
            assert server.metric("nextword_worker_restarts_total")[f'{{worker="{victim}"}}'] == 1
    log = await server.rest_of_log()
    assert f"worker {victim} (pid {server.workers[victim]}) died (signal 9)" in log
    assert "Traceback" not in log


async def _kill_busiest_worker(server: Server, kill: asyncio.Event) -> int:
    """SIGKILL the worker holding the streams (once ``kill`` is set); its number."""
    await kill.wait()
    streams = server.metric("nextword_open_streams")
    label = max(streams, key=lambda k: streams[k])
    victim = int(label.split('worker="')[1].split('"')[0])
    os.kill(server.workers[victim], signal.SIGKILL)
    return victim


async def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_replicas_behind_nginx_lose_no_session_when_one_is_killed(
    tiny_bundle: Path, tiny_corpus: Path, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as redis:
        async with (
            serving(tiny_bundle, "--session-store", redis.url) as one,
            serving(tiny_bundle, "--session-store", redis.url) as two,
        ):
            with nginx_grpc(tmp_path, [one.target, two.target]) as balancer:
                async with AsyncNextWordClient(balancer.target, timeout=10) as client:
                    typists = _typists(client, tiny_corpus)
                    kill = asyncio.Event()

                    async def kill_one() -> None:
                        await kill.wait()
                        one.proc.kill()  # SIGKILL
                        await one.proc.wait()

                    await _type_through(typists, kill, asyncio.ensure_future(kill_one()))
                    await asyncio.gather(*(t.check() for t in typists))
                moved = [t for t in typists if t.reconnects]
                assert moved, "no stream was on the killed replica"
                assert all(t.last_id == t.first_id for t in typists), "a session was lost, not resumed"
    assert "Traceback" not in await two.rest_of_log()


@pytest.mark.slow
async def test_while_the_store_is_down_attached_sessions_go_on_and_health_says_so(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as redis:
        async with (
            serving(tiny_bundle, "--session-store", redis.url) as server,
            serving(tiny_bundle, "--session-store", redis.url) as other,
            AsyncNextWordClient(server.target, timeout=10) as client,
            AsyncNextWordClient(other.target, timeout=10) as elsewhere,
            grpc.aio.insecure_channel(server.target) as channel,
        ):
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
            async with client.session() as session:
                before = await session.send("it is a truth universally acknowledged that a single ")
                redis.kill()
                during = await session.send("man ")  # served from memory
                assert during.context_tokens == before.context_tokens + 1

                async def down() -> bool:
                    return await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING

                for _ in range(50):
                    if await down():
                        break
                    await asyncio.sleep(0.2)
                assert await down()
                assert server.metric("nextword_session_store_up") == {'{store="redis"}': 0.0}
                # The server as a whole still serves.
                assert await _health(channel, "") == health_pb2.HealthCheckResponse.SERVING
                # Another replica cannot resume it now: NOT_FOUND, which the client library answers
                # by replaying the session's text (tests/test_restart.py).
                with pytest.raises(grpc.RpcError) as lost:
                    async with elsewhere.session(session.session_id, reconnect=Reconnect(attempts=0)) as s:
                        await s.send("")
                assert lost.value.code() == grpc.StatusCode.NOT_FOUND
                assert "session store is unreachable" in str(lost.value.details())
            redis.restart()
            for _ in range(50):
                if await _health(channel) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.2)
            assert server.metric("nextword_session_store_up") == {'{store="redis"}': 1.0}


@pytest.mark.slow
async def test_a_resume_from_a_stored_copy_behind_the_last_reply_resends_the_rest(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The server stores a step after its reply: a process killed in between leaves a copy a step
    or so behind. Here the copy is made two requests old by hand before the kill; the client library
    resends those two on the replica it reconnects to, and the session goes on with the same id."""
    texts = ["it is a truth universally ", "acknowledged that ", "a single ", "man in "]
    with redis_server(tmp_path) as redis_proc:
        store = redis.Redis.from_url(redis_proc.url)
        async with (
            serving(tiny_bundle, "--session-store", redis_proc.url) as one,
            serving(tiny_bundle, "--session-store", redis_proc.url) as two,
        ):
            with nginx_grpc(tmp_path, [one.target, two.target]) as balancer:
                async with AsyncNextWordClient(balancer.target, timeout=10) as client:
                    async with client.session() as session:
                        await session.send(texts[0])
                        key = f"nextword:session:{session.session_id}"
                        await _until_stored(store, key, 1)
                        first = store.hgetall(key)
                        for text in texts[1:3]:
                            await session.send(text)
                        await _until_stored(store, key, 3)
                        store.hset(key, mapping={b"s": first[b"s"], b"r": first[b"r"]})  # two steps lost
                        holder = one if one.metric("nextword_open_streams")[""] == 1 else two
                        holder.proc.kill()
                        await holder.proc.wait()
                        got = await session.send(texts[3])
                        assert session.reconnects == 1 and session.seq > 4  # resumed, two resent
                        same_id = session.session_id == key.rsplit(":", 1)[1]
                    async with client.session(reconnect=Reconnect(attempts=0)) as uninterrupted:
                        for text in texts:
                            want = await uninterrupted.send(text)
    assert same_id
    assert_same(got, want, "after the resume")


async def _until_stored(store: redis.Redis, key: str, seq: int) -> None:
    await _until(lambda: int(store.hget(key, "s") or 0) >= seq)


@pytest.mark.slow
async def test_a_server_starts_while_its_store_is_down_and_uses_it_once_it_answers(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as redis_proc:
        redis_proc.stop()  # its port is known, nothing answers there yet (Redis still starting)
        async with (
            serving(tiny_bundle, "--session-store", redis_proc.url) as server,
            AsyncNextWordClient(server.target, timeout=10) as client,
            grpc.aio.insecure_channel(server.target) as channel,
        ):
            assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            async with client.session() as session:
                assert (await session.send("it is a truth ")).context_tokens == 4
            redis_proc.restart()
            await _until(lambda: server.metric("nextword_session_store_up") == {'{store="redis"}': 1.0})
            async with client.session() as session:
                await session.send("it is a truth ")
                key = f"nextword:session:{session.session_id}"
                await _until_stored(redis.Redis.from_url(redis_proc.url), key, 1)
    assert "session store redis is down" in await server.rest_of_log()


@pytest.mark.slow
async def test_a_load_over_several_connections_reaches_every_worker(tiny_bundle: Path) -> None:
    """The kernel hands each worker connections, not streams: a client with one connection meets one
    worker; ``nextword loadtest --connections`` spreads its streams so that every worker serves."""
    async with serving(tiny_bundle, "--workers", "2") as server:
        load = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "nextword.cli", "loadtest", "--target", server.target),
            *("--streams", "16", "--connections", "16", "--words", "400"),
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(load.wait(), timeout=60) == 0
        words = server.metric("nextword_words_total")
        model = f'model="{load_bundle(tiny_bundle).manifest.name}",version="1"'
        assert sorted(words) == [f'{{{model},worker="0"}}', f'{{{model},worker="1"}}']
        assert all(count > 0 for count in words.values()), words


def test_workers_share_the_cores_among_their_onnxruntime_threads() -> None:
    """onnxruntime's default pool is one thread per core in every process: N workers would run N
    times the cores. By default each worker gets its share; --threads still says it exactly."""
    cores = usable_cores()
    assert ServerConfig(workers="1").intra_op_threads == cores
    assert ServerConfig(workers="auto").intra_op_threads == 1
    assert ServerConfig(workers=str(2 * cores)).intra_op_threads == 1
    assert ServerConfig(workers="2", threads=3).intra_op_threads == 3


def test_each_worker_runs_its_share_of_the_cores_without_spinning() -> None:
    """What the supervisor hands its workers: the same share as above, not the whole machine each."""
    cores = usable_cores()
    alone = Supervisor(ServerConfig(workers="1")).worker_config(port=1, store="none")
    assert (alone.intra_op_threads, alone.onnx_spin) == (cores, True)
    worker = Supervisor(ServerConfig(workers="2")).worker_config(port=1, store="none")
    assert (worker.intra_op_threads, worker.onnx_spin) == (max(1, cores // 2), False)
    assert (worker.port, worker.reuse_port, worker.session_store) == (1, True, "none")
