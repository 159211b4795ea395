"""``nextword diagnose`` (gradient norms back through time) and the adding-problem benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import adding
from nextword.cli import main as nextword
from nextword.export.diagnose import fresh_model, gradient_norms, sample_tokens

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _relative_norm(cell: str, k: int) -> float:
    """||dL_T/dh_(T-k)|| / ||dL_T/dh_T|| of a fresh 1x32 model, over 8 random sequences."""
    model = fresh_model(cell, hidden=32, layers=1, vocab_size=50, delay=4, seed=0).double()
    tokens = sample_tokens(8, 10 + k + 2, 50, torch.Generator().manual_seed(0))
    norms = gradient_norms(model, tokens, horizon=k, warmup=10)
    assert len(norms) == k + 1 and all(n >= 0 for n in norms)
    return norms[k] / norms[0]


def test_tanh_rnn_gradient_vanishes_faster_than_lstm() -> None:
    rnn, lstm = _relative_norm("rnn", 30), _relative_norm("lstm", 30)
    # At init a tanh RNN loses roughly half the gradient each step (~1e-7 after 30
    # steps); the LSTM's cell path keeps ~1e-3. Two orders of magnitude is a safe margin.
    assert rnn < 1e-2 * lstm, (rnn, lstm)
    # ... and the IRNN's identity recurrence keeps most of it.
    assert _relative_norm("irnn", 30) > 0.1


def test_gradient_norms_reach_every_state_tensor() -> None:
    # The delay cell's state is a window of d hidden states and the LSTM's has h and c:
    # the gradient must reach each state of each step, for every k.
    for cell in ("delay", "lstm", "cifg"):
        model = fresh_model(cell, hidden=8, layers=2, vocab_size=20, delay=3, seed=1).double()
        tokens = sample_tokens(2, 12, 20, torch.Generator().manual_seed(1))
        norms = gradient_norms(model, tokens, horizon=10, warmup=0)
        assert all(n > 0 for n in norms), (cell, norms)
    with pytest.raises(ValueError):
        gradient_norms(model, tokens, horizon=5, warmup=0)  # wrong sequence length


def test_cli_writes_png_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "grad.png"
    args = ["diagnose", "--cells", "rnn,lstm,delay", "--hidden-size", "16", "--vocab-size", "50"]
    args += ["--horizon", "20", "--sequences", "2", "--warmup", "5", "--out", str(png), "--json"]
    assert nextword(args) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    report = json.loads(capsys.readouterr().out)
    assert [c["cell"] for c in report["curves"]] == ["rnn", "lstm", "delay"]
    assert all(len(c["norms"]) == 21 for c in report["curves"])
    assert nextword(["diagnose", "--cells", "nope", "--out", str(png)]) == 2


def test_trained_run_on_real_text(
    tiny_run: Path, tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "run.png"
    args = ["diagnose", str(tiny_run), "--data", str(tiny_corpus / "valid.txt"), "--horizon", "15"]
    args += ["--sequences", "3", "--warmup", "5", "--out", str(png), "--json"]
    assert nextword(args) == 0
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    (curve,) = json.loads(capsys.readouterr().out)["curves"]
    assert curve["cell"] == "lstm" and "trained" in curve["label"]
    assert len(curve["norms"]) == 16 and curve["norms"][0] > 0


def test_adding_data() -> None:
    x, y = adding.adding_batch(500, 10, torch.Generator().manual_seed(0))
    assert x.shape == (500, 10, 2) and y.shape == (500,)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    assert (markers.sum(1) == 2).all()
    assert (markers[:, :5].sum(1) == 1).all() and (markers[:, 5:].sum(1) == 1).all()  # one per half
    torch.testing.assert_close(y, (values * markers).sum(1))
    # The baseline: a model that ignores the input predicts the mean, 1, and scores Var = 1/6.
    _, big = adding.adding_batch(50_000, 4, torch.Generator().manual_seed(1))
    assert abs(((big - 1) ** 2).mean().item() - adding.BASELINE_MSE) < 0.005


def test_adding_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adding.json"
    args = ["--budget", "0.3", "--lengths", "10", "--cells", "rnn,delay", "--hidden", "8"]
    assert adding.main([*args, "--eval-size", "50", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "0.3 s of training per run" in lines[0]
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| cell | T | hidden | params |") and len(rows) == 3
    report = json.loads(out.read_text())
    assert report["budget_s"] == 0.3 and len(report["runs"]) == 2
    for run, cell in zip(report["runs"], ["rnn", "delay"], strict=True):
        assert run["cell"] == cell and run["length"] == 10 and run["steps"] >= 1
        assert run["params"] > 0 and run["mse"] >= 0 and run["baseline_mse"] == adding.BASELINE_MSE
