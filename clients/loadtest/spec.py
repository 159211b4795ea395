"""What one load test runs: a frozen ``LoadSpec``, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..channel import Credentials
from .errors import LoadTestError
from .target import check_target

DEFAULT_DURATION_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# A stream with requests out and no reply for this long is given up (counted DEADLINE_EXCEEDED);
# after a duration-bound run, the in-flight replies get this long to arrive.
REPLY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LoadSpec:
    """``streams`` concurrent sessions against ``target``; see the package doc.

    The run stops after ``duration`` seconds or ``words`` answered words in all
    (10 s when neither is given). ``rate``: words/s per stream, open loop;
    None: closed loop. ``context_words``: words each stream sends in one request
    before measuring. ``text``: the words to type (``load_words`` makes them
    from a str or a file); None: the default corpus. Making a spec raises
    ``LoadTestError`` for a bad value, or for a target that is not loopback
    unless ``allow_remote``.
    """

    target: str
    streams: int
    duration: float | None = None
    words: int | None = None
    rate: float | None = None
    context_words: int = 0
    text: tuple[str, ...] | None = field(default=None, repr=False)
    k: int = 3
    allow_remote: bool = False
    credentials: Credentials | None = None  # TLS and bearer token (None: plaintext)
    connect_timeout: float = CONNECT_TIMEOUT_S
    reply_timeout: float = REPLY_TIMEOUT_S
    # HTTP/2 connections of each process, its streams spread over them: a server's workers are
    # given connections, not streams, so one connection reaches one worker.
    connections: int = 1
    # How each session fills its strip (nextword.ranking.POLICIES; None: the server's default),
    # sent once, on a stream's first request, as a keyboard would.
    strip: str | None = None
    no_repeat: bool = False

    def __post_init__(self) -> None:
        check_target(self.target, allow_remote=self.allow_remote)
        if self.streams < 1:
            raise LoadTestError("streams must be at least 1")
        if self.connections < 1:
            raise LoadTestError("connections must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise LoadTestError("duration must be positive")
        if self.words is not None and self.words < 1:
            raise LoadTestError("words must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise LoadTestError("rate must be positive")
        if self.context_words < 0 or self.k < 0:
            raise LoadTestError("context words and k must not be negative")
        if self.connect_timeout <= 0 or self.reply_timeout <= 0:
            raise LoadTestError("timeouts must be positive")
        if self.text is not None:
            if isinstance(self.text, str):
                raise TypeError("LoadSpec.text is a tuple of words: load_words(text) splits a str")
            object.__setattr__(self, "text", tuple(self.text))  # a list is taken too, kept as a tuple
            if not self.text:
                raise LoadTestError("the load test text has no words")

    @property
    def time_limit(self) -> float | None:
        """Seconds the run lasts at most: ``duration``, or 10 s when neither it nor ``words`` is given."""
        if self.duration is None and self.words is None:
            return DEFAULT_DURATION_S
        return self.duration
