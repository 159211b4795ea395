"""``nextword diagnose``: how fast does the gradient vanish back through time?

For a trained run (``nextword diagnose RUN_DIR``) or a freshly initialised model
of each cell (``--cells rnn,lstm``), this measures ||dL_T / dh_(T-k)|| for
k = 0..K: L_T is the cross-entropy of the next-word prediction read from the
state after the last step T, and h_(T-k) is the model's *whole recurrent state*
k steps earlier -- every state tensor of every layer, concatenated:

* ``rnn``, ``irnn``, ``gru``: h, the hidden state of each layer;
* ``lstm``, ``cifg``: h and the cell state c of each layer;
* ``delay``: the buffer of the last d hidden states h_(t-d+1) .. h_t of each
  layer (that window, not h_t alone, is what the next step reads).

The model is stepped one token at a time through its public interface
(``model.rnn(x_t, state)`` with sequence length 1), so every cell is measured
the same way; each step's state tensors keep their gradient (``retain_grad``)
and one backward pass fills them all in. Because the state is everything the
future reads from the past, dL_T/d(state_t) is the full gradient that reaches
step t, through every path. The prediction at T is read from the state (as the
exported head graph reads it), so the k = 0 gradient is not zero.

The norms are per sequence and averaged over ``--sequences`` sequences of
random token ids (or windows of real text with ``--data``). A ``--warmup`` of
steps without gradient first moves the state off its all-zero start. Models
run in float64 and eval mode (no dropout): a tanh RNN's gradient can fall below
float32's range well before k = 100, and it should be measured, not flushed to 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from nextword.options import from_args
from nextword.tokenizer import Vocab

from .config import DiagnoseConfig, InputError
from .data import encode, read_tokens
from .model import CELLS, ModelConfig, RNNLanguageModel
from .onnx_export import check_run, load_run


def gradient_norms(
    model: RNNLanguageModel, tokens: torch.Tensor, horizon: int, warmup: int = 0
) -> list[float]:
    """Mean over the batch of ||dL_T / d state_(T-k)|| for k = 0..horizon.

    ``tokens`` [batch, warmup + horizon + 2]: the first ``warmup`` only set up the
    state; the model then reads ``horizon + 1`` tokens (steps T-horizon .. T) and
    L_T scores the prediction of the last token.
    """
    if tokens.size(1) != warmup + horizon + 2:
        raise ValueError(f"need {warmup + horizon + 2} tokens per sequence, got {tokens.size(1)}")
    model.eval()
    dtype = next(model.parameters()).dtype
    batch = tokens.size(0)
    state = tuple(s.to(dtype) for s in model.init_state(batch))
    with torch.no_grad():
        if warmup:
            _, state = model.rnn(model.embed(tokens[:, :warmup]), state)
    states = []  # states[i] is the state after step T - horizon + i
    for t in range(warmup, warmup + horizon + 1):
        _, state = model.rnn(model.embed(tokens[:, t : t + 1]), state)
        for tensor in state:
            tensor.retain_grad()
        states.append(state)
    logits = model.decoder(model.rnn.top_hidden(state[0]))
    # Summed, not averaged, over the batch: sequences are independent, so each
    # sequence's slice of the state gradient is the gradient of its own loss.
    loss = torch.nn.functional.cross_entropy(logits, tokens[:, -1], reduction="sum")
    loss.backward()
    norms = []
    for step_state in reversed(states):  # k = 0 first
        # Every state tensor has its batch axis at 1; concatenate per sequence.
        grads = [
            (s.grad if s.grad is not None else torch.zeros_like(s)).transpose(0, 1).reshape(batch, -1)
            for s in step_state
        ]
        norms.append(torch.cat(grads, 1).norm(dim=1).mean().item())
    return norms


def fresh_model(
    cell: str, hidden: int, layers: int, vocab_size: int, delay: int, seed: int
) -> RNNLanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        cell=cell,
        embedding_dim=hidden,
        hidden_size=hidden,
        num_layers=layers,
        dropout=0.0,
        delay=delay,
    )
    return RNNLanguageModel(cfg).eval()


def sample_tokens(
    n: int, length: int, vocab_size: int, generator: torch.Generator, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """``n`` sequences of ``length`` ids: random windows of ``ids``, else uniform random ids."""
    if ids is None:
        return torch.randint(vocab_size, (n, length), generator=generator)
    if ids.numel() < length:
        raise InputError(
            f"--data has {ids.numel()} tokens; need at least {length} (--warmup + --horizon + 2)"
        )
    starts = torch.randint(ids.numel() - length + 1, (n,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


Subject = tuple[str, RNNLanguageModel, torch.Tensor | None]  # label, model, the token ids of --data


def check_inputs(opts: DiagnoseConfig) -> list[str]:
    """The fresh cells asked for; InputError for an unknown cell, a missing run or --data."""
    cells = [c.strip() for c in opts.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise InputError(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    if not cells and not opts.run_dirs:
        raise InputError("give training run directories (RUN_DIR ...) or --cells, e.g. --cells rnn,lstm")
    for run_dir in opts.run_dirs:
        check_run(run_dir)
    if opts.data is not None and not opts.data.is_file():
        raise InputError(f"--data {opts.data}: no such file; give a text file")
    return cells


def load_models(opts: DiagnoseConfig, cells: list[str]) -> list[Subject]:
    """The trained runs, then a fresh model of each cell, each with the --data ids it reads (if any)."""
    tokens = read_tokens(opts.data, opts.format) if opts.data else None
    models: list[Subject] = []
    for run_dir in opts.run_dirs:
        model, _ = load_run(run_dir)
        ids = encode(tokens, Vocab.load(run_dir / "vocab.txt")) if tokens is not None else None
        models.append((_label(model.cfg, f"{run_dir.name}: ", "trained"), model, ids))
    if not cells:
        return models
    # Fresh models have no vocabulary of their own: build one from --data if given.
    vocab = Vocab.build(tokens, max_size=opts.vocab_size, min_count=1) if tokens is not None else None
    vocab_size = len(vocab) if vocab is not None else opts.vocab_size
    ids = encode(tokens, vocab) if tokens is not None and vocab is not None else None
    for cell in cells:
        model = fresh_model(cell, opts.hidden_size, opts.layers, vocab_size, opts.delay, opts.seed)
        models.append((_label(model.cfg, "", "fresh init"), model, ids))
    return models


def _label(m: ModelConfig, prefix: str, kind: str) -> str:
    delay = f", d={m.delay}" if m.cell == "delay" else ""
    return f"{prefix}{m.cell} {m.num_layers}x{m.hidden_size}{delay} ({kind})"


def measure(models: list[Subject], opts: DiagnoseConfig) -> list[dict[str, Any]]:
    """Each model's gradient norms for k = 0..horizon, on the same sequences (one seed)."""
    length = opts.warmup + opts.horizon + 2
    curves = []
    for label, model, ids in models:
        gen = torch.Generator().manual_seed(opts.seed)
        batch = sample_tokens(opts.sequences, length, model.cfg.vocab_size, gen, ids)
        norms = gradient_norms(model.double(), batch, opts.horizon, opts.warmup)
        curves.append({"label": label, "cell": model.cfg.cell, "norms": norms})
        picks = [k for k in (0, 10, 30, 100) if k <= opts.horizon]
        summary = "  ".join(f"k={k}: {norms[k]:.2e}" for k in picks)
        print(f"{label}: {summary}", file=sys.stderr)
    return curves


