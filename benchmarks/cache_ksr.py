"""Would a cache of the user's own words save keystrokes? Unigram and bigram caches interpolated
with the model, exactly as a learning session mixes them (``WordCache.mix``).

    python -m benchmarks.cache_ksr [--bundle models/demo] [--weights 0,0.02,0.05,0.1]
                                   [--follows 0,0.05,0.1] [--window 1000] TEXT [TEXT ...]

For each text, typed as ``nextword eval --ksr`` types it (``nextword.ksr``: probability
strip, 3 slots, repeats allowed, words outside the vocabulary offered once typed), the next-word
distribution at each word's start becomes

    p(w) = (1 - λ - μ) p_model(w) + λ c(w) / N + μ c(v w) / c(v ·)

where c(w) counts ``w`` among the last ``--window`` in-vocabulary words typed (N of them), v
is the latest of them and c(v w) how often ``w`` followed it there (μ is 0 while v has not been
followed yet): the simplest form of the cache of Grave et al. (2017), whose neural version
weights past positions by their hidden states' similarity instead. λ = 0 is the strip of a
session that does not learn. Prints keystroke savings for each λ with μ = 0, then for each μ
with the λ sessions use (``CACHE_WEIGHT``); the model runs once per text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.serving import ROOT
from nextword.bundle import load_bundle
from nextword.ksr import typed_before_offered, word_starts
from nextword.ranking import CACHE_WEIGHT, Ranker, Scores, UserWords, WordCache
from nextword.runtime import OnnxLM

SLOTS = 3


def starts(
    lm: OnnxLM, ranker: Ranker, text: str, window: int
) -> list[tuple[np.ndarray, str, WordCache, UserWords]]:
    """Each word of ``text``: the log-probs at its start, the word, the cache and the unknown words then."""
    sized = type("Cache", (WordCache,), {"SIZE": window})
    cache: WordCache = sized()
    out = []
    for log_probs, before, word, unknown in word_starts(lm, text, ranker):
        cache = cache.after(ranker.cacheable(lm.bundle.vocab.encode(before)))
        out.append((log_probs, word, cache, UserWords(unknown.words())))
    return out


def savings(
    ranker: Ranker, words: list[tuple[np.ndarray, str, WordCache, UserWords]], weight: float, follow: float
) -> float:
    keys = without = 0
    for log_probs, word, cache, unknown in words:
        mixed = cache.mix(Scores(None, None, log_probs), weight, follow).log_probs
        assert mixed is not None
        typed = typed_before_offered(ranker, mixed, word, SLOTS, unknown)
        keys += len(word) + 1 if typed is None else typed + 1
        without += len(word) + 1
    return 1 - keys / without


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", type=Path, nargs="+")
    p.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--weights", default="0,0.02,0.05,0.1", help="values of λ (μ = 0), comma-separated")
    p.add_argument("--follows", default="0.05,0.1", help=f"values of μ (λ = {CACHE_WEIGHT}), comma-separated")
    p.add_argument("--window", type=int, default=1000, help="in-vocabulary words the cache holds")
    p.add_argument("--chars", type=int, default=20_000, help="first N characters of each text")
    args = p.parse_args(argv)
    columns = [(float(x), 0.0) for x in args.weights.split(",")]
    columns += [(CACHE_WEIGHT, float(x)) for x in args.follows.split(",") if x]
    if any(not 0 <= w < 1 or not 0 <= f < 1 - w for w, f in columns):
        p.error("--weights, --follows: shares from 0, λ + μ below 1")
    lm = OnnxLM(load_bundle(args.bundle), device="cpu")
    ranker = Ranker(lm.bundle.vocab, lexicon=lm.bundle.lexicon)
    print(f"| text | {' | '.join(f'λ = {w:g}, μ = {f:g}' for w, f in columns)} |")
    print(f"|---|{'---|' * len(columns)}")
    for path in args.texts:
        words = starts(lm, ranker, path.read_text(encoding="utf-8")[: args.chars], args.window)
        cells = " | ".join(f"{100 * savings(ranker, words, w, f):.2f}%" for w, f in columns)
        print(f"| {path.name} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
