"""``nextword eval``: perplexity and top-1/top-3 next-word accuracy of a bundle, with onnxruntime.

The text is scored exactly as the server runs the model: the bundle's own step
graph, one token at a time, the state carried. The stream is cut into
``batch`` contiguous columns (each starting from the zero state) so that one
onnxruntime call scores ``batch`` tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from nextword.bundle import BundleError, load_bundle
from nextword.ksr import keystroke_savings
from nextword.runtime import OnnxLM
from nextword.tokenizer import corpus_tokens, looks_pretokenized


def evaluate(
    bundle_dir: Path,
    data: Path,
    *,
    fmt: str = "auto",
    batch: int = 32,
    device: str = "cpu",
    lm: OnnxLM | None = None,
) -> dict[str, Any]:
    lm = lm or OnnxLM(load_bundle(bundle_dir), device=device)
    text = data.read_text(encoding="utf-8")
    lines = looks_pretokenized(text) if fmt == "auto" else fmt == "lines"
    ids = np.asarray(lm.bundle.vocab.encode(corpus_tokens(text, line_per_sentence=lines)), dtype=np.int64)
    steps = len(ids) // batch
    if steps < 2:
        raise ValueError(f"{data}: {len(ids)} tokens is too little to score with {batch} columns")
    columns = ids[: steps * batch].reshape(batch, steps)
    state = lm.zero_state(batch)
    nll, top1, top3 = 0.0, 0, 0
    rows = np.arange(batch)
    for t in range(steps - 1):
        log_probs, state = lm.step(columns[:, t : t + 1], state)
        target = columns[:, t + 1]
        nll -= float(log_probs[rows, target].sum())
        best3 = np.argpartition(-log_probs, 3, axis=1)[:, :3]
        top3 += int((best3 == target[:, None]).any(axis=1).sum())
        top1 += int((log_probs.argmax(axis=1) == target).sum())
    tokens = batch * (steps - 1)
    return {
        "perplexity": math.exp(nll / tokens),
        "top1": top1 / tokens,
        "top3": top3 / tokens,
        "tokens": tokens,
        "format": "lines" if lines else "raw",
    }


def main(args: argparse.Namespace) -> int:
    try:
        lm = OnnxLM(load_bundle(args.bundle), device=args.device)
        result = evaluate(args.bundle, args.data, fmt=args.format, lm=lm)
        if args.ksr:
            text = args.data.read_text(encoding="utf-8")
            result.update(keystroke_savings(lm, text, slots=args.slots, max_chars=args.ksr_chars))
    except (BundleError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.data}: perplexity {result['perplexity']:.2f}  top-1 {result['top1']:.2%}  "
            f"top-3 {result['top3']:.2%}  ({result['tokens']:,} tokens)"
        )
        if args.ksr:
            print(
                f"keystroke savings {result['ksr']:.2%} with {args.slots} slots  ({result['keys']:,} of "
                f"{result['keys_without_prediction']:,} keys, first {result['ksr_chars']:,} characters)"
            )
    return 0
