"""Shared fixtures: a tiny corpus written by the tests and a real bundle trained on it."""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NOUNS = (
    "cat dog bird horse friend man woman child king queen house garden door tree river mountain "
    "letter book ship sea city village road window table chair morning evening"
).split()
ADJS = "old young little great good poor happy quiet dark bright small large".split()
VERBS = (
    "sat on|looked at|walked to|ran past|spoke to|waited for|thought of|came from|went into|"
    "stood by|wrote to|sang to"
).split("|")
NAMES = "emma harriet knightley elton weston jane frank john mary thomas".split()


def _sentence(rng: random.Random) -> str:
    def np_() -> str:
        if rng.random() < 0.25:
            return rng.choice(NAMES).capitalize()
        adj = rng.choice(ADJS) + " " if rng.random() < 0.4 else ""
        return f"{rng.choice(['the', 'a', 'my', 'her', 'his'])} {adj}{rng.choice(NOUNS)}"

    clause = f"{np_()} {rng.choice(VERBS)} {np_()}"
    if rng.random() < 0.3:
        clause += f", and {np_()} {rng.choice(VERBS)} {np_()}"
    text = clause[0].upper() + clause[1:] + rng.choice([".", ".", ".", "!", "?"])
    if rng.random() < 0.1:
        text += f" It was {rng.randint(2, 1999)} o'clock."
    return text


def write_corpus(directory: Path, *, seed: int = 0, paragraphs: int = 1200) -> Path:
    """Raw-text train/valid/test splits: wrapped lines, blank-line paragraphs."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", paragraphs), ("valid", paragraphs // 10), ("test", paragraphs // 10)):
        paras = []
        for _ in range(n):
            words = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4))).split()
            lines = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
            paras.append("\n".join(lines))
        (directory / f"{split}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def train_tiny(
    corpus: Path, out: Path, *, cell: str = "lstm", epochs: int = 3, lr: float = 1e-2, **model_kw: Any
) -> Path:
    """Train a small model for a few seconds and return its run directory."""
    import torch

    from nextword.export.model import ModelConfig
    from nextword.export.train import TrainConfig, run

    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation

    cfg = TrainConfig(
        out=out,
        data=corpus,
        epochs=epochs,
        batch_size=16,
        bptt=20,
        lr=5e-3,
        min_count=1,
        command="pytest tiny model",
    )
    size = model_kw.pop("size", 32)
    mcfg = ModelConfig(
        vocab_size=0,
        cell=cell,
        embedding_dim=size,
        hidden_size=size,
        num_layers=model_kw.pop("num_layers", 2),
        dropout=0.1,
        **model_kw,
    )
    run(cfg, mcfg)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tiny_corpus, tmp_path_factory.mktemp("run") / "lstm")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-layer LSTM bundle (two state tensors, h and c) of the tiny corpus."""
    from nextword.export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(tiny_run, out, name="tiny", command="pytest tiny bundle")
    return out


SERVING = re.compile(r"nextword serving \S+ \([^)]*\) on [\d.]+:(\d+)")


@contextlib.contextmanager
def nextword_process(args: list[str], ready: re.Pattern[str]) -> Iterator[re.Match[str]]:
    """``nextword ARGS`` as a real process, until its log says ``ready`` (the match); SIGTERM after."""
    with nextword_popen(args, ready) as (match, _):
        yield match


@contextlib.contextmanager
def nextword_popen(
    args: list[str], ready: re.Pattern[str], env: dict[str, str] | None = None
) -> Iterator[tuple[re.Match[str], subprocess.Popen[str]]]:
    """``nextword_process`` with the process too, started with ``env`` (default: this one's)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextword.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        log = ""
        while (match := ready.search(log)) is None:
            line = proc.stderr.readline()
            assert line, f"nextword {args[0]} exited before it was ready:\n{log}"
            log += line
        yield match, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def serve_process(bundle: Path, *args: str) -> Iterator[str]:
    """``nextword serve --model BUNDLE --port 0`` as a real process; yields its HOST:PORT."""
    cmd = ["serve", "--model", str(bundle), "--port", "0", "--metrics-port", "0", "--threads", "1", *args]
    with nextword_process(cmd, SERVING) as match:
        yield f"127.0.0.1:{match.group(1)}"
