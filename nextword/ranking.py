"""From next-word log-probabilities to the words a user is offered."""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, Self, TypeVar

import numpy as np

from nextword.tokenizer import Lexicon, Vocab, is_word, prefix_run
from nextword.v1 import nextword_pb2 as pb

PROBABILITY, KEYSTROKES = "probability", "keystrokes"  # how a strip's slots are filled (Ranker.predict)
POLICIES = (PROBABILITY, KEYSTROKES)
# Keys a word saves by being offered now rather than after one more letter: at most one, as it
# can be offered then too (none for a word typed in full, which goes last). Ranking by probability × all the
# letters left measured worse: 0.9-1.0 points of keystroke savings fewer than probability alone.
GAIN_CAP = 1.0
T = TypeVar("T")
USER_WORDS = 128  # how many of a user's latest out-of-vocabulary words a session keeps
USER_WORD_CHARS = 40  # a longer word is not kept (a session record stays a few kilobytes at most)
CACHE_WORDS = 1000  # how many of a user's latest in-vocabulary words a learning session keeps
# The cache's share of a learning session's next-word distribution (λ). Measured on mixed's
# sources (benchmarks/cache_ksr.py): 0.05 gains 0.4-0.8 points of keystrokes on text unlike the
# training text and loses nothing measurable on text like it; 0.1 gains a little more on the
# former and starts to lose on the latter.
CACHE_WEIGHT = 0.05
# The share of the words that followed the user's latest word earlier in the cache's window (a
# bigram cache, μ), beside λ's unigram. Measured the same way: 0.05 gains 0.2-0.6 points more on
# text unlike the training text (phrases the user repeats) and is level on text like it.
FOLLOW_WEIGHT = 0.05


class _Recent(Generic[T]):
    """The latest ``SIZE`` items a user typed, oldest first, repeats included, with how often
    each is in the window. Immutable in use: ``after`` gives a new window (a session's is
    replaced when its request is committed, never changed under a request in flight)."""

    SIZE = 0

    def __init__(self, items: Iterable[T] = ()) -> None:
        self._window: deque[T] = deque(maxlen=self.SIZE)
        self._counts: Counter[T] = Counter()
        self.add(items)

    def keeps(self, item: T) -> bool:
        return True

    def add(self, items: Iterable[T]) -> None:
        """Append ``items``, evicting the oldest beyond the bound."""
        for item in items:
            if not self.keeps(item):
                continue
            if len(self._window) == self._window.maxlen:
                old = self._window[0]
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]
            self._window.append(item)
            self._counts[item] += 1

    def after(self, items: Sequence[T]) -> Self:
        """This window with ``items`` added (self when there are none: the common case)."""
        if not items:
            return self
        grown = type(self)(self._window)
        grown.add(items)
        return grown

    def items(self) -> list[T]:
        """The window, oldest first (what a stored session keeps)."""
        return list(self._window)

    def __len__(self) -> int:
        return len(self._window)

    def __contains__(self, item: object) -> bool:
        return item in self._counts


class UserWords(_Recent[str]):
    """The words a user typed lately that the model cannot name (outside its vocabulary).

    A window of the latest ``USER_WORDS`` such words: a name or a word of today's slang the
    model reads as ``<unk>`` becomes a completion as soon as the user has typed it once. The
    ranker gives such a word its share of the model's ``<unk>`` probability, in proportion to
    how often it is in the window. The window is part of a session: stored with it, and kept
    across ``reset``.
    """

    SIZE = USER_WORDS

    def keeps(self, word: str) -> bool:
        return len(word) <= USER_WORD_CHARS

    def words(self) -> list[str]:
        return self.items()

    def starting(self, prefix: str) -> list[tuple[str, float]]:
        """The words starting with ``prefix``, each with its share of the window."""
        total = len(self._window)
        return [(w, c / total) for w, c in self._counts.items() if w.startswith(prefix)]


