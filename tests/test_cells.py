"""Every recurrent cell through the same path: train, export, serve, stream."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nextword.cli import main as nextword
from nextword.clients.client import NextWordClient
from nextword.export.model import CELLS
from tests.conftest import serve_process

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--epochs",
    "1",
    "--embedding-dim",
    "16",
    "--hidden-size",
    "16",
    "--layers",
    "2",
    "--batch-size",
    "16",
]
TINY += ["--bptt", "20", "--min-count", "1", "--threads", "1"]


@pytest.mark.parametrize("cell", CELLS)
def test_train_export_serve_stream(cell: str, tiny_corpus: Path, tmp_path: Path) -> None:
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    lr = ["--lr", "2e-3"] if cell == "irnn" else ["--lr", "1e-2"]
    assert nextword(["train", "--data", str(tiny_corpus), "--out", str(run), "--cell", cell, *TINY, *lr]) == 0
    assert nextword(["export", str(run), "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["cell"] == cell
    assert manifest["export"]["parity_max_abs_diff"] < 1e-4
    if cell == "delay":  # the state is the last d hidden states of each layer
        assert [s["shape"] for s in manifest["state"]] == [[2, "batch", 4, 16]]
    if cell in ("lstm", "cifg"):
        assert [s["name"] for s in manifest["state"]] == ["h", "c"]

    text = "the old cat sat on the mat, and a dog ran past the house."
    with serve_process(bundle) as target, NextWordClient(target, timeout=30) as client:
        session = client.session(k=5)
        for word in text.split():
            streamed = session.send(word + " ")
        whole = client.predict(text + " ", k=5)
        assert streamed.context_tokens == whole.context_tokens == 16
        assert [s.word for s in streamed.suggestions] == [s.word for s in whole.suggestions]
        for a, b in zip(streamed.suggestions, whole.suggestions, strict=True):
            assert a.prob == pytest.approx(b.prob, abs=1e-4)
        assert len(whole.suggestions) == 5
        partial = session.send("th")
        assert partial.completions and all(c.word.startswith("th") for c in partial.completions)


def test_server_has_no_cell_specific_code() -> None:
    """The server drives every cell from the manifest alone."""
    for source in (ROOT / "server").glob("*.py"):
        text = source.read_text()
        for cell in CELLS:
            assert not re.search(rf"[\"']{cell}[\"']", text), f"{source.name} names the {cell!r} cell"


def test_irnn_scale_makes_a_carried_state_decay_instead_of_adding_up() -> None:
    """The IRNN's recurrent matrix starts as scale × I. At 1 (Le et al.) a ReLU state fed the same
    input adds it up for as long as the state is carried; below 1 it settles (about 1/(1 - scale)
    times one step's input), which is what a state carried across a whole text needs."""
    import torch

    from nextword.export.config import ModelConfig
    from nextword.export.model import make_recurrent

    def run(scale: float, steps: int) -> float:
        torch.manual_seed(0)
        cfg = ModelConfig(cell="irnn", embedding_dim=8, hidden_size=8, num_layers=1, irnn_scale=scale)
        rnn = make_recurrent(cfg)
        weights = dict(rnn.named_parameters())
        assert torch.equal(weights["rnn.weight_hh_l0"], scale * torch.eye(8))
        x = torch.ones(1, steps, 8)
        with torch.no_grad():
            _, (h,) = rnn(x, rnn.init_state(1))
        return float(h.max())

    assert run(1.0, 2000) > 1.9 * run(1.0, 1000)  # keeps growing with the length carried
    assert run(0.9, 2000) == pytest.approx(run(0.9, 1000), rel=1e-4)  # settled
