"""Keystroke savings (nextword/ksr.py) on the real tiny LSTM bundle and hand-made texts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nextword.bundle import build_lexicon, load_bundle, sha256, write_manifest
from nextword.clients.client import NextWordClient
from nextword.ksr import keystroke_savings, typed_words
from nextword.ranking import CACHE_WEIGHT
from nextword.runtime import OnnxLM
from nextword.server.config import ServerConfig
from nextword.tokenizer import split_partial
from tests.servers import in_thread


@pytest.fixture(scope="module")
def lm(tiny_bundle: Path) -> OnnxLM:
    return OnnxLM(load_bundle(tiny_bundle), device="cpu", threads=1)


def test_typed_words_feed_the_tokens_a_session_would() -> None:
    text = 'Emma sat, and "the dog\'s" well-known friend ran to 1999 hou'
    words = [w for _, w in typed_words(text)]
    # Inner apostrophes and hyphens stay in the word; the text ends mid-word, and that word counts too.
    assert words == ["emma", "sat", "and", "the", "dog's", "well-known", "friend", "ran", "to", "1999", "hou"]
    fed = [t for before, _ in typed_words(text) for t in before]
    assert fed == split_partial(text)[0]  # every complete token, in order, exactly once


def test_a_strip_as_large_as_the_vocabulary_takes_every_known_word_with_one_key(lm: OnnxLM) -> None:
    vocab = set(lm.bundle.vocab.words)
    assert {"the", "cat", "sat", "on"} <= vocab and "zebra" not in vocab  # the premise of the count below
    result = keystroke_savings(lm, "The cat, sat on zebra.", slots=len(vocab))
    # Without prediction: every word and its space, punctuation not counted.
    assert result["keys_without_prediction"] == 4 + 4 + 4 + 3 + 6
    # Four known words offered before their first letter (one key each, space free); zebra typed + space.
    assert result["keys"] == 4 * 1 + 6
    assert result["selections"] == 4 and result["words"] == 5
    assert result["ksr"] == pytest.approx(1 - 10 / 21)


def test_out_of_vocabulary_words_cost_their_full_length(lm: OnnxLM) -> None:
    vocab = set(lm.bundle.vocab.words)
    text = "Zebra quokka, xylophones! 2024"
    assert not {"zebra", "quokka", "xylophones"} & vocab
    result = keystroke_savings(lm, text, slots=len(vocab))
    assert result["keys"] == result["keys_without_prediction"] == 6 + 7 + 11 + 5
    assert result["ksr"] == 0 and result["selections"] == 0


def test_more_slots_never_cost_more_keys_and_case_does_not_matter(lm: OnnxLM, tiny_corpus: Path) -> None:
    text = (tiny_corpus / "test.txt").read_text(encoding="utf-8")[:1500]
    keys = [keystroke_savings(lm, text, slots=k)["keys"] for k in (1, 3, 10)]
    assert keys[0] >= keys[1] >= keys[2]
    assert keystroke_savings(lm, text.upper(), slots=3) == keystroke_savings(lm, text, slots=3)


def test_ksr_is_a_fraction_and_counts_the_first_characters(lm: OnnxLM, tiny_corpus: Path) -> None:
    text = (tiny_corpus / "test.txt").read_text(encoding="utf-8")
    result = keystroke_savings(lm, text, max_chars=3000)
    assert result == keystroke_savings(lm, text[:3000])
    assert result["ksr_chars"] == 3000
    assert 0 <= result["ksr"] < 1
    assert result["words"] <= result["keys"] <= result["keys_without_prediction"]
    # The tiny model has learned its tiny grammar: it should save a good share of the keys.
    assert result["ksr"] > 0.3


def test_one_model_step_per_word(lm: OnnxLM, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"step": 0, "head": 0}
    step, head = lm.step, lm.head

    def counted_step(*a: Any, **kw: Any) -> Any:
        calls["step"] += 1
        return step(*a, **kw)

    def counted_head(*a: Any, **kw: Any) -> Any:
        calls["head"] += 1
        return head(*a, **kw)

    monkeypatch.setattr(lm, "step", counted_step)
    monkeypatch.setattr(lm, "head", counted_head)
    result = keystroke_savings(lm, "The old king looked at the quiet garden, and the dog sat on my chair.")
    assert calls == {"step": result["words"], "head": 0}  # <eos>, then one per word after the first


def test_no_words_is_an_error(lm: OnnxLM) -> None:
    with pytest.raises(ValueError, match="no words"):
        keystroke_savings(lm, " ... !")


def test_eval_cli_prints_keystroke_savings(tiny_bundle: Path, tiny_corpus: Path) -> None:
    data = tiny_corpus / "test.txt"
    cmd = ["eval", str(tiny_bundle), "--data", str(data), "--ksr", "--ksr-chars", "2000", "--slots", "3"]
    out = subprocess.run(
        [sys.executable, "-m", "nextword.cli", *cmd, "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert {"perplexity", "ksr", "ksr_chars", "keys", "keys_without_prediction"} <= set(result)
    assert result["ksr_chars"] == 2000 and 0 <= result["ksr"] < 1
    assert result["ksr"] == pytest.approx(1 - result["keys"] / result["keys_without_prediction"])
    plain = subprocess.run(
        [sys.executable, "-m", "nextword.cli", *cmd], capture_output=True, text=True, check=True, timeout=120
    )
    assert "keystroke savings" in plain.stdout


def test_a_word_outside_the_vocabulary_is_offered_once_typed(lm: OnnxLM) -> None:
    """As a session does, the simulation offers a word the model cannot name once the text has used
    it. Both texts read the same to the model (every odd word is <unk>); only in the first has the
    user typed "zyzzyva" before, so there its second time costs at most "zy" and one key, not 8."""
    vocab = lm.bundle.vocab
    assert vocab.id("zyzzyva") == vocab.id("qwxzyva") == vocab.unk_id
    seen = keystroke_savings(lm, "the zyzzyva sat . the zyzzyva", slots=3)
    unseen = keystroke_savings(lm, "the qwxzyva sat . the zyzzyva", slots=3)
    assert seen["keys_without_prediction"] == unseen["keys_without_prediction"]
    assert unseen["keys"] - seen["keys"] >= 8 - (2 + 1)
    assert seen["selections"] == unseen["selections"] + 1


def test_any_word_of_the_training_text_is_completable(tiny_bundle: Path, tmp_path: Path) -> None:
    """A word the training text has but the vocabulary lacks (too rare for it) is in the bundle's
    lexicon: the server completes it, and so does the keystroke simulation."""
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle_dir)
    bundle = load_bundle(bundle_dir)
    assert (
        not bundle.lexicon and bundle.vocab.id("zyzzyva") == bundle.vocab.unk_id
    )  # every word in the vocabulary
    # The training text, as the manifest names it: rare words the vocabulary could not keep.
    train = tmp_path / "train.txt"
    train.write_text("the zyzzyva sat on the mat . a zyzzyva ran to the quokka .\n", encoding="utf-8")
    bundle.manifest.training["data"] = {"train": {"path": str(train), "sha256": sha256(train)}}
    lexicon = build_lexicon(bundle_dir, bundle.manifest, bundle.vocab)
    assert lexicon is not None and lexicon.words == ["zyzzyva"]  # "quokka" was seen once
    write_manifest(bundle_dir, bundle.manifest)

    config = ServerConfig(model=bundle_dir, port=0, metrics_port=0, device="cpu")
    with in_thread(config) as target, NextWordClient(target, timeout=10) as client:
        assert "zyzzyva" in [s.word for s in client.predict("the zy", k=5).completions]
    lm = OnnxLM(load_bundle(bundle_dir), device="cpu", threads=1)
    result = keystroke_savings(lm, "the zyzzyva", slots=5)
    assert (
        result["selections"] >= 1 and result["keys"] < result["keys_without_prediction"] - len("zyzzyva") + 3
    )


def test_the_demo_completes_a_word_it_lacks_once_typed_and_words_of_its_training_text() -> None:
    """The committed demo: a word outside its softmax vocabulary, typed earlier in the session, is
    offered after two letters; a rare word of its training text is offered from its lexicon."""
    demo = Path(__file__).resolve().parent.parent / "models" / "demo"
    bundle = load_bundle(demo)
    assert bundle.vocab.id("zyzzyva") == bundle.vocab.unk_id and bundle.lexicon is not None
    rare = next(
        w for w in bundle.lexicon.words if w.startswith("abh") and bundle.vocab.id(w) == bundle.vocab.unk_id
    )
    config = ServerConfig(model=demo, port=0, metrics_port=0, device="cpu")
    with in_thread(config) as target, NextWordClient(target, timeout=10) as client:
        with client.session(k=3) as session:
            session.send("I saw a zyzzyva in the garden, and then another ")
            assert "zyzzyva" in [s.word for s in session.send("zy").completions]
        assert rare in [s.word for s in client.predict(f"it was {rare[:-1]}", k=10).completions]


def test_a_learning_strip_saves_keys_on_a_text_that_repeats_its_words(lm: OnnxLM) -> None:
    # A user who keeps writing of the same things, where the model expects any of thirty nouns:
    # the cache raises them (Strip.learn).
    text = " ".join(["the queen sat on the chair . my queen looked at her chair ."] * 6)
    plain = keystroke_savings(lm, text)
    learning = keystroke_savings(lm, text, learn=CACHE_WEIGHT)
    assert learning["learn"] == CACHE_WEIGHT and plain["learn"] == 0.0
    assert learning["keys"] < plain["keys"], (learning, plain)
    assert learning["keys_without_prediction"] == plain["keys_without_prediction"]
