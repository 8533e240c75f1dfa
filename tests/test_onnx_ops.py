"""Every node of every exported variant against the TensorRT 10 ONNX-parser operator matrix (shipped with
stexport as trt_engines/data/onnx-tensorrt-operators.md, so this runs in any clone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ONNX_VARIANTS
from onnx import TensorProto, helper, numpy_helper
from stexport.trt_engines.onnx_support import MATRIX_FILE, check_tensorrt_ops, operator_matrix

# the ops a folded ST-Adapter graph may contain (any other op appearing in an export is a change to look at)
FOLDED_OPS = {"Add", "Cast", "Concat", "Constant", "Conv", "DequantizeLinear", "Div", "Erf", "Expand", "Gather",
              "Gemm", "Identity", "LayerNormalization", "MatMul", "Mul", "Pad", "QuantizeLinear", "ReduceMean",
              "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Transpose",
              "Unsqueeze", "Where"}


@pytest.fixture(scope="module")
def matrix():
    """The full matrix parsed from onnx-tensorrt's operators.md, as shipped in the package."""
    parsed = operator_matrix()
    assert MATRIX_FILE.is_file() and len(parsed) > 150 and parsed["MatMul"] == {"FP32", "FP16", "BF16"}
    assert parsed["QLinearMatMul"] is None
    return parsed


def test_matrix_ships_with_the_package_and_matches_the_upstream_copy():
    upstream = Path(__file__).resolve().parents[2] / "shared" / "reference" / "onnx-tensorrt-operators.md"
    if upstream.is_file():  # beside a checkout of this project's workspace: the copy is unchanged
        assert upstream.read_text() == MATRIX_FILE.read_text()
    assert all(operator_matrix().get(op) for op in FOLDED_OPS)


@pytest.mark.parametrize("variant", ONNX_VARIANTS)
def test_every_node_supported_with_its_tensor_types(onnx_variants, matrix, variant):
    bundle, _ = onnx_variants[variant]
    model = onnx.load(str(bundle.file("onnx")))
    assert check_tensorrt_ops(model, matrix) == []
    assert {n.op_type for n in model.graph.node} <= FOLDED_OPS
    assert all(op.version <= 20 for op in model.opset_import)
    # UINT8 only on the network input, consumed by Cast alone
    inp = model.graph.input[0]
    if bundle.manifest.input.dtype == "uint8":
        assert inp.type.tensor_type.elem_type == TensorProto.UINT8
        assert {n.op_type for n in model.graph.node if inp.name in n.input} == {"Cast"}
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


@pytest.mark.parametrize("variant", [v for v in ONNX_VARIANTS if ONNX_VARIANTS[v][1] == "int8"])
def test_qdq_zero_points_zero_weights_per_output_channel(onnx_variants, variant):
    bundle, _ = onnx_variants[variant]
    model = onnx.load(str(bundle.file("onnx")))
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        zp = numpy_helper.to_array(inits[n.input[2]])
        assert zp.dtype == np.int8 and not zp.any(), n.name
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    for dq in weights:
        (gemm,) = consumers[dq.output[0]]
        w = numpy_helper.to_array(inits[dq.input[0]])
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        trans_b = any(a.name == "transB" and a.i for a in gemm.attribute)
        assert axis == (0 if trans_b else 1)  # the output-channel axis
        assert numpy_helper.to_array(inits[dq.input[1]]).shape == (w.shape[axis],)
        assert gemm.input[1] == dq.output[0]
    made = {o: n for n in model.graph.node for o in n.output}
    if bundle.manifest.calibration.attention_scores_int8:
        scores = [n for n in model.graph.node if n.name.endswith(".attn.scores")]
        assert scores
        for n in scores:  # kᵀ: a last-two-axes Transpose feeds the MatMul; Q/DQ sit above the layout ops
            kt = made[n.input[1]]
            assert kt.op_type == "Transpose" and list(kt.attribute[0].ints) == [0, 1, 3, 2]
            for t in n.input:
                src = made[t]
                while src.op_type in ("Transpose", "Reshape"):
                    src = made[src.input[0]]
                assert src.op_type == "DequantizeLinear", src.name
    acts = [n for n in qdq if n.op_type == "QuantizeLinear"]
    for q in acts:  # per-tensor activations, only into GEMM inputs; LayerNorm/Softmax stay float
        assert numpy_helper.to_array(inits[q.input[1]]).shape == ()
        (dq,) = consumers[q.output[0]]
        (user,) = consumers[dq.output[0]]
        while user.op_type in ("Transpose", "Reshape"):  # layout only: the per-tensor scale commutes
            (user,) = consumers[user.output[0]]
        assert user.op_type in ("Gemm", "MatMul")
        assert made[q.input[0]].op_type not in ("Transpose", "Reshape") or len(consumers[q.input[0]]) > 1
    for n in model.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert all(i not in {q.output[0] for q in qdq} for i in n.input)


def _model(nodes, inputs, outputs, inits=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_checker_catches_what_tensorrt_rejects():
    u8 = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4])
    f32 = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1])
    # a Transpose on UINT8 (layout change before the cast)
    m = _model([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
                helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)], [u8], [f32])
    assert any("UINT8" in p for p in check_tensorrt_ops(m))
    # a non-zero zero point
    fx = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    fy = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "z")]
    m = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], [fx], [fy], inits)
    assert sum("not 0" in p for p in check_tensorrt_ops(m)) == 2
    # an operator the parser lacks, and an opset beyond it
    sq = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    scalar = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    m = _model([helper.make_node("Det", ["x"], ["y"])], [sq], [scalar])
    assert any("not supported" in p for p in check_tensorrt_ops(m, {**operator_matrix(), "Det": None}))
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [fx], [fy], opset=21)
    assert any("opset 21" in p for p in check_tensorrt_ops(m, {**operator_matrix(), "Relu": {"FP32"}}))
