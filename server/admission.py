"""What a request costs in model tokens, and whether the server takes it now.

Characters say little about cost: NFKC turns one U+FDFA into four words and one
U+3316 into a six-letter word, so limits are counted after normalisation, in
the tokens the model will run (``--max-request-tokens``) and in the characters
of the word a session leaves unfinished (``--max-word-chars``).

``measure`` tokenizes a request a piece at a time and stops as soon as it is
over the token limit, so a refused request costs at most about one limit's
worth of tokenizing, and the event loop serves others between pieces.

``Admission`` holds the server's budget of model tokens queued or running
(``--max-inflight-tokens``). Past it a request is refused at once with
RESOURCE_EXHAUSTED and an estimate of when to retry, from the tokens the model
finished recently; nothing queues without bound. Long requests may use only
seven eighths of the budget: the rest is kept for short (typed) requests, so a
flood of pastes never locks out typing. A long text holds a cheap estimate of its
tokens from the moment it is taken, so a busy server refuses it before
tokenizing it, and long texts are tokenized one at a time (the lane), so many
arriving at once cannot crowd the event loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nextword.tokenizer import UNK, split_partial

from .metrics import Metrics

# Raw characters tokenized between checks of the token limit and yields to the event loop: tens
# of microseconds for text, about half a millisecond for the worst expansion (U+FDFA). A text
# of one piece (a typed increment) is tokenized at once; longer ones go through Admission.hold
# and the lane.
PIECE_CHARS = 64
_JOINERS = "'-"  # inside a word, or at its end while more letters may come (tokenizer._WORD)
_MARKS = ',.;:!?"()'  # the punctuation most text has: each mark is a token of its own
RETRY_MIN, RETRY_MAX = 0.01, 30.0  # seconds: bounds of the retry advice
GUESS = 0.25  # seconds: the advice while the throughput is unknown
TRIM_EVERY = 256  # Throughput.add drops finishes out of its window every this many (rate() always does)


def estimate_tokens(text: str) -> int:
    """About how many tokens ``text`` is, counted in C without normalising: its words and marks.

    Close for prose, whatever its language; low for compatibility characters
    (one U+FDFA is four words) and letters joined by punctuation ("a.b").
    """
    return max(1, len(text.split()) + sum(map(text.count, _MARKS)))


class TooManyTokens(Exception):
    """The request would add more tokens than ``--max-request-tokens``."""


@dataclass(frozen=True)
class Measured:
    tokens: list[str]  # complete tokens; a word cut short for its length is <unk>
    partial: str  # the unfinished word, normalised (cut short, still over the limit, if it grew past it)


async def measure(pending: str, text: str, *, max_tokens: int, max_word_chars: int) -> Measured:
    """The tokens ``pending + text`` completes and the word it leaves unfinished.

    Equal to ``split_partial(pending + text)`` (the tokenizer's streaming guarantee
    makes piecewise tokenizing exact), except that a word still unfinished and
    longer than ``max_word_chars`` when a piece ends is cut short, so carrying it
    costs little, and becomes one ``<unk>`` when it ends. Raises TooManyTokens.
    """
    tokens: list[str] = []
    partial, overlong = pending, False
    start = 0
    while start < len(text):
        if start:
            await asyncio.sleep(0)  # let other requests' replies out between pieces
        end = _piece_end(text, start)
        complete, partial = split_partial(partial + text[start:end])
        if overlong and complete:
            complete[0], overlong = UNK, False  # the cut-short word ended: one <unk>
        tokens += complete
        if len(tokens) > max_tokens:
            raise TooManyTokens
        if len(partial) > max_word_chars + 3:
            partial, overlong = _cut_short(partial, max_word_chars), True
        start = end
    return Measured(tokens, partial)


def _piece_end(text: str, start: int) -> int:
    """Where the piece from ``start`` ends: before a space in its second half if there is one.

    Cutting before a space never splits a word or a combining sequence.
    """
    end = start + PIECE_CHARS
    if end >= len(text):
        return len(text)
    space = text.rfind(" ", start + PIECE_CHARS // 2, end)
    return space if space > start else end


def _cut_short(partial: str, limit: int) -> str:
    """A word still longer than ``limit`` whose end (its last two characters) is unchanged.

    The end decides how the next piece continues the word (a letter, or a letter
    then ' or -, waiting for more), so token boundaries stay exact.
    """
    return partial[: limit + 1].rstrip(_JOINERS) + partial[-2:]


class Overloaded(Exception):
    """The server has no room for this request now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Throughput:
    """Model tokens finished per second while busy, over the last ``window`` seconds at most.

    Measured between finishes (from the first one kept to now), so that a burst is
    timed from its first call, and restarted whenever the server falls idle, so that
    idle time does not count as slowness.
    """

    def __init__(self, window: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._done: deque[tuple[float, int]] = deque()
        self._sum = 0
        self._adds = 0

    def add(self, tokens: int) -> None:
        self._done.append((self._clock(), tokens))
        self._sum += tokens
        self._adds += 1
        if self._adds % TRIM_EVERY == 0:  # on every finish it would cost more than the rest of add
            self._trim()

    def restart(self) -> None:
        self._done.clear()
        self._sum = 0

    def rate(self) -> float | None:
        """Tokens per second, or None before two calls finished lately."""
        self._trim()
        if len(self._done) < 2:
            return None
        first_time, first_tokens = self._done[0]
        span = self._clock() - first_time
        return (self._sum - first_tokens) / span if span > 0 else None

    def _trim(self) -> None:
        horizon = self._clock() - self._window
        while self._done and self._done[0][0] < horizon:
            self._sum -= self._done.popleft()[1]


class Ticket:
    """Tokens one request holds in the budget; handed back as its calls finish."""

    def __init__(self, admission: Admission, tokens: int) -> None:
        self._admission = admission
        self.held = tokens

    def resize(self, tokens: int) -> None:
        """Hold the request's real cost, known once it is tokenized, instead of its estimate.

        Raises Overloaded when it is more than the estimate and the rest does not fit.
        """
        extra = tokens - self.held
        if extra > 0:
            self._admission.take(extra, total=tokens, others=self._admission.inflight - self.held)
        else:
            self._admission.settle(-extra, ran=False)
        self.held = tokens

    def release(self, tokens: int) -> None:
        """``tokens`` of this request ran."""
        tokens = min(tokens, self.held)
        self.held -= tokens
        self._admission.settle(tokens, ran=True)

    def close(self) -> None:
        """The request is over: whatever it still holds did not run (it failed or was cancelled)."""
        self._admission.settle(self.held, ran=False)
        self.held = 0


class Admission:
    """The server's budget of model tokens queued or running, tokenizing included."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        budget: int,  # ServerConfig.max_inflight_tokens
        short_tokens: int,  # ServerConfig.prefill_chunk_tokens: a request this small is typing
        max_request_tokens: int,  # ServerConfig.max_request_tokens
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget
        self.short_tokens = short_tokens
        self.max_request_tokens = max_request_tokens
        self.long_limit = budget - budget // 8  # long requests leave an eighth to short ones
        self.inflight = 0
        self.throughput = Throughput(clock=clock)
        # Long texts are tokenized one at a time, a piece per turn of the event loop, so that
        # however many arrive at once, a typed word waits for one piece, not for all of them.
        self.lane = asyncio.Lock()
        self._clock = clock
        self._next_slot = 0.0  # when the last refused request was told to come back
        self._random = random.Random(0)  # spreads advice; seeded: the same load, the same advice
        metrics.inflight_tokens.set_function(lambda: self.inflight)

    def hold(self, text: str) -> Ticket | None:
        """Hold a long text's estimated cost while it waits for the lane and is tokenized.

        The estimate (``estimate_tokens``) costs microseconds, so a busy server
        refuses the text before spending time on it; what it misses (U+FDFA and the
        like) ``Ticket.resize`` asks for once the text is tokenized. A short text
        (None) costs little to tokenize and is admitted by ``admit``.
        """
        if len(text) <= PIECE_CHARS:
            return None
        estimate = min(estimate_tokens(text), self.max_request_tokens)
        self.take(estimate, total=estimate, others=self.inflight, estimated=True)
        return Ticket(self, estimate)

    def admit(self, tokens: int) -> Ticket:
        """Hold ``tokens`` of the budget, or raise Overloaded."""
        self.take(tokens, total=tokens, others=self.inflight)
        return Ticket(self, tokens)

    def take(self, tokens: int, *, total: int, others: int, estimated: bool = False) -> None:
        """Add ``tokens`` to a request of ``total`` beside ``others``, or raise Overloaded.

        A short request may use the whole budget, a long one seven eighths of it; a
        request alone on the server is always taken (one request fits: see ServerConfig).
        """
        limit = self.budget if total <= self.short_tokens else self.long_limit
        if others and self.inflight + tokens > limit:
            need = f" and this request needs {'about ' if estimated else ''}{total}"
            raise self._overloaded(tokens, limit, need)
        self.inflight += tokens

    def settle(self, tokens: int, *, ran: bool) -> None:
        """``tokens`` held by a ticket are no longer in flight (``ran``: the model ran them)."""
        self.inflight -= tokens
        if ran and tokens:
            self.throughput.add(tokens)
        if not self.inflight:
            self.throughput.restart()

    def retry_after(self, tokens: int, limit: int) -> float:
        """Seconds until a refused request of ``tokens`` may fit, if others told to wait come back first.

        Refused requests are given successive slots, ``tokens / rate`` apart, so that
        clients that follow the advice come back at the pace the model frees room,
        not all at once. Slots never lie further out than the time to run the whole
        budget: past it, a request gets a random time before it, so clients that
        ignore the advice cannot push everyone's far away, and the rest do not all
        come back at the same moment.
        """
        rate = self.throughput.rate()
        if rate is None:  # the backlog is new, or nothing ran lately: a guess, spread
            return GUESS * self._random.uniform(0.5, 1.5)
        now = self._clock()
        earliest, horizon = now + (self.inflight + tokens - limit) / rate, now + self.budget / rate
        start = max(earliest, self._next_slot)
        if start + tokens / rate <= horizon:
            self._next_slot = start + tokens / rate
        else:
            start = self._random.uniform(min(earliest, horizon), horizon)
        return min(max(start - now, RETRY_MIN), RETRY_MAX)

    def _overloaded(self, tokens: int, limit: int, need: str) -> Overloaded:
        wait = self.retry_after(tokens, limit)
        kept = "" if limit == self.budget else f", of which long texts may use {limit}"
        return Overloaded(
            f"server busy: {self.inflight} model tokens are queued or running{need} "
            f"(--max-inflight-tokens {self.budget}{kept}); retry in about {wait:.2g} s",
            wait,
        )