def strip_message(policy: str, no_repeat: bool, learn: bool = False) -> pb.Strip:
    """The API's ``Strip`` for a policy name (``POLICIES``), ``no_repeat`` and ``learn``: what a
    client sends."""
    value = pb.Strip.POLICY_KEYSTROKES if policy == KEYSTROKES else pb.Strip.POLICY_PROBABILITY
    return pb.Strip(policy=value, no_repeat=no_repeat, learn=learn)


@dataclass(frozen=True)
class StripState:
    """How a session's strip is filled, and with ``no_repeat`` what its current word has shown."""

    policy: str = PROBABILITY
    no_repeat: bool = False
    learn: bool = False  # mix in a cache of the user's own words (WordCache)
    passed: tuple[str, ...] = ()  # shown earlier in the current word, and typed past
    shown: tuple[str, ...] = ()  # shown by the latest reply

    def chosen(self, strip: pb.Strip) -> StripState:
        """This state under the settings a request chose (``Strip`` of the API)."""
        policy = KEYSTROKES if strip.policy == pb.Strip.POLICY_KEYSTROKES else PROBABILITY
        return replace(self, policy=policy, no_repeat=strip.no_repeat, learn=strip.learn)

    def passing(self, *, new_word: bool, grew: bool) -> tuple[str, ...]:
        """The words not to offer now: none in a new word; in the same word, those passed over
        before and, when the user typed on (``grew``), the latest reply's too."""
        if not self.no_repeat or new_word:
            return ()
        return self.passed + self.shown if grew else self.passed

    def after(self, passed: tuple[str, ...], prediction: pb.Prediction) -> StripState:
        """The state once ``prediction`` is shown, ``passed`` having been left out of it."""
        if not self.no_repeat:
            return self
        strip = prediction.completions if prediction.partial else prediction.suggestions
        return replace(self, passed=passed, shown=tuple(s.word for s in strip))


NO_USER_WORDS = UserWords()  # shared by every session with none: replaced (``after``), never added to


class WordCache(_Recent[int]):
    """The words of the vocabulary a user typed lately (their ids), for a session that learns
    its user (``Strip.learn``): the simplest form of Grave et al.'s (2017) cache, a unigram of the
    latest ``CACHE_WORDS`` such words, and a bigram of them, mixed into the model's next-word
    distribution,

        p(w) = (1 - λ - μ) p_model(w) + λ c(w) / N + μ c(v w) / c(v ·),

    v the latest word typed, c(v w) how often w followed it in the window (μ is 0 while v has
    not been followed yet), so that the words and phrases this user repeats (a name, a topic,
    a habit) rise in the strip. Kept, like ``UserWords``, with the session (stored with it,
    across ``reset``).
    """

    SIZE = CACHE_WORDS

    def mix(self, scores: Scores, weight: float = CACHE_WEIGHT, follow: float = FOLLOW_WEIGHT) -> Scores:
        """``scores`` (with the whole distribution) mixed with this cache (λ ``weight``, μ
        ``follow``; no λ, no learning): the graph's own top-k no longer holds, so only the mixed
        distribution is returned."""
        assert scores.log_probs is not None, "mixing needs the whole distribution"
        if not self._window or not weight:
            return scores
        window = np.fromiter(self._window, dtype=np.int64, count=len(self._window))
        followers = window[1:][window[:-1] == window[-1]]  # what came after the latest word before
        follow = follow if len(followers) else 0.0
        ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float64, count=len(self._counts))
        mixed = scores.log_probs + math.log1p(-weight - follow)
        mixed[ids] = np.logaddexp(mixed[ids], np.log(weight * counts / len(window)))
        if follow:
            after, times = np.unique(followers, return_counts=True)
            mixed[after] = np.logaddexp(mixed[after], np.log(follow * times / len(followers)))
        return Scores(None, None, mixed)


