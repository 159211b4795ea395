"""The LSTM op of an exported graph as int8 matrix products with fixed scales.

onnxruntime quantizes its LSTM op only dynamically: each call's activation scale
is taken over the whole batch, so one session's answer would depend on who
shares the call. Here each LSTM node is written out as what it computes, so
that its two matrix products (input × W, state × R) run on int8 with scales
fixed in the graph:

* the input projection of every time step at once (``MatMulInteger``), then a
  ``Scan`` over the steps whose body does the recurrent product and the gates;
* weights: int8, one scale per output column (gate unit), zero point 0;
* activations: int8 with a scale known from the model itself, no calibration:
  the hidden state and a lower layer's output are ``o · tanh(c)``, inside
  (-1, 1); an embedding lookup is bounded by the table's largest entry.

Integer products are exact and every other op works row by row, so a row's
answer is bitwise the same alone or in any batch. What cannot be bounded this
way (an input of another kind) keeps its LSTM in float, and ``int8_lstms``
says how many it rewrote.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Ops that pass a tensor's values through unchanged in magnitude (the walk back to a bound).
_SAME_VALUES = {"Transpose", "Squeeze", "Unsqueeze", "Reshape", "Identity", "Flatten"}
_UNIT = 1.0  # bound of an LSTM's outputs: o · tanh(c) with o a sigmoid


def int8_lstms(model: onnx.ModelProto) -> int:
    """Rewrite every forward LSTM node whose input is bounded; how many were rewritten."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if opset < 13:  # Squeeze/Unsqueeze/Split with tensor inputs
        return 0
    producers = {out: node for node in graph.node for out in node.output}
    tables = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        bound = _bound(node.input[0], producers, tables) if node.op_type == "LSTM" else None
        if bound is None or not _plain(node, tables):
            nodes.append(node)
            continue
        nodes += _lstm_nodes(graph, node, tables, bound, f"lstm{rewritten}", opset)
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _plain(node: onnx.NodeProto, tables: dict[str, TensorProto]) -> bool:
    """A forward LSTM with the default gates, its weights in the graph, no sequence lengths/peepholes."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if set(attrs) - {"hidden_size", "direction", "layout", "input_forget"}:  # activations, clip: not ours
        return False
    if attrs.get("layout", 0) != 0 or attrs.get("input_forget", 0) != 0:
        return False
    if attrs.get("direction", b"forward") not in (b"forward", "forward"):
        return False
    inputs = list(node.input) + [""] * (8 - len(node.input))
    has_state = bool(inputs[5] and inputs[6])  # the export always feeds it
    return all(name in tables for name in inputs[1:4]) and has_state and not inputs[4] and not inputs[7]


def _bound(name: str, producers: dict[str, onnx.NodeProto], tables: dict[str, TensorProto]) -> float | None:
    """The largest magnitude ``name`` can take, where the graph says; else None."""
    while (node := producers.get(name)) is not None and node.op_type in _SAME_VALUES:
        name = node.input[0]
    if node is None:
        return None
    if node.op_type == "LSTM" and name in node.output[:2]:
        return _UNIT
    if node.op_type == "Gather" and node.input[0] in tables:
        return float(np.abs(numpy_helper.to_array(tables[node.input[0]])).max())
    return None


def int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [rows, cols] as int8 and one scale per column (symmetric, zero point 0)."""
    scale = np.abs(w).max(axis=0) / 127
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def _product(name: str, a: str, scale: str, weights: str, both: str, zero: str) -> list[onnx.NodeProto]:
    """``a`` × int8 ``weights``, back in float: ``a`` quantized at ``scale`` (uint8 around ``zero``,
    onnxruntime's fast u8 × s8 kernels), the integer product, rescaled per column by ``both``."""
    return [
        helper.make_node("QuantizeLinear", [a, scale, zero], [f"{name}_q"]),
        helper.make_node("MatMulInteger", [f"{name}_q", weights, zero], [f"{name}_i32"]),
        helper.make_node("Cast", [f"{name}_i32"], [f"{name}_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{name}_f", both], [name]),
    ]


