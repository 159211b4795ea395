"""Word-level tokenizer and vocabulary: the one both training and serving use.

Rules (documented in README, versioned by ``TOKENIZER_VERSION``):

* Text is NFKC-normalised and lower-cased; curly quotes and apostrophes become
  straight ones; ``_`` (Gutenberg's emphasis markup) is dropped.
* A *word* is a run of letters/digits, possibly joined by an inner apostrophe
  or hyphen: ``don't``, ``twenty-one``, ``o'clock``.
* A word made only of digits becomes the ``<num>`` token.
* Every other non-space character is a token of its own (``,`` ``.`` ``"``
  ``-``): one character each, so appending text can never merge a punctuation
  token that was already emitted (this is what keeps streaming and one-shot
  tokenization identical).
* ``<eos>`` ends a paragraph (a blank line) in raw text, or a line in
  pre-tokenized, one-sentence-per-line text.
* A word outside the vocabulary is ``<unk>``.

Text that ends in a letter or digit (or such a word followed by an apostrophe
or hyphen) ends in a *partial word*: a keyboard user is still typing it.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENIZER_NAME = "nextword-words"
TOKENIZER_VERSION = 1

UNK, EOS, NUM = "<unk>", "<eos>", "<num>"
SPECIALS = (UNK, EOS, NUM)

_LETTER = r"(?:[^\W_]|[\u0300-\u036f])"  # letters, digits and combining accents
_WORD = rf"{_LETTER}+(?:['\-]{_LETTER}+)*"
_TOKEN_RE = re.compile(rf"{_WORD}|\S")
_PARTIAL_RE = re.compile(rf"{_WORD}['\-]?\Z")  # \Z, not $: $ also matches before a final newline
_DIGITS_RE = re.compile(r"\d+")
_TRANSLATE = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "_": None})
_PTB_QUOTES = {"``": '"', "''": '"'}


def normalize(text: str) -> str:
    """NFKC, lower case, straight quotes, no underscores."""
    return unicodedata.normalize("NFKC", text).lower().translate(_TRANSLATE)


def _words(normalized: str) -> list[str]:
    return [NUM if _DIGITS_RE.fullmatch(t) else t for t in _TOKEN_RE.findall(normalized)]


def tokenize(text: str) -> list[str]:
    """All tokens of ``text`` (a trailing partial word counts as a word)."""
    return _words(normalize(text))


def split_partial(text: str) -> tuple[list[str], str]:
    """Split text into its complete tokens and the partial word it ends in.

    The partial word is returned normalised ("" when the text ends in a space
    or punctuation). ``split_partial(a + b)`` always equals tokenizing ``a``'s
    complete tokens followed by ``split_partial(partial(a) + b)``: sessions rely
    on this to feed each word to the model exactly once.
    """
    norm = normalize(text)
    match = _PARTIAL_RE.search(norm)
    if match is None:
        return _words(norm), ""
    return _words(norm[: match.start()]), match.group()


def is_word(token: str) -> bool:
    """Whether a vocabulary entry may be offered to a user (not punctuation or a special)."""
    return token not in SPECIALS and any(ch.isalnum() for ch in token)


def corpus_tokens(text: str, *, line_per_sentence: bool) -> Iterator[str]:
    """Tokens of a training/evaluation corpus, with ``<eos>`` at sentence/paragraph ends.

    Raw text (``line_per_sentence=False``): hard-wrapped lines are joined, a
    blank line ends a paragraph. Pre-tokenized text (``True``, e.g. Brown):
    every line is a sentence and ``` `` ``` / ``''`` quotes become ``"``.
    """
    if line_per_sentence:
        for line in text.splitlines():
            parts = [_PTB_QUOTES.get(p, p) for p in line.split()]
            if parts:
                yield from tokenize(" ".join(parts))
                yield EOS
        return
    for paragraph in re.split(r"\n\s*\n", text):
        tokens = tokenize(paragraph)
        if tokens:
            yield from tokens
            yield EOS


def looks_pretokenized(text: str) -> bool:
    """Heuristic for ``--format auto``: PTB-style text has spaces before punctuation."""
    sample = text[:200_000]
    spaced = len(re.findall(r" [,.;:?!] ", sample))
    glued = len(re.findall(r"\w[,.;:?!](?:\s|$)", sample))
    return spaced > glued


@dataclass(frozen=True)
class Vocab:
    """Words by id; ids are line numbers of ``vocab.txt``. Specials come first."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary has duplicate entries")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    @property
    def unk_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    def id(self, token: str) -> int:
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return index.get(token, 0)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return [index.get(t, 0) for t in tokens]

    @classmethod
    def build(cls, tokens: Iterable[str], *, max_size: int, min_count: int) -> Vocab:
        """Most frequent tokens (ties broken alphabetically, so builds are deterministic)."""
        counts = Counter(t for t in tokens if t not in SPECIALS)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        keep = [w for w, c in ranked if c >= min_count][: max(0, max_size - len(SPECIALS))]
        return cls(SPECIALS + tuple(keep))

    def save(self, path: Path) -> None:
        path.write_text("".join(w + "\n" for w in self.words), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls(tuple(path.read_text(encoding="utf-8").split("\n")[:-1]))


_PREFIX_END = "\U0010ffff"  # sorts after any character: prefix + this bounds the words with that prefix


def prefix_run(words: Sequence[str], prefix: str) -> tuple[int, int]:
    """Where the words starting with ``prefix`` are in sorted ``words``: ``words[lo:hi]``."""
    lo = bisect.bisect_left(words, prefix)
    return lo, bisect.bisect_left(words, prefix + _PREFIX_END, lo)


class Lexicon:
    """Words of a training text outside its vocabulary, with how often they occur (``lexicon.txt``).

    The model reads each of them as ``<unk>``; the ranker offers them as completions with their
    share of the model's ``<unk>`` probability, so any word of the training text can be completed.
    Sorted, so the words starting with a prefix are one run, found by bisection.
    """

    def __init__(self, counts: dict[str, int]) -> None:
        self.words = sorted(counts)
        self.counts = [counts[w] for w in self.words]
        self.total = sum(self.counts) or 1
        self._counts = np.array(self.counts, dtype=np.int64)  # for picking the most used of a run

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        if not isinstance(word, str):
            return False
        at = bisect.bisect_left(self.words, word)
        return at < len(self.words) and self.words[at] == word

    def starting(self, prefix: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` most frequent words starting with ``prefix``, each with its share of the lexicon."""
        lo, hi = prefix_run(self.words, prefix)
        # Most used first, then alphabetical (the run's order): one distinct key per word, so that a
        # partial selection (linear in the run) and a sort of the k kept give exactly that order.
        key = -self._counts[lo:hi] * (hi - lo) + np.arange(hi - lo)
        keep = np.argpartition(key, k - 1)[:k] if k < len(key) else np.arange(len(key))
        keep = keep[np.argsort(key[keep])]
        return [(self.words[lo + i], self.counts[lo + i] / self.total) for i in keep.tolist()]

    @classmethod
    def build(
        cls, tokens: Iterable[str], vocab: Vocab, *, min_count: int = 2, max_words: int = 50_000
    ) -> Lexicon:
        """The words of ``tokens`` outside ``vocab`` seen ``min_count`` times or more, the most
        frequent ``max_words`` of them (ties alphabetically: builds are deterministic)."""
        counts = Counter(t for t in tokens if vocab.id(t) == vocab.unk_id and is_word(t) and t != NUM)
        ranked = sorted(((w, c) for w, c in counts.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
        return cls(dict(ranked[:max_words]))

    def save(self, path: Path) -> None:
        order = sorted(range(len(self.words)), key=lambda i: (-self.counts[i], self.words[i]))
        path.write_text("".join(f"{self.words[i]}\t{self.counts[i]}\n" for i in order), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Lexicon:
        counts = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            word, count = line.split("\t")
            counts[word] = int(count)
        return cls(counts)
