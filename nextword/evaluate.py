"""``nextword eval``: how good a bundle is on a text, scored offline with onnxruntime.

Perplexity and top-1/top-3 next-word accuracy come from the bundle's own step
graph, one token at a time with the state carried, exactly as the server runs
it. The token stream is cut into ``batch`` contiguous columns (each starting
from the zero state) so that one onnxruntime call scores ``batch`` tokens.
With ``--ksr``, a person typing the text with a suggestion strip is simulated
too (``nextword.ksr``): the keystrokes saved.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nextword.bundle import BundleError, load_bundle
from nextword.ksr import keystroke_savings
from nextword.options import from_args, option, positional, required, switch
from nextword.progress import progress
from nextword.ranking import CACHE_WEIGHT, POLICIES, PROBABILITY
from nextword.runtime import OnnxLM
from nextword.tokenizer import corpus_tokens, looks_pretokenized


@dataclass(frozen=True)
class EvalOptions:
    bundle: Path = positional("bundle directory to score")
    data: Path = required("text file to score")
    format: str = option(
        "auto", "raw: wrapped text; lines: one tokenized sentence a line", choices=("auto", "raw", "lines")
    )
    json: bool = switch("print one JSON object")
    device: str = option("cpu", "where the model runs", choices=("auto", "cpu", "cuda"))
    ksr: bool = switch("also simulate typing the text with a suggestion strip: keystroke savings")
    ksr_chars: int = option(20000, "keystroke savings: simulate the first N characters")
    slots: int = option(3, "keystroke savings: suggestions shown on the strip")
    strip: str = option(
        PROBABILITY,
        "keystroke savings: how the strip is filled (keystrokes: a word typed in full goes last)",
        choices=POLICIES,
    )
    no_repeat: bool = switch("keystroke savings: within a word, do not offer again what the user typed past")
    learn: bool = switch(
        f"keystroke savings: the strip learns its user (Strip.learn: a cache of the words typed, "
        f"λ = {CACHE_WEIGHT})"
    )


def evaluate(
    bundle_dir: Path,
    data: Path,
    *,
    fmt: str = "auto",
    batch: int = 32,
    device: str = "cpu",
    lm: OnnxLM | None = None,
) -> dict[str, Any]:
    """Perplexity, top-1 and top-3 accuracy of the bundle on the text file ``data``."""
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
    for t in progress(range(steps - 1), desc=f"scoring {data.name}", unit_scale=batch, unit="token"):
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
    opts = from_args(EvalOptions, args)
    try:
        lm = OnnxLM(load_bundle(opts.bundle), device=opts.device)
        result = evaluate(opts.bundle, opts.data, fmt=opts.format, lm=lm)
        if opts.ksr:
            text = opts.data.read_text(encoding="utf-8")
            result.update(
                keystroke_savings(
                    lm,
                    text,
                    slots=opts.slots,
                    max_chars=opts.ksr_chars,
                    policy=opts.strip,
                    no_repeat=opts.no_repeat,
                    learn=CACHE_WEIGHT if opts.learn else 0.0,
                )
            )
    except (BundleError, OSError, ValueError) as exc:
        print(f"nextword eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if opts.json else _table(opts, result))
    return 0


def _table(opts: EvalOptions, result: dict[str, Any]) -> str:
    lines = [
        f"{opts.data}: perplexity {result['perplexity']:.2f}  top-1 {result['top1']:.2%}  "
        f"top-3 {result['top3']:.2%}  ({result['tokens']:,} tokens)"
    ]
    if opts.ksr:
        lines.append(
            f"keystroke savings {result['ksr']:.2%} with {opts.slots} slots, {opts.strip} strip"
            f"{', no repeats' if opts.no_repeat else ''}{', learning' if opts.learn else ''}"
            f"  ({result['keys']:,} of "
            f"{result['keys_without_prediction']:,} keys, first {result['ksr_chars']:,} characters)"
        )
    return "\n".join(lines)
