"""``nextword export``: a trained run -> a self-describing ONNX model bundle.

The step graph ``(tokens[batch, seq], *state) -> (log_probs, *state')`` and
the head graph ``(*state) -> log_probs`` share one ``weights.bin`` (ONNX
external data): the tied embedding/softmax matrix is most of the model and is
stored once. Export refuses to write a bundle whose graphs disagree with torch
by more than ``--tolerance``, and scores the exported graph on valid/test text
(with the same code as ``nextword eval``) into the manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from nextword.bundle import BATCH, Graph, Manifest, StateTensor, build_lexicon, load_bundle, write_manifest
from nextword.evaluate import evaluate as score_text
from nextword.options import from_args
from nextword.runtime import OnnxLM
from nextword.tokenizer import TOKENIZER_NAME, TOKENIZER_VERSION, Vocab, is_word

from .config import ExportConfig, InputError, ModelConfig, check_run_dir, command_line
from .model import HeadGraph, RNNLanguageModel, StepGraph

WEIGHTS = "weights.bin"


class ParityError(RuntimeError):
    pass


def check_run(run_dir: Path) -> None:
    """InputError, saying what to do, unless ``run_dir`` is a training run with trained weights."""
    check_run_dir(
        run_dir,
        "best.pt",
        hint="give a training run directory (what `nextword train --out` wrote)",
        unfinished=f"train it to the end of an epoch first (nextword train --resume --out {run_dir}, "
        "or anew without --resume)",
    )


def load_run(run_dir: Path) -> tuple[RNNLanguageModel, dict[str, Any]]:
    """The run's best weights (best.pt) and its config.json."""
    check_run(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    model = RNNLanguageModel(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu"))
    return model.eval(), config


def state_spec(model: RNNLanguageModel) -> list[StateTensor]:
    """Each state tensor of the cell, with its batch axis marked."""
    specs = []
    for name, tensor in zip(model.state_names(), model.init_state(1), strict=True):
        shape: list[int | str] = list(tensor.shape)
        shape[model.state_batch_axis()] = BATCH
        specs.append(StateTensor(name=name, input=f"state_{name}", output=f"state_{name}_out", shape=shape))
    return specs


def _to_onnx(
    module: torch.nn.Module,
    args: tuple,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
    opset: int,
) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns about batch_first RNNs
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
        return onnx.load(str(path))


TOP_OUTPUTS = ["top_log_probs", "top_ids"]


def offer_mask(vocab: Vocab) -> torch.Tensor:
    """0 for the words a user may be offered, -inf for punctuation and specials."""
    return torch.tensor([0.0 if is_word(w) else float("-inf") for w in vocab.words])


def write_graphs(
    model: RNNLanguageModel, specs: list[StateTensor], out: Path, opset: int, offer: torch.Tensor, top_k: int
) -> tuple[Graph, Graph]:
    state = model.init_state(2)
    top = TOP_OUTPUTS if top_k else []
    state_dyn = {s.input: {s.batch_axis: BATCH} for s in specs} | {
        s.output: {s.batch_axis: BATCH} for s in specs
    }
    top_dyn = {name: {0: BATCH} for name in top}
    step_graph = Graph(
        "model.onnx", ["tokens", *(s.input for s in specs)], ["log_probs", *(s.output for s in specs), *top]
    )
    step = _to_onnx(
        StepGraph(model, offer, top_k).eval(),
        (torch.zeros(2, 3, dtype=torch.long), *state),
        step_graph.inputs,
        step_graph.outputs,
        {"tokens": {0: BATCH, 1: "seq"}, "log_probs": {0: BATCH}, **state_dyn, **top_dyn},
        opset,
    )
    head_graph = Graph("head.onnx", [specs[0].input], ["log_probs", *top])
    head = _to_onnx(
        HeadGraph(model, offer, top_k).eval(),
        (state[0],),
        head_graph.inputs,
        head_graph.outputs,
        {specs[0].input: {specs[0].batch_axis: BATCH}, "log_probs": {0: BATCH}, **top_dyn},
        opset,
    )
    onnx.save_model(
        step,
        str(out / step_graph.file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS,
        size_threshold=1024,
    )
    _share_weights(head, onnx.load(str(out / step_graph.file), load_external_data=False))
    onnx.save_model(head, str(out / head_graph.file))
    for graph in (step_graph, head_graph):
        onnx.checker.check_model(str(out / graph.file))
    return step_graph, head_graph


def _share_weights(head: onnx.ModelProto, step: onnx.ModelProto) -> None:
    """Point the head's initializers at the step graph's copy in weights.bin."""
    external = {t.name: t for t in step.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for tensor in head.graph.initializer:
        twin = external.get(tensor.name)
        if twin is None or list(twin.dims) != list(tensor.dims):
            continue
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.extend(twin.external_data)


def check_parity(model: RNNLanguageModel, lm: OnnxLM, tolerance: float, seed: int = 0) -> float:
    """Max |torch - onnxruntime| over log-probs, states and top-k values, for random tokens and states."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 7), generator=gen)
    state = tuple(torch.randn(s.shape, generator=gen) * 0.5 for s in model.init_state(3))
    offer = offer_mask(lm.bundle.vocab)
    with torch.no_grad():
        log_probs, *rest = StepGraph(model, offer, lm.top_k)(tokens, *state)
        head, *head_top = HeadGraph(model, offer, lm.top_k)(state[0])
    want_state, want_top = rest[: len(state)], rest[len(state) :]
    step = lm.step_ranked(tokens.numpy(), [s.numpy() for s in state], whole_distribution=True)
    got_head = lm.head_ranked([s.numpy() for s in state], whole_distribution=True)
    pairs = [
        (step.log_probs, log_probs),
        (got_head.log_probs, head),
        *zip(step.state, want_state, strict=True),
    ]
    if lm.top_k:  # the values, not the ids: near-ties may rank either way
        pairs += [(step.top_values, want_top[0]), (got_head.top_values, head_top[0])]
    worst = float(max(np.abs(got - want.numpy()).max() for got, want in pairs))
    if worst > tolerance:
        raise ParityError(f"onnxruntime differs from torch by {worst:.3g} > tolerance {tolerance:g}")
    return worst


def stage(message: str) -> None:
    """What export is doing now, on stderr (the steps that take a while have their own bars)."""
    print(message, file=sys.stderr, flush=True)


def check_export(cfg: ExportConfig) -> None:
    """InputError, saying what to do, for a run or directory export cannot use; nothing is written."""
    check_run(cfg.run_dir)
    out = cfg.out
    if out.exists() and not (out / "manifest.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(
            f"--out {out} exists and is not a model bundle: export replaces only a bundle; "
            "give a new directory"
        )
    data = cfg.eval_data
    if data is not None and not any((data / f"{split}.txt").is_file() for split in SCORED):
        problem = "no such directory" if not data.is_dir() else "has no valid.txt or test.txt"
        raise InputError(f"--eval-data {data}: {problem}; give a directory with valid.txt and/or test.txt")


SCORED = ("valid", "test")


def texts_to_score(cfg: ExportConfig, config: dict[str, Any]) -> list[Path]:
    """The valid/test files scored into the manifest: --eval-data's, else the training data's."""
    data_dir = cfg.eval_data or Path(config["train"]["data"])
    paths = [data_dir / f"{split}.txt" for split in SCORED if (data_dir / f"{split}.txt").is_file()]
    if not paths:
        print(
            f"nextword export: warning: {data_dir}, the run's training data, has no valid.txt or test.txt "
            "(any more): the manifest will hold no metrics; give --eval-data DIR to score one",
            file=sys.stderr,
        )
    return paths


def export(cfg: ExportConfig) -> Manifest:
    """Write the bundle ``cfg.out`` from the run ``cfg.run_dir``: graphs, manifest, parity, scores.

    The bundle is built in ``OUT.partial`` and replaces ``cfg.out`` only once all of it passed;
    a refused export (InputError, ParityError) leaves nothing behind.
    """
    check_export(cfg)
    model, config = load_run(cfg.run_dir)
    texts = texts_to_score(cfg, config)
    partial = cfg.out.with_name(cfg.out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        manifest = build_bundle(model, config, cfg, partial, texts)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if cfg.out.exists():
        shutil.rmtree(cfg.out)
    partial.rename(cfg.out)
    return manifest


def export_bundle(run_dir: Path, out: Path, **settings: Any) -> Manifest:
    """``export`` for Python callers: ``settings`` are ExportConfig's other fields (name, top_k, ...)."""
    return export(ExportConfig(run_dir=Path(run_dir), out=Path(out), **settings))


def build_bundle(
    model: RNNLanguageModel, config: dict[str, Any], cfg: ExportConfig, out: Path, texts: list[Path]
) -> Manifest:
    """Every file of the bundle, in ``out``; ParityError if onnxruntime disagrees with torch."""
    summary_file = cfg.run_dir / "summary.json"  # absent if training was stopped before its end
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    shutil.copyfile(cfg.run_dir / "vocab.txt", out / "vocab.txt")
    offer = offer_mask(Vocab.load(out / "vocab.txt"))
    top_k = min(cfg.top_k, int(torch.isfinite(offer).sum()))  # never rank a non-word into the top
    stage(f"exporting {cfg.run_dir} to ONNX graphs (opset {cfg.opset}) ...")
    specs = state_spec(model)
    step, head = write_graphs(model, specs, out, cfg.opset, offer, top_k)
    manifest = new_manifest(model, config, summary, cfg, specs, (step, head), top_k)
    # Any word of the training text can then be completed, not only the vocabulary's.
    if build_lexicon(out, manifest, Vocab.load(out / "vocab.txt")) is None:
        print("nextword export: the training text is not here (or changed): the bundle has no lexicon")
    write_manifest(out, manifest)
    lm = OnnxLM(load_bundle(out), device="cpu")
    worst = check_parity(model, lm, cfg.tolerance)
    manifest.export["parity_max_abs_diff"] = worst
    print(f"parity: max |torch - onnxruntime| = {worst:.3g} (tolerance {cfg.tolerance:g})")
    for path in texts:
        stage(f"scoring {path} ...")
        scores = score_text(out, path, fmt=summary.get("format", "auto"), lm=lm)
        manifest.metrics[path.stem] = {"path": str(path), **scores}
        manifest.metrics[f"{path.stem}_perplexity"] = scores["perplexity"]
        print(
            f"{path.stem}: perplexity {scores['perplexity']:.2f}  top-1 {scores['top1']:.2%}  "
            f"top-3 {scores['top3']:.2%}"
        )
    for file in out.iterdir():
        file.chmod(0o644)  # onnx writes external data owner-only; a bundle is meant to be shared
    write_manifest(out, manifest)
    return manifest


def new_manifest(
    model: RNNLanguageModel,
    config: dict[str, Any],
    summary: dict[str, Any],
    cfg: ExportConfig,
    specs: list[StateTensor],
    graphs: tuple[Graph, Graph],
    top_k: int,
) -> Manifest:
    """The manifest of a bundle: what the graphs are, what trained them, how to make them again."""
    return Manifest(
        name=cfg.name or cfg.out.name,
        cell=model.cfg.cell,
        model={**model.cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters())},
        step=graphs[0],
        head=graphs[1],
        state=specs,
        tokenizer={
            "name": TOKENIZER_NAME,
            "version": TOKENIZER_VERSION,
            "training_format": summary.get("format"),
        },
        vocab_size=model.cfg.vocab_size,
        topk={"k": top_k, "values": TOP_OUTPUTS[0], "ids": TOP_OUTPUTS[1]} if top_k else {},
        training={
            **{k: v for k, v in summary.items() if k != "metrics"},
            "config": config["train"],
            "torch_metrics": summary.get("metrics", {}),
        },
        export={
            "command": cfg.command,
            "reproduce": " && ".join(c for c in (summary.get("command"), cfg.command) if c),
            "opset": cfg.opset,
            "tolerance": cfg.tolerance,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    )


def main(args: argparse.Namespace) -> int:
    cfg = from_args(ExportConfig, args, command=command_line(args))
    try:
        export(cfg)
    except InputError as exc:
        print(f"nextword export: error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"nextword export: error: export refused: {exc}", file=sys.stderr)
        return 1
    print(f"wrote bundle {cfg.out}")
    return 0
