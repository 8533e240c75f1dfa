"""ONNX export of the deploy model (FP32, FP16; INT8 via `insert_qdq`) and the TensorRT operator-matrix check.

Opset 18: inside the TensorRT 10 parser's range (9–20), and the lowest the torch dynamo exporter writes
without a lossy down-conversion (its Pad cannot be converted to 17). Batch is dynamic; frames and resolution
are fixed.
"""

from __future__ import annotations

import ast
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from stexport import interrupt
from stexport.errors import StexportError

log = logging.getLogger("stexport")

OPSET = 18
INPUT, OUTPUT = "frames", "logits"
EXTERNAL_DATA_BYTES = 1 << 30  # models with more weight bytes than this get a model.onnx.data file
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def example_input(model, frames: int, batch: int = 2) -> torch.Tensor:
    s = model.image_size
    if model.input_format == "uint8":
        return torch.randint(0, 256, (batch, frames, s, s, 3), dtype=torch.uint8)
    return torch.randn(batch, frames, 3, s, s)


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def export_onnx(model: torch.nn.Module, path: str | Path, frames: int,
                external_data: bool | None = None) -> Path:
    """Export a folded `DeployViT` to `path` (opset 18, dynamic batch); checked and shape-inferred."""
    path = Path(path)
    x = example_input(model, frames)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                model, (x,), dynamo=True, opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False,
                optimize=True,
            )
        except Exception as e:  # noqa: BLE001 - exporter failures are bugs or unsupported configs
            interrupt.reraise(e)  # the exporter wraps a Ctrl-C in its own error
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise StexportError(f"ONNX export failed ({type(e).__name__}: {why})") from e
    proto = program.model_proto
    name_linear_nodes(proto)
    split_key_transposes(proto)
    _tidy(proto)
    if external_data is None:
        external_data = _weight_bytes(model) > EXTERNAL_DATA_BYTES
    save(proto, path, external_data)
    check(path)
    return path


def _tidy(proto: onnx.ModelProto) -> None:
    """Drop exporter bookkeeping that bloats the file, name the graph, read the batch size from the Cast.

    TensorRT takes UINT8 only as a network input feeding a Cast, but the exporter reads the dynamic batch size
    with a Shape of the input itself; the Cast's output has the same shape.
    """
    proto.graph.name = "stexport"
    inp = proto.graph.input[0].name
    cast = next((n for n in proto.graph.node if n.op_type == "Cast" and n.input[0] == inp), None)
    if cast is not None:
        for n in proto.graph.node:
            if n is not cast and inp in n.input:
                n.input[list(n.input).index(inp)] = cast.output[0]
        _topo_sort(proto.graph)
    proto.producer_name = "stexport"
    for n in proto.graph.node:
        del n.metadata_props[:]
    del proto.metadata_props[:]


def _topo_sort(g: onnx.GraphProto) -> None:
    nodes = list(g.node)
    ready = {t.name for t in g.initializer} | {i.name for i in g.input}
    ordered = _stable_topo(nodes, {id(n): float(i) for i, n in enumerate(nodes)}, ready)
    del g.node[:]
    g.node.extend(ordered)


def save(proto: onnx.ModelProto, path: Path, external_data: bool = False) -> None:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external_data:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def check(path: Path) -> None:
    """onnx.checker full check (with shape inference) on the saved file; raises StexportError on failure."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        interrupt.reraise(e)
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise StexportError(f"{path}: the exported graph fails onnx.checker ({why})") from e


def external_files(path: Path) -> list[str]:
    """Names of the external-data files `path` refers to (empty when the weights are inline)."""
    m = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                names.add(e.value)
    return sorted(names)


# ----------------------------------------------------------------------------------------------------------
# INT8: explicit Q/DQ on the inputs and weights of the transformer's linear layers

def scope_of(node: onnx.NodeProto) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(p.value)
    return []


def quant_targets(proto: onnx.ModelProto, attention: bool = False) -> list[onnx.NodeProto]:
    """MatMul/Gemm of the transformer blocks with a weight initializer (patch embedding, head stay float);
    with `attention`, also the attention-score MatMul (q·kᵀ; the softmax·v product stays float)."""
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or not n.name.startswith("blocks."):
            continue
        if n.input[1] in inits or (attention and n.name.endswith(".attn.scores")):
            out.append(n)
    return out


def name_linear_nodes(proto: onnx.ModelProto) -> None:
    """Name MatMul/Gemm nodes after their torch module (e.g. 'blocks.3.attn.q', 'blocks.3.attn.scores') so Q/DQ
    can find them after the exporter's metadata is gone."""
    seen: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = [s for s in scope_of(n) if s]
        if len(scopes) < 2:
            continue
        base = scopes[-2]  # the module; scopes[-1] is the aten op inside it
        k = seen.get(base, 0)
        seen[base] = k + 1
        n.name = base if k == 0 else f"{base}#{k}"


