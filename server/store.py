"""Session records, kept where every worker and replica can read them.

A session is a small record: its recurrent state, the unfinished word, k, its
owner, how many requests it has answered (``seq``), and the model it runs on.
After each model call the batcher hands the call's records to the
``Persister``, whose writer thread stores everything handed to it since its last
write in one store operation (the newest record of each session), off the
critical path: a reply never waits for the store. A process killed with SIGKILL
therefore loses no session, only possibly its last step or so; a resume says
which request the stored copy ends at (its ``seq``), and the client library
resends the requests after it (``clients/client.py``), so the session continues
exactly, with the same id.

Which stream owns a session is settled by an *epoch*. Resuming a session
*claims* it: the store adds one to its epoch and hands back the record. A write
names the epoch its session was claimed at and is refused when the record's
epoch has moved on, so a worker that still holds a stream of a session taken
over elsewhere (on another worker, or another replica behind a balancer) cannot
overwrite it: its stream is ended (ABORTED, resumed by another stream). A write
older than the stored record (a lower ``seq``) is skipped.

Two stores:

* ``SqliteStore`` (``--session-store embedded`` or ``sqlite:///PATH``): one
  SQLite file in WAL mode shared by the workers of one machine, nothing to run.
  Written without fsync: it survives any process dying, not the machine.
* ``RedisStore`` (``--session-store redis://HOST:PORT/DB``): one Redis shared
  by replicas on several machines; expiry by Redis's own TTL.

When the store cannot be reached the server keeps answering (sessions live in
its memory meanwhile), says so in health and metrics, and retries the store now
and then; a resume it cannot serve from memory gets NOT_FOUND, and the client
library replays the session's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import sqlite3
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from nextword.ranking import KEYSTROKES, PROBABILITY, StripState

from .metrics import Metrics
from .resp import RedisConnection, ReplyError
from .threads import name_this_thread

T = TypeVar("T")

log = logging.getLogger("nextword.server")

WRITER_THREAD = "nextword-store"  # the writer thread's name in the OS (top -H)
WRITTEN, TAKEN, STALE = 1, 0, 2  # what a write did to each record
_FORMAT = 3  # first byte of an encoded record: what a future layout is told apart by
# Format 1: format, k, seq, context tokens, then the length of each string: principal, pending,
# model. Format 2 adds a byte of strip flags after the context tokens, and three more strings: the
# user's words, the words passed over and the words shown (space-separated). Format 3 adds the
# length of the learning cache's word ids (uint32, little-endian) after them. 1 and 2 are still read.
_HEADERS = {1: struct.Struct("<BIQQIII"), 2: struct.Struct("<BIQQBIIIIII"), 3: struct.Struct("<BIQQBIIIIIII")}
_NO_REPEAT, _KEYSTROKES, _LEARN = 1, 2, 4  # strip flags
_PLAIN = StripState()  # by probability, repeats allowed


class StoreError(Exception):
    """The store could not be reached or refused the operation."""


@dataclass(frozen=True, slots=True)
class Record:
    """One session as stored. ``state`` is the recurrent state tensors' bytes in the bundle's order."""

    id: str
    principal: str
    model: str  # Manifest.fingerprint: a session resumes only on the model it started on
    k: int
    seq: int
    context_tokens: int
    pending: str
    state: bytes
    epoch: int = 0  # the claim this record was written under (see the module docstring)
    user_words: tuple[str, ...] = ()  # nextword.ranking.UserWords, oldest first
    strip: StripState = _PLAIN
    cache: tuple[int, ...] = ()  # nextword.ranking.WordCache's word ids, oldest first

    def with_state(self, state: bytes) -> Record:
        """This record holding ``state`` (dataclasses.replace, at a third of its cost: one per step)."""
        return Record(
            self.id,
            self.principal,
            self.model,
            self.k,
            self.seq,
            self.context_tokens,
            self.pending,
            state,
            self.epoch,
            self.user_words,
            self.strip,
            self.cache,
        )

    def encode(self) -> bytes:
        strip = self.strip
        words = (self.user_words, strip.passed, strip.shown)
        strings = [
            s.encode("utf-8") for s in (self.principal, self.pending, self.model, *map(" ".join, words))
        ]
        strings.append(struct.pack(f"<{len(self.cache)}I", *self.cache))
        flags = (
            _NO_REPEAT * strip.no_repeat | _KEYSTROKES * (strip.policy == KEYSTROKES) | _LEARN * strip.learn
        )
        header = _HEADERS[_FORMAT].pack(
            _FORMAT, self.k, self.seq, self.context_tokens, flags, *map(len, strings)
        )
        return b"".join((header, *strings, self.state))

    @classmethod
    def decode(cls, session_id: str, data: bytes, epoch: int) -> Record:
        layout = _HEADERS.get(data[0]) if data else None
        if layout is None:
            raise StoreError(f"session record of unknown format {data[:1].hex() or 'empty'}")
        fmt, k, seq, context_tokens, *rest = layout.unpack_from(data)
        flags, lengths = (rest[0], rest[1:]) if fmt >= 2 else (0, rest)
        at, fields = layout.size, []
        for n in lengths:
            fields.append(data[at : at + n])
            at += n
        cache = struct.unpack(f"<{len(fields[6]) // 4}I", fields.pop()) if fmt >= 3 else ()
        principal, pending, model, *lists = (f.decode("utf-8") for f in fields)
        user_words, passed, shown = (tuple(x.split()) for x in lists) if lists else ((), (), ())
        policy = KEYSTROKES if flags & _KEYSTROKES else PROBABILITY
        strip = StripState(policy, bool(flags & _NO_REPEAT), bool(flags & _LEARN), passed, shown)
        return cls(
            session_id,
            principal,
            model,
            k,
            seq,
            context_tokens,
            pending,
            data[at:],
            epoch,
            user_words,
            strip,
            tuple(cache),
        )


class SessionStore(ABC):
    """Where records live. Blocking calls: the server makes them off its event loop."""

    kind: str  # "embedded", "sqlite" or "redis": the ``store`` label of the metrics
    writes_async = False  # whether ``write_async`` writes without blocking the event loop

    @abstractmethod
    def write(self, records: Sequence[Record], ttl: float) -> list[int]:
        """Store ``records`` (one per session), each only if it is new, or its epoch is still the
        stored one and its seq is newer than the stored one's.

        Returns, per record, WRITTEN, TAKEN (another claim moved the epoch on) or STALE (the
        stored record is as new or newer). Each record expires ``ttl`` seconds after its last write.
        """

    @abstractmethod
    def claim(self, session_id: str, ttl: float) -> Record | None:
        """The session's record with its epoch advanced (taking it over), or None if unknown."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreError unless the store answers."""

    async def write_async(self, records: Sequence[Record], ttl: float) -> list[int]:
        """``write`` without blocking the event loop, where ``writes_async`` says it can."""
        raise NotImplementedError

    def sweep(self) -> None:  # noqa: B027  # stores without expiry of their own override it
        """Delete expired records (Redis expires its own)."""

    def close(self) -> None:  # noqa: B027
        """Release connections."""

    async def close_async(self) -> None:  # noqa: B027
        """Release what ``write_async`` holds (on the event loop, before ``close``)."""


