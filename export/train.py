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
    history.jsonl    one line per epoch (loss, valid ppl, grad norms, lr, words/s)
    summary.json     final metrics (valid/test perplexity of best.pt), data checksums, command
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nextword.bundle import sha256
from nextword.tokenizer import TOKENIZER_NAME, TOKENIZER_VERSION, Vocab

from .data import batchify, encode, read_tokens, resolve_format, windows
from .model import ModelConfig, RNNLanguageModel


@dataclass
class TrainConfig:
    data: str
    format: str = "auto"
    vocab_size: int = 10000
    min_count: int = 2
    epochs: int = 10
    batch_size: int = 32
    bptt: int = 35
    lr: float = 2e-3
    clip: float = 1.0
    seed: int = 1234
    device: str = "auto"
    max_minutes: float = 0.0
    eval_batch_size: int = 16
    command: str = ""


def perplexity(nll: float) -> float:
    """exp(nll), inf for a diverged model rather than an OverflowError."""
    return math.exp(nll) if nll < 700 else math.inf


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate(model: RNNLanguageModel, data: torch.Tensor, bptt: int) -> float:
    """Mean negative log-likelihood per token over batchified data, state carried."""
    model.eval()
    state = model.init_state(data.size(0), data.device)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in windows(data, bptt):
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    cuda = device != "cpu" and torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    dist = Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if cuda:
        torch.cuda.set_device(dist.local_rank)
    return dist


