"""From next-word log-probabilities to the words a user is offered."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from nextword.tokenizer import Vocab, is_word
from nextword.v1 import nextword_pb2 as pb

_PREFIX_END = "\U0010ffff"  # sorts after any character: prefix + this bounds the words with that prefix


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

    def __init__(self, vocab: Vocab, *, graph_k: int = 0) -> None:
        self.graph_k = graph_k  # the graphs rank this many offerable words themselves
        self._words = vocab.words
        self._suggestable = np.array([i for i, w in enumerate(vocab.words) if is_word(w)], dtype=np.int64)
        by_word = sorted(self._suggestable.tolist(), key=lambda i: vocab.words[i])
        self._sorted_words = [vocab.words[i] for i in by_word]
        self._sorted_ids = np.array(by_word, dtype=np.int64)

    def predict(self, scores: Scores, partial: str, k: int, context_tokens: int) -> pb.Prediction:
        """Suggestions from the graph's own top-k when it has enough; completions need the full row."""
        if scores.top_values is not None and scores.top_ids is not None and k <= len(scores.top_values):
            # One exp and one conversion for all k: per-item numpy scalars cost more than the k words.
            probs, ids = np.exp(scores.top_values[:k]).tolist(), scores.top_ids[:k].tolist()
            words = self._words
            suggestions = [pb.Suggestion(word=words[i], prob=p) for i, p in zip(ids, probs, strict=True)]
        else:
            assert scores.log_probs is not None, "the batcher fetches log_probs when the graph ranks too few"
            suggestions = self._top(scores.log_probs, self._suggestable, k)
        completions = []
        if partial:
            assert scores.log_probs is not None, "completions need the full distribution"
            completions = self._top(scores.log_probs, self.completion_ids(partial), k)
        return pb.Prediction(
            suggestions=suggestions,
            completions=completions,
            partial=partial,
            context_tokens=context_tokens,
        )

    def completion_ids(self, prefix: str) -> np.ndarray:
        """Ids of the suggestable words that start with ``prefix`` (already normalised)."""
        lo = bisect.bisect_left(self._sorted_words, prefix)
        hi = bisect.bisect_left(self._sorted_words, prefix + _PREFIX_END, lo)
        return self._sorted_ids[lo:hi]

    def _top(self, log_probs: np.ndarray, ids: np.ndarray, k: int) -> list[pb.Suggestion]:
        if len(ids) == 0:
            return []
        scores = log_probs[ids]
        # Partial selection first (linear), then sort only the k kept.
        keep = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        words = self._words
        probs = np.exp(scores[keep]).tolist()
        return [pb.Suggestion(word=words[i], prob=p) for i, p in zip(ids[keep].tolist(), probs, strict=True)]
