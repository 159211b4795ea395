"""``nextword train``: a word-level recurrent LM from raw text.

Truncated BPTT with the state carried across batches, gradient clipping (the
norm before clipping is logged), dropout, tied weights, validation perplexity
every epoch with the best checkpoint kept, learning rate halved when
validation stops improving, resumable and seedable.

Run directory::

    config.json      TrainConfig + ModelConfig (what --resume reads back)
    vocab.txt        the vocabulary built from train.txt
    checkpoint.pt    latest state (model, optimizer, epoch, rng): resume point
    best.pt          weights with the best validation perplexity
    history.jsonl    one line per epoch (loss, valid ppl, grad norms, lr, words/s; an epoch
                     that --max-minutes cut short says so: "cut", "tokens" of "epoch_tokens")
    summary.json     final metrics (valid/test perplexity of best.pt), data checksums, command

Every input is checked, and the corpus read, before the run directory is made or
touched: a refused command (``nextword train: error: ...``) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nextword.bundle import sha256
from nextword.options import from_args
from nextword.progress import progress
from nextword.tokenizer import TOKENIZER_NAME, TOKENIZER_VERSION, Vocab

from .config import SPLITS, InputError, ModelConfig, TrainConfig, check_run_dir, command_line
from .data import batchify, encode, read_tokens, resolve_format, windows
from .model import RNNLanguageModel


def perplexity(nll: float) -> float:
    """exp(nll), inf for a diverged model rather than an OverflowError."""
    return math.exp(nll) if nll < 700 else math.inf


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def world_size() -> int:
    """Processes training together: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def evaluate(model: RNNLanguageModel, data: Tensor, bptt: int, desc: str = "scoring") -> float:
    """Mean negative log-likelihood per token over batchified data, state carried."""
    model.eval()
    state = model.init_state(data.size(0), data.device)
    total, count = 0.0, 0
    batches = math.ceil((data.size(1) - 1) / bptt)
    with torch.no_grad():
        for x, y in progress(windows(data, bptt), desc, total=batches, unit="batch"):
            logits, state = model(x, state)
            total += nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / max(count, 1)


@dataclass(frozen=True)
class Dist:
    """Where this process stands under torchrun (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: ranks must leave loops together."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def init_distributed(device: str) -> Dist:
    """Join the torchrun group if there is one: nccl on CUDA, gloo on the CPU."""
    world = world_size()
    if world == 1:
        return Dist()
    cuda = device != "cpu" and torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    dist = Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if cuda:
        torch.cuda.set_device(dist.local_rank)
    return dist


def log_main(dist: Dist, *args: Any, **kwargs: Any) -> None:
    """print on rank 0 only: one process speaks for the run."""
    if dist.main:
        print(*args, **kwargs, flush=True)


# ---- inputs, checked before anything is written ----------------------------------------
def check_inputs(cfg: TrainConfig, mcfg: ModelConfig | None, out: Path, *, resume: bool) -> None:
    """InputError, saying what is missing and what to do, for anything this run cannot start from."""
    if resume:
        check_resumable(out)
    elif out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a directory for the run")
    elif (out / "checkpoint.pt").exists():
        raise InputError(
            f"--out {out} already holds a training run: add --resume to continue it, or choose another --out"
        )
    check_data(cfg.data, resumed_from=out if resume else None)
    if mcfg is not None and not resume:
        mcfg.check()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu or auto")
    if cfg.batch_size % world_size():
        raise InputError(f"--batch-size {cfg.batch_size} must divide evenly over {world_size()} processes")
    if not 0 <= cfg.restart_prob < 1:
        raise InputError(f"--restart-prob must be at least 0 and below 1 (got {cfg.restart_prob:g})")


def check_data(data: Path | None, *, resumed_from: Path | None = None) -> None:
    if data is None:
        raise InputError(f"--data DIR is required: {SPLITS}")
    name = f"--data {data}" if resumed_from is None else f"{data} (the data of {resumed_from}/config.json)"
    if not data.is_dir():
        problem = "is a file" if data.exists() else "no such directory"
        raise InputError(f"{name}: {problem}; give {SPLITS}")
    missing = [split for split in ("train.txt", "valid.txt") if not (data / split).is_file()]
    if missing:
        raise InputError(f"{name} has no {' and no '.join(missing)}: it must be {SPLITS}")


def check_resumable(out: Path) -> None:
    try:
        check_run_dir(
            out,
            "checkpoint.pt",
            hint="give the --out directory of an earlier `nextword train`",
            unfinished="train it anew, without --resume",
        )
    except InputError as exc:
        raise InputError(f"--resume: {exc}") from None


def resumed_config(given: TrainConfig) -> TrainConfig:
    """The saved settings of the run in ``given.out``, with this session's (TrainConfig.SESSION)."""
    check_resumable(given.out)
    saved = TrainConfig.from_dict(json.loads((given.out / "config.json").read_text())["train"], given.out)
    session = {name: getattr(given, name) for name in TrainConfig.SESSION}
    return dataclasses.replace(saved, **session, epochs=max(given.epochs, saved.epochs))


