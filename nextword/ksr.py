"""Keystroke savings: how many keys a suggestion strip saves someone typing a text.

The count mirrors Presage's ``presage_simulator`` (presage 0.9.1,
``src/lib/simulator/simulator.cpp`` and ``src/tools/presageSimulator.cpp``), so
that ``benchmarks/presage_ksr.py`` gives a number on the same scale:

* The text is a sequence of words; punctuation and whitespace are neither
  typed nor counted (Presage's tokenizer drops its separator characters).
* Without prediction a word costs its length plus one for the space after it.
* With prediction, before each character of the word the strip is looked at:
  the next-word suggestions before the first character, the completions of the
  prefix once some are typed. When the word is there it is taken with one key
  and the space after it comes free (Presage's ``autoSpace``); otherwise the
  next character is typed. A word never offered costs its length plus the space.
* KSR = 1 - (typed + selections) / (keys without prediction), i.e. Presage's
  1 - (ki + ks) / kn.

Matching ignores case: our tokenizer lower-cases (a keyboard re-capitalises a
taken suggestion); ``benchmarks/presage_ksr.py`` runs Presage with
``presage_simulator -i`` and a lower-cased database to match.

The model runs as the server runs it: state after ``<eos>`` from zeros, then
the text fed as it is typed, keystroke by keystroke through ``split_partial``
(punctuation included, no ``<eos>`` at blank lines: a session never gets one),
one ``step`` per word for the tokens completed since the previous word began.
The distribution at a word's start serves all its prefixes, as the server's
``head`` would give the same one; ranking is ``nextword.ranking.Ranker``'s, with
the words outside the vocabulary typed so far offered as completions, as a
session offers them (``nextword.ranking.UserWords``).

Remaining differences from ``presage_simulator``:

* A word is our tokenizer's word, so ``don't`` and ``well-known`` are one word
  (one suggestion) where Presage, splitting at ``'`` and ``-``, sees two; both
  count the same keys without prediction (``don't`` + space = ``don`` + space +
  ``t`` + space). Non-ASCII letters are one key here, one per UTF-8 byte there.
* Presage's context is the words only; ours has the punctuation as typed.
* Presage starts its selection counter at 1 and counts an empty last token when
  the text ends in a separator (at most two keys in total); we count neither.
* Presage does not re-offer, within a word, suggestions it already showed
  (``REPEAT_SUGGESTIONS`` no); here that is ``no_repeat``, off unless asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from nextword.progress import progress
from nextword.ranking import PROBABILITY, Ranker, Scores, UserWords, WordCache
from nextword.runtime import OnnxLM
from nextword.tokenizer import split_partial


def typed_words(text: str) -> Iterator[tuple[list[str], str]]:
    """Each word of ``text`` with the tokens completed since the previous word began.

    Replays ``text`` one keystroke at a time through ``split_partial`` as a
    session would, so the tokens are exactly those the server feeds the model.
    The word is normalised, without the apostrophe or hyphen it may end in
    (``dogs'`` is the word ``dogs`` and the token ``'``).
    """
    pending = ""  # the partial word, as a session keeps it
    fed: list[str] = []  # tokens completed since the last word began
    before: list[str] = []  # those tokens, for the word being typed
    word = ""
    for ch in text:
        complete, partial = split_partial(pending + ch)
        fed.extend(complete)
        if partial and (not pending or complete):  # this keystroke began a word
            if word:
                yield before, word.rstrip("'-")
            before, fed = fed, []
        if partial:
            word = partial
        pending = partial
    if word:
        yield before, word.rstrip("'-")


def keystroke_savings(
    lm: OnnxLM,
    text: str,
    *,
    slots: int = 3,
    max_chars: int | None = None,
    policy: str = PROBABILITY,
    no_repeat: bool = False,
    learn: float = 0.0,
) -> dict[str, Any]:
    """Simulate typing ``text`` (its first ``max_chars`` characters) with a ``slots``-word strip.

    ``policy`` fills the strip (``Ranker.predict``); ``no_repeat``: a word the strip showed
    earlier in the same word, and the user passed over, is not shown again; ``learn`` (λ > 0):
    the strip learns its user as a session with ``Strip.learn`` does (``WordCache``).

    Returns ``ksr`` (1 - keys / keys_without_prediction), ``keys`` (characters
    typed + suggestions taken), ``keys_without_prediction``, ``selections``,
    ``words``, ``ksr_chars`` (characters simulated) and ``slots``.
    """
    if slots < 1:
        raise ValueError(f"slots must be at least 1, not {slots}")
    text = text if max_chars is None else text[:max_chars]
    ranker = Ranker(lm.bundle.vocab, lexicon=lm.bundle.lexicon)
    keys = without = selections = words = 0
    starts = word_starts(lm, text, ranker)
    cache = WordCache()
    for log_probs, before, word, user_words in progress(starts, desc="simulating typing", unit="word"):
        if learn:  # the words typed so far, as the session's cache has them where this word begins
            cache.add(ranker.cacheable(lm.bundle.vocab.encode(before)))
        mixed = cache.mix(Scores(None, None, log_probs), learn).log_probs  # as is while the cache is empty
        assert mixed is not None
        typed = typed_before_offered(ranker, mixed, word, slots, user_words, policy, no_repeat)
        if typed is None:  # typed in full, then the space
            keys += len(word) + 1
        else:  # typed a prefix, took the suggestion; the space comes with it
            keys += typed + 1
            selections += 1
        without += len(word) + 1
        words += 1
    if not words:
        raise ValueError("the text has no words to type")
    return {
        "ksr": 1 - keys / without,
        "keys": keys,
        "keys_without_prediction": without,
        "selections": selections,
        "words": words,
        "ksr_chars": len(text),
        "slots": slots,
        "policy": policy,
        "no_repeat": no_repeat,
        "learn": learn,
    }


def word_starts(
    lm: OnnxLM, text: str, ranker: Ranker
) -> Iterator[tuple[np.ndarray, list[str], str, UserWords]]:
    """Each word of ``text`` as a session meets it: the next-word log-probs [vocab] where it
    begins, the tokens completed since the previous word began (``typed_words``), the word, and
    the words outside the vocabulary typed so far (``UserWords``, as the session keeps them; one
    object, updated as the text goes on). The model runs as the module docstring says.
    """
    vocab = lm.bundle.vocab
    log_probs, state = lm.start()  # where every session starts
    user_words = UserWords()
    for before, word in typed_words(text):
        if before:
            ids = vocab.encode(before)
            log_probs, state = lm.step(np.array([ids], dtype=np.int64), state)
            user_words.add(ranker.unknown(before, ids))
        yield log_probs[0], before, word, user_words


def typed_before_offered(
    ranker: Ranker,
    log_probs: np.ndarray,
    word: str,
    slots: int,
    user_words: UserWords,
    policy: str = PROBABILITY,
    no_repeat: bool = False,
) -> int | None:
    """How many characters of ``word`` are typed before a ``slots``-word strip offers it (None:
    never), the strip ranked from ``log_probs`` (the distribution where the word begins).

    Offered with the whole word typed saves nothing (taking it or typing the
    space is one key either way), so only shorter prefixes are looked at.
    """
    if not ranker.can_offer(word, user_words):
        return None
    scores = Scores(None, None, log_probs)  # the whole distribution, as the server has when completing
    passed: set[str] = set()  # shown in this word and not taken (the user typed on)
    for typed in range(len(word)):
        prediction = ranker.predict(
            scores, word[:typed], slots, 0, user_words, policy=policy, passed=passed if no_repeat else ()
        )
        strip = [s.word for s in (prediction.completions if typed else prediction.suggestions)]
        if word in strip:
            return typed
        passed.update(strip)
    return None
