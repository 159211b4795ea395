"""A newcomer's mistakes with `nextword train` / `nextword export`: one line saying what to do, exit 2,
nothing written; and a --max-minutes run that stops inside an epoch says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nextword.cli import main as nextword
from nextword.export.train import restart
from tests.conftest import write_corpus

SMALL = ["--embedding-dim", "8", "--hidden-size", "8", "--layers", "1", "--batch-size", "4", "--bptt", "10"]
SMALL += ["--min-count", "1", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("errors-corpus"), seed=3, paragraphs=100)


def _corpus_without(corpus: Path, tmp_path: Path, missing: str) -> Path:
    partial = tmp_path / f"no-{missing}"
    partial.mkdir()
    for split in ("train.txt", "valid.txt", "test.txt"):
        if split != missing:
            (partial / split).write_bytes((corpus / split).read_bytes())
    return partial


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *, prog: str) -> str:
    """Run the command; it must exit 2 with one stderr line `nextword PROG: error: ...`."""
    assert nextword(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"nextword {prog}: error: "), lines[0]
    assert "Traceback" not in captured.err and not captured.out
    return lines[0]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_train_without_a_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs" / "x"
    line = _refused(
        ["train", "--data", str(tmp_path / "nonexistent"), "--out", str(out)], capsys, prog="train"
    )
    assert "nonexistent: no such directory" in line and "train.txt and valid.txt" in line
    line = _refused(["train", "--out", str(out)], capsys, prog="train")
    assert "--data DIR is required" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("missing", ["valid.txt", "train.txt"])
def test_train_with_a_split_missing(
    missing: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = _corpus_without(corpus, tmp_path, missing), tmp_path / "runs" / "x"
    line = _refused(["train", "--data", str(data), "--out", str(out), *SMALL], capsys, prog="train")
    assert f"has no {missing}" in line and "train.txt and valid.txt" in line
    assert not (tmp_path / "runs").exists()


def test_train_refuses_before_writing(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs" / "x"
    base = ["train", "--data", str(corpus), "--out", str(out)]
    # Tied weights with unequal sizes: the model cannot be built.
    line = _refused([*base, "--hidden-size", "16", "--embedding-dim", "8"], capsys, prog="train")
    assert "--embedding-dim equal to --hidden-size" in line and "--no-tie" in line
    # A corpus too small for the batch.
    line = _refused([*base, *SMALL, "--batch-size", "100000"], capsys, prog="train")
    assert "train.txt" in line and "--batch-size" in line
    # Every stream restarting at every window: no state would ever be carried.
    line = _refused([*base, *SMALL, "--restart-prob", "1"], capsys, prog="train")
    assert "--restart-prob must be at least 0 and below 1" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("shape", [(2, 6, 3), (2, 6, 4, 3)])  # lstm's h or c; the delay cell's window
def test_restart_zeroes_whole_streams_and_keeps_the_rest(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    state = (torch.rand(shape) + 1, torch.rand(shape) + 1)
    assert all(torch.equal(a, b) for a, b in zip(restart(state, 1, 0.0), state, strict=True))
    out = restart(state, 1, 0.5)
    for s, o in zip(state, out, strict=True):
        zeroed = [b for b in range(shape[1]) if not o[:, b].any()]
        kept = [b for b in range(shape[1]) if torch.equal(o[:, b], s[:, b])]
        assert sorted(zeroed + kept) == list(range(shape[1])), "a stream is either kept whole or zeroed"
    assert [b for b in range(shape[1]) if not out[0][:, b].any()] == [
        b for b in range(shape[1]) if not out[1][:, b].any()
    ], "h and c of a stream restart together"
    restarted = sum(not restart(state, 1, 0.5)[0][:, b].any() for _ in range(200) for b in range(shape[1]))
    assert 0.4 < restarted / (200 * shape[1]) < 0.6


def test_train_will_not_write_over_a_run(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    line = _refused(["train", "--data", str(corpus), "--out", str(run), *SMALL], capsys, prog="train")
    assert "already holds a training run" in line and "--resume" in line
    assert _tree(run) == ["checkpoint.pt"]


def test_resume_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a run\n")
    line = _refused(["train", "--resume", "--out", str(folder)], capsys, prog="train")
    assert "is not a training run" in line and "nextword train" in line
    assert _tree(folder) == ["readme.txt"]
    line = _refused(["train", "--resume", "--out", str(tmp_path / "nope")], capsys, prog="train")
    assert "no such directory" in line
    assert not (tmp_path / "nope").exists()


def test_export_of_a_missing_or_unfinished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "x"
    line = _refused(["export", str(tmp_path / "runs" / "nope"), "--out", str(out)], capsys, prog="export")
    assert "no such directory" in line and "nextword train --out" in line
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"train": {}, "model": {}}))
    (unfinished / "vocab.txt").write_text("<unk>\n<eos>\n")
    line = _refused(["export", str(unfinished), "--out", str(out)], capsys, prog="export")
    assert "has no best.pt" in line and "--resume" in line
    line = _refused(["export", str(tmp_path), "--out", str(out)], capsys, prog="export")
    assert "is not a training run" in line
    assert not (tmp_path / "models").exists()


def test_export_will_not_replace_a_directory_that_is_not_a_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "vocab.txt", "best.pt"):
        (run / name).write_text("")
    models = tmp_path / "models"
    models.mkdir()
    (models / "keep.txt").write_text("other bundles live here\n")
    line = _refused(["export", str(run), "--out", str(models)], capsys, prog="export")
    assert "is not a model bundle" in line
    assert _tree(models) == ["keep.txt"]


def test_a_cut_epoch_says_so(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # A deadline of 3 ms passes during the first batch: epoch 1 is cut, epoch 2 never starts.
    argv = ["train", "--data", str(corpus), "--out", str(out), *SMALL, "--epochs", "2"]
    assert nextword([*argv, "--max-minutes", "0.00005"]) == 0
    stdout = capsys.readouterr().out
    (record,) = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert record["cut"] is True and 0 < record["tokens"] < record["epoch_tokens"]
    cut = f"epoch 1 (cut by --max-minutes after {record['tokens']:,} of {record['epoch_tokens']:,} tokens): "
    assert cut in stdout
    assert "stopping: --max-minutes 5e-05 reached before epoch 2 of 2" in stdout
    assert json.loads((out / "summary.json").read_text())["epochs_cut"] == [1]


def test_a_whole_epoch_is_not_cut(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert nextword(["train", "--data", str(corpus), "--out", str(out), *SMALL, "--epochs", "1"]) == 0
    assert "\nepoch 1: train ppl" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert record["cut"] is False and record["tokens"] == record["epoch_tokens"]


def test_resume_continues_the_run(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert nextword(["train", "--data", str(corpus), "--out", str(out), *SMALL, "--epochs", "1"]) == 0
    # The saved settings (not the defaults of the flags left out) carry on; --epochs raises the count.
    assert nextword(["train", "--resume", "--out", str(out), "--epochs", "2", "--threads", "1"]) == 0
    assert "resuming" in capsys.readouterr().out
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["hidden_size"] == 8 and saved["train"]["batch_size"] == 4