def _constants(
    W: np.ndarray, R: np.ndarray, bias: np.ndarray, bound: float, p: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The rewrite's constants: those of the whole sequence, and the Scan body's own (a body that
    names only its own constants stands alone)."""
    wq, w_scale = int8_columns(W.T)
    rq, r_scale = int8_columns(R.T)
    x_scale = np.float32(max(bound, 1e-12) / 127)
    h_scale = np.float32(_UNIT / 127)
    outer = {
        f"{p}_W": wq,
        f"{p}_x_scale": np.asarray(x_scale),
        f"{p}_zero": np.asarray(np.uint8(128)),
        f"{p}_xw_scale": (x_scale * w_scale).astype(np.float32),
        f"{p}_bias": bias.astype(np.float32),
        f"{p}_axis0": np.array([0], np.int64),
        f"{p}_axis1": np.array([1], np.int64),
    }
    inner = {
        f"{p}_R": rq,
        f"{p}_h_scale": np.asarray(h_scale),
        f"{p}_zero_t": np.asarray(np.uint8(128)),
        f"{p}_hr_scale": (h_scale * r_scale).astype(np.float32),
    }
    return outer, inner


def _step_body(p: str, opset: int, constants: dict[str, np.ndarray]) -> onnx.GraphProto:
    """The Scan's body, one time step: state h, c [batch, H] and the step's x·W + b [batch, 4H] in;
    the next h, c and the step's output out."""
    split = helper.make_node("Split", [f"{p}_gates"], [f"{p}_{g}_pre" for g in "iofg"], axis=1)
    if opset >= 18:  # four equal parts: said by an attribute from opset 18 on
        split.attribute.append(helper.make_attribute("num_outputs", 4))
    h, c, xw = f"{p}_h", f"{p}_c", f"{p}_xw_t"
    nodes = [
        *_product(f"{p}_hr", h, f"{p}_h_scale", f"{p}_R", f"{p}_hr_scale", f"{p}_zero_t"),
        helper.make_node("Add", [f"{p}_hr", xw], [f"{p}_gates"]),
        split,
        *(helper.make_node("Sigmoid", [f"{p}_{g}_pre"], [f"{p}_{g}"]) for g in "iof"),
        helper.make_node("Tanh", [f"{p}_g_pre"], [f"{p}_g"]),
        helper.make_node("Mul", [f"{p}_f", c], [f"{p}_fc"]),
        helper.make_node("Mul", [f"{p}_i", f"{p}_g"], [f"{p}_ig"]),
        helper.make_node("Add", [f"{p}_fc", f"{p}_ig"], [f"{p}_c_next"]),
        helper.make_node("Tanh", [f"{p}_c_next"], [f"{p}_c_tanh"]),
        helper.make_node("Mul", [f"{p}_o", f"{p}_c_tanh"], [f"{p}_h_next"]),
        helper.make_node("Identity", [f"{p}_h_next"], [f"{p}_y_t"]),
    ]

    def values(*names: str) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]

    return helper.make_graph(
        nodes,
        f"{p}_step",
        values(h, c, xw),
        values(f"{p}_h_next", f"{p}_c_next", f"{p}_y_t"),
        initializer=[numpy_helper.from_array(v, k) for k, v in constants.items()],
    )


def _lstm_nodes(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    tables: dict[str, TensorProto],
    bound: float,
    p: str,
    opset: int,
) -> list[onnx.NodeProto]:
    """The nodes that compute what the LSTM ``node`` did; their constants go into ``graph``."""
    x, w, r, b, _, h0, c0, _ = list(node.input) + [""] * (8 - len(node.input))
    y, y_h, y_c = [*node.output, "", "", ""][:3]
    W, R = (numpy_helper.to_array(tables[n])[0] for n in (w, r))  # [4H, I], [4H, H]; gates i, o, f, c
    hidden = R.shape[1]
    # ONNX's LSTM adds two biases (input's and recurrence's): one sum here
    bias = numpy_helper.to_array(tables[b])[0].reshape(2, -1).sum(axis=0) if b else np.zeros(4 * hidden)
    outer, inner = _constants(W, R, bias, bound, p)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in outer.items())
    axis0, h_last, c_last, ys = f"{p}_axis0", f"{p}_h_last", f"{p}_c_last", f"{p}_ys"
    out = [
        # x·W + b of every time step at once: [T, batch, 4H]
        *_product(f"{p}_xw_nb", x, f"{p}_x_scale", f"{p}_W", f"{p}_xw_scale", f"{p}_zero"),
        helper.make_node("Add", [f"{p}_xw_nb", f"{p}_bias"], [f"{p}_xw"]),
        helper.make_node("Squeeze", [h0, axis0], [f"{p}_h0"]),
        helper.make_node("Squeeze", [c0, axis0], [f"{p}_c0"]),
        helper.make_node(
            "Scan",
            [f"{p}_h0", f"{p}_c0", f"{p}_xw"],
            [h_last, c_last, ys],
            num_scan_inputs=1,
            body=_step_body(p, opset, inner),
        ),
    ]
    if y:
        out.append(helper.make_node("Unsqueeze", [ys, f"{p}_axis1"], [y]))  # [T, 1, batch, H]
    if y_h:
        out.append(helper.make_node("Unsqueeze", [h_last, axis0], [y_h]))
    if y_c:
        out.append(helper.make_node("Unsqueeze", [c_last, axis0], [y_c]))
    return out
