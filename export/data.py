"""Corpus -> token ids -> batches for truncated BPTT (as in pytorch/examples' word LM)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from nextword.tokenizer import Vocab, corpus_tokens, looks_pretokenized

from .config import InputError


def read_text(path: Path) -> str:
    """A corpus file's text; InputError (not a traceback) for one that is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_tokens(path: Path, fmt: str = "auto") -> list[str]:
    """Tokens of a corpus file; ``fmt`` is raw, lines or auto (guess from the text)."""
    text = read_text(path)
    line_per_sentence = looks_pretokenized(text) if fmt == "auto" else fmt == "lines"
    return list(corpus_tokens(text, line_per_sentence=line_per_sentence))


def resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "lines" if looks_pretokenized(read_text(path)) else "raw"


def encode(tokens: list[str], vocab: Vocab) -> torch.Tensor:
    return torch.tensor(vocab.encode(tokens), dtype=torch.long)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Lay the stream out as ``batch_size`` contiguous columns: [batch, steps].

    Row b continues where it left off from one BPTT window to the next, which is
    what lets the recurrent state be carried across batches.
    """
    steps = ids.numel() // batch_size
    if steps < 2:
        raise InputError(f"{ids.numel()} tokens are too few to lay out as {batch_size} streams of 2 or more")
    return ids[: steps * batch_size].view(batch_size, steps)


def windows(data: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) windows of at most ``bptt`` steps over batchified data."""
    for start in range(0, data.size(1) - 1, bptt):
        length = min(bptt, data.size(1) - 1 - start)
        yield data[:, start : start + length], data[:, start + 1 : start + 1 + length]
