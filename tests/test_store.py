"""The session stores themselves: records round-trip, claims fence older writers, stale writes are
skipped, records expire. The same checks against a real SQLite file and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import uvloop

from nextword.ranking import KEYSTROKES, StripState
from nextword.server.metrics import Metrics
from nextword.server.resp import _INCOMPLETE, ReplyError, _parse
from nextword.server.store import (
    STALE,
    TAKEN,
    WRITTEN,
    Persister,
    Record,
    RedisStore,
    SessionStore,
    SqliteStore,
    StoreError,
    open_store,
)
from tests.services import RedisProcess, redis_server


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SessionStore]:
    if request.param == "sqlite":
        sqlite = SqliteStore(tmp_path / "sessions.db")
        yield sqlite
        sqlite.close()
        return
    with redis_server(tmp_path) as redis_proc:
        redis = open_store(redis_proc.url)
        assert redis is not None
        yield redis
        redis.close()


STRIP = StripState(KEYSTROKES, no_repeat=True, learn=True, passed=("true", "truth"), shown=())


def _record(seq: int, epoch: int = 0, state: bytes = b"\x01\x02" * 8) -> Record:
    return Record(
        "s1",
        "alice",
        "demo@0123",
        3,
        seq,
        seq * 2,
        "tru",
        state,
        epoch,
        ("zyzzyva", "olé"),
        STRIP,
        (7, 70_000, 7),
    )


def _open_at_once(path: Path, openers: int) -> list[str]:
    """``openers`` threads open ``path`` with one connection each, released together; their errors."""
    barrier = threading.Barrier(openers)
    failed: list[str] = []

    def open_it() -> None:
        barrier.wait()
        try:
            SqliteStore(path).close()
        except StoreError as exc:
            failed.append(str(exc))

    threads = [threading.Thread(target=open_it) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


def test_workers_opening_a_new_sqlite_file_at_once_all_get_it(tmp_path: Path) -> None:
    # As the workers of one server do at startup: setting up WAL on a new file once lost the race
    # now and then ("database is locked", a worker that did not start), 2 rounds in 20 here.
    for round_ in range(40):
        failed = _open_at_once(tmp_path / f"sessions-{round_}.db", 8)
        assert not failed, failed[0]


def test_a_record_round_trips_through_a_claim(store: SessionStore) -> None:
    assert store.write([_record(1)], ttl=60) == [WRITTEN]
    claimed = store.claim("s1", ttl=60)
    assert claimed == _record(1, epoch=1)  # every field as written, the epoch moved on
    assert store.claim("nope", ttl=60) is None


def test_records_of_the_previous_format_are_still_read() -> None:
    """A rolling upgrade: records servers of formats 1 (no user words) and 2 (no learning cache)
    wrote resume on this one."""
    old = _record(4)
    strings = [x.encode() for x in (old.principal, old.pending, old.model)]
    header = struct.pack("<BIQQIII", 1, old.k, old.seq, old.context_tokens, *map(len, strings))
    data = b"".join((header, *strings, old.state))
    assert Record.decode("s1", data, 0) == replace(old, user_words=(), strip=StripState(), cache=())
    # Format 2 (user words and the strip, no learning cache):
    strings = [x.encode() for x in (old.principal, old.pending, old.model, "zyzzyva olé", "true truth", "")]
    header = struct.pack("<BIQQBIIIIII", 2, old.k, old.seq, old.context_tokens, 3, *map(len, strings))
    data = b"".join((header, *strings, old.state))
    assert Record.decode("s1", data, 0) == replace(old, strip=replace(STRIP, learn=False), cache=())
    assert Record.decode("s1", old.encode(), 0) == old
    with pytest.raises(StoreError, match="unknown format 09"):
        Record.decode("s1", b"\x09" + data[1:], 0)


def test_a_claim_fences_writes_of_the_old_epoch_and_old_seqs_are_skipped(store: SessionStore) -> None:
    store.write([_record(1)], ttl=60)
    assert store.claim("s1", ttl=60) is not None  # epoch 1: another process took it
    assert store.write([_record(2, epoch=0)], ttl=60) == [TAKEN]
    assert store.write([_record(3, epoch=1)], ttl=60) == [WRITTEN]
    assert store.write([_record(2, epoch=1)], ttl=60) == [STALE]  # older than what is stored
    claimed = store.claim("s1", ttl=60)
    assert claimed is not None and claimed.seq == 3


def test_a_file_made_with_the_earlier_table_is_still_served(tmp_path: Path) -> None:
    path = tmp_path / "earlier.db"
    with contextlib.closing(sqlite3.connect(path)) as db:  # the table as releases before made it
        db.execute(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, seq INTEGER NOT NULL, "
            "expires REAL NOT NULL, record BLOB NOT NULL) WITHOUT ROWID"
        )
        db.commit()
    store = SqliteStore(path)
    try:
        test_a_claim_fences_writes_of_the_old_epoch_and_old_seqs_are_skipped(store)
    finally:
        store.close()


def test_records_of_a_batch_are_judged_one_by_one(store: SessionStore) -> None:
    other = Record("s2", "bob", "demo@0123", 5, 1, 1, "", b"", 0)
    store.write([_record(1)], ttl=60)
    store.claim("s1", ttl=60)
    assert store.write([_record(2, epoch=0), other], ttl=60) == [TAKEN, WRITTEN]


def test_records_expire_after_their_ttl(store: SessionStore) -> None:
    store.write([_record(1)], ttl=0.3)
    time.sleep(0.5)
    store.sweep()
    assert store.claim("s1", ttl=60) is None
    assert store.write([_record(1, epoch=7)], ttl=60) == [WRITTEN]  # a fresh start


# ---- the event loop's own writes to Redis (a lone stream's, server/resp.py) ----------------------


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    with redis_server(tmp_path) as proc:
        yield proc


@contextlib.asynccontextmanager
async def _loop_store(url: str, timeout: float = 1.0) -> AsyncIterator[RedisStore]:
    store = RedisStore(url, timeout=timeout)
    try:
        yield store
    finally:
        await store.close_async()
        store.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # the server runs uvloop where installed
def test_the_event_loops_writes_are_judged_as_the_stores_own(redis_proc: RedisProcess, loop: str) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        runner.run(_judged_as_the_stores_own(redis_proc))


async def _judged_as_the_stores_own(redis_proc: RedisProcess) -> None:
    big = bytes(range(256)) * 40  # a state of 10 KB: replies and commands of more than one read
    async with _loop_store(redis_proc.url) as store:
        assert store.writes_async
        assert await store.write_async([_record(1, state=big)], ttl=60) == [WRITTEN]
        store.claim("s1", ttl=60)
        assert await store.write_async([_record(2, epoch=0)], ttl=60) == [TAKEN]
        assert await store.write_async([_record(3, epoch=1, state=big)], ttl=60) == [WRITTEN]
        assert await store.write_async([_record(2, epoch=1)], ttl=60) == [STALE]
        claimed = store.claim("s1", ttl=60)
        assert claimed is not None and (claimed.seq, claimed.state) == (3, big)
        # Many writes in flight at once on the one connection: each gets its own answer.
        many = [replace(_record(1), id=f"m{i}", seq=i + 1) for i in range(50)]
        results = await asyncio.gather(*(store.write_async([r], ttl=60) for r in many))
        assert results == [[WRITTEN]] * 50
        assert [store.claim(f"m{i}", ttl=60).seq for i in range(50)] == list(range(1, 51))  # type: ignore[union-attr]


async def test_the_event_loops_writes_load_the_script_again_after_a_flush(redis_proc: RedisProcess) -> None:
    async with _loop_store(redis_proc.url) as store:
        assert await store.write_async([_record(1)], ttl=60) == [WRITTEN]
        redis.Redis.from_url(redis_proc.url).script_flush()
        assert await store.write_async([_record(2)], ttl=60) == [WRITTEN]


async def test_the_event_loops_writes_log_in_and_use_the_urls_database(redis_proc: RedisProcess) -> None:
    admin = redis.Redis.from_url(redis_proc.url)
    admin.config_set("requirepass", "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{redis_proc.port}/3"
    try:
        async with _loop_store(url) as store:
            assert await store.write_async([_record(1)], ttl=60) == [WRITTEN]
            assert store.claim("s1", ttl=60) is not None  # the same database as the thread's client
        with redis.Redis.from_url(url) as db3, redis.Redis.from_url(url.replace("/3", "/0")) as db0:
            assert db3.exists(RedisStore.PREFIX + "s1") and not db0.exists(RedisStore.PREFIX + "s1")
        async with _loop_store(url.replace("s3cret", "wrong")) as store:
            with pytest.raises(StoreError, match=r"WRONGPASS|invalid"):
                await store.write_async([_record(1)], ttl=60)
    finally:
        with redis.Redis.from_url(url) as authed:
            authed.config_set("requirepass", "")


async def test_a_redis_that_hangs_fails_the_loops_write_in_time_then_it_connects_again(
    redis_proc: RedisProcess,
) -> None:
    async with _loop_store(redis_proc.url, timeout=0.3) as store:
        assert await store.write_async([_record(1)], ttl=60) == [WRITTEN]
        redis_proc.process.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(StoreError, match=r"did not answer within 0\.3 s"):
                await store.write_async([_record(2)], ttl=60)
            assert time.monotonic() - start < 2
        finally:
            redis_proc.process.send_signal(signal.SIGCONT)
        assert await store.write_async([_record(3)], ttl=60) == [WRITTEN]


def test_replies_cut_anywhere_wait_for_the_rest() -> None:
    """Redis's replies arrive in pieces of any size: a piece never yields half a reply."""
    replies = b"*3\r\n:1\r\n:0\r\n:2\r\n+OK\r\n-NOSCRIPT No matching script\r\n$5\r\nab\r\nc\r\n$-1\r\n"
    expected = [[1, 0, 2], "OK", "NOSCRIPT No matching script", b"ab\r\nc", None]
    for cut in range(1, len(replies)):
        buf, got, at = bytearray(replies[:cut]), [], 0
        while (reply := _parse(buf, at))[0] is not _INCOMPLETE:
            got.append(reply[0])
            at = reply[1]
        buf += replies[cut:]
        while at < len(buf):
            reply = _parse(buf, at)
            got.append(reply[0])
            at = reply[1]
        assert [str(r) if isinstance(r, ReplyError) else r for r in got] == expected, cut


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_a_session_typing_faster_than_the_write_interval_is_stored_once_per_interval(
    redis_proc: RedisProcess, tmp_path: Path, kind: str
) -> None:
    # Writes go at most once per --store-interval (SQLite's from the writer thread): the first at
    # once, then the newest record of each interval; what waits is written when its interval ends,
    # even if nothing follows.
    store = open_store(redis_proc.url if kind == "redis" else f"sqlite:///{tmp_path / 's.db'}")
    assert store is not None
    metrics = Metrics()
    persister = Persister(store, metrics, ttl=60, interval=0.5)

    def writes() -> float:
        return (
            metrics.registry.get_sample_value("nextword_session_store_seconds_count", {"op": "write"}) or 0.0
        )

    def stored_seq() -> int | None:
        found = store.claim("s1", ttl=60)
        return None if found is None else found.seq

    async def type_words() -> None:
        start = time.monotonic()
        for seq in range(1, 21):  # 20 words in about 0.1 s: one interval
            persister.submit([_record(seq)], wake=False)
            persister.flush_held()
            await asyncio.sleep(0.005)
        assert time.monotonic() - start < 0.4, "the machine was too slow for this test's timing"
        await asyncio.sleep(0.05)
        assert writes() == 1  # the first word's, at once; the rest wait for the interval to end
        await asyncio.sleep(0.6)
        assert writes() == 2
        await persister.settle()

    try:
        asyncio.run(type_words())
        assert stored_seq() == 20
    finally:
        persister.close()