# ---- the corpus, the run directory, the model ------------------------------------------
@dataclass
class Corpus:
    data_dir: Path
    fmt: str
    vocab: Vocab
    train: Tensor  # this rank's columns of the global batch
    valid: Tensor
    test: Tensor | None


def load_corpus(cfg: TrainConfig, dist: Dist, device: torch.device, vocab: Vocab | None = None) -> Corpus:
    """Read and batch every split; the vocabulary is built from train.txt unless given (resume)."""
    assert cfg.data is not None
    data_dir = cfg.data
    fmt = resolve_format(data_dir / "train.txt", cfg.format)
    tokens = read_tokens(data_dir / "train.txt", fmt)
    if vocab is None:
        # Every rank builds the same vocabulary from the same text; rank 0 writes the files.
        vocab = Vocab.build(tokens, max_size=cfg.vocab_size, min_count=cfg.min_count)
    # The global batch is cfg.batch_size columns; each rank trains its share of them, so
    # DDP's averaged gradient is the one-process gradient of the whole batch.
    train = _batched(
        data_dir / "train.txt", encode(tokens, vocab), cfg.batch_size, " or a smaller --batch-size"
    )
    valid, test = (
        _batched(path, encode(read_tokens(path, fmt), vocab), cfg.eval_batch_size).to(device)
        if path.is_file()
        else None
        for path in (data_dir / "valid.txt", data_dir / "test.txt")
    )
    assert valid is not None  # check_data saw it
    return Corpus(data_dir, fmt, vocab, train[dist.rank :: dist.world].to(device), valid, test)


def _batched(path: Path, ids: Tensor, batch_size: int, hint: str = "") -> Tensor:
    try:
        return batchify(ids, batch_size)
    except InputError as exc:
        raise InputError(f"{path}: {exc}: give more text{hint}") from None


def prepare_run_dir(out: Path, cfg: TrainConfig, mcfg: ModelConfig, vocab: Vocab, world: int) -> None:
    """A new run: its vocabulary, its settings (config.json) and an empty history."""
    out.mkdir(parents=True, exist_ok=True)
    vocab.save(out / "vocab.txt")
    config = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "world_size": world}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "history.jsonl").write_text("")


