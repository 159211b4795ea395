"""Users typing through sessions, and the check that what they saw is what an uninterrupted
session gives: the yardstick of the restart and failover tests."""

from __future__ import annotations

import asyncio
import random

import pytest

from nextword.clients.client import AsyncNextWordClient, Prediction, Reconnect

TOL = 1e-4
MAX_TEXT = 100  # the servers' --max-text-chars in these tests: a session's text outgrows one request soon


def pieces(words: list[str], rng: random.Random) -> list[str]:
    """What a user sends: some context in one request, then a word and its space at a time, now
    and then a word in two parts."""
    context = ""
    while len(context) + len(words[0]) < MAX_TEXT:
        context += words.pop(0) + " "
    pieces = [context]
    for word in words:
        cut = rng.randrange(1, len(word)) if len(word) > 2 and rng.random() < 0.3 else len(word)
        pieces += [word[:cut], word[cut:] + " "] if cut < len(word) else [word + " "]
    return pieces


class Typist:
    """One user typing through a session: every piece sent and the reply to it."""

    def __init__(self, client: AsyncNextWordClient, pieces: list[str]) -> None:
        self.client = client
        self.pieces = pieces
        self.typed: list[tuple[str, Prediction, bool]] = []  # (piece, its reply, sent after SIGTERM)
        self.first_id: str | None = None
        self.last_id: str | None = None
        self.reconnects = 0

    async def run(self, sigterm: asyncio.Event, restarted: asyncio.Event, after: int) -> None:
        """Type until ``after`` pieces have been answered by the restarted server."""
        answered_after = 0
        async with self.client.session(k=3) as session:
            for piece in self.pieces:
                late = sigterm.is_set()
                self.typed.append((piece, await session.send(piece), late))
                self.first_id = self.first_id or session.session_id
                answered_after += restarted.is_set()
                if answered_after >= after:
                    break
                await asyncio.sleep(0.01)  # a fast typist, but not a flood
            self.reconnects = session.reconnects
            self.last_id = session.session_id
        assert answered_after >= after, "the text ran out before the restart"

    async def check(self) -> None:
        """Every reply is the one a session that never met a restart gives the same pieces:
        same words, same probabilities (sent late or not: both servers serve one bundle)."""
        text = ""
        async with self.client.session(k=3, reconnect=Reconnect(attempts=0)) as uninterrupted:
            for piece, got, late in self.typed:
                text += piece
                want = await uninterrupted.send(piece)
                assert_same(got, want, f"after {text[-40:]!r}{' (sent after SIGTERM)' if late else ''}")


def assert_same(got: Prediction, want: Prediction, where: str) -> None:
    assert (got.partial, got.context_tokens) == (want.partial, want.context_tokens), where
    for g, w in ((got.suggestions, want.suggestions), (got.completions, want.completions)):
        assert [s.word for s in g] == [s.word for s in w], where
        assert [s.prob for s in g] == pytest.approx([s.prob for s in w], abs=TOL), where
