"""``nextword quantize``: an int8 bundle from an fp32 one (onnxruntime.quantization, no torch).

Static quantization: the matrix products outside the recurrent op (the
softmax projection, most of a step's arithmetic) get int8 weights, one scale
per output channel, and int8 activations with scales *fixed at calibration*
from real text. Dynamic quantization would compute each activation scale over
the whole input tensor at run time, i.e. over every session that shares a
batch, so one user's suggestions would depend on who else is typing; fixed
scales keep every row of a batch independent of the others (tested in
tests/test_quantize.py through the server). onnxruntime quantizes the
LSTM/GRU/RNN ops only dynamically, which is exactly the batch dependence we
refuse, so each LSTM is written out as its int8 products with scales fixed by
the model itself (``export/int8_lstm.py``); GRU and RNN ops stay float.

The embedding lookup reads int8 rows too, each times its own scale (a row's
scale depends on the table only, never on the batch). With tied weights it
reads the very int8 matrix of the softmax projection, and the step and head
graphs share one ``weights.bin`` (ONNX external data) as in the fp32 bundle,
so the int8 matrix is stored once: with its LSTMs in int8 too, the bundle is
under a third of the fp32 one (the demo: 4.2 MB of 14.9). The head graph is
calibrated on the states the step graph returns, so both graphs quantize the
projection with the same scales and the head's answer for a state is the
answer the step gave with it. The manifest records the perplexity change
measured on the calibration corpus's valid/test splits.

``--precision fp16`` writes a half-precision twin for CUDA GPUs instead: every
weight and product in fp16 (half the bytes a step reads), with the graph's
inputs and outputs kept float32 so the state spec, the server and the clients
are unchanged, and the softmax and top-k kept float32 so log-probs keep their
resolution. No calibration: fp16 is batch-independent as it stands. It is
scored on CUDA where onnxruntime has it; onnxruntime's CPU runs it too, but
no faster than fp32, so it is not a CPU format.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from nextword.bundle import MANIFEST, Bundle, Manifest, load_bundle, sha256, write_manifest
from nextword.options import from_args
from nextword.progress import progress
from nextword.runtime import OnnxLM
from nextword.tokenizer import corpus_tokens, looks_pretokenized

from .config import QuantizeConfig
from .int8_lstm import int8_columns, int8_lstms

QUANTIZED_OPS = ["Gemm", "MatMul"]  # by onnxruntime; embedding Gathers are rewritten here
WEIGHTS = "weights.bin"
GraphFile = tuple[str, onnx.ModelProto]  # a graph and the file name it is saved under


class QuantizeError(ValueError):
    """Input that cannot be quantized; the message says what to fix."""


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def calibration_feeds(
    lm: OnnxLM, text: str, *, batch: int = 16, samples: int = 32, every: int = 8
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Inputs of the step and head graphs met while reading ``text``: real tokens, real states.

    The head is fed the states the sampled steps return: the states it is asked
    about when serving, and the very values the step graph's projection saw,
    so both graphs calibrate that projection alike.
    """
    m = lm.bundle.manifest
    ids = np.asarray(
        lm.bundle.vocab.encode(corpus_tokens(text, line_per_sentence=looks_pretokenized(text))),
        dtype=np.int64,
    )
    steps = len(ids) // batch
    samples = min(samples, (steps - 1) // every)
    if samples < 4:
        raise QuantizeError(f"calibration text is too short ({len(ids)} tokens); give more text")
    columns = ids[: steps * batch].reshape(batch, steps)
    state = lm.zero_state(batch)
    head_in = [i for i, s in enumerate(m.state) if s.input in m.head.inputs]
    step_feeds, head_feeds = [], []
    for t in progress(range(samples * every), desc="calibrating", unit="step"):
        if t % every == 0:
            feeds = {m.step.inputs[0]: columns[:, t : t + 1].copy()}
            feeds |= {s.input: v.copy() for s, v in zip(m.state, state, strict=True)}
            step_feeds.append(feeds)
        _, state = lm.step(columns[:, t : t + 1], state)
        if t % every == 0:
            head_feeds.append({m.state[i].input: state[i].copy() for i in head_in})
    return step_feeds, head_feeds


class Rewritten(NamedTuple):
    """What ``quantize_graph`` did beyond onnxruntime's quantizer: int8 embedding lookups and LSTMs."""

    lookups: int = 0
    lstms: int = 0

    def __add__(self, other: tuple[int, ...]) -> Rewritten:  # type: ignore[override]
        return Rewritten(*(a + b for a, b in zip(self, other, strict=True)))


def quantize_graph(
    src: Path, tmp: Path, feeds: list[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto, Rewritten]:
    """One graph, pre-processed (shape inference) and statically quantized, in memory."""
    pre, raw = tmp / f"pre-{src.name}", tmp / f"int8-{src.name}"
    quant_pre_process(str(src), str(pre))
    quantize_static(
        str(pre),
        str(raw),
        _Feeds(feeds),
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=QUANTIZED_OPS,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    model = onnx.load(str(raw))
    lstms = int8_lstms(model)  # before the lookups: it reads the embedding's bound from the float table
    lookups = int8_embeddings(model)
    float_logits(model)
    _drop_unused(model.graph)
    return model, Rewritten(lookups, lstms)


def int8_embeddings(model: onnx.ModelProto) -> int:
    """Make each lookup of a float table's rows by fed token ids read int8 rows times a scale; how many."""
    graph = model.graph
    tables = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    inputs = {i.name for i in graph.input}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[0] not in tables or node.input[1] not in inputs or axis:
            nodes.append(node)
            continue
        rows, scale = _int8_rows(graph, tables[node.input[0]])
        ids, out, name = node.input[1], node.output[0], node.name or node.output[0]
        unsqueeze = (
            helper.make_node(
                "Unsqueeze", [f"{out}_scale", _constant(graph, "unsqueeze_last", [-1])], [out + "_s"]
            )
            if opset >= 13
            else helper.make_node("Unsqueeze", [f"{out}_scale"], [out + "_s"], axes=[-1])
        )
        nodes += [
            helper.make_node("Gather", [rows, ids], [f"{out}_int8"], name=f"{name}_int8"),
            helper.make_node("Cast", [f"{out}_int8"], [f"{out}_rows"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [scale, ids], [f"{out}_scale"], name=f"{name}_scale"),
            unsqueeze,
            helper.make_node("Mul", [f"{out}_rows", out + "_s"], [out], name=f"{name}_dequant"),
        ]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def float_logits(model: onnx.ModelProto) -> int:
    """Let each QGemm whose output is only dequantized give float instead; how many.

    QGemm with no output scale accumulates in int32 and scales once to float:
    the logits keep their precision instead of being rounded to 256 levels, and
    a step saves a QuantizeLinear/DequantizeLinear pass over the vocabulary.
    """
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "QGemm" or len(node.input) < 9 or node.output[0] in outputs:
            continue
        consumers = readers.get(node.output[0], [])
        dq = consumers[0] if len(consumers) == 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or list(dq.input[1:]) != list(node.input[7:9]):
            continue
        del node.input[7:]
        node.output[0] = dq.output[0]
        graph.node.remove(dq)
        rewritten += 1
    return rewritten


def _drop_unused(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def _int8_rows(graph: onnx.GraphProto, table: TensorProto) -> tuple[str, str]:
    """Names of ``table`` as int8 rows and one scale per row (zero point 0).

    A tied table is also the projection's weight, which onnxruntime has already
    quantized per output channel, i.e. per row: that copy is used when it is one.
    """
    w = numpy_helper.to_array(table)
    have = {t.name: t for t in graph.initializer}
    q, s, zp = (have.get(table.name + suffix) for suffix in ("_quantized", "_scale", "_zero_point"))
    if q is not None and s is not None and zp is not None and q.data_type == TensorProto.INT8:
        rows, scale, zero = (numpy_helper.to_array(t) for t in (q, s, zp))
        if (
            rows.shape == w.shape
            and scale.shape == (w.shape[0],)
            and not zero.any()
            and np.all(np.abs(rows * scale[:, None] - w) <= scale[:, None] * 0.5001 + 1e-12)
        ):
            return q.name, s.name
    columns, scale = int8_columns(w.T)  # a row of the table is a column of its transpose
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(columns.T), f"{table.name}_rows_int8"),
            numpy_helper.from_array(scale, f"{table.name}_rows_scale"),
        ]
    )
    return f"{table.name}_rows_int8", f"{table.name}_rows_scale"


def _constant(graph: onnx.GraphProto, name: str, values: list[int]) -> str:
    if not any(t.name == name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def write_graphs(out: Path, graphs: list[GraphFile]) -> None:
    """Save the graphs; the first one's large tensors go to weights.bin, shared by the others.

    A later graph's initializer points into weights.bin when the first graph
    stored the same name with the same content; anything else stays inline.
    """
    for _, model in graphs:  # raw bytes, the form onnx moves to external data
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") and tensor.data_location != TensorProto.EXTERNAL:
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    (first_file, first), *rest = graphs
    stored = {t.name: numpy_helper.to_array(t) for t in first.graph.initializer}
    onnx.save_model(
        first,
        str(out / first_file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS,
        size_threshold=1024,
    )
    saved = onnx.load(str(out / first_file), load_external_data=False)
    external = {t.name: t for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    for file, model in rest:
        for tensor in model.graph.initializer:
            twin = external.get(tensor.name)
            if twin is None or twin.data_type != tensor.data_type:
                continue
            value = numpy_helper.to_array(tensor)
            if value.shape == stored[tensor.name].shape and np.array_equal(value, stored[tensor.name]):
                shared = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
                shared.data_location = TensorProto.EXTERNAL
                shared.external_data.extend(twin.external_data)
                tensor.CopyFrom(shared)
        onnx.save_model(model, str(out / file))
    for file, _ in graphs:
        onnx.checker.check_model(str(out / file))
    for path in out.iterdir():
        path.chmod(0o644)  # onnx writes external data owner-only; a bundle is meant to be shared


def _calibration_text(calibration: Path) -> str:
    file = calibration / "valid.txt" if calibration.is_dir() else calibration
    if not file.is_file():
        where = f"{calibration} has no valid.txt" if calibration.is_dir() else f"{calibration} not found"
        raise QuantizeError(f"calibration text: {where} (give --data a text file or a directory with one)")
    return file.read_text(encoding="utf-8")


def _quantized_manifest(m: Manifest, calibration: Path, command: str, done: Rewritten) -> Manifest:
    manifest = copy.deepcopy(m)
    manifest.files, manifest.metrics = {}, {}
    manifest.name = f"{m.name}-int8"
    manifest.export = {
        **m.export,
        "quantization": {
            "type": "int8 static (QOperator): per-channel int8 weights, uint8 activations, calibrated "
            "scales, float logits",
            "ops": QUANTIZED_OPS + (["Gather"] if done.lookups else []) + (["LSTM"] if done.lstms else []),
            "embedding": "int8 rows, one scale per row" if done.lookups else "float",
            "recurrent": (
                "int8 LSTM products, fixed activation scales (export/int8_lstm.py)"
                if done.lstms
                else "float (onnxruntime quantizes LSTM/GRU/RNN only dynamically: batch-dependent)"
            ),
            "from_bundle": m.name,
            "calibration": str(calibration),
            "command": command,
        },
    }
    return manifest


def score(manifest: Manifest, fp32: Bundle, out: Path, calibration: Path, *, device: str = "cpu") -> None:
    """Perplexity of the new bundle on valid/test next to the fp32 one's, into the manifest."""
    from nextword.evaluate import evaluate  # the scorer `nextword eval` uses

    q = OnnxLM(load_bundle(out), device=device)
    for split in ("valid", "test"):
        path = calibration / f"{split}.txt"
        if not (calibration.is_dir() and path.is_file()):
            continue
        before = fp32.manifest.metrics.get(split) or {}
        fmt = before.get("format", "auto")
        scores = evaluate(out, path, fmt=fmt, lm=q)
        manifest.metrics[split] = {"path": str(path), **scores}
        manifest.metrics[f"{split}_perplexity"] = scores["perplexity"]
        if "perplexity" in before and _measured_on(fp32.manifest, split, path):
            fp32_ppl = float(before["perplexity"])
        else:  # the fp32 bundle was scored on another text (or not at all): score it on this one
            fp32_ppl = float(evaluate(fp32.path, path, fmt=fmt, device=device)["perplexity"])
        change = scores["perplexity"] / fp32_ppl - 1
        manifest.metrics[f"{split}_perplexity_change"] = change
        print(f"{split}: perplexity {scores['perplexity']:.2f} (fp32 {fp32_ppl:.2f}, {change:+.2%})")


def _measured_on(m: Manifest, split: str, path: Path) -> bool:
    """Whether the fp32 manifest's ``split`` metrics were measured on the file ``path``."""
    recorded = str(m.metrics.get(split, {}).get("path", ""))
    if recorded and Path(recorded).resolve() == path.resolve():
        return True
    data = m.training.get("data")  # the same text, named relative to another directory
    known = data.get(split) if isinstance(data, dict) else None
    return isinstance(known, dict) and known.get("path") == recorded and known.get("sha256") == sha256(path)


def _int8_graphs(bundle: Bundle, calibration: Path, command: str) -> tuple[list[GraphFile], Manifest]:
    text = _calibration_text(calibration)
    step_feeds, head_feeds = calibration_feeds(OnnxLM(bundle, device="cpu"), text)
    graphs, done = [], Rewritten()
    m = bundle.manifest
    with tempfile.TemporaryDirectory(prefix="nextword-quantize-") as tmp:
        work = ((m.step, step_feeds), (m.head, head_feeds))
        for graph, feeds in progress(work, desc="quantizing", unit="graph"):
            model, rewritten = quantize_graph(bundle.path / graph.file, Path(tmp), feeds)
            graphs.append((graph.file, model))
            done += rewritten
    return graphs, _quantized_manifest(m, calibration, command, done)


FP32_OPS = ["LogSoftmax", "Add", "TopK"]  # log-probs, the offerable-word mask, ranking: kept float32


def _fp16_graphs(bundle: Bundle, calibration: Path, command: str) -> tuple[list[GraphFile], Manifest]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = bundle.manifest
    graphs = []
    for graph in (m.step, m.head):
        model = onnx.load(str(bundle.path / graph.file))
        half = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
        )
        OnnxModel(half).topological_sort()  # the converter appends its input casts last
        graphs.append((graph.file, half))
    manifest = copy.deepcopy(m)
    manifest.files, manifest.metrics = {}, {}
    manifest.name = f"{m.name}-fp16"
    manifest.export = {
        **m.export,
        "quantization": {
            "type": "fp16: weights and products in half precision, float32 inputs and outputs",
            "float32_ops": FP32_OPS,
            "for": "CUDAExecutionProvider (onnxruntime's CPU runs it no faster than fp32)",
            "from_bundle": m.name,
            "calibration": str(calibration),
            "command": command,
        },
    }
    return graphs, manifest


def quantize_bundle(
    src: Path, out: Path, *, calibration: Path, command: str = "", precision: str = "int8"
) -> Manifest:
    """Write the int8 (or fp16) twin of the bundle ``src`` to ``out`` (replaced only once complete)."""
    bundle = load_bundle(src)
    _check_out(out, bundle)
    make = {"int8": _int8_graphs, "fp16": _fp16_graphs}[precision]
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        graphs, manifest = make(bundle, calibration, command)
        m = bundle.manifest
        write_graphs(partial, graphs)
        for name in (m.vocab_file, *([m.lexicon_file] if m.lexicon_file else [])):
            shutil.copyfile(bundle.path / name, partial / name)
        write_manifest(partial, manifest)
        score(manifest, bundle, partial, calibration, device="auto" if precision == "fp16" else "cpu")
        write_manifest(partial, manifest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return manifest


def _check_out(out: Path, bundle: Bundle) -> None:
    """Refuse an ``out`` that is the fp32 bundle, or anything but a bundle that may be replaced."""
    if out.resolve() == bundle.path.resolve():
        raise QuantizeError(f"--out {out} is the fp32 bundle itself; write the new one elsewhere")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())):
        raise QuantizeError(f"--out {out} exists and is not a model bundle; not replacing it")


def _size(path: Path) -> str:
    return f"{sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6:.1f} MB"


def main(args: argparse.Namespace) -> int:
    cfg = from_args(QuantizeConfig, args)
    command = "nextword " + shlex.join(args.argv) if getattr(args, "argv", None) else ""
    try:
        quantize_bundle(cfg.bundle, cfg.out, calibration=cfg.data, command=command, precision=cfg.precision)
    except (ValueError, OSError) as exc:
        print(f"nextword quantize: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {cfg.out} ({_size(cfg.out)}; fp32 {_size(cfg.bundle)})")
    return 0
