"""The session stores themselves: records round-trip, claims fence older writers, stale writes are
skipped, records expire. The same checks against a real SQLite file and a real Redis."""

from __future__ import annotations

import contextlib
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nextword.ranking import KEYSTROKES, StripState
from nextword.server.store import (
    STALE,
    TAKEN,
    WRITTEN,
    Record,
    SessionStore,
    SqliteStore,
    StoreError,
    open_store,
)
from tests.services import redis_server


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


STRIP = StripState(KEYSTROKES, no_repeat=True, passed=("true", "truth"), shown=())


def _record(seq: int, epoch: int = 0, state: bytes = b"\x01\x02" * 8) -> Record:
    return Record("s1", "alice", "demo@0123", 3, seq, seq * 2, "tru", state, epoch, ("zyzzyva", "olé"), STRIP)


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
    """A rolling upgrade: records a server of format 1 wrote (no user words) resume on this one."""
    old = _record(4)
    strings = [x.encode() for x in (old.principal, old.pending, old.model)]
    header = struct.pack("<BIQQIII", 1, old.k, old.seq, old.context_tokens, *map(len, strings))
    data = b"".join((header, *strings, old.state))
    assert Record.decode("s1", data, 0) == replace(old, user_words=(), strip=StripState())
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
