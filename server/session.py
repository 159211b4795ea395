"""Sessions: a client's recurrent state, kept between requests and across dropped streams.

The table is an LRU bounded by ``max_sessions``. A session with no stream
attached is kept ``ttl`` seconds after its last use so that a client whose
connection dropped can resume it by id; a session attached to a live stream is
never expired or evicted (its client is still there).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from nextword.ranking import NO_CACHE, NO_USER_WORDS, StripState, UserWords, WordCache

from .model import ModelVersion
from .state import INITIAL


class SessionTableFull(Exception):
    """Every session is attached to a live stream: none can be evicted for a new one."""


class Stream:
    """One live ``Session`` RPC, and how the server ends it.

    The server ends a stream when another stream takes its session over, when it drains, and
    when the stream waits too long for its next request. A stream waiting for a request is
    woken by cancelling its handler task (cheaper than watching extra futures on every read);
    a stream answering a request sees ``ended`` once it has replied.
    """

    __slots__ = ("ended", "poller", "read_since", "reading", "shared", "task")

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.reading = False  # waiting for its next request
        self.read_since = 0.0  # loop time the wait began
        self.ended: str | None = None  # why the server ends it: "superseded", "drain" or "idle"
        self.poller: asyncio.Task[None] | None = None  # keeps the loop awake for a lone stream
        # Carries several sessions at once (a KServe stream of several sequences): its steps are
        # batched with each other even when it is the only stream open.
        self.shared = False

    def end(self, reason: str) -> None:
        """End this stream for ``reason``: at once if it waits for a request, else after its reply."""
        if self.ended is None:
            self.ended = reason
            if self.reading and self.task is not None:
                self.task.cancel()


@dataclass(eq=False, slots=True)
class SessionRecord:
    id: str
    k: int
    principal: str  # who opened it; only they may resume it (server/security.py)
    slot: int = INITIAL  # where its recurrent state is in the server's StatePool
    pending: str = ""  # the partial word typed so far, normalised
    context_tokens: int = 0  # tokens fed since the last reset (the initial <eos> not counted)
    seq: int = 0  # requests answered
    user_words: UserWords = NO_USER_WORDS  # typed words the model cannot name (a new window once any)
    cache: WordCache = NO_CACHE  # typed words of the vocabulary, while it learns (Strip.learn)
    strip: StripState = field(default_factory=StripState)  # how its strip is filled (Strip in the API)
    epoch: int = 0  # the session store's claim this process holds it under (server/store.py)
    taken: bool = False  # another process claimed it: forgotten here once its stream ends
    last_used: float = field(default_factory=time.monotonic)
    stream: Stream | None = None  # the stream attached, if any
    model: ModelVersion | None = None  # the model version it runs on, to its end (server/repository.py)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request at a time


class SessionTable:
    """Sessions by id, least recently used first."""

    def __init__(
        self,
        max_sessions: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[SessionRecord], None] = lambda session: None,
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl
        self._clock = clock
        self._on_drop = on_drop  # frees what a session holds outside the table (its state slot)
        self._sessions: OrderedDict[str, SessionRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, k: int, principal: str, session_id: str | None = None) -> SessionRecord:
        """A new session of ``principal``; makes room by evicting the least recently used idle one.

        ``session_id``: a session this process takes from the session store (it has an id already).
        """
        if len(self._sessions) >= self.max_sessions:
            self.expire()
        if len(self._sessions) >= self.max_sessions:
            victim = next((s for s in self._sessions.values() if s.stream is None), None)
            if victim is None:
                raise SessionTableFull(
                    f"all {self.max_sessions} sessions are attached to open streams; "
                    "close idle streams or raise --max-sessions"
                )
            self._drop(victim)
        session = SessionRecord(session_id or secrets.token_hex(16), k, principal, last_used=self._clock())
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str, principal: str) -> SessionRecord | None:
        """``principal``'s session, or None if unknown, evicted, expired (dropped now) or another's.

        Another principal's session looks exactly like an unknown id to the caller, and is left
        untouched: a stranger learns nothing about it and cannot keep it alive.
        """
        session = self._sessions.get(session_id)
        if session is None or session.principal != principal:
            return None
        if session.stream is None and self._expired(session, self._clock()):
            self._drop(session)
            return None
        self.touch(session)
        return session

    def find(self, session_id: str) -> SessionRecord | None:
        """The session ``session_id``, whoever owns it (for the server's own bookkeeping)."""
        return self._sessions.get(session_id)

    def forget(self, session: SessionRecord) -> None:
        """Drop ``session`` now (another process took it over)."""
        if self._sessions.get(session.id) is session:
            self._drop(session)

    def touch(self, session: SessionRecord) -> None:
        session.last_used = self._clock()
        self._sessions.move_to_end(session.id)

    def attach(self, session: SessionRecord, stream: Stream) -> None:
        """Attach ``stream``; a stream still attached is told it lost the session."""
        old = session.stream
        if old is not None and old is not stream:
            old.end("superseded")
        session.stream = stream
        self.touch(session)

    def detach(self, session: SessionRecord, stream: Stream) -> None:
        """The stream ended; the session's idle time starts now (unless another stream took it).

        A session that holds nothing yet (no word fed, nothing pending) is dropped at once:
        resuming it would give what a new session gives, and keeping it for ``ttl`` would
        let anyone fill the table with empty sessions by opening streams.
        """
        if session.stream is stream:
            session.stream = None
            empty = session.slot == INITIAL and not session.pending and not session.context_tokens
            if session.taken or empty:
                self._drop(session)
            else:
                self.touch(session)

    def expire(self) -> int:
        """Drop idle sessions unused for ``ttl`` seconds; returns how many."""
        now = self._clock()
        stale = []
        # Ordered by last use: stop at the first idle session that is still fresh.
        for session in self._sessions.values():
            if session.stream is not None:
                continue
            if not self._expired(session, now):
                break
            stale.append(session)
        for session in stale:
            self._drop(session)
        return len(stale)

    async def sweep_forever(self) -> None:
        """Expire idle sessions periodically, so memory is freed even if nobody asks for them."""
        interval = min(self.ttl, 60.0) / 2
        while True:
            await asyncio.sleep(interval)
            self.expire()

    def _drop(self, session: SessionRecord) -> None:
        # A session taken over elsewhere may have been replaced under its id by a fresh copy.
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        self._on_drop(session)
        session.slot = INITIAL  # dropped once: what it held is freed once

    def _expired(self, session: SessionRecord, now: float) -> bool:
        return now - session.last_used >= self.ttl