SQLITE_OPEN_WAIT_S = 10.0  # how long opening waits for other processes setting up the same file


class SqliteStore(SessionStore):
    """One SQLite file (WAL) that the workers of one machine share."""

    def __init__(self, path: Path, kind: str = "sqlite") -> None:
        self.kind = kind
        self.path = path
        self._lock = threading.Lock()  # one connection, used from the model and store threads
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            self._prepare(deadline=time.monotonic() + SQLITE_OPEN_WAIT_S)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the session store {path}: {exc}") from exc

    def _prepare(self, deadline: float) -> None:
        """WAL mode and the table, waiting out the other processes doing the same.

        Several workers open a new file at once. Turning it to WAL takes a lock that SQLite does
        not wait for (its busy timeout does not cover that switch): the loser got "database is
        locked" and its worker failed to start, now and then. So a busy setup is tried again.
        """
        while True:
            try:
                # WAL: readers and the writer do not block each other. synchronous=OFF: a commit is
                # in the OS's cache when it returns, which every process sees and which outlives any
                # of them (not a power cut). That is the durability a worker's SIGKILL needs, per step.
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=OFF")
                # A rowid table: records of a few KB (the state) sit badly in a WITHOUT ROWID
                # table's index pages (about 2.5× the time per write measured here). Files made
                # before keep their WITHOUT ROWID table; the statements are the same for both.
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, "
                    "seq INTEGER NOT NULL, expires REAL NOT NULL, record BLOB NOT NULL)"
                )
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def write(self, records: Sequence[Record], ttl: float) -> list[int]:
        now = time.time()
        with self._lock, _sqlite_errors():
            self._db.execute("BEGIN IMMEDIATE")  # the other workers' writes and claims wait
            try:
                results = [self._write_one(r, now, now + ttl) for r in records]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return results

    # One statement writes a record unless the stored one is live and either of another claim or
    # as new; only then is it read, to say which (a write is one statement, not a read and a write).
    _UPSERT = (
        "INSERT INTO sessions VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET epoch = excluded.epoch, "
        "seq = excluded.seq, expires = excluded.expires, record = excluded.record "
        "WHERE sessions.expires < ? OR (sessions.epoch = excluded.epoch AND sessions.seq < excluded.seq)"
    )

    def _write_one(self, r: Record, now: float, expires: float) -> int:
        cursor = self._db.execute(self._UPSERT, (r.id, r.epoch, r.seq, expires, r.encode(), now))
        if cursor.rowcount == 1:
            return WRITTEN
        (epoch,) = self._db.execute("SELECT epoch FROM sessions WHERE id = ?", (r.id,)).fetchone()
        return TAKEN if epoch != r.epoch else STALE

    def claim(self, session_id: str, ttl: float) -> Record | None:
        now = time.time()
        with self._lock, _sqlite_errors():
            row = self._db.execute(
                "UPDATE sessions SET epoch = epoch + 1, expires = ? WHERE id = ? AND expires >= ? "
                "RETURNING epoch, record",
                (now + ttl, session_id, now),
            ).fetchone()
        return None if row is None else Record.decode(session_id, row[1], row[0])

    def ping(self) -> None:
        with self._lock, _sqlite_errors():
            self._db.execute("SELECT 1").fetchone()

    def sweep(self) -> None:
        with self._lock, _sqlite_errors():
            self._db.execute("DELETE FROM sessions WHERE expires < ?", (time.time(),))

    def close(self) -> None:
        with self._lock:
            self._db.close()


