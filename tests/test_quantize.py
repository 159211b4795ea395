"""int8 bundles: calibrated static scales, so a user's answer never depends on who shares the batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import pytest

from nextword.bundle import load_bundle
from nextword.export.quantize import quantize_bundle
from nextword.runtime import OnnxLM
from tests.test_server import assert_same, serving, type_words


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    quantize_bundle(tiny_bundle, out, calibration=tiny_corpus)
    return out


def _size(bundle: Path) -> int:
    return sum(f.stat().st_size for f in bundle.iterdir())


def test_int8_bundle_is_valid_and_scored(int8_bundle: Path, tiny_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)
    m = bundle.manifest
    assert m.name == "tiny-int8" and "int8" in m.export["quantization"]["type"]
    assert m.state == load_bundle(tiny_bundle).manifest.state
    assert not int8_bundle.with_name("tiny-int8.partial").exists()
    step = (int8_bundle / m.step.file).read_bytes()
    assert b"QGemm" in step or b"QLinearMatMul" in step or b"MatMulInteger" in step
    # Quantization costs a little perplexity, not a lot.
    assert abs(m.metrics["test_perplexity_change"]) < 0.05


def test_int8_bundle_stores_its_weights_once_as_int8(int8_bundle: Path, tiny_bundle: Path) -> None:
    m = load_bundle(int8_bundle).manifest
    assert set(m.files) == {"model.onnx", "head.onnx", "weights.bin", "vocab.txt", "lexicon.txt"}
    assert _size(int8_bundle) < _size(tiny_bundle)
    step = onnx.load(str(int8_bundle / m.step.file), load_external_data=False)
    head = onnx.load(str(int8_bundle / m.head.file), load_external_data=False)
    tensors = {t.name: t for t in step.graph.initializer}
    # The embedding lookup reads int8 rows, and no float copy of the table is left.
    lookup = next(n for n in step.graph.node if n.op_type == "Gather" and n.input[1] == m.step.inputs[0])
    assert tensors[lookup.input[0]].data_type == onnx.TensorProto.INT8
    vocab_rows = [t for t in tensors.values() if t.dims and t.dims[0] == m.vocab_size and len(t.dims) == 2]
    assert [t.data_type for t in vocab_rows] == [onnx.TensorProto.INT8]  # tied: one matrix for both uses
    # The head reads the step graph's copy in weights.bin.
    shared = [t.name for t in head.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert vocab_rows[0].name in shared
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in vocab_rows)
    # The LSTMs are int8 products too, their float weights gone: a Scan over the steps per layer.
    ops = [n.op_type for n in step.graph.node]
    assert "LSTM" not in ops and ops.count("Scan") == 2 and ops.count("MatMulInteger") == 2
    float_matrices = [
        t for t in tensors.values() if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2
    ]
    assert float_matrices == []
    assert "int8 LSTM" in m.export["quantization"]["recurrent"]


def test_int8_head_answers_what_the_step_answered(int8_bundle: Path) -> None:
    lm = OnnxLM(load_bundle(int8_bundle), device="cpu")
    rng = np.random.default_rng(0)
    state = lm.zero_state(4)
    for _ in range(5):
        log_probs, state = lm.step(rng.integers(0, lm.vocab_size, (4, 1)), state)
    np.testing.assert_array_equal(lm.head(state), log_probs)


def test_int8_text_read_at_once_leaves_the_state_word_by_word_leaves(int8_bundle: Path) -> None:
    """A paste runs as one call of many tokens (the LSTM's Scan over them), a typed word as one
    call each: with integer products and fixed scales both leave the very same state."""
    lm = OnnxLM(load_bundle(int8_bundle), device="cpu")
    tokens = np.random.default_rng(3).integers(0, lm.vocab_size, (3, 6))
    at_once, whole_state = lm.step(tokens, lm.zero_state(3))
    state = lm.zero_state(3)
    for t in range(tokens.shape[1]):
        log_probs, state = lm.step(tokens[:, t : t + 1], state)
    for a, b in zip(whole_state, state, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(at_once, log_probs)


@pytest.mark.asyncio(loop_scope="session")
async def test_int8_answers_do_not_depend_on_the_batch(int8_bundle: Path) -> None:
    texts = [
        "the cat sat on the mat. ",
        "a dog ran past my house, and ",
        "her old king spoke to ",
        "emma ",
        "x y z ",
    ]
    pieces = [[w + " " for w in text.split()] for text in texts]
    async with serving(int8_bundle) as (_, stub):
        alone = [await type_words(stub, words) for words in pieces]
        together = await asyncio.gather(*(type_words(stub, words) for words in pieces))
    for a, t in zip(alone, together, strict=True):
        for x, y in zip(a, t, strict=True):
            assert_same(x.prediction, y.prediction)


def _quantize_cli(bundle: Path, out: Path, data: Path) -> int:
    from nextword.cli import main

    return main(["quantize", str(bundle), "--out", str(out), "--data", str(data)])


def test_quantize_cli_is_quiet_unless_something_is_wrong(
    tiny_bundle: Path, tiny_corpus: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert _quantize_cli(tiny_bundle, tmp_path / "q", tiny_corpus) == 0
    out, err = capfd.readouterr()
    assert err == ""  # no onnxruntime warnings, no progress bars off a terminal
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["valid", "test"]
    assert all("fp32" in line for line in lines[:2])
    assert lines[2].startswith(f"wrote bundle {tmp_path / 'q'} (") and len(lines) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.parametrize("problem", ["no bundle", "no text", "too little text", "out is not a bundle"])
def test_quantize_cli_errors_are_one_line_and_leave_nothing(
    problem: str, tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, data, out = tiny_bundle, tmp_path / "short.txt", tmp_path / "q"
    data.write_text("too short\n")
    if problem == "no bundle":
        bundle = tmp_path / "missing"
    elif problem == "no text":
        data = tmp_path / "corpus"
        data.mkdir()  # a directory without valid.txt
    elif problem == "out is not a bundle":
        out.mkdir()
        (out / "notes.txt").write_text("keep me\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _quantize_cli(bundle, out, data) == 2
    err = capsys.readouterr().err
    assert err.startswith("nextword quantize: error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half-written bundle
    if problem == "out is not a bundle":
        assert (out / "notes.txt").read_text() == "keep me\n"


def test_an_untied_embedding_gets_its_own_int8_rows() -> None:
    import onnxruntime as ort

    from nextword.export.quantize import int8_embeddings

    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "tokens"], ["vectors"])],
        "lookup",
        [onnx.helper.make_tensor_value_info("tokens", onnx.TensorProto.INT64, ["batch", "seq"])],
        [onnx.helper.make_tensor_value_info("vectors", onnx.TensorProto.FLOAT, ["batch", "seq", 8])],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
    assert int8_embeddings(model) == 1
    used = {name for node in model.graph.node for name in node.input}
    assert {t.data_type for t in model.graph.initializer if t.name in used} == {
        onnx.TensorProto.INT8,
        onnx.TensorProto.FLOAT,  # the per-row scales
        onnx.TensorProto.INT64,  # the Unsqueeze axes
    }
    onnx.checker.check_model(model)
    tokens = np.array([[0, 7, 49], [3, 3, 1]], dtype=np.int64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"tokens": tokens})[0]
    step = np.abs(table).max(axis=1) / 127
    assert np.all(np.abs(got - table[tokens]) <= step[tokens][..., None] / 2 + 1e-7)


@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    quantize_bundle(tiny_bundle, out, calibration=tiny_corpus, precision="fp16")
    return out


def test_fp16_bundle_computes_in_half_precision_behind_float32_io(
    fp16_bundle: Path, tiny_bundle: Path
) -> None:
    bundle, fp32 = load_bundle(fp16_bundle), load_bundle(tiny_bundle)
    m = bundle.manifest
    assert m.name == "tiny-fp16" and m.export["quantization"]["type"].startswith("fp16")
    # The state spec, and so the server, the store and the clients, are those of the fp32 bundle.
    assert m.state == fp32.manifest.state
    step = onnx.load(str(fp16_bundle / m.step.file))
    assert {i.type.tensor_type.elem_type for i in step.graph.input if i.name.startswith("state")} == {
        onnx.TensorProto.FLOAT
    }
    recurrent = next(n for n in step.graph.node if n.op_type == m.cell.upper())
    weights = {t.name: t for t in step.graph.initializer}
    assert weights[recurrent.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert _size(fp16_bundle) < 0.7 * _size(tiny_bundle)
    # Scored where it was made (on the CPU here): the same model, to fp16's precision.
    assert abs(m.metrics["test_perplexity_change"]) < 0.01


def test_fp16_answers_what_fp32_answers(fp16_bundle: Path, tiny_bundle: Path) -> None:
    half, full = (
        OnnxLM(load_bundle(fp16_bundle), device="cpu"),
        OnnxLM(load_bundle(tiny_bundle), device="cpu"),
    )
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, full.vocab_size, (8, 6))
    a, _ = half.step(tokens, half.zero_state(8))
    b, _ = full.step(tokens, full.zero_state(8))
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=0.02)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.75


def _lstm_graph(batch_input: bool, hidden: int = 8, features: int = 5) -> onnx.ModelProto:
    """One LSTM node, as the export writes it, fed by an embedding lookup (or, else, a graph input)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weights = {
        "table": rng.normal(0, 1, (20, features)),
        "W": rng.normal(0, 0.5, (1, 4 * hidden, features)),
        "R": rng.normal(0, 0.5, (1, 4 * hidden, hidden)),
        "B": rng.normal(0, 0.1, (1, 8 * hidden)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    x = "x" if batch_input else "rows"
    nodes = [] if batch_input else [helper.make_node("Gather", ["table", "ids"], ["rows"])]
    nodes.append(
        helper.make_node("LSTM", [x, "W", "R", "B", "", "h0", "c0"], ["y", "y_h", "y_c"], hidden_size=hidden)
    )
    first = (
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", features])
        if batch_input
        else helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", "N"])
    )
    state = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "N", hidden]) for n in ("h0", "c0")]
    shapes: dict[str, list[str | int]] = {
        "y": ["T", 1, "N", hidden],
        "y_h": [1, "N", hidden],
        "y_c": [1, "N", hidden],
    }
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    graph = helper.make_graph(nodes, "lstm", [first, *state], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_lstm_becomes_int8_products_that_answer_as_it_did_row_by_row() -> None:
    import onnxruntime as ort

    from nextword.export.int8_lstm import int8_lstms

    model = _lstm_graph(batch_input=False)
    int8 = onnx.ModelProto()
    int8.CopyFrom(model)
    assert int8_lstms(int8) == 1
    onnx.checker.check_model(int8)
    run = {
        name: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run
        for name, m in (("fp32", model), ("int8", int8))
    }
    rng = np.random.default_rng(2)
    feeds: dict[str, np.ndarray] = {
        "ids": rng.integers(0, 20, (6, 4)),  # 6 steps of 4 rows
        "h0": rng.uniform(-0.9, 0.9, (1, 4, 8)).astype(np.float32),
        "c0": rng.normal(0, 1, (1, 4, 8)).astype(np.float32),
    }
    expected, got = run["fp32"](None, feeds), run["int8"](None, feeds)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, atol=0.05)
    # Each row alone gives bitwise what it gave in the batch: integer products, fixed scales.
    for row in range(4):
        alone = run["int8"](None, {k: v[:, row : row + 1] for k, v in feeds.items()})
        for whole, one in zip(got, alone, strict=True):
            np.testing.assert_array_equal(np.asarray(whole)[..., row : row + 1, :], one)


def test_an_lstm_with_an_input_of_unknown_range_stays_float() -> None:
    from nextword.export.int8_lstm import int8_lstms

    model = _lstm_graph(batch_input=True)
    assert int8_lstms(model) == 0
    assert [n.op_type for n in model.graph.node] == ["LSTM"]
