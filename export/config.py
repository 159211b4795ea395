"""Settings of the export side's commands: train, export, quantize, diagnose.

Plain dataclasses with no torch import, so ``nextword train --help`` works (and
says which extra to install) on a machine that only serves. Each field's
default and help text is the command-line option's (``nextword.options``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from nextword.options import option, positional, required, switch

CELLS = ("rnn", "irnn", "delay", "lstm", "gru", "cifg")
FORMATS = ("auto", "raw", "lines")
_FORMAT_HELP = "raw: wrapped text, a blank line ends a paragraph; lines: one tokenized sentence a line"
SPLITS = "a directory with train.txt and valid.txt (test.txt optional)"


class InputError(ValueError):
    """What the user gave cannot be used: the command prints one line, ``nextword CMD: error: ...``, exit 2.

    Raised before anything is written, so a refused command leaves nothing behind.
    """


def check_run_dir(run_dir: Path, needed: str, *, hint: str, unfinished: str) -> None:
    """InputError unless ``run_dir`` is a training run that holds ``needed`` (best.pt, checkpoint.pt).

    ``hint`` says what to give instead; ``unfinished`` what to do about a run without ``needed``.
    """
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such directory; {hint}")
    if not (run_dir / "config.json").is_file() or not (run_dir / "vocab.txt").is_file():
        raise InputError(f"{run_dir} is not a training run (no config.json and vocab.txt); {hint}")
    if not (run_dir / needed).is_file():
        raise InputError(f"{run_dir} has no {needed}: no epoch of its training has finished; {unfinished}")


def command_line(args: argparse.Namespace) -> str:
    """The command that made a run or bundle, as recorded in it ("" when not run from the CLI)."""
    argv = getattr(args, "argv", None)
    return "nextword " + shlex.join(argv) if argv else ""


@dataclass
class ModelConfig:
    """The network: sizes and cell. Saved with every run and bundle."""

    vocab_size: int = option(0, "", cli=False)  # set from the vocabulary built
    cell: str = option("lstm", "recurrent cell (see export/model.py)", choices=CELLS)
    embedding_dim: int = option(256, "word embedding size")
    hidden_size: int = option(256, "recurrent state size per layer")
    num_layers: int = option(2, "recurrent layers", flag="--layers")
    dropout: float = option(0.3, "dropout between layers and before the softmax")
    tie_weights: bool = switch("separate input and output embeddings (the default ties them)", off="--no-tie")
    delay: int = option(4, "delay cell: h_t also reads h_(t-d), this d")
    irnn_scale: float = option(
        1.0,
        "irnn: the recurrent matrix starts as this times the identity (below 1, a state carried "
        "from segment to segment decays instead of adding up every input it has seen)",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ModelConfig:
        """A saved ``to_dict``; runs from before ``delay`` was a field kept it in ``extra``."""
        saved = dict(saved)
        extra = saved.pop("extra", None) or {}
        if "delay" in extra:
            saved.setdefault("delay", extra["delay"])
        return cls(**saved)

    def check(self) -> None:
        """Raise InputError, naming the options to change, for sizes no model can be built with."""
        if self.cell not in CELLS:
            raise InputError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.cell == "delay" and self.delay < 1:
            raise InputError(f"--delay must be at least 1 (got {self.delay})")
        if self.tie_weights and self.embedding_dim != self.hidden_size:
            raise InputError(
                f"tied weights need --embedding-dim equal to --hidden-size (got {self.embedding_dim} "
                f"and {self.hidden_size}): give both the same size, or add --no-tie"
            )


@dataclass
class TrainConfig:
    """How a run trains (``nextword train``); saved in the run directory as config.json."""

    out: Path = required("run directory to write (checkpoints, vocabulary, metrics)")
    data: Path | None = option(None, SPLITS)
    resume: bool = switch(
        "continue the run in --out from its last checkpoint, with its saved settings; "
        "--epochs may raise its epoch count, --max-minutes, --device and --threads apply to this session"
    )
    format: str = option("auto", _FORMAT_HELP, choices=FORMATS)
    vocab_size: int = option(10000, "most frequent training words kept; the rest are <unk>")
    min_count: int = option(2, "words seen fewer times than this are <unk>")
    epochs: int = option(10, "passes over the training text")
    batch_size: int = option(32, "parallel streams of text per step (over all processes)")
    bptt: int = option(35, "truncated backpropagation through time: tokens per window")
    lr: float = option(2e-3, "Adam learning rate (halved whenever validation stops improving)")
    clip: float = option(1.0, "gradient-norm clipping threshold; 0 disables")
    restart_prob: float = option(
        0.0,
        "chance that a stream's state starts again from zero at a window, so the model also learns "
        "to start from nothing, as every served session and every scored column does (0: only at "
        "each epoch's start)",
    )
    seed: int = option(1234, "random seed (weights, dropout, order)")
    device: str = option("auto", "auto (cuda if available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    max_minutes: float = option(0.0, "stop training after this many minutes (0: no limit); best kept")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    eval_batch_size: int = option(16, "", cli=False)
    command: str = option("", "", cli=False)  # the command line that made the run

    # Recorded in config.json, but --resume takes them from its own command line, not from there.
    SESSION: ClassVar[tuple[str, ...]] = ("out", "resume", "max_minutes", "device", "threads")

    def __post_init__(self) -> None:
        # Python callers and config.json give paths as strings.
        self.out = Path(self.out)
        self.data = Path(self.data) if self.data is not None else None

    def to_dict(self) -> dict[str, Any]:
        """What config.json records: the settings that make the run (paths as strings)."""
        saved = {k: v for k, v in asdict(self).items() if k not in ("out", "resume")}
        return {k: str(v) if isinstance(v, Path) else v for k, v in saved.items()}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], out: Path) -> TrainConfig:
        """The settings ``to_dict`` recorded for the run in ``out``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"out"}
        return cls(out=out, **{k: v for k, v in saved.items() if k in names})


