"""How a trained run copes with starting from nothing: whole columns that go wrong, and the first
words that send it there.

    python benchmarks/fresh_starts.py RUN_DIR --data FILE [FILE ...] [--weights FILE] [--words 100]

``nextword train`` scores valid.txt and test.txt as 16 columns, each from the zero state, and
carries the state through each column (thousands of tokens). A model that has a second,
self-sustaining regime, one it falls into from some starts and never leaves, then scores a whole
column at a perplexity of thousands, and the split's perplexity depends on how its columns
happen to begin. For each file this prints the perplexity from the zero state and from the state
after ``<eos>`` (where every served session starts, ``server/state.py``), and how many columns
score above ``--bad`` perplexity. Then, for the ``--words`` most frequent words, whether reading
that one word from the zero state before a stretch of ordinary text (the first file's opening
tokens) leaves the model in such a regime: the text's perplexity above ``--bad``.

``--weights`` defaults to the run's best.pt; a checkpoint.pt (the last epoch) works too.
CPU, deterministic, a minute or two for a 3.6 M-parameter model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nextword.export.data import batchify, read_tokens, windows
from nextword.export.model import RNNLanguageModel
from nextword.export.onnx_export import load_run
from nextword.tokenizer import Vocab, is_word

COLUMNS, BPTT = 16, 35  # as nextword train scores a split (TrainConfig.eval_batch_size, --bptt)
PROBE_TOKENS = 800  # the ordinary text read after each first word


def load(run: Path, weights: Path | None) -> tuple[RNNLanguageModel, Vocab]:
    model, _ = load_run(run)  # best.pt
    if weights is not None:
        saved = torch.load(weights, map_location="cpu", weights_only=False)
        model.load_state_dict(saved.get("model", saved))  # a checkpoint.pt keeps them under "model"
    return model, Vocab.load(run / "vocab.txt")


def column_nll(model: RNNLanguageModel, cols: Tensor, state: tuple[Tensor, ...]) -> Tensor:
    """Mean negative log-likelihood of each column, the state carried along it from ``state``."""
    total, n = torch.zeros(cols.size(0)), 0
    with torch.no_grad():
        for x, y in windows(cols, BPTT):
            logits, state = model(x, state)
            total += nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)
            n += x.size(1)
    return total / n


def after_eos(model: RNNLanguageModel, vocab: Vocab, batch: int) -> tuple[Tensor, ...]:
    with torch.no_grad():
        _, state = model(torch.full((batch, 1), vocab.eos_id), model.init_state(batch))
    return tuple(state)


def score_file(model: RNNLanguageModel, vocab: Vocab, path: Path, bad: float) -> dict[str, Any]:
    cols = batchify(torch.tensor(vocab.encode(read_tokens(path, "auto"))), COLUMNS)
    out: dict[str, Any] = {"file": str(path), "tokens_per_column": cols.size(1)}
    for start, state in (("zero", model.init_state(COLUMNS)), ("eos", after_eos(model, vocab, COLUMNS))):
        nll = column_nll(model, cols, state)
        per_column = nll.exp()
        out[start] = {
            "perplexity": math.exp(float(nll.mean())),
            "bad_columns": [int(c) for c in (per_column > bad).nonzero().flatten()],
            "column_perplexities": [round(float(p), 1) for p in per_column],
        }
    return out


def first_words(model: RNNLanguageModel, vocab: Vocab, text: Tensor, n: int, bad: float) -> dict[str, Any]:
    """Which of the ``n`` most frequent words, read first from the zero state, spoil ``text`` after it."""
    words = [w for w in vocab.words if is_word(w)][:n]  # the vocabulary is sorted by frequency
    batch = torch.stack([torch.cat([torch.tensor([vocab.id(w)]), text]) for w in words])
    with torch.no_grad():
        logits, _ = model(batch[:, :-1], model.init_state(len(words)))
    nll = nn.functional.cross_entropy(logits[:, 1:].transpose(1, 2), batch[:, 2:], reduction="none")
    ppl = nll.mean(1).exp()
    spoiled = [(w, round(float(p))) for w, p in zip(words, ppl, strict=True) if p > bad]
    return {"words": len(words), "spoiled": spoiled, "median_perplexity": float(ppl.median())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a nextword train run directory")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="text files to score")
    p.add_argument("--weights", type=Path, help="weights to load (default: RUN/best.pt)")
    p.add_argument("--words", type=int, default=100, help="most frequent words tried as a first word")
    p.add_argument("--bad", type=float, default=1000.0, help="a column (or probe) above this perplexity")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, vocab = load(args.run, args.weights)
    files = [score_file(model, vocab, path, args.bad) for path in args.data]
    probe = torch.tensor(vocab.encode(read_tokens(args.data[0], "auto"))[:PROBE_TOKENS])
    starts = first_words(model, vocab, probe, args.words, args.bad)
    if args.json:
        print(
            json.dumps(
                {"run": str(args.run), "weights": str(args.weights or "best.pt"), "files": files, **starts}
            )
        )
        return 0
    for f in files:
        z, e = f["zero"], f["eos"]
        print(
            f"{f['file']}: from the zero state {z['perplexity']:.2f} ({len(z['bad_columns'])} of {COLUMNS} "
            f"columns above {args.bad:g}); from the state after <eos> {e['perplexity']:.2f} "
            f"({len(e['bad_columns'])} above)"
        )
    spoiled = ", ".join(f"{w!r} ({p:,})" for w, p in starts["spoiled"]) or "none"
    print(
        f"first words from the zero state: {len(starts['spoiled'])} of the {starts['words']} most frequent "
        f"leave the next {PROBE_TOKENS} tokens above perplexity {args.bad:g}: {spoiled}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
