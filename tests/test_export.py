"""Training and export, for real: a tiny LSTM trained for a few seconds, exported, checked."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from nextword.bundle import BundleError, Manifest, load_bundle, write_manifest
from nextword.cli import main as nextword
from nextword.export.config import ModelConfig
from nextword.export.onnx_export import ParityError, export_bundle, load_run
from nextword.runtime import OnnxLM
from tests.conftest import train_tiny


def test_training_learns_and_logs(tiny_run: Path) -> None:
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3
    assert history[-1]["valid_ppl"] < history[0]["train_ppl"]  # it learned something
    vocab_size = len((tiny_run / "vocab.txt").read_text().splitlines())
    assert history[-1]["valid_ppl"] < vocab_size / 4  # far better than uniform
    for record in history:  # the gradient norm before clipping is logged
        assert record["grad_norm_max"] >= record["grad_norm_mean"] > 0
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["metrics"]["test_perplexity_torch"] > 1
    assert set(summary["data"]) == {"train", "valid", "test"}


def test_training_is_seeded_and_resumable(tiny_corpus: Path, tmp_path: Path) -> None:
    a = train_tiny(tiny_corpus, tmp_path / "a", epochs=1, size=16, num_layers=1)
    b = train_tiny(tiny_corpus, tmp_path / "b", epochs=1, size=16, num_layers=1)
    wa, wb = torch.load(a / "best.pt"), torch.load(b / "best.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    from nextword.export.train import TrainConfig, run

    saved = TrainConfig.from_dict(json.loads((a / "config.json").read_text())["train"], a)
    run(dataclasses.replace(saved, epochs=2, resume=True))
    epochs = [json.loads(line)["epoch"] for line in (a / "history.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_bundle_is_self_describing(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    assert m.cell == "lstm" and m.vocab_size == len(bundle.vocab)
    assert [(s.input, s.output, s.batch_axis) for s in m.state] == [
        ("state_h", "state_h_out", 1),
        ("state_c", "state_c_out", 1),
    ]
    # lexicon.txt: the training words outside the vocabulary (none here: min_count 1 kept them all)
    assert set(m.files) == {"model.onnx", "head.onnx", "weights.bin", "vocab.txt", "lexicon.txt"}
    assert m.lexicon_file == "lexicon.txt" and bundle.lexicon is not None and len(bundle.lexicon) == 0
    assert m.export["parity_max_abs_diff"] <= m.export["tolerance"]
    assert (
        m.metrics["test_perplexity"] > 1 and 0 < m.metrics["test"]["top1"] <= m.metrics["test"]["top3"] <= 1
    )
    assert m.training["command"] and m.export["command"]
    for graph in (m.step, m.head):
        onnx.checker.check_model(str(tiny_bundle / graph.file))
    # The head graph reuses the step graph's weights file: the big matrix is stored once.
    assert (tiny_bundle / "head.onnx").stat().st_size < 4096


def test_exported_graphs_match_torch_on_new_shapes(tiny_run: Path, tiny_bundle: Path) -> None:
    model, _ = load_run(tiny_run)
    lm = OnnxLM(load_bundle(tiny_bundle), device="cpu")
    tokens = torch.randint(0, model.cfg.vocab_size, (5, 11))
    state = tuple(torch.randn(s.shape) for s in model.init_state(5))
    with torch.no_grad():
        logits, want_state = model(tokens, state)
    log_probs, got_state = lm.step(tokens.numpy(), [s.numpy() for s in state])
    want = torch.log_softmax(logits[:, -1], dim=-1).numpy()
    assert abs(log_probs - want).max() < 1e-4
    for got, ref in zip(got_state, want_state, strict=True):
        assert abs(got - ref.numpy()).max() < 1e-4
    assert abs(lm.head(got_state) - log_probs).max() < 1e-4  # head(state') == step's own output


def test_export_refuses_when_parity_fails(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="tolerance"):
        export_bundle(tiny_run, tmp_path / "b", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []  # not even the half-made b.partial


def test_export_cli_says_what_it_is_doing(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert nextword(["export", str(tiny_run), "--out", str(tmp_path / "b"), "--top-k", "8"]) == 0
    captured = capsys.readouterr()
    assert "exporting" in captured.err and "ONNX graphs" in captured.err
    assert "scoring" in captured.err and "valid.txt" in captured.err and "test.txt" in captured.err
    assert f"wrote bundle {tmp_path / 'b'}" in captured.out
    manifest = load_bundle(tmp_path / "b").manifest
    assert manifest.topk["k"] == 8 and manifest.export["command"].startswith("nextword export ")


def test_model_config_of_older_runs() -> None:
    """Runs saved before ``delay`` was a field kept it in ``extra``."""
    saved = {**ModelConfig(cell="delay").to_dict(), "extra": {"delay": 3}}
    del saved["delay"]
    assert ModelConfig.from_dict(saved).delay == 3
    assert ModelConfig.from_dict({"cell": "lstm", "extra": {}}).delay == ModelConfig.delay


def test_invalid_bundles_are_refused_with_a_reason(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    (bad / "vocab.txt").write_text((bad / "vocab.txt").read_text() + "extra\n")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bad)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    shutil.copy(tiny_bundle / "vocab.txt", bad / "vocab.txt")
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        load_bundle(bad)
    (bad / "manifest.json").write_text(json.dumps({**manifest, "state": []}))
    with pytest.raises(BundleError, match="no recurrent state"):
        load_bundle(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "lexicon.txt").write_text("the\t3\n")  # a word the model names is no lexicon word
    write_manifest(bad, Manifest.from_dict(manifest))  # checksums of every file, the new one too
    with pytest.raises(BundleError, match="'the' is a vocabulary word"):
        load_bundle(bad)


def test_eval_cli_reproduces_manifest_metrics(tiny_bundle: Path, tiny_corpus: Path) -> None:
    cmd = ["eval", str(tiny_bundle), "--data", str(tiny_corpus / "test.txt"), "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "nextword.cli", *cmd], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout)
    recorded = load_bundle(tiny_bundle).manifest.metrics["test"]
    assert result["perplexity"] == pytest.approx(recorded["perplexity"], rel=1e-6)
    assert set(result) >= {"perplexity", "top1", "top3", "tokens"}
    assert 0 < result["top1"] <= result["top3"] <= 1


def test_eval_cli_reports_a_bad_bundle(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello world\n")
    out = subprocess.run(
        [sys.executable, "-m", "nextword.cli", "eval", str(tmp_path), "--data", str(tmp_path / "t.txt")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "not a model bundle" in out.stderr and "Traceback" not in out.stderr
