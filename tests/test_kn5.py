"""benchmarks/kn5.py: the KenLM KN-5 baseline scores our tokens, and its top-k is exact.

Needs KenLM's lmplz and query, built once by benchmarks/kenlm/build.sh into the ignored
benchmarks/.cache/ (about 4 minutes on 2 cores, plus Debian's boost packages when missing);
the first test here builds them if needed. Skipped only where no C++ toolchain can be had.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from nextword.export.data import read_tokens
from nextword.tokenizer import Vocab
from tests.conftest import write_corpus

ROOT = Path(__file__).resolve().parents[1]
# The one-off KenLM build may run inside the first test's setup: give it more than pytest's 300 s.
pytestmark = pytest.mark.timeout(1500)


def _load_kn5() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kn5", ROOT / "benchmarks" / "kn5.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kn5 = _load_kn5()


@pytest.fixture(scope="module")
def kenlm_bin() -> Path:
    built = ROOT / "benchmarks" / ".cache" / "kenlm" / "build" / "bin"
    if not all((built / tool).exists() for tool in ("lmplz", "query")):
        toolchain = shutil.which("cmake") and shutil.which("c++")
        installable = os.geteuid() == 0 and shutil.which("apt-get")
        if not (toolchain or installable):
            pytest.skip("KenLM not built and no cmake/c++ (nor root apt-get) to build it")
    return kn5.kenlm_tools()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("kn5-corpus"), seed=5, paragraphs=300)


def _model(
    corpus: Path, kenlm_bin: Path, workdir: Path, *, order: int, vocab_size: int
) -> tuple[Vocab, list[int], list[tuple[int, ...]], Any, Path]:
    """Vocab, valid ids/contexts and the ARPA model, as kn5.run builds them."""
    train = read_tokens(corpus / "train.txt", "raw")
    vocab = Vocab.build(train, max_size=vocab_size, min_count=1)
    word_ids, bos, kenlm_unk = kn5.kenlm_word_ids(vocab)
    text, arpa = workdir / "train.txt", workdir / "model.arpa"
    kn5.write_lmplz_text(vocab.encode(train), vocab, text)
    kn5.run_lmplz(kenlm_bin / "lmplz", text, arpa, order=order, memory="100M", fallback=True)
    ids = vocab.encode(read_tokens(corpus / "valid.txt", "raw"))
    ctxs = list(kn5.contexts(ids, vocab.eos_id, bos, order))
    lm = kn5.BackoffLM(arpa, word_ids, needed=ctxs)
    lm.excluded = {bos, kenlm_unk}
    return vocab, ids, ctxs, lm, arpa


def test_lmplz_sees_every_token_once(corpus: Path, tmp_path: Path) -> None:
    train = read_tokens(corpus / "train.txt", "raw")
    vocab = Vocab.build(train, max_size=30, min_count=1)  # small: plenty of <unk>
    ids = vocab.encode(train)
    kn5.write_lmplz_text(ids, vocab, tmp_path / "t.txt")
    lines = (tmp_path / "t.txt").read_text(encoding="utf-8").splitlines()
    words = [w for line in lines for w in line.split()]
    # lmplz predicts each word of a line and then </s>: one event per token, <eos> included.
    assert len(words) + len(lines) == len(ids)
    assert len(lines) == ids.count(vocab.eos_id)
    assert "<oov>" in words and not {"<unk>", "<eos>", "<s>", "</s>"} & set(words)


def test_scored_positions_are_nextword_evals() -> None:
    for n, columns in ((1000, 32), (1031, 32), (97, 5), (50, 1)):
        steps = n // columns
        # nextword/evaluate.py: ids[: steps * columns].reshape(columns, steps), targets columns[:, 1:]
        expected = np.arange(steps * columns).reshape(columns, steps)[:, 1:].ravel()
        assert list(kn5.scored_positions(n, columns)) == expected.tolist()


@pytest.mark.parametrize(("order", "vocab_size"), [(5, 10000), (3, 30)])
def test_topk_is_exact_and_probabilities_are_kenlms(
    corpus: Path, kenlm_bin: Path, tmp_path: Path, order: int, vocab_size: int
) -> None:
    vocab, ids, ctxs, lm, arpa = _model(corpus, kenlm_bin, tmp_path, order=order, vocab_size=vocab_size)
    words = sorted(set(lm.successors[()]) - lm.excluded)
    for ctx in set(ctxs):
        scores = {w: lm.logprob(ctx, w) for w in words}
        brute = sorted(words, key=lambda w: (-scores[w], w))  # every word scored, ties by id
        assert lm.topk(ctx, 3) == brute[:3], ctx
        assert lm.topk(ctx, 1) == brute[:1], ctx
        # A distribution over our words; KenLM's own <unk> keeps a sliver of mass.
        assert 0.99 < sum(10**s for s in scores.values()) <= 1.0001, ctx

    # Same log10 probabilities as KenLM's own query, token by token (it prints 6 digits).
    lines = [" ".join(kn5.OOV if w == "<unk>" else w for w in seg) for seg in _segments(vocab, ids)]
    out = subprocess.run(
        [str(kenlm_bin / "query"), "-v", "word", str(arpa)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    kenlm = [float(m) for m in re.findall(r"=\d+ \d+ (\S+)", out)]
    ours = [lm.logprob(ctxs[i], ids[i]) for i in range(len(ids))]
    assert len(kenlm) == len(ids)
    np.testing.assert_allclose(ours, kenlm, rtol=1e-5, atol=1e-5)


def _segments(vocab: Vocab, ids: list[int]) -> list[list[str]]:
    return [[vocab.words[t] for t in seg] for seg in kn5.segments(ids, vocab.eos_id)]


def test_cli_reports_both_splits(corpus: Path, kenlm_bin: Path, tmp_path: Path) -> None:
    base = ["--data", str(corpus), "--order", "4", "--min-count", "1", "--discount-fallback", "--json"]

    def run(*extra: str) -> dict:
        out = io.StringIO()
        with redirect_stdout(out):
            assert kn5.main([*base, *extra]) == 0
        return json.loads(out.getvalue())

    built = run("--workdir", str(tmp_path / "work"))
    assert (tmp_path / "work" / "kn4.arpa").exists()
    for split in ("valid", "test"):
        r = built["splits"][split]
        n = len(read_tokens(corpus / f"{split}.txt", "raw"))
        assert r["tokens"] == 32 * (n // 32 - 1)  # what `nextword eval` scores
        assert 1 < r["perplexity"] < built["vocab_size"]
        assert 0 < r["top1"] <= r["top3"] <= 1
    assert built["command"].startswith("python benchmarks/kn5.py --data")

    # A run's vocab.txt in place of the one built from train.txt gives the same model.
    train = read_tokens(corpus / "train.txt", "raw")
    Vocab.build(train, max_size=10000, min_count=1).save(tmp_path / "vocab.txt")
    assert run("--vocab", str(tmp_path / "vocab.txt"))["splits"] == built["splits"]
