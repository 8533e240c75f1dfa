"""Swappable graphs: the per-task tensors of an exported model as distinct, named, overridable initializers.

A swappable bundle serves many tasks from one backbone (paper section 3: a task is ~7 M adapter and head
parameters on a frozen 86 M backbone). Its ONNX keeps every per-task tensor (each adapter's fc1, temporal-conv
taps and bias, fc2, and the head; for INT8 also the adapters' INT8 weights, their per-channel scales and the
activation scales of the adapter GEMMs) as an initializer of its own, named after the folded model's parameter,
in the layout its operator reads, and also as a graph input with that default ("overridable initializer"):
ONNX Runtime then lets one run call replace it (its LoRA adapter mechanism) and never constant-folds it into
a neighbour; OpenVINO replaces the constant before compiling; TensorRT refits it by name.

The export passes the per-task parameters as graph inputs (DeployViT.forward's `task`), so no exporter pass can
fold them into backbone constants or share one initializer between equal tensors; `inputs_to_initializers`
then stores them as initializers and `finalize` marks the final set (after an INT8 rewrite) overridable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from stexport.errors import StexportError
from stexport.bundle.manifest import TaskTensor
from stexport.onnx_graph import check, perm_of, save

GEMMS = ("MatMul", "Gemm")


def _readers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def inputs_to_initializers(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """The exported graph's per-task inputs (`values`: name → the task's tensor) become initializers of those
    names. A tensor read only through a Transpose (a Linear weight on a 3-D or 4-D input) is stored transposed
    and the Transpose dropped, so each per-task tensor feeds its operator directly."""
    g = proto.graph
    readers = _readers(g)
    drop: set[int] = set()
    for name, value in values.items():
        rd = readers.get(name, [])
        if not rd:
            raise StexportError(f"per-task parameter '{name}' is not used by the exported graph")
        if len(rd) == 1 and rd[0].op_type == "Transpose":
            t = rd[0]
            value = np.transpose(value, perm_of(t) or None)
            for n in readers.get(t.output[0], []):
                for k, i in enumerate(n.input):
                    if i == t.output[0]:
                        n.input[k] = name
            drop.add(id(t))
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    inputs = [i for i in g.input if i.name not in values]
    del g.input[:]
    g.input.extend(inputs)
    vi = [v for v in g.value_info if v.name not in values]
    del g.value_info[:]
    g.value_info.extend(vi)


def task_tensor_names(proto: onnx.ModelProto, params: list[str]) -> list[str]:
    """The per-task initializers of a graph exported with `params` as per-task parameters: each parameter's
    initializer, or its INT8 form (`_int8` weight and `_wscale` per-channel scales) after the Q/DQ rewrite, and
    the activation scales of every GEMM that reads a per-task weight (their ranges change with the task)."""
    g = proto.graph
    inits = {t.name for t in g.initializer}
    out: list[str] = []
    weights = set()
    for p in params:
        if p in inits:
            out.append(p)
            weights.add(p)
        elif f"{p}_int8" in inits:
            out += [f"{p}_int8", f"{p}_wscale"]
            weights.add(f"{p}_dq")
        else:
            raise StexportError(f"per-task parameter '{p}' is missing from the graph")
    gemms = {n.name for n in g.node if n.op_type in GEMMS and any(i in weights for i in n.input)}
    for t in g.initializer:
        if "@" in t.name and t.name.endswith("_scale") and t.name[:-len("_scale")].rsplit("@", 1)[1] in gemms:
            out.append(t.name)
    return out


def backbone_scales(proto: onnx.ModelProto, task: list[str]) -> list[str]:
    """The activation scales of the backbone's GEMMs in an INT8 graph: the ranges they were calibrated for
    change with the task's adapters too (every adapter adds to the token stream the backbone reads)."""
    taken = set(task)
    return [t.name for t in proto.graph.initializer
            if "@" in t.name and t.name.endswith("_scale") and t.name not in taken]