def split_key_transposes(proto: onnx.ModelProto) -> None:
    """kᵀ of each q·kᵀ as two Transposes, the last swapping only the last two axes and feeding the MatMul.

    The exporter merges them into one (0, 2, 3, 1) permute; OpenVINO folds a last-two-axes Transpose into the
    MatMul and then runs the whole attention in its fused kernel (~17% faster attention and no standalone
    Transpose of k on ViT-B/16), while TensorRT and ONNX Runtime fuse either form.
    """
    g = proto.graph
    made = {o: n for n in g.node for o in n.output}
    extra: dict[int, onnx.NodeProto] = {}
    for mm in g.node:
        src = made.get(mm.input[1]) if mm.op_type == "MatMul" and mm.name.endswith(".attn.scores") else None
        if src is None or src.op_type != "Transpose":
            continue
        perm = _perm(src)
        if len(perm) < 3 or _swaps_last_axes(perm):
            continue
        first = [*perm[:-2], perm[-1], perm[-2]]
        mid = f"{src.output[0]}_heads"
        del src.attribute[:]
        src.attribute.append(helper.make_attribute("perm", first))
        out = src.output[0]
        src.output[0] = mid
        swap = [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]
        extra[id(src)] = helper.make_node("Transpose", [mid], [out], name=f"{src.name}_kT", perm=swap)
    if not extra:
        return
    nodes = []
    for n in g.node:
        nodes.append(n)
        if id(n) in extra:
            nodes.append(extra[id(n)])
    del g.node[:]
    g.node.extend(nodes)