@contextlib.contextmanager
def _sqlite_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"session store: {exc}") from exc


# Every key of a batch in one script: the checks and the write are atomic per record, and the
# batch is one round trip. KEYS[i] is a session; ARGV = ttl_ms, then (epoch, seq, record) per key.
# Returns per key 1 (written), 0 (taken: another epoch) or 2 (stale: not newer than stored).
_WRITE = """
local ttl = ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  local epoch, seq = ARGV[3 * i - 1], tonumber(ARGV[3 * i])
  local stored = redis.call('HMGET', key, 'e', 's')
  if stored[1] and stored[1] ~= epoch then
    out[i] = 0
  elseif stored[1] and tonumber(stored[2]) >= seq then
    out[i] = 2
  else
    redis.call('HSET', key, 'e', epoch, 's', seq, 'r', ARGV[3 * i + 1])
    redis.call('PEXPIRE', key, ttl)
    out[i] = 1
  end
end
return out
"""
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local epoch = redis.call('HINCRBY', KEYS[1], 'e', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {epoch, redis.call('HGET', KEYS[1], 'r')}
"""


class RedisStore(SessionStore):
    """Records in one Redis (``redis://HOST:PORT/DB``), shared by replicas; expiry by its TTL.

    One key per session, ``nextword:session:ID``, a hash of the epoch and the record.
    The scripts touch several keys at once, so this is for one Redis (with replicas of its
    own if wanted), not Redis Cluster.
    """

    kind = "redis"
    PREFIX = "nextword:session:"

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        import redis  # only servers that use Redis import it

        self._redis_errors = (redis.RedisError, OSError)
        self._no_script = redis.exceptions.NoScriptError
        # A store that hangs must not hold the model thread long: every operation is bounded.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
        )
        self._write_sha = hashlib.sha1(_WRITE.encode()).hexdigest()
        self._claim = self._client.register_script(_CLAIM)
        # The event loop's own connection, for a lone stream's writes (Persister.flush_held),
        # opened by the first of them; TLS is left to the writer thread's client (server/resp.py).
        self._url, self._timeout = url, timeout
        self.writes_async = urlparse(url).scheme != "rediss"
        self._loop_conn: RedisConnection | None = None
        self._opening = asyncio.Lock()

    def _command(self, records: Sequence[Record], ttl: float) -> tuple[int, list[str | bytes | int]]:
        """EVALSHA's arguments after the script: the key count; the keys, ttl, then each record's."""
        keys: list[str | bytes | int] = [self.PREFIX + r.id for r in records]
        args: list[str | bytes | int] = [round(ttl * 1000)]
        for r in records:
            args += [r.epoch, r.seq, r.encode()]
        return len(keys), [*keys, *args]

    async def write_async(self, records: Sequence[Record], ttl: float) -> list[int]:
        n, command = self._command(records, ttl)
        try:
            conn = await self._connection()
            try:
                written = await conn.call("EVALSHA", self._write_sha, n, *command)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                load = conn.call("SCRIPT", "LOAD", _WRITE)  # Redis answers in order: loaded first
                written = await conn.call("EVALSHA", self._write_sha, n, *command)
                await load
        except (ReplyError, OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            raise StoreError(f"session store: {exc}") from exc
        return [int(x) for x in written]

    async def _connection(self) -> RedisConnection:
        if self._loop_conn is None or not self._loop_conn.open_now:
            async with self._opening:  # one connection, however many writes find none
                if self._loop_conn is None or not self._loop_conn.open_now:
                    self._loop_conn = await RedisConnection.open(self._url, self._timeout)
        return self._loop_conn

    def write(self, records: Sequence[Record], ttl: float) -> list[int]:
        n, command = self._command(records, ttl)
        try:
            try:  # EVALSHA itself (a step's one round trip), loading the script when Redis lacks it
                written = self._client.evalsha(self._write_sha, n, *command)
            except self._no_script:
                self._client.script_load(_WRITE)
                written = self._client.evalsha(self._write_sha, n, *command)
        except self._redis_errors as exc:
            raise StoreError(f"session store: {exc}") from exc
        return [int(x) for x in written]

    def claim(self, session_id: str, ttl: float) -> Record | None:
        try:
            found = self._claim(keys=[self.PREFIX + session_id], args=[round(ttl * 1000)])
        except self._redis_errors as exc:
            raise StoreError(f"session store: {exc}") from exc
        if not found:
            return None
        epoch, data = found
        return Record.decode(session_id, data, int(epoch))

    def ping(self) -> None:
        try:
            self._client.ping()
        except self._redis_errors as exc:
            raise StoreError(f"session store: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    async def close_async(self) -> None:
        if self._loop_conn is not None:
            self._loop_conn.close()


def open_store(spec: str) -> SessionStore | None:
    """The store ``--session-store`` names: ``none``, ``sqlite:///PATH`` or ``redis://...``.

    (``embedded`` and ``auto`` are turned into a sqlite path by whoever starts the workers.)
    """
    if spec == "none":
        return None
    url = urlparse(spec)
    if url.scheme in ("redis", "rediss", "unix"):
        return RedisStore(spec)
    if url.scheme == "sqlite" and url.path:
        return SqliteStore(Path(url.path), kind="embedded" if url.fragment == "embedded" else "sqlite")
    raise StoreError(
        f"--session-store {spec!r}: expected none, embedded, sqlite:///PATH or redis://HOST:PORT/DB"
    )


class Persister:
    """The server's side of the store: a writer thread, metrics, and riding out a store that is down.

    ``submit`` never waits: the writer thread stores, in one operation, the newest record of
    every session submitted since its last write. A record the store says was taken by another
    claim is reported to ``on_taken`` (on the event loop), which ends that session's stream here.
    After a failure the store is left alone for ``retry_after`` seconds (doubling up to
    ``max_retry_after``), so a store that hangs costs one bounded wait now and then; records
    meanwhile stay in this process only. ``up`` is what health and
    ``nextword_session_store_up`` say.
    """

    def __init__(
        self,
        store: SessionStore,
        metrics: Metrics,
        ttl: float,
        *,
        interval: float = 0.0,
        retry_after: float = 0.5,
        max_retry_after: float = 5.0,
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._ttl = ttl
        self._up_gauge = metrics.store_up.labels(store.kind)
        self._write_time = metrics.store_seconds.labels("write").observe
        self._claim_time = metrics.store_seconds.labels("claim").observe
        self._retry_min, self._retry_max = retry_after, max_retry_after
        self._retry = retry_after
        self._next_try = 0.0
        self.up = True
        self._up_gauge.set(1)
        # Called with [(session id, epoch)] of records another claim took (set by the servicer).
        self.on_taken: Callable[[list[tuple[str, int]]], None] = lambda taken: None
        self._pending: dict[str, Record] = {}
        # Writes are at least ``interval`` apart (the first after a quiet spell goes at once): a
        # lone stream typing fast costs the store one write per interval, not one per word.
        self._interval = interval
        self._last_write = -math.inf  # time.monotonic() of the last write begun
        self._timer: asyncio.TimerHandle | None = None
        self.held = False  # records were submitted with wake=False: the submitter flushes them
        self._flushing: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._writer = threading.Thread(target=self._write_loop, name="session-store-writer", daemon=True)
        self._writer.start()
        # Claims and health checks wait here, off the event loop.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-store")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def submit(self, records: Sequence[Record], *, wake: bool = True) -> None:
        """Have ``records`` stored soon (from any thread; never blocks on the store).

        ``wake=False``: leave them for ``flush_held``, which the server calls right after the
        reply (a lone step's), so that no writer competes for the interpreter and the CPU while
        the reply is being made.
        """
        with self._lock:
            for r in records:
                queued = self._pending.get(r.id)
                if queued is None or r.seq > queued.seq:
                    self._pending[r.id] = r
        if wake:
            self._wake.set()
        else:
            self.held = True

    def flush_held(self) -> None:
        """Store what was submitted with ``wake=False``, from the event loop without blocking it:
        the write goes out while the reply travels and the next request is read. A store with
        no such write (SQLite, whose lock another worker may hold) is left to the writer thread."""
        if not self.held:
            return
        self.held = False
        if not self.store.writes_async:
            self._wake.set()
        elif self._timer is None:  # else the write already due takes these records too
            wait = self._last_write + self._interval - time.monotonic()
            if wait <= 0:
                self._start_flush()
            else:
                self._timer = asyncio.get_running_loop().call_later(wait, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        self._last_write = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._flush_async())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def settle(self) -> None:
        """Wait for the event loop's writes still on their way, and release their connection
        (before ``close``)."""
        if self._timer is not None:  # records waiting for their interval go now
            self._timer.cancel()
            self._start_flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        await self.store.close_async()

    def flush(self) -> None:
        """Store what is pending now, on this thread."""
        batch = self._take()
        if batch:
            self._written(batch, self.write(batch))

    async def _flush_async(self) -> None:
        batch = self._take()
        if not batch or not self._available():
            return
        start = time.perf_counter()
        try:
            results = await self.store.write_async(batch, self._ttl)
        except StoreError as exc:
            self._failed("write", exc)
            return
        self._written(batch, self._stored(start, results))

    def _take(self) -> list[Record]:
        with self._lock:
            batch, self._pending = list(self._pending.values()), {}
        return batch

    def _written(self, batch: list[Record], results: list[int] | None) -> None:
        if results is None:
            return
        taken = [(r.id, r.epoch) for r, result in zip(batch, results, strict=True) if result == TAKEN]
        if taken:
            self._metrics.store_conflicts.inc(len(taken))
            self.on_taken(taken)

    def reclaimed(self, session_id: str, epoch: int) -> None:
        """This process claimed ``session_id`` again: its records not yet written carry the new epoch."""
        with self._lock:
            if (queued := self._pending.get(session_id)) is not None:
                self._pending[session_id] = replace(queued, epoch=epoch)

    def close(self) -> None:
        """Write what is pending, then release the store."""
        self._closing = True
        self._wake.set()
        self._writer.join(timeout=10)
        self._thread.shutdown(wait=True)
        self.store.close()

    def _write_loop(self) -> None:
        name_this_thread(WRITER_THREAD)
        while True:
            if not self._closing:
                self._wake.wait()
                # Records that come meanwhile join this write (time.sleep releases the GIL).
                time.sleep(max(0.0, self._last_write + self._interval - time.monotonic()))
            self._wake.clear()
            self._last_write = time.monotonic()
            self.flush()
            if self._closing and not self._pending:
                return

    def write(self, records: Sequence[Record]) -> list[int] | None:
        """Store ``records`` now: per record WRITTEN, TAKEN or STALE; None while the store is down."""
        if not records or not self._available():
            return None
        start = time.perf_counter()
        try:
            results = self.store.write(records, self._ttl)
        except StoreError as exc:
            self._failed("write", exc)
            return None
        return self._stored(start, results)

    def _stored(self, start: float, results: list[int]) -> list[int]:
        """A write that began at ``start`` went through: timed, and the store is up."""
        self._write_time(time.perf_counter() - start)
        self._ok()
        return results

    def claim(self, session_id: str) -> Record | None:
        """The session's record, taken over; None if the store does not know it. Raises StoreError."""
        if not self._available():
            raise StoreError("the session store is down")
        start = time.perf_counter()
        try:
            record = self.store.claim(session_id, self._ttl)
        except StoreError as exc:
            self._failed("claim", exc)
            raise
        self._claim_time(time.perf_counter() - start)
        self._ok()
        return record

    def check(self) -> bool:
        """Ping the store now (health's periodic check); whether it is up."""
        try:
            self.store.ping()
            self.store.sweep()
        except StoreError as exc:
            self._failed("ping", exc)
        else:
            self._ok()
        return self.up

    def _available(self) -> bool:
        return self.up or time.monotonic() >= self._next_try

    def _ok(self) -> None:
        if not self.up:
            log.info("session store %s is back", self.store.kind)
        self.up, self._retry = True, self._retry_min
        self._up_gauge.set(1)

    def _failed(self, op: str, exc: StoreError) -> None:
        self._metrics.store_errors.labels(op).inc()
        if self.up:
            log.warning(
                "session store %s is down (%s): sessions are served from this process's memory "
                "until it is back; resumes elsewhere replay their text",
                self.store.kind,
                exc,
            )
        self.up = False
        self._up_gauge.set(0)
        self._next_try = time.monotonic() + self._retry
        self._retry = min(self._retry * 2, self._retry_max)
