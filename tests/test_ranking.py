"""The words a user typed that the model cannot name (nextword.ranking.UserWords): bounded, shared fairly."""

from __future__ import annotations

import pytest

from nextword.ranking import USER_WORD_CHARS, USER_WORDS, UserWords


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


def test_a_word_too_long_to_be_a_word_is_not_kept() -> None:
    words = UserWords(["x" * (USER_WORD_CHARS + 1), "x" * USER_WORD_CHARS])
    assert words.words() == ["x" * USER_WORD_CHARS]
