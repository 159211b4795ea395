"""Would a cache of the user's own words save keystrokes? A unigram cache interpolated with the model.

    python -m benchmarks.cache_ksr [--bundle models/demo] [--weights 0,0.02,0.05,0.1] [--window 1000]
                                   TEXT [TEXT ...]

For each text, typed as ``nextword eval --ksr`` types it (``nextword.ksr``: probability
strip, 3 slots, repeats allowed, words outside the vocabulary offered once typed), the next-word
distribution at each word's start becomes

    p(w) = (1 - λ) p_model(w) + λ c(w) / N

where c(w) counts ``w`` among the last ``--window`` in-vocabulary words typed (N of them):
the simplest form of the cache of Grave et al. (2017), whose neural version weights past
positions by their hidden states' similarity instead. λ = 0 is the strip as shipped.
Prints keystroke savings for each λ; the model runs once per text.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, deque
from pathlib import Path

import numpy as np

from benchmarks.serving import ROOT
from nextword.bundle import load_bundle
from nextword.ksr import typed_before_offered, word_starts
from nextword.ranking import Ranker, UserWords
from nextword.runtime import OnnxLM
from nextword.tokenizer import is_word

SLOTS = 3


def starts(
    lm: OnnxLM, ranker: Ranker, text: str, window: int
) -> list[tuple[np.ndarray, str, Counter[str], UserWords]]:
    """Each word of ``text``: the log-probs at its start, the word, the cache and the unknown words then."""
    vocab = lm.bundle.vocab
    recent: deque[str] = deque(maxlen=window)
    out = []
    for log_probs, before, word, unknown in word_starts(lm, text, ranker):
        recent.extend(t for t in before if is_word(t) and vocab.id(t) != vocab.unk_id)
        out.append((log_probs, word, Counter(recent), UserWords(unknown.words())))
    return out


def with_cache(log_probs: np.ndarray, cache: Counter[str], weight: float, lm: OnnxLM) -> np.ndarray:
    if not weight or not cache:
        return log_probs
    total = sum(cache.values())
    ids = np.array([lm.bundle.vocab.id(w) for w in cache])
    share = np.array(list(cache.values()), dtype=np.float64) / total
    mixed = log_probs + math.log(1 - weight)
    mixed[ids] = np.logaddexp(mixed[ids], np.log(weight * share))
    return mixed


def savings(
    lm: OnnxLM, ranker: Ranker, words: list[tuple[np.ndarray, str, Counter[str], UserWords]], weight: float
) -> float:
    keys = without = 0
    for log_probs, word, cache, unknown in words:
        typed = typed_before_offered(ranker, with_cache(log_probs, cache, weight, lm), word, SLOTS, unknown)
        keys += len(word) + 1 if typed is None else typed + 1
        without += len(word) + 1
    return 1 - keys / without


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", type=Path, nargs="+")
    p.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--weights", default="0,0.02,0.05,0.1", help="values of λ, comma-separated")
    p.add_argument("--window", type=int, default=1000, help="in-vocabulary words the cache holds")
    p.add_argument("--chars", type=int, default=20_000, help="first N characters of each text")
    args = p.parse_args(argv)
    weights = [float(x) for x in args.weights.split(",")]
    if any(not 0 <= w < 1 for w in weights):
        p.error("--weights: each in [0, 1)")
    lm = OnnxLM(load_bundle(args.bundle), device="cpu")
    ranker = Ranker(lm.bundle.vocab, lexicon=lm.bundle.lexicon)
    print(f"| text | {' | '.join(f'λ = {w:g}' for w in weights)} |")
    print(f"|---|{'---|' * len(weights)}")
    for path in args.texts:
        words = starts(lm, ranker, path.read_text(encoding="utf-8")[: args.chars], args.window)
        cells = " | ".join(f"{100 * savings(lm, ranker, words, w):.2f}%" for w in weights)
        print(f"| {path.name} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
