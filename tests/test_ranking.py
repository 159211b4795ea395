"""The words a user typed that the model cannot name (nextword.ranking.UserWords): bounded, shared fairly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from nextword.ranking import KEYSTROKES, NO_USER_WORDS, USER_WORD_CHARS, USER_WORDS, Ranker, Scores, UserWords
from nextword.tokenizer import NUM, SPECIALS, Lexicon, Vocab
from nextword.v1 import nextword_pb2 as pb


def test_the_window_keeps_the_latest_words_and_their_shares() -> None:
    words = UserWords(["zyzzyva", "zyme", "zyzzyva"])
    assert sorted(words.starting("zy")) == [("zyme", pytest.approx(1 / 3)), ("zyzzyva", pytest.approx(2 / 3))]
    assert words.starting("q") == []
    words.add(f"w{i}" for i in range(USER_WORDS - 1))  # pushes the two oldest out
    assert len(words) == USER_WORDS
    assert words.starting("zy") == [("zyzzyva", pytest.approx(1 / USER_WORDS))]
    assert "zyme" not in words and words.words()[0] == "zyzzyva"


def test_after_leaves_the_session_s_words_as_they_are() -> None:
    words = UserWords(["zyzzyva"])
    grown = words.after(["quokka"])
    assert words.words() == ["zyzzyva"] and grown.words() == ["zyzzyva", "quokka"]
    assert words.after([]) is words  # nothing new: no copy
    assert NO_USER_WORDS.after(["quokka"]).words() == ["quokka"] and not NO_USER_WORDS  # shared: untouched


def test_a_word_too_long_to_be_a_word_is_not_kept() -> None:
    words = UserWords(["x" * (USER_WORD_CHARS + 1), "x" * USER_WORD_CHARS])
    assert words.words() == ["x" * USER_WORD_CHARS]


WORDS = ("the", "an", "and", "ant", "another", "antelope")
PROBS = (0.2, 0.3, 0.25, 0.05, 0.08, 0.10)  # what a model might give after some context


def _ranker_and_scores() -> tuple[Ranker, Scores]:
    vocab = Vocab((*SPECIALS, *WORDS))
    log_probs = np.full(len(vocab), np.log(0.0025), dtype=np.float32)
    for word, p in zip(WORDS, PROBS, strict=True):
        log_probs[vocab.id(word)] = np.log(p)
    log_probs[vocab.unk_id] = np.log(0.02)  # the words it cannot name
    order = np.array(sorted((vocab.id(w) for w in WORDS), key=lambda i: -log_probs[i]))
    return Ranker(vocab, graph_k=len(order)), Scores(log_probs[order], order, log_probs)


def _words(strip: Sequence[pb.Suggestion]) -> list[str]:
    return [s.word for s in strip]


def test_the_keystroke_policy_puts_a_word_that_saves_nothing_last() -> None:
    ranker, scores = _ranker_and_scores()
    by_probability = ranker.predict(scores, "an", 3, 0)
    assert _words(by_probability.completions) == ["an", "and", "antelope"]
    # "an" is typed in full: taking it saves no key. The slot goes to the next most likely word.
    by_keys = ranker.predict(scores, "an", 3, 0, policy=KEYSTROKES)
    assert _words(by_keys.completions) == ["and", "antelope", "another"]
    assert by_keys.completions[0].prob == pytest.approx(0.25)  # the probability, whatever the order
    # Before any letter every word saves a key or more: the order is the probability's.
    assert _words(ranker.predict(scores, "", 3, 0, policy=KEYSTROKES).suggestions) == ["an", "and", "the"]


def test_words_passed_over_are_not_offered_again_and_user_words_join_the_strip() -> None:
    ranker, scores = _ranker_and_scores()
    passed = ranker.predict(scores, "an", 3, 0, passed={"an", "and"})
    assert _words(passed.completions) == ["antelope", "another", "ant"]
    user = UserWords(["antidisestablishment"])  # outside the vocabulary: all of p(<unk>) = .02
    assert _words(ranker.predict(scores, "an", 4, 0, user).completions) == [
        "an",
        "and",
        "antelope",
        "another",
    ]
    with_user = ranker.predict(scores, "an", 3, 0, user, passed={"an", "and", "another"})
    assert _words(with_user.completions) == ["antelope", "ant", "antidisestablishment"]
    assert with_user.completions[2].prob == pytest.approx(0.02)
    again = ranker.predict(scores, "an", 3, 0, user, policy=KEYSTROKES, passed={"antidisestablishment"})
    assert "antidisestablishment" not in _words(again.completions)


def test_a_lexicon_keeps_the_training_words_the_vocabulary_lacks(tmp_path: Path) -> None:
    vocab = Vocab((*SPECIALS, "the", "cat"))
    tokens = [*"the zyzzyva cat zyzzyva the zymurgy zymurgy zymurgy quux , ,".split(), NUM, NUM]
    lexicon = Lexicon.build(tokens, vocab, min_count=2)
    # Seen twice or more, outside the vocabulary, a word: not "quux" (once), "the", "," or numbers.
    assert lexicon.words == ["zymurgy", "zyzzyva"] and lexicon.total == 5
    assert lexicon.starting("zy", 1) == [("zymurgy", pytest.approx(3 / 5))]
    assert "zyzzyva" in lexicon and "zy" not in lexicon
    ties = Lexicon({"zeta": 2, "zebra": 2, "zed": 2, "zest": 9})
    assert [w for w, _ in ties.starting("ze", 3)] == ["zest", "zebra", "zed"]  # most used, then a-z
    lexicon.save(tmp_path / "lexicon.txt")
    assert (tmp_path / "lexicon.txt").read_text() == "zymurgy\t3\nzyzzyva\t2\n"  # most used first
    loaded = Lexicon.load(tmp_path / "lexicon.txt")
    assert loaded.words == lexicon.words and loaded.counts == lexicon.counts
