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
import shlex
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

from nextword.bundle import BATCH, Graph, Manifest, StateTensor, load_bundle, write_manifest
from nextword.runtime import OnnxLM
from nextword.tokenizer import TOKENIZER_NAME, TOKENIZER_VERSION, Vocab, is_word

from .model import HeadGraph, ModelConfig, RNNLanguageModel, StepGraph

WEIGHTS = "weights.bin"


class ParityError(RuntimeError):
    pass


def load_run(run_dir: Path) -> tuple[RNNLanguageModel, dict[str, Any]]:
    config = json.loads((run_dir / "config.json").read_text())
    model = RNNLanguageModel(ModelConfig(**config["model"]))
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
    step = lm.step_ranked(tokens.numpy(), [s.numpy() for s in state], full=True)
    got_head = lm.head_ranked([s.numpy() for s in state], full=True)
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


def export_bundle(
    run_dir: Path,
    out: Path,
    *,
    name: str | None = None,
    opset: int = 17,
    tolerance: float = 1e-4,
    eval_data: Path | None = None,
    command: str = "",
    top_k: int = 64,
) -> Manifest:
    # Imported here: nextword.evaluate is the same scorer `nextword eval` uses.
    from nextword.evaluate import evaluate

    model, config = load_run(run_dir)
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    )
    specs = state_spec(model)
    final, out = out, out.with_name(out.name + ".partial")  # replace the old bundle only once all passed
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(run_dir / "vocab.txt", out / "vocab.txt")
    offer = offer_mask(Vocab.load(out / "vocab.txt"))
    top_k = min(top_k, int(torch.isfinite(offer).sum()))  # never rank a non-word into the top
    step, head = write_graphs(model, specs, out, opset, offer, top_k)
    manifest = Manifest(
        name=name or final.name,
        cell=model.cfg.cell,
        model={**model.cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters())},
        step=step,
        head=head,
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
            "command": command,
            "reproduce": " && ".join(c for c in (summary.get("command"), command) if c),
            "opset": opset,
            "tolerance": tolerance,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    )
    write_manifest(out, manifest)
    lm = OnnxLM(load_bundle(out), device="cpu")
    manifest.export["parity_max_abs_diff"] = check_parity(model, lm, tolerance)
    print(
        f"parity: max |torch - onnxruntime| = {manifest.export['parity_max_abs_diff']:.3g} "
        f"(tolerance {tolerance:g})"
    )
    data_dir = eval_data or (Path(config["train"]["data"]))
    for split in ("valid", "test"):
        path = data_dir / f"{split}.txt"
        if path.exists():
            scores = evaluate(out, path, fmt=summary.get("format", "auto"), lm=lm)
            manifest.metrics[split] = {"path": str(path), **scores}
            manifest.metrics[f"{split}_perplexity"] = scores["perplexity"]
            print(
                f"{split}: perplexity {scores['perplexity']:.2f}  top-1 {scores['top1']:.2%}  "
                f"top-3 {scores['top3']:.2%}"
            )
    for file in out.iterdir():
        file.chmod(0o644)  # onnx writes external data owner-only; a bundle is meant to be shared
    write_manifest(out, manifest)
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    return manifest


def main(args: argparse.Namespace) -> int:
    command = "nextword " + shlex.join(args.argv) if getattr(args, "argv", None) else ""
    try:
        export_bundle(
            args.run_dir,
            args.out,
            name=args.name,
            opset=args.opset,
            tolerance=args.tolerance,
            eval_data=args.eval_data,
            command=command,
            top_k=args.top_k,
        )
    except ParityError as exc:
        print(f"error: export refused: {exc}", file=sys.stderr)
        return 1
    print(f"wrote bundle {args.out}")
    return 0
