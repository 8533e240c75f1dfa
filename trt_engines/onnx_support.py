"""What the TensorRT ONNX parser accepts, checked on CPU: every node's operator and tensor types against the
parser's operator matrix (onnx/onnx-tensorrt docs/operators.md, shipped as data/onnx-tensorrt-operators.md),
the opset range, UINT8 only at the network's edge, INT8 only between Q/DQ with zero points of 0.

No TensorRT is imported: this is what stexport can know about a graph before a GPU host parses it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

MATRIX_FILE = Path(__file__).parent / "data" / "onnx-tensorrt-operators.md"


@functools.lru_cache(maxsize=1)
def operator_matrix() -> dict[str, set[str] | None]:
    """{op: supported types, or None when the parser does not support it} for the TensorRT 10 parser."""
    return parse_operator_matrix(MATRIX_FILE.read_text(encoding="utf-8"))


TRT_OPSET = (9, 20)

# Inputs that carry shapes or indices rather than data: the matrix's "Supported Types" column describes the
# data tensors, so these are checked separately (they must be INT64/INT32).
_INDEX_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Pad": {1, 2, 3}, "Squeeze": {1}, "Unsqueeze": {1},
    "ReduceMean": {1}, "Gather": {1}, "Split": {1}, "Tile": {1},
}
_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.UINT8: "UINT8",
    TensorProto.INT8: "INT8", TensorProto.BOOL: "BOOL",
    TensorProto.DOUBLE: "DOUBLE", TensorProto.INT4: "INT4", TensorProto.FLOAT8E4M3FN: "FP8",
}


def parse_operator_matrix(markdown: str) -> dict[str, set[str] | None]:
    """{op: supported types} from onnx-tensorrt's operators.md table; None for ops marked unsupported."""
    ops: dict[str, set[str] | None] = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"[A-Za-z0-9]+", cells[0]) or cells[1] not in ("Y", "N"):
            continue
        types = {t.strip() for t in cells[2].split(",") if t.strip()} if len(cells) > 2 else set()
        ops[cells[0]] = types if cells[1] == "Y" else None
    return ops


def tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor in the graph (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def check_tensorrt_ops(proto: onnx.ModelProto, matrix: dict[str, set[str] | None] | None = None) -> list[str]:
    """Every node against the TensorRT operator matrix; returns the problems found (empty when clean).

    Checks: opset range and default domain only; each op supported; the types of its data inputs/outputs in
    the op's supported types; UINT8 only on the graph's input/output (and the Cast that consumes/produces it);
    INT8 only between QuantizeLinear and DequantizeLinear; Q/DQ zero points all zero.
    """
    matrix = matrix or operator_matrix()
    problems: list[str] = []
    for op in proto.opset_import:
        if op.domain not in ("", "ai.onnx"):
            problems.append(f"opset domain '{op.domain}' is not ONNX standard")
        elif not TRT_OPSET[0] <= op.version <= TRT_OPSET[1]:
            problems.append(f"opset {op.version} outside TensorRT's {TRT_OPSET}")
    types = tensor_types(proto)
    io = {v.name for v in [*proto.graph.input, *proto.graph.output]}
    consts = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        where = f"{n.op_type} '{n.name}'"
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain '{n.domain}'")
            continue
        supported = matrix.get(n.op_type)
        if supported is None:
            problems.append(f"{where}: not supported by the TensorRT ONNX parser")
            continue
        skip = _INDEX_INPUTS.get(n.op_type, set())
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _check_qdq(n, types, consts)
            continue
        tensors = [(f"input {i}", t) for i, t in enumerate(n.input) if t and i not in skip]
        tensors += [(f"output {i}", t) for i, t in enumerate(n.output) if t]
        if n.op_type == "Shape":
            tensors = tensors[:1]  # its INT64 output is a shape
        for role, t in tensors:
            ty = _TYPE_NAMES.get(types.get(t, 0), f"type {types.get(t)}")
            if ty == "UINT8" and (t not in io or n.op_type != "Cast"):
                problems.append(f"{where}: {role} '{t}' is UINT8 (allowed only as network input/output)")
            elif ty not in supported:
                problems.append(f"{where}: {role} '{t}' is {ty}, not in {sorted(supported)}")
        for i in skip:
            if i < len(n.input) and n.input[i]:
                ty = _TYPE_NAMES.get(types.get(n.input[i], 0), "?")
                if ty not in ("INT64", "INT32"):
                    problems.append(f"{where}: index input {i} is {ty}")
    return problems


def _check_qdq(n: onnx.NodeProto, types: dict[str, int], consts: dict) -> list[str]:
    where = f"{n.op_type} '{n.name}'"
    out = []
    x, scale = n.input[0], n.input[1]
    zp = n.input[2] if len(n.input) > 2 else ""
    q = n.op_type == "QuantizeLinear"
    float_t, int_t = (x, n.output[0]) if q else (n.output[0], x)
    if _TYPE_NAMES.get(types.get(float_t)) not in ("FP32", "FP16", "BF16"):
        out.append(f"{where}: float side '{float_t}' is {_TYPE_NAMES.get(types.get(float_t))}")
    if _TYPE_NAMES.get(types.get(int_t)) != "INT8":
        out.append(f"{where}: quantized side '{int_t}' is {_TYPE_NAMES.get(types.get(int_t))}, expected INT8")
    if scale not in consts:
        out.append(f"{where}: scale '{scale}' is not an initializer")
    if not zp:
        out.append(f"{where}: no zero point (defaults to UINT8; TensorRT needs an INT8 zero point of 0)")
    elif zp not in consts:
        out.append(f"{where}: zero point '{zp}' is not an initializer")
    elif np.any(numpy_helper.to_array(consts[zp]) != 0):
        out.append(f"{where}: zero point '{zp}' is not 0")
    return out