def insert_qdq(proto: onnx.ModelProto, amax: dict[str, float],
               targets: list[str] | None = None) -> onnx.ModelProto:
    """Explicit INT8 quantization, TensorRT style.

    For each target MatMul/Gemm, each activation input → QuantizeLinear → DequantizeLinear (per-tensor,
    scale amax/127, zero point 0) and each weight stored as INT8 with a per-output-channel DequantizeLinear
    (the N axis of the (K, N) or, with transB, (N, K) weight). Outputs stay float, so bias, residuals,
    LayerNorm and Softmax run in float. `amax[name]`: calibrated |max| of the activation tensor `name`.
    """
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    layout = _layout_tops(g)
    wanted = targets if targets is not None else [n.name for n in quant_targets(proto)]
    new_inits: list[onnx.TensorProto] = []
    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> Q/DQ nodes to insert before it
    # One Q/DQ pair per GEMM, even where GEMMs read the same tensor (q, k, v): ONNX Runtime's fused integer GEMM
    # ran ~8x slower when three of them shared one pair (90 ms vs 11 ms each, ViT-B/16 on 2 cores).
    done_weights: set[str] = set()
    after: list[onnx.NodeProto] = []  # bias Adds split off Gemms
    for name in wanted:
        node = nodes[name]
        added: list[onnx.NodeProto] = []
        for i in (0, 1):
            t = node.input[i]
            if t in inits:
                node.input[i] = _quantize_weight(node, t, inits, done_weights, new_inits, added)
                continue
            if t not in amax:
                raise StexportError(f"no calibration range for '{t}' (input {i} of {name})")
            key = f"{t}@{name}"
            scale = max(float(amax[t]), 1e-8) / 127.0
            s_name, z_name, q, dq = f"{key}_scale", f"{key}_zero", f"{key}_q", f"{key}_dq"
            new_inits += [numpy_helper.from_array(np.array(scale, np.float32), s_name),
                          numpy_helper.from_array(np.array(0, np.int8), z_name)]
            # Q/DQ go above the Transposes and Reshapes between the tensor's producer and the GEMM (the
            # per-tensor scale commutes with them: same numbers). OpenVINO then fuses the quantization into
            # the producer (the attention kernel for attn.out) and folds kᵀ into q·kᵀ; TensorRT and ONNX
            # Runtime move Q/DQ across layout ops themselves.
            top = layout.get(t)
            src = top.input[0] if top is not None else t
            added += [helper.make_node("QuantizeLinear", [src, s_name, z_name], [q], name=f"{key}_Q"),
                      helper.make_node("DequantizeLinear", [q, s_name, z_name], [dq], name=f"{key}_DQ")]
            if top is not None:
                top.input[0] = dq
            else:
                node.input[i] = dq
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            after.append(_split_bias(node))
        before[name] = added
    # Each Q/DQ goes right before the first layer that reads it; a stable topological sort keeps that order.
    pos = {n.name: i for i, n in enumerate(g.node)}
    rank = {id(n): float(i) for i, n in enumerate(g.node)}
    for name in wanted:
        for extra in before.get(name, []):
            rank.setdefault(id(extra), pos[name] - 0.5)
    for add in after:
        rank[id(add)] = pos[add.name[: -len("_bias")]] + 0.5
    ordered = [*g.node, *(e for extras in before.values() for e in extras), *after]
    ordered = _stable_topo(ordered, rank, {t.name for t in g.initializer} | {t.name for t in new_inits}
                           | {i.name for i in g.input})
    used = {i for n in ordered for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(ordered)
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    return proto


def _layout_tops(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name → the topmost of the chain of Transpose/Reshape nodes that makes it, each of whose outputs
    has one reader (so moving a quantization above the chain changes no other reader)."""
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    made = {o: n for n in g.node for o in n.output}
    tops = {}
    for out, n in made.items():
        top = None
        while n is not None and n.op_type in ("Transpose", "Reshape") and readers.get(n.output[0]) == 1:
            top, n = n, made.get(n.input[0])
        if top is not None:
            tops[out] = top
    return tops


def _perm(transpose: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [])


def _swaps_last_axes(perm: list[int]) -> bool:
    return len(perm) >= 2 and perm == [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]


def _quantize_weight(node: onnx.NodeProto, wname: str, inits: dict, done: set[str], new_inits: list,
                     added: list) -> str:
    """INT8 copy of weight `wname` with per-output-channel scales and its DequantizeLinear; the DQ's output."""
    trans = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    axis = 0 if trans else 1
    wdq = f"{wname}_dq"
    if wname in done:  # an initializer the exporter shared between identical layers
        return wdq
    done.add(wname)
    w = numpy_helper.to_array(inits[wname]).astype(np.float32)
    wscale = (np.maximum(np.abs(w).max(axis=1 - axis), 1e-12) / 127.0).astype(np.float32)
    shape = (-1, 1) if axis == 0 else (1, -1)
    wq = np.clip(np.round(w / wscale.reshape(shape)), -127, 127).astype(np.int8)
    wq_name, ws_name, wz_name = f"{wname}_int8", f"{wname}_wscale", f"{wname}_wzero"
    new_inits += [numpy_helper.from_array(wq, wq_name), numpy_helper.from_array(wscale, ws_name),
                  numpy_helper.from_array(np.zeros(w.shape[axis], np.int8), wz_name)]
    added.append(helper.make_node("DequantizeLinear", [wq_name, ws_name, wz_name], [wdq], name=f"{wname}_DQ",
                                  axis=axis))
    return wdq


def _split_bias(gemm: onnx.NodeProto) -> onnx.NodeProto:
    """Gemm(A, B, C) → Add(Gemm(A, B), C): ONNX Runtime fuses DQ → Gemm into an integer GEMM only without
    a float C (TensorRT fuses the bias add either way)."""
    bias, out = gemm.input[2], gemm.output[0]
    del gemm.input[2]
    for a in gemm.attribute:
        if a.name == "beta" and a.f != 1.0:
            raise StexportError(f"{gemm.name}: Gemm with beta={a.f} cannot be quantized")
    gemm.output[0] = f"{out}_nobias"
    return helper.make_node("Add", [gemm.output[0], bias], [out], name=f"{gemm.name}_bias")


def _stable_topo(nodes: list[onnx.NodeProto], rank: dict[int, float],
                 ready: set[str]) -> list[onnx.NodeProto]:
    """Topological order that follows `rank` wherever the dependencies allow (Kahn's algorithm on a heap)."""
    import heapq

    producer = {o: n for n in nodes for o in n.output}
    waiting = {id(n): {i for i in n.input if i and i not in ready and i in producer} for n in nodes}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in waiting[id(n)]:
            readers.setdefault(i, []).append(n)
    heap = [(rank[id(n)], k, n) for k, n in enumerate(nodes) if not waiting[id(n)]]
    order = {id(n): k for k, n in enumerate(nodes)}
    heapq.heapify(heap)
    out = []
    while heap:
        _, _, n = heapq.heappop(heap)
        out.append(n)
        for o in n.output:
            for r in readers.get(o, []):
                waiting[id(r)].discard(o)
                if not waiting[id(r)]:
                    heapq.heappush(heap, (rank[id(r)], order[id(r)], r))
    if len(out) != len(nodes):
        raise StexportError("graph rewrite left a cycle or a dangling input (a bug in stexport)")
    return out


# ----------------------------------------------------------------------------------------------------------
# TensorRT 10 ONNX-parser operator matrix (rows of onnx/onnx-tensorrt docs/operators.md for the ops a folded
# ST-Adapter graph can contain; `parse_operator_matrix` reads the full markdown when it is at hand).

TRT_OPS: dict[str, set[str]] = {
    "Add": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "Cast": {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"},
    "Concat": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Constant": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Conv": {"FP32", "FP16", "BF16"},
    "DequantizeLinear": {"INT8", "FP8", "INT4"},
    "Div": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "Erf": {"FP32", "FP16", "BF16"},
    "Expand": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Gather": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Gelu": {"FP32", "FP16", "BF16", "INT8", "INT32", "INT64"},
    "Gemm": {"FP32", "FP16", "BF16"},
    "Identity": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "LayerNormalization": {"FP32", "FP16", "BF16"},
    "MatMul": {"FP32", "FP16", "BF16"},
    "Mul": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "Pad": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "QuantizeLinear": {"FP32", "FP16", "BF16"},
    "ReduceMean": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "Reshape": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Shape": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Sigmoid": {"FP32", "FP16", "BF16"},
    "Slice": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Softmax": {"FP32", "FP16", "BF16"},
    "Split": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Sqrt": {"FP32", "FP16", "BF16"},
    "Squeeze": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Sub": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "Transpose": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Unsqueeze": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Where": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
}
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
    matrix = matrix or TRT_OPS
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