def train_epoch(
    model, data, opt, cfg: TrainConfig, deadline: float, epoch: int, dist: Dist
) -> dict[str, float]:
    model.train()
    core = model.module if isinstance(model, DistributedDataParallel) else model
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
    for x, y in bar:
        # Truncated BPTT: keep the state's values, cut its gradient history.
        state = tuple(s.detach() for s in state)
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
    elapsed = time.perf_counter() - start
    train_loss = total_loss / max(total_tokens, 1)  # this rank's share; the others' is alike
    total_tokens *= dist.world  # every rank ran as many tokens as this one
    return {
        "train_loss": train_loss,
        "grad_norm_mean": sum(norms) / max(len(norms), 1),
        "grad_norm_max": max(norms, default=0.0),
        "clipped_fraction": clipped / max(len(norms), 1),
        "words_per_s": total_tokens / elapsed if elapsed else 0.0,
        "tokens": total_tokens,
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def run(cfg: TrainConfig, mcfg: ModelConfig | None, out: Path, *, resume: bool = False) -> dict[str, Any]:
    """Train into ``out``; returns the summary. ``mcfg`` is None when resuming."""
    dist = init_distributed(cfg.device)
    data_dir = Path(cfg.data)
    fmt = resolve_format(data_dir / "train.txt", cfg.format)
    train_tokens = read_tokens(data_dir / "train.txt", fmt)
    if resume:
        vocab = Vocab.load(out / "vocab.txt")
        mcfg = ModelConfig(**json.loads((out / "config.json").read_text())["model"])
    else:
        # Every rank builds the same vocabulary from the same text; rank 0 writes the files.
        vocab = Vocab.build(train_tokens, max_size=cfg.vocab_size, min_count=cfg.min_count)
        assert mcfg is not None
        mcfg.vocab_size = len(vocab)
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            vocab.save(out / "vocab.txt")
            (out / "config.json").write_text(
                json.dumps(
                    {"train": asdict(cfg), "model": mcfg.to_dict(), "world_size": dist.world}, indent=2
                )
            )
    if cfg.batch_size % dist.world:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide evenly over {dist.world} processes")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    device = pick_device(cfg.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    core = RNNLanguageModel(mcfg).to(device)
    torch.manual_seed(cfg.seed + dist.rank)  # but each rank its own dropout masks
    model = core if dist.world == 1 else DistributedDataParallel(core)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    first_epoch, best_nll, lr = 1, float("inf"), cfg.lr
    if resume:
        ckpt = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
        core.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        first_epoch, best_nll, lr = ckpt["epoch"] + 1, ckpt["best_nll"], ckpt["lr"]
        print(f"resuming {out} at epoch {first_epoch} (best valid ppl {perplexity(best_nll):.2f})")

    # The global batch is cfg.batch_size columns; each rank trains its share of them, so
    # DDP's averaged gradient is the one-process gradient of the whole batch.
    train = batchify(encode(train_tokens, vocab), cfg.batch_size)[dist.rank :: dist.world].to(device)
    valid = batchify(encode(read_tokens(data_dir / "valid.txt", fmt), vocab), cfg.eval_batch_size).to(device)
    params = count_parameters(core)
    log = print if dist.main else _quiet
    log(
        f"{mcfg.cell}: {params:,} parameters, vocab {len(vocab)}, {train.numel():,} train tokens, "
        f"device {device}" + (f", {dist.world} processes" if dist.world > 1 else "")
    )

    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else 0.0
    for epoch in range(first_epoch, cfg.epochs + 1):
        for group in opt.param_groups:
            group["lr"] = lr
        if deadline and dist.any(time.monotonic() > deadline):
            log(f"stopping: --max-minutes {cfg.max_minutes} reached")
            break
        stats = train_epoch(model, train, opt, cfg, deadline, epoch, dist)
        valid_nll = evaluate(core, valid, cfg.bptt)  # every rank: the same number, the same decisions
        improved = valid_nll < best_nll
        if improved:
            best_nll = valid_nll
            if dist.main:
                torch.save(core.state_dict(), out / "best.pt")
        else:
            lr /= 2  # plateau: halve the step size (Zaremba et al. 2014 decay, made adaptive)
        record = {
            "epoch": epoch,
            "lr": lr,
            "valid_ppl": perplexity(valid_nll),
            "train_ppl": perplexity(stats["train_loss"]),
            **stats,
        }
        if not dist.main:
            continue
        with (out / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(
            f"epoch {epoch}: train ppl {record['train_ppl']:.2f}  valid ppl {record['valid_ppl']:.2f}"
            f"{' (best)' if improved else ''}  grad norm mean {stats['grad_norm_mean']:.2f} "
            f"max {stats['grad_norm_max']:.2f}  {stats['words_per_s']:.0f} words/s",
            flush=True,
        )
        torch.save(
            {
                "model": core.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "best_nll": best_nll,
                "lr": lr,
                "rng": torch.get_rng_state(),
            },
            out / "checkpoint.pt",
        )
    if dist.world > 1:
        torch.distributed.barrier()  # rank 0 has written best.pt
        torch.distributed.destroy_process_group()
        if not dist.main:
            return {}
    return summarize(core, cfg, out, data_dir, fmt, vocab, device, params)


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def summarize(model, cfg, out, data_dir, fmt, vocab, device, params) -> dict[str, Any]:
    model.load_state_dict(torch.load(out / "best.pt", map_location=device))
    metrics: dict[str, Any] = {}
    for split in ("valid", "test"):
        path = data_dir / f"{split}.txt"
        if path.exists():
            data = batchify(encode(read_tokens(path, fmt), vocab), cfg.eval_batch_size).to(device)
            metrics[f"{split}_perplexity_torch"] = perplexity(evaluate(model, data, cfg.bptt))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    summary = {
        "command": cfg.command,
        "data": {
            s: {"path": str(data_dir / f"{s}.txt"), "sha256": sha256(data_dir / f"{s}.txt")}
            for s in ("train", "valid", "test")
            if (data_dir / f"{s}.txt").exists()
        },
        "format": fmt,
        "tokenizer": {"name": TOKENIZER_NAME, "version": TOKENIZER_VERSION},
        "parameters": params,
        "epochs_run": len(history),
        "words_per_s": sum(h["words_per_s"] for h in history) / len(history),
        "metrics": metrics,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("best checkpoint: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return summary


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "nextword " + shlex.join(args.argv) if getattr(args, "argv", None) else ""
    if args.resume:
        saved = json.loads((args.out / "config.json").read_text())["train"]
        cfg = TrainConfig(**{**saved, "epochs": max(args.epochs, saved["epochs"])})
        run(cfg, None, args.out, resume=True)
        return 0
    if args.data is None:
        print("error: --data DIR is required (a directory with train.txt and valid.txt)", file=sys.stderr)
        return 2
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(
        **{k: v for k, v in vars(args).items() if k in names and k not in ("data", "command")},
        data=str(args.data),
        command=command,
    )
    mcfg = ModelConfig(
        vocab_size=0,
        cell=args.cell,
        embedding_dim=args.embedding_dim,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        dropout=args.dropout,
        tie_weights=args.tie,
        extra={"delay": args.delay} if args.cell == "delay" else {},
    )
    run(cfg, mcfg, args.out)
    return 0