@dataclass(frozen=True)
class ExportConfig:
    """``nextword export``: a training run to a model bundle."""

    run_dir: Path = positional("a training run directory (what `nextword train --out` wrote)")
    out: Path = required("bundle directory to write")
    name: str | None = option(None, "model name (default: the bundle directory's name)")
    opset: int = option(17, "ONNX opset of the graphs")
    top_k: int = option(64, "rank this many words inside the graphs (0: the server ranks)")
    tolerance: float = option(1e-4, "largest |torch - onnxruntime| difference accepted")
    eval_data: Path | None = option(
        None, "directory whose valid.txt/test.txt are scored into the manifest (default: the training data)"
    )
    command: str = option("", "", cli=False)  # the command line that made the bundle


@dataclass(frozen=True)
class QuantizeConfig:
    """``nextword quantize``: an int8 (CPU) or fp16 (CUDA) bundle from an fp32 one."""

    bundle: Path = positional("an fp32 bundle")
    out: Path = required("bundle directory to write")
    data: Path = required(
        "calibration text: a file, or a directory (valid.txt calibrates; valid/test.txt are scored)"
    )
    precision: str = option(
        "int8",
        "int8: calibrated static int8, for CPUs; fp16: half-precision weights and arithmetic, for CUDA "
        "GPUs (scored on CUDA where there is one, else on the CPU, slowly)",
        choices=("int8", "fp16"),
    )


@dataclass(frozen=True)
class DiagnoseConfig:
    """``nextword diagnose``: gradient norm back through time, per cell or trained run."""

    run_dirs: list[Path] = positional("training run directories", metavar="RUN_DIR", nargs="*")
    cells: str = option("", "also freshly initialised models of these cells, comma-separated, e.g. rnn,lstm")
    out: Path = option(Path("grad.png"), "PNG to write")
    json: bool = switch("print one JSON object with the norms")
    horizon: int = option(100, "largest k (steps back)")
    sequences: int = option(8, "sequences averaged over")
    warmup: int = option(50, "steps run before T-K, without gradient")
    data: Path | None = option(None, "text file: real token windows instead of random ids")
    format: str = option("auto", _FORMAT_HELP, choices=FORMATS)
    hidden_size: int = option(256, "fresh models: state size")
    layers: int = option(1, "fresh models: layers")
    vocab_size: int = option(10000, "fresh models: vocabulary size")
    delay: int = option(ModelConfig.delay, "fresh delay cell: h_t also reads h_(t-d), this d")
    seed: int = option(0, "random seed")
    threads: int = option(1, "torch CPU threads")