def structure_hash(proto: onnx.ModelProto) -> str:
    """sha256 of the graph without its weights' values: nodes, inputs, outputs, and each initializer's name,
    type and shape. Two exports of the same backbone and adapter layout have the same structure whatever the
    task's values (and, for INT8, whatever their calibrated ranges)."""
    h = hashlib.sha256()
    g = proto.graph
    for n in g.node:
        h.update(n.SerializeToString(deterministic=True))
    for v in [*g.input, *g.output]:
        h.update(v.SerializeToString(deterministic=True))
    for t in sorted(g.initializer, key=lambda t: t.name):
        h.update(f"{t.name}:{t.data_type}:{list(t.dims)};".encode())
    return h.hexdigest()


def records(proto: onnx.ModelProto, names: list[str], fixed: list[str] = ()) -> list[TaskTensor]:
    inits = {t.name: t for t in proto.graph.initializer}
    return [TaskTensor(name=n, shape=tuple(inits[n].dims),
                       dtype=str(helper.tensor_dtype_to_np_dtype(inits[n].data_type)), overridable=n not in fixed)
            for n in [*names, *fixed]]


def mark_overridable(proto: onnx.ModelProto, names: list[str]) -> None:
    """Each of `names` (initializers) also a graph input: ONNX Runtime's overridable initializers."""
    g = proto.graph
    have = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer}
    for n in names:
        if n not in have:
            t = inits[n]
            g.input.append(helper.make_tensor_value_info(n, t.data_type, list(t.dims)))


SCALAR_SHAPE = "task_scalar_shape"


def scales_as_vectors(proto: onnx.ModelProto, names: list[str]) -> None:
    """Per-task scalars (INT8 activation scales) stored as 1-element vectors, each Reshaped to the scalar its
    QuantizeLinear/DequantizeLinear read: ONNX Runtime's adapters refuse 0-d parameters, and OpenVINO can then
    replace them (see finalize). Constant ones are folded back by every runtime before it fuses Q/DQ."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    scalars = [n for n in names if len(inits[n].dims) == 0]
    if not scalars:
        return
    g.initializer.append(numpy_helper.from_array(np.zeros(0, np.int64), SCALAR_SHAPE))
    made = []
    for n in scalars:
        value = numpy_helper.to_array(inits[n]).reshape(1)
        inits[n].CopyFrom(numpy_helper.from_array(value, n))
        out = f"{n}_scalar"
        for node in g.node:
            for k, i in enumerate(node.input):
                if i == n:
                    node.input[k] = out
        made.append(helper.make_node("Reshape", [n, SCALAR_SHAPE], [out], name=f"{n}_Reshape"))
    nodes = [*made, *g.node]
    del g.node[:]
    g.node.extend(nodes)


def finalize(onnx_path: Path, params: list[str], external_data: bool | None = None) -> tuple[list[TaskTensor], str]:
    """Mark the per-task tensors of the graph at `onnx_path` overridable (in place); their records and the
    graph's structure hash."""

    proto = onnx.load(str(onnx_path))
    names = task_tensor_names(proto, params)
    fixed = backbone_scales(proto, names)
    # every scale as a vector + Reshape: OpenVINO's ONNX reader folds a constant scalar scale into its
    # FakeQuantize's limits, where replacing the scale's constant afterwards would reach the DequantizeLinear only
    scales_as_vectors(proto, [*names, *fixed])
    mark_overridable(proto, names)
    save(proto, onnx_path, external_data if external_data is not None else proto.ByteSize() > (1 << 30))
    check(onnx_path)
    return records(proto, names, fixed), structure_hash(proto)


def tensors(proto_or_path, names: list[str]) -> dict[str, np.ndarray]:
    """The values of initializers `names` of a graph (a ModelProto or an ONNX path)."""
    proto = proto_or_path if isinstance(proto_or_path, onnx.ModelProto) else onnx.load(str(proto_or_path))
    inits = {t.name: t for t in proto.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise StexportError(f"the graph has no per-task tensor '{missing[0]}'")
    return {n: numpy_helper.to_array(inits[n]) for n in names}