NO_CACHE = WordCache()  # shared by every session with none: replaced (``after``), never added to


@dataclass(frozen=True)
class Scores:
    """One context's next-word scores, as much of them as a graph call fetched."""

    top_values: np.ndarray | None  # [K] log-probs of the top offerable words, best first
    top_ids: np.ndarray | None  # [K]
    log_probs: np.ndarray | None  # [vocab]: the whole distribution, only when asked for


class Ranker:
    """Top-k suggestions and prefix completions over the words a user may be offered.

    Punctuation and specials (``<unk>``, ``<eos>``, ``<num>``) are never offered.
    Completions use the suggestable words sorted once at startup: the words
    starting with a prefix are one contiguous run, found by bisection.
    """

    def __init__(self, vocab: Vocab, *, graph_k: int = 0, lexicon: Lexicon | None = None) -> None:
        self.graph_k = graph_k  # the graphs rank this many offerable words themselves
        self._vocab = vocab
        self._lexicon = lexicon  # training words outside the vocabulary: completions too
        self._words = vocab.words
        self._suggestable = np.array([i for i, w in enumerate(vocab.words) if is_word(w)], dtype=np.int64)
        by_word = sorted(self._suggestable.tolist(), key=lambda i: vocab.words[i])
        self._sorted_words = [vocab.words[i] for i in by_word]
        self._sorted_ids = np.array(by_word, dtype=np.int64)
        self._lengths = np.array([len(w) for w in vocab.words], dtype=np.float64)  # keys a word costs
        self._offerable = np.zeros(len(vocab.words), dtype=bool)
        self._offerable[self._suggestable] = True

    def cacheable(self, ids: Sequence[int]) -> list[int]:
        """Those of ``ids`` a learning session's cache keeps: the words the strip may offer."""
        offerable = self._offerable
        return [i for i in ids if offerable[i]]

    def can_offer(self, word: str, user_words: UserWords | None = None) -> bool:
        """Whether some strip can show ``word``: a suggestable word of the vocabulary, a word of the
        lexicon, or one of ``user_words``."""
        i = bisect.bisect_left(self._sorted_words, word)
        return (
            (i < len(self._sorted_words) and self._sorted_words[i] == word)
            or (user_words is not None and word in user_words)
            or (self._lexicon is not None and word in self._lexicon)
        )

    def unknown(self, tokens: Sequence[str], ids: Sequence[int]) -> list[str]:
        """The words among ``tokens`` (encoded as ``ids``) the vocabulary lacks (what ``UserWords`` keeps)."""
        unk = self._vocab.unk_id
        return [t for t, i in zip(tokens, ids, strict=True) if i == unk and is_word(t)]

    def predict(
        self,
        scores: Scores,
        partial: str,
        k: int,
        context_tokens: int,
        user_words: UserWords | None = None,
        *,
        policy: str = PROBABILITY,
        passed: Collection[str] = (),
    ) -> pb.Prediction:
        """Suggestions from the graph's own top-k when it has enough; completions need the full row.

        ``user_words``: words outside the vocabulary the user typed, offered as completions too.
        ``policy``: fill the slots by probability, or by the keys a word is expected to save by
        being offered now (``KEYSTROKES``: probability × ``GAIN_CAP``-capped characters left, so a
        word already typed in full, which would save nothing, comes after every word that saves a
        key). ``passed``: words shown earlier in this word and not taken, not offered again.
        """
        typed = None if policy == PROBABILITY else len(partial)
        suggestions = self._suggestions(scores, k, typed)
        completions = []
        if partial:
            assert scores.log_probs is not None, "completions need the full distribution"
            completions = self._top(scores.log_probs, self.completion_ids(partial), k, typed, passed)
            if user_words or self._lexicon:
                completions = self._with_unknown_words(
                    completions, scores.log_probs, partial, k, user_words, typed, passed
                )
        return pb.Prediction(
            suggestions=suggestions,
            completions=completions,
            partial=partial,
            context_tokens=context_tokens,
        )

    def _suggestions(self, scores: Scores, k: int, typed: int | None) -> list[pb.Suggestion]:
        if scores.top_values is not None and scores.top_ids is not None and k <= len(scores.top_values):
            if typed is not None:  # by keys saved, among the words the graph ranked
                return self._top(scores.top_values, scores.top_ids, k, typed, (), values_by_id=False)
            # One exp and one conversion for all k: per-item numpy scalars cost more than the k words.
            probs, ids = np.exp(scores.top_values[:k]).tolist(), scores.top_ids[:k].tolist()
            words = self._words
            return [pb.Suggestion(word=words[i], prob=p) for i, p in zip(ids, probs, strict=True)]
        assert scores.log_probs is not None, "the batcher fetches log_probs when the graph ranks too few"
        return self._top(scores.log_probs, self._suggestable, k, typed, ())

    def completion_ids(self, prefix: str) -> np.ndarray:
        """Ids of the suggestable words that start with ``prefix`` (already normalised)."""
        lo, hi = prefix_run(self._sorted_words, prefix)
        return self._sorted_ids[lo:hi]

    def _top(
        self,
        log_probs: np.ndarray,
        ids: np.ndarray,
        k: int,
        typed: int | None,
        passed: Collection[str],
        *,
        values_by_id: bool = True,
    ) -> list[pb.Suggestion]:
        """The best ``k`` of ``ids``: by probability (``typed`` None) or by probability × the
        characters left after ``typed`` (capped: ``GAIN_CAP``). ``log_probs`` is indexed by id, or (not
        ``values_by_id``) aligned with ``ids``."""
        scores = log_probs[ids] if values_by_id else log_probs
        if passed:
            fresh = ~np.isin(ids, [self._vocab.id(w) for w in passed])
            ids, scores = ids[fresh], scores[fresh]
        if len(ids) == 0:
            return []
        key = (
            scores if typed is None else scores + np.log(np.clip(self._lengths[ids] - typed, 1e-9, GAIN_CAP))
        )
        # Partial selection first (linear), then sort only the k kept.
        keep = np.argpartition(-key, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
        keep = keep[np.argsort(-key[keep], kind="stable")]
        words = self._words
        probs = np.exp(scores[keep]).tolist()
        return [pb.Suggestion(word=words[i], prob=p) for i, p in zip(ids[keep].tolist(), probs, strict=True)]

    def _with_unknown_words(
        self,
        completions: list[pb.Suggestion],
        log_probs: np.ndarray,
        partial: str,
        k: int,
        user_words: UserWords | None,
        typed: int | None,
        passed: Collection[str],
    ) -> list[pb.Suggestion]:
        """``completions`` with the words the model cannot name that start with ``partial``: the
        user's own and the training text's (the bundle's lexicon), best k of all.

        Such a word gets p(<unk>) times its share: of the user's window, of the lexicon, or half
        of each when there are both, so that the user's own words come first.
        """
        mine = dict(user_words.starting(partial)) if user_words else {}
        known = dict(self._lexicon.starting(partial, k + len(passed))) if self._lexicon else {}
        weight = 0.5 if mine and self._lexicon else 1.0
        shares = {w: weight * s for w, s in known.items()}
        for w, s in mine.items():
            shares[w] = shares.get(w, 0.0) + weight * s
        found = [(w, share) for w, share in shares.items() if w not in passed]
        if not found:
            return completions
        unk = math.exp(float(log_probs[self._vocab.unk_id]))
        extra = [pb.Suggestion(word=w, prob=unk * share) for w, share in found]

        def key(s: pb.Suggestion) -> float:
            return -s.prob if typed is None else -s.prob * min(len(s.word) - typed, GAIN_CAP)

        return sorted([*completions, *extra], key=key)[:k]  # stable: a tie keeps the model's word first
