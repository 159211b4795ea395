"""Tokenizer and vocabulary: the rules both training and serving depend on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nextword.tokenizer import (
    EOS,
    NUM,
    SPECIALS,
    UNK,
    Vocab,
    corpus_tokens,
    is_word,
    looks_pretokenized,
    split_partial,
    tokenize,
)


def test_words_punctuation_case_and_numbers() -> None:
    assert tokenize("Emma Woodhouse, handsome; 21 years!") == [
        "emma", "woodhouse", ",", "handsome", ";", NUM, "years", "!",
    ]  # fmt: skip


def test_apostrophes_and_hyphens_stay_inside_words() -> None:
    assert tokenize("Don’t say twenty-one o'clock -- 'quoted'") == [
        "don't", "say", "twenty-one", "o'clock", "-", "-", "'", "quoted", "'",
    ]  # fmt: skip


def test_unicode_is_normalised() -> None:
    # NFKC folds the ligature and composes e + combining acute; upper case folds.
    assert tokenize("ﬁne CAFE\u0301 Ζεύς") == ["fine", "café", "ζεύς"]
    assert tokenize("naïve 東京") == ["naïve", "東京"]


def test_gutenberg_emphasis_underscores_are_dropped() -> None:
    assert tokenize("Between _them_ it was") == ["between", "them", "it", "was"]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t  \n"])
def test_empty_and_whitespace_only(text: str) -> None:
    assert tokenize(text) == []
    assert split_partial(text) == ([], "")
    assert list(corpus_tokens(text, line_per_sentence=False)) == []
    assert list(corpus_tokens(text, line_per_sentence=True)) == []


def test_very_long_word_is_one_token_and_unknown() -> None:
    word = "a" * 100_000
    assert tokenize(f"the {word} end") == ["the", word, "end"]
    vocab = Vocab((*SPECIALS, "the", "end"))
    assert vocab.encode(tokenize(f"the {word} end")) == [3, 0, 4]


def test_partial_word_detection() -> None:
    assert split_partial("It is a truth univ") == (["it", "is", "a", "truth"], "univ")
    assert split_partial("It is a truth ") == (["it", "is", "a", "truth"], "")
    assert split_partial("Hello,") == (["hello", ","], "")
    assert split_partial("don'") == ([], "don'")  # an apostrophe may still join a word
    assert split_partial("well-") == ([], "well-")


def test_streaming_split_equals_whole_text() -> None:
    """Feeding text in arbitrary pieces gives the tokens of the whole text."""
    rng = random.Random(7)
    alphabet = "ab c,.'-\n Z9é"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        tokens, pending, last = [], "", 0
        for cut in [*cuts, len(text)]:
            done, pending = split_partial(pending + text[last:cut])
            tokens += done
            last = cut
        assert (tokens, pending) == split_partial(text), text


def test_raw_corpus_paragraphs_end_with_eos() -> None:
    text = "First line\nwrapped here.\n\nSecond paragraph.\n"
    assert list(corpus_tokens(text, line_per_sentence=False)) == [
        "first", "line", "wrapped", "here", ".", EOS, "second", "paragraph", ".", EOS,
    ]  # fmt: skip


def test_pretokenized_lines_end_with_eos_and_ptb_quotes() -> None:
    text = "He said `` no '' .\nIt 's over .\n"
    assert list(corpus_tokens(text, line_per_sentence=True)) == [
        "he", "said", '"', "no", '"', ".", EOS, "it", "'", "s", "over", ".", EOS,
    ]  # fmt: skip
    assert looks_pretokenized("A b , c . D e , f .\nG h ; i .")
    assert not looks_pretokenized("A b, c. D e, f.\nG h; i.")


def test_vocab_by_frequency_with_cap_and_min_count() -> None:
    tokens = ["b", "a", "b", "c", "a", "b", "d", EOS, EOS]
    vocab = Vocab.build(tokens, max_size=len(SPECIALS) + 2, min_count=2)
    assert vocab.words == (*SPECIALS, "b", "a")
    assert vocab.encode(["a", "zzz", EOS]) == [4, vocab.unk_id, vocab.eos_id]
    assert Vocab.build(tokens, max_size=100, min_count=2).words[len(SPECIALS) :] == ("b", "a")


def test_vocab_round_trips_through_file(tmp_path: Path) -> None:
    vocab = Vocab((*SPECIALS, "x", "don't", "é"))
    vocab.save(tmp_path / "vocab.txt")
    assert Vocab.load(tmp_path / "vocab.txt") == vocab


def test_is_word_excludes_specials_and_punctuation() -> None:
    assert is_word("cat") and is_word("don't") and is_word("twenty-one")
    assert not any(is_word(t) for t in (UNK, EOS, NUM, ",", '"', "-"))
