"""torchrun with two processes (DDP over gloo) trains the same model as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["--epochs", "2", "--embedding-dim", "16", "--hidden-size", "16", "--layers", "1"]
ARGS += ["--batch-size", "16", "--bptt", "20", "--min-count", "1", "--threads", "1", "--dropout", "0"]


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_corpus: Path, tmp_path: Path) -> None:
    train = ["-m", "nextword.cli", "train", "--data", str(tiny_corpus), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run([*torchrun, *train, "--out", str(tmp_path / "ddp")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, *train, "--out", str(tmp_path / "one")], check=True, env=env, timeout=300)

    ddp, one = _history(tmp_path / "ddp"), _history(tmp_path / "one")
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    assert len(ddp) == len(one) == 2
    # Same global batch, same initial weights, no dropout: the same model up to float rounding.
    for a, b in zip(ddp, one, strict=True):
        assert a["valid_ppl"] == pytest.approx(b["valid_ppl"], rel=1e-3)
        assert a["train_ppl"] == pytest.approx(b["train_ppl"], rel=0.05)  # rank 0's half of the batch
        assert a["tokens"] == b["tokens"]