def plot(curves: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in tests
    import matplotlib.pyplot as plt

    fig, (ax_abs, ax_rel) = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    for curve in curves:
        ks = range(len(curve["norms"]))
        ax_abs.plot(ks, curve["norms"], label=curve["label"], linewidth=1.8)
        first = curve["norms"][0] or math.nan
        ax_rel.plot(ks, [v / first for v in curve["norms"]], label=curve["label"], linewidth=1.8)
    ax_abs.set_ylabel(r"$\|\partial L_T / \partial h_{T-k}\|$  (mean over sequences)")
    ax_rel.set_ylabel(r"$\|\partial L_T / \partial h_{T-k}\| \;/\; \|\partial L_T / \partial h_T\|$")
    ax_abs.set_title("gradient norm")
    ax_rel.set_title("relative to k = 0")
    for ax in (ax_abs, ax_rel):
        ax.set_yscale("log")
        ax.set_xlabel("k: steps back from the predicted word")
        ax.grid(True, which="major", alpha=0.3)
    ax_rel.legend(fontsize=8, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    opts = from_args(DiagnoseConfig, args)
    torch.set_num_threads(max(1, opts.threads))
    try:
        curves = measure(load_models(opts, check_inputs(opts)), opts)
    except InputError as exc:
        print(f"nextword diagnose: error: {exc}", file=sys.stderr)
        return 2
    source = f"text of {opts.data.name}" if opts.data else "random token ids"
    title = (
        f"Gradient of the last word's loss w.r.t. the recurrent state k steps earlier "
        f"({opts.sequences} sequences of {source}, warm-up {opts.warmup})"
    )
    plot(curves, opts.out, title)
    print(f"wrote {opts.out}", file=sys.stderr)
    if opts.json:
        report = {
            "horizon": opts.horizon,
            "sequences": opts.sequences,
            "warmup": opts.warmup,
            "data": str(opts.data) if opts.data else None,
            "seed": opts.seed,
            "png": str(opts.out),
            "curves": curves,
        }
        print(json.dumps(report))
    return 0
