"""``nextword quantize``: an int8 bundle from an fp32 one (onnxruntime.quantization, no torch).

Static quantization: the matrix products outside the recurrent op (the
softmax projection, most of a step's arithmetic) get int8 weights, one scale
per output channel, and int8 activations with scales *fixed at calibration*
from real text. Dynamic quantization would compute each activation scale over
the whole input tensor at run time, i.e. over every session that shares a
batch, so one user's suggestions would depend on who else is typing; fixed
scales keep every row of a batch independent of the others (tested in
tests/test_quantize.py through the server). The LSTM/GRU/RNN ops stay float:
onnxruntime quantizes them only dynamically, which is exactly the batch
dependence we refuse.

The quantized graphs are written self-contained (the fp32 bundle's shared
weights.bin is not needed), and the manifest records the perplexity change
measured on the calibration corpus's valid/test splits.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from nextword.bundle import Bundle, Manifest, load_bundle, write_manifest
from nextword.runtime import OnnxLM
from nextword.tokenizer import corpus_tokens, looks_pretokenized

QUANTIZED_OPS = ["Gemm", "MatMul"]


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def calibration_feeds(
    lm: OnnxLM, text: str, *, batch: int = 16, samples: int = 32, every: int = 8
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Inputs of the step and head graphs met while reading ``text``: real tokens, real states."""
    m = lm.bundle.manifest
    ids = np.asarray(
        lm.bundle.vocab.encode(corpus_tokens(text, line_per_sentence=looks_pretokenized(text))),
        dtype=np.int64,
    )
    steps = len(ids) // batch
    samples = min(samples, (steps - 1) // every)
    if samples < 4:
        raise ValueError(f"calibration text is too short ({len(ids)} tokens); give more text")
    columns = ids[: steps * batch].reshape(batch, steps)
    state = lm.zero_state(batch)
    step_feeds, head_feeds = [], []
    for t in range(samples * every):
        if t % every == 0:
            feeds = {m.step.inputs[0]: columns[:, t : t + 1].copy()}
            feeds |= {s.input: v.copy() for s, v in zip(m.state, state, strict=True)}
            step_feeds.append(feeds)
            head_feeds.append({name: feeds[name] for name in m.head.inputs})
        _, state = lm.step(columns[:, t : t + 1], state)
    return step_feeds, head_feeds


def quantize_bundle(src: Path, out: Path, *, calibration: Path, command: str = "") -> Manifest:
    from nextword.evaluate import evaluate  # the scorer `nextword eval` uses

    bundle: Bundle = load_bundle(src)
    lm = OnnxLM(bundle, device="cpu")
    calib_text = (calibration / "valid.txt" if calibration.is_dir() else calibration).read_text(
        encoding="utf-8"
    )
    step_feeds, head_feeds = calibration_feeds(lm, calib_text)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    m = bundle.manifest
    for graph, feeds in ((m.step, step_feeds), (m.head, head_feeds)):
        quantize_static(
            str(bundle.path / graph.file),
            str(out / graph.file),
            _Feeds(feeds),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    shutil.copyfile(bundle.path / m.vocab_file, out / m.vocab_file)
    manifest = copy.deepcopy(m)
    manifest.files, manifest.metrics = {}, {}
    manifest.name = f"{m.name}-int8"
    manifest.export = {
        **m.export,
        "quantization": {
            "type": "int8 static (QOperator): per-channel int8 weights, uint8 activations, calibrated scales",
            "ops": QUANTIZED_OPS,
            "from_bundle": m.name,
            "calibration": str(calibration),
            "command": command,
        },
    }
    write_manifest(out, manifest)
    q = OnnxLM(load_bundle(out), device="cpu")
    for split in ("valid", "test"):
        fp32 = m.metrics.get(split)
        if not (calibration.is_dir() and (calibration / f"{split}.txt").exists()):
            continue
        scores = evaluate(out, calibration / f"{split}.txt", lm=q)
        manifest.metrics[split] = {"path": str(calibration / f"{split}.txt"), **scores}
        manifest.metrics[f"{split}_perplexity"] = scores["perplexity"]
        if fp32:
            change = scores["perplexity"] / fp32["perplexity"] - 1
            manifest.metrics[f"{split}_perplexity_change"] = change
            fp32_ppl = fp32["perplexity"]
            print(f"{split}: perplexity {scores['perplexity']:.2f} (fp32 {fp32_ppl:.2f}, {change:+.2%})")
    write_manifest(out, manifest)
    return manifest


def main(args: argparse.Namespace) -> int:
    import shlex

    command = "nextword " + shlex.join(args.argv) if getattr(args, "argv", None) else ""
    try:
        quantize_bundle(args.bundle, args.out, calibration=args.data, command=command)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {args.out}")
    return 0
