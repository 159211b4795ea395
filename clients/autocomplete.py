"""``nextword complete``: type in a terminal, see next-word suggestions as you type.

The completer holds ONE server session for the whole prompt and sends only
the text typed since its last request, so each keystroke costs the model one
step whatever the length of the line. When text is deleted or edited before
the end, the session is reset with the full text instead.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, ThreadedCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from nextword.options import from_args, option, switch
from nextword.ranking import POLICIES, PROBABILITY, strip_message
from nextword.tokenizer import normalize
from nextword.v1 import nextword_pb2 as pb

from .channel import CredentialsError
from .client import NextWordClient, Prediction, SyncSession
from .connection import ConnectionOptions
from .predict import format_prob, rpc_error_message

# The raw (un-normalised) partial word at the end of the text, as the tokenizer sees one.
_LETTER = r"(?:[^\W_]|[\u0300-\u036f])"
_RAW_PARTIAL = re.compile(rf"{_LETTER}+(?:['\-\u2019]{_LETTER}+)*['\-\u2019]?$")


def _typed_partial(text: str, partial: str) -> str:
    """The characters of ``text`` that the server's (normalised) ``partial`` came from."""
    match = _RAW_PARTIAL.search(text)
    if match and normalize(match.group()) == partial:
        return match.group()
    return text[len(text) - len(partial) :] if partial else ""


def _match_case(word: str, typed: str) -> str:
    # The vocabulary is lower case; keep the capital the user typed ("Th" -> "The").
    if typed[:1].isupper():
        return word.upper() if len(typed) > 1 and typed.isupper() else word[:1].upper() + word[1:]
    return word


class NextWordCompleter(Completer):
    """A prompt_toolkit completer backed by one streaming session (reopened if it fails)."""

    def __init__(self, client: NextWordClient, k: int = 5, strip: pb.Strip | None = None) -> None:
        self.client = client
        self.k = k
        self.strip = strip  # how the session fills its slots (None: the server's default)
        self.last: Prediction | None = None
        self.last_error: str | None = None
        self.requests = 0  # requests sent (for the toolbar and tests)
        self._session: SyncSession | None = None
        self._sent = ""  # the text the session's context holds
        self._lock = threading.Lock()  # ThreadedCompleter may call us from several threads

    def predict(self, text: str) -> Prediction | None:
        """Bring the session up to ``text`` (sending only what is new) and return its prediction."""
        with self._lock:
            if self._session is not None and self.last is not None and text == self._sent:
                return self.last  # nothing typed since (cursor moves, Tab): no round-trip
            try:
                if self._session is None:
                    self._session = self.client.session(k=self.k, strip=self.strip)
                    pred = self._session.send(text, reset=True)
                elif text.startswith(self._sent):
                    pred = self._session.send(text[len(self._sent) :])
                else:  # backspace or an edit before the end: the context no longer matches
                    pred = self._session.send(text, reset=True)
            except grpc.RpcError as exc:
                # Keep the prompt alive; the next keystroke opens a fresh session with the full text.
                self.last_error = rpc_error_message(exc, self.client.target)
                self._drop_session()
                return None
            self.requests += 1
            self._sent, self.last, self.last_error = text, pred, None
            return pred

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        pred = self.predict(text)
        if pred is None:
            return
        if pred.partial:
            typed = _typed_partial(text, pred.partial)
            for s in pred.completions:
                yield Completion(
                    _match_case(s.word, typed),
                    start_position=-len(typed),
                    display=s.word,
                    display_meta=format_prob(s.prob),
                )
            return
        # After punctuation ("end.") the next word needs its own space.
        sep = "" if not text or text[-1].isspace() else " "
        for s in pred.suggestions:
            yield Completion(sep + s.word, display=s.word, display_meta=format_prob(s.prob))

    def toolbar(self) -> str:
        if self.last_error:
            return self.last_error
        if self.last is None:
            return "start typing"
        nxt = "  ".join(f"{s.word} {format_prob(s.prob)}" for s in self.last.suggestions)
        return f"next: {nxt}   [{self.last.context_tokens} tokens, {self.requests} requests]"

    def _drop_session(self) -> None:
        if self._session is not None:
            with contextlib.suppress(grpc.RpcError):
                self._session.close()
        self._session, self._sent, self.last = None, "", None

    def close(self) -> None:
        with self._lock:
            self._drop_session()


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("backspace")
    def _backspace(event: KeyPressEvent) -> None:
        # prompt_toolkit completes only on insertion; after a deletion ask again, so the
        # menu and toolbar follow the shorter text (the completer resets the session for it).
        buf = event.current_buffer
        buf.delete_before_cursor(count=event.arg)
        if buf.text:
            buf.start_completion(select_first=False)

    return kb


@dataclass(frozen=True)
class CompleteOptions:
    k: int = option(5, "suggestions shown")
    timeout: float = option(10.0, "seconds to wait for each answer")
    strip: str = option(
        PROBABILITY,
        "how the suggestions are chosen (keystrokes: a word typed in full goes last)",
        choices=POLICIES,
    )
    no_repeat: bool = switch("within a word, do not offer again a word you typed past")
    learn: bool = switch("learn as you type: the words you use often rise in the suggestions")


def main(args: argparse.Namespace) -> int:
    opts = from_args(CompleteOptions, args)
    conn = from_args(ConnectionOptions, args)
    try:
        client = conn.client(timeout=opts.timeout)
    except CredentialsError as exc:
        print(f"nextword complete: error: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            info = client.model_info()
        except grpc.RpcError as exc:
            print(rpc_error_message(exc, conn.target), file=sys.stderr)
            return 1
        completer = NextWordCompleter(
            client, k=opts.k, strip=strip_message(opts.strip, opts.no_repeat, opts.learn)
        )
        print(
            f"{info.name} ({info.cell}, {info.provider}) at {conn.target}. "
            "Tab or arrows pick a word; Enter starts a new line; Ctrl-D quits."
        )
        # Completion runs in a thread so a slow reply never freezes typing.
        prompt: PromptSession[str] = PromptSession(
            completer=ThreadedCompleter(completer),
            complete_while_typing=True,
            bottom_toolbar=completer.toolbar,
            refresh_interval=0.5,
            key_bindings=_key_bindings(),
        )
        try:
            while True:
                try:
                    prompt.prompt("> ")
                except KeyboardInterrupt:
                    continue
        except EOFError:
            pass
        finally:
            completer.close()
    return 0