def build_model(
    cfg: TrainConfig, mcfg: ModelConfig, dist: Dist, device: torch.device
) -> tuple[RNNLanguageModel, nn.Module, torch.optim.Optimizer]:
    """The model, what trains it (DDP-wrapped under torchrun) and its optimizer."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    core = RNNLanguageModel(mcfg).to(device)
    torch.manual_seed(cfg.seed + dist.rank)  # but each rank its own dropout masks
    model = core if dist.world == 1 else DistributedDataParallel(core)
    return core, model, torch.optim.Adam(model.parameters(), lr=cfg.lr)


def pick_run_device(name: str, dist: Dist) -> torch.device:
    device = pick_device(name)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    return device


def unwrap(model: nn.Module) -> RNNLanguageModel:
    """The language model inside a DDP wrapper (or the model itself)."""
    core = model.module if isinstance(model, DistributedDataParallel) else model
    assert isinstance(core, RNNLanguageModel)
    return core


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


# ---- checkpoints -----------------------------------------------------------------------
@dataclass
class Progress:
    """Where training stands between epochs: what a checkpoint holds besides the weights."""

    lr: float
    epoch: int = 0  # the last epoch finished
    best_nll: float = math.inf


def save_checkpoint(out: Path, core: nn.Module, opt: torch.optim.Optimizer, at: Progress) -> None:
    state = {"model": core.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    torch.save({**state, "epoch": at.epoch, "best_nll": at.best_nll, "lr": at.lr}, out / "checkpoint.pt")


def load_checkpoint(out: Path, core: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> Progress:
    ckpt = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
    core.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"].cpu())  # the CPU generator's state, whatever map_location moved
    return Progress(lr=ckpt["lr"], epoch=ckpt["epoch"], best_nll=ckpt["best_nll"])


# ---- training --------------------------------------------------------------------------
def restart(state: tuple[Tensor, ...], axis: int, prob: float) -> tuple[Tensor, ...]:
    """``state`` with each stream (index on ``axis``) set back to zero with probability ``prob``.

    Carried through a whole epoch, a stream starts from zero only once, so a model may never
    learn to start: a delay cell trained that way, reading "the" from the zero state, fell into
    a regime it never left and scored whole columns at perplexity 10^5 (benchmarks/RESULTS.md)."""
    n = state[0].size(axis)
    keep = (torch.rand(n, device=state[0].device) >= prob).to(state[0].dtype)
    return tuple(s * keep.view([n if d == axis else 1 for d in range(s.dim())]) for s in state)


def train_epoch(
    model: nn.Module,
    data: Tensor,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    deadline: float,
    epoch: int,
    dist: Dist,
) -> dict[str, Any]:
    """One pass over ``data`` (or less, if ``deadline`` passes first: then "cut" is true)."""
    model.train()
    core = unwrap(model)
    state = core.init_state(data.size(0), data.device)
    total_loss, total_tokens, norms, clipped = 0.0, 0, [], 0
    start = time.perf_counter()
    bar = tqdm(
        list(windows(data, cfg.bptt)),
        desc=f"epoch {epoch}",
        unit="batch",
        leave=False,
        disable=not sys.stderr.isatty(),
    )
    axis = core.state_batch_axis()
    for x, y in bar:
        # Truncated BPTT: keep the state's values, cut its gradient history.
        state = tuple(s.detach() for s in state)
        if cfg.restart_prob:
            state = restart(state, axis, cfg.restart_prob)
        logits, state = model(x, state)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.clip if cfg.clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        clipped += norm > max_norm
        norms.append(norm)
        opt.step()
        total_loss += loss.item() * y.numel()
        total_tokens += y.numel()
        bar.set_postfix(ppl=f"{perplexity(total_loss / total_tokens):.1f}", gnorm=f"{norm:.2f}")
        if deadline and dist.any(time.monotonic() > deadline):
            break
    bar.close()
    elapsed = time.perf_counter() - start
    train_loss = total_loss / max(total_tokens, 1)  # this rank's share; the others' is alike
    total_tokens *= dist.world  # every rank ran as many tokens as this one
    epoch_tokens = data.size(0) * (data.size(1) - 1) * dist.world
    return {
        "train_loss": train_loss,
        "grad_norm_mean": sum(norms) / max(len(norms), 1),
        "grad_norm_max": max(norms, default=0.0),
        "clipped_fraction": clipped / max(len(norms), 1),
        "words_per_s": total_tokens / elapsed if elapsed else 0.0,
        "tokens": total_tokens,
        "epoch_tokens": epoch_tokens,
        "cut": total_tokens < epoch_tokens,
    }


def train_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    corpus: Corpus,
    cfg: TrainConfig,
    out: Path,
    dist: Dist,
    at: Progress,
) -> None:
    """The epochs left: train, validate, keep the best weights, halve the lr on a plateau, checkpoint."""
    core = unwrap(model)
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else 0.0
    first = at.epoch + 1
    for epoch in range(first, cfg.epochs + 1):
        # Not before the session's first epoch: a run always trains some, and has a best.pt.
        if deadline and epoch > first and dist.any(time.monotonic() > deadline):
            log_main(
                dist,
                f"stopping: --max-minutes {cfg.max_minutes:g} reached before epoch {epoch} of {cfg.epochs}",
            )
            break
        for group in opt.param_groups:
            group["lr"] = at.lr
        stats = train_epoch(model, corpus.train, opt, cfg, deadline, epoch, dist)
        # Every rank: the same number, the same decisions.
        valid_nll = evaluate(core, corpus.valid, cfg.bptt, desc=f"epoch {epoch}: valid.txt")
        improved = valid_nll < at.best_nll
        if improved:
            at.best_nll = valid_nll
            if dist.main:
                torch.save(core.state_dict(), out / "best.pt")
        else:
            at.lr /= 2  # plateau: halve the step size (Zaremba et al. 2014 decay, made adaptive)
        at.epoch = epoch
        if dist.main:
            record = {
                "epoch": epoch,
                "lr": at.lr,
                "valid_ppl": perplexity(valid_nll),
                "train_ppl": perplexity(stats["train_loss"]),
                **stats,
            }
            with (out / "history.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(epoch_line(record, improved), flush=True)
            save_checkpoint(out, core, opt, at)


def epoch_line(record: dict[str, Any], improved: bool) -> str:
    """``epoch 3: train ppl ...``; an epoch --max-minutes cut short says how much of it ran."""
    name = f"epoch {record['epoch']}"
    if record["cut"]:
        name += f" (cut by --max-minutes after {record['tokens']:,} of {record['epoch_tokens']:,} tokens)"
    return (
        f"{name}: train ppl {record['train_ppl']:.2f}  valid ppl {record['valid_ppl']:.2f}"
        f"{' (best)' if improved else ''}  grad norm mean {record['grad_norm_mean']:.2f} "
        f"max {record['grad_norm_max']:.2f}  {record['words_per_s']:.0f} words/s"
    )


def run(cfg: TrainConfig, mcfg: ModelConfig | None = None) -> dict[str, Any]:
    """Train into ``cfg.out``, or go on training it (``cfg.resume``, ``mcfg`` None); returns the summary.

    Raises InputError before writing anything when an input is missing or unusable.
    """
    out, resume = cfg.out, cfg.resume
    check_inputs(cfg, mcfg, out, resume=resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(cfg.device)
    device = pick_run_device(cfg.device, dist)
    if resume:
        mcfg = ModelConfig.from_dict(json.loads((out / "config.json").read_text())["model"])
        corpus = load_corpus(cfg, dist, device, Vocab.load(out / "vocab.txt"))
    else:
        assert mcfg is not None
        corpus = load_corpus(cfg, dist, device)
        mcfg = dataclasses.replace(mcfg, vocab_size=len(corpus.vocab))
    core, model, opt = build_model(cfg, mcfg, dist, device)
    if resume:
        at = load_checkpoint(out, core, opt, device)
        log_main(
            dist, f"resuming {out} after epoch {at.epoch} (best valid ppl {perplexity(at.best_nll):.2f})"
        )
    else:
        at = Progress(lr=cfg.lr)
        if dist.main:
            prepare_run_dir(out, cfg, mcfg, corpus.vocab, dist.world)
    params = count_parameters(core)
    log_main(
        dist,
        f"{mcfg.cell}: {params:,} parameters, vocab {len(corpus.vocab)}, "
        f"{corpus.train.numel() * dist.world:,} train tokens, device {device}"
        + (f", {dist.world} processes" if dist.world > 1 else ""),
    )
    train_epochs(model, opt, corpus, cfg, out, dist, at)
    if dist.world > 1:
        torch.distributed.barrier()  # rank 0 has written best.pt
        torch.distributed.destroy_process_group()
        if not dist.main:
            return {}
    return summarize(core, cfg, out, corpus, params)


def summarize(
    model: RNNLanguageModel, cfg: TrainConfig, out: Path, corpus: Corpus, params: int
) -> dict[str, Any]:
    """summary.json: best.pt's valid/test perplexity, the data's checksums, the command."""
    model.load_state_dict(torch.load(out / "best.pt", map_location=corpus.valid.device))
    metrics: dict[str, Any] = {}
    names = "valid.txt" + (" and test.txt" if corpus.test is not None else "")
    print(f"scoring best.pt on {names} ...", file=sys.stderr, flush=True)
    for split, data in (("valid", corpus.valid), ("test", corpus.test)):
        if data is not None:
            nll = evaluate(model, data, cfg.bptt, desc=f"best.pt: {split}.txt")
            metrics[f"{split}_perplexity_torch"] = perplexity(nll)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    files = {s: corpus.data_dir / f"{s}.txt" for s in ("train", "valid", "test")}
    summary = {
        "command": cfg.command,
        "data": {s: {"path": str(p), "sha256": sha256(p)} for s, p in files.items() if p.exists()},
        "format": corpus.fmt,
        "tokenizer": {"name": TOKENIZER_NAME, "version": TOKENIZER_VERSION},
        "parameters": params,
        "epochs_run": len(history),
        "epochs_cut": [h["epoch"] for h in history if h.get("cut")],
        "words_per_s": sum(h["words_per_s"] for h in history) / max(len(history), 1),
        "metrics": metrics,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("best checkpoint: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return summary


def main(args: argparse.Namespace) -> int:
    cfg = from_args(TrainConfig, args, command=command_line(args))
    try:
        if cfg.resume:
            run(resumed_config(cfg))
        else:
            run(cfg, from_args(ModelConfig, args, vocab_size=0))
    except InputError as exc:
        print(f"nextword train: error: {exc}", file=sys.stderr)
        return 2
    return 0
