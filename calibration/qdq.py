"""INT8 graph surgery: explicit QuantizeLinear/DequantizeLinear on the transformer's linear layers.

TensorRT style (what a strongly typed TensorRT network, ONNX Runtime's QDQ fusions and OpenVINO's low-precision
transformations all read): activations per tensor, weights per output channel, symmetric, zero point 0. The
ranges come from calibration (calibration.quantize); the rewrite itself is pure ONNX.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from stexport.bundle.precision import FLOAT_PRECISIONS, float_dtype
from stexport.errors import StexportError
from stexport.onnx_graph import stable_topo


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


FLOAT_TYPES = {n: np.dtype(float_dtype(n)).type for n in FLOAT_PRECISIONS}
QDQ_OPSET_FP16 = 19  # QuantizeLinear/DequantizeLinear take FP16 scales and tensors from opset 19 on


def insert_qdq(proto: onnx.ModelProto, amax: dict[str, float],
               targets: list[str] | None = None, float_precision: str = "fp32") -> onnx.ModelProto:
    """Explicit INT8 quantization, TensorRT style.

    For each target MatMul/Gemm, each activation input → QuantizeLinear → DequantizeLinear (per-tensor,
    scale amax/127, zero point 0) and each weight stored as INT8 with a per-output-channel DequantizeLinear
    (the N axis of the (K, N) or, with transB, (N, K) weight). Outputs stay float, so bias, residuals,
    LayerNorm and Softmax run in float. `amax[name]`: calibrated |max| of the activation tensor `name`.

    float_precision: the graph's float type around the Q/DQ pairs, "fp32" or "fp16" (an FP16 graph from
    fold(compute_dtype=float16): scales are FP16, dequantized tensors FP16, and the opset is raised to 19,
    the first with FP16 Q/DQ). A strongly typed TensorRT network runs the float parts in exactly this type.
    """
    if float_precision not in FLOAT_TYPES:
        raise StexportError(f"--int8-float {float_precision}: choose one of {', '.join(FLOAT_TYPES)}")
    ftype = FLOAT_TYPES[float_precision]
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
                node.input[i] = _quantize_weight(node, t, inits, done_weights, new_inits, added, ftype)
                continue
            if t not in amax:
                raise StexportError(f"no calibration range for '{t}' (input {i} of {name})")
            key = f"{t}@{name}"
            scale = scale_as(np.array(max(float(amax[t]), 1e-8) / 127.0), ftype)
            s_name, z_name, q, dq = f"{key}_scale", f"{key}_zero", f"{key}_q", f"{key}_dq"
            new_inits += [numpy_helper.from_array(scale, s_name),
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
    ordered = stable_topo(ordered, rank, {t.name for t in g.initializer} | {t.name for t in new_inits}
                           | {i.name for i in g.input})
    used = {i for n in ordered for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(ordered)
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    if ftype is np.float16:
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < QDQ_OPSET_FP16:
                op.version = QDQ_OPSET_FP16  # 18 → 19 changes no op this graph uses except Q/DQ's types
    return proto


def scale_as(scale: np.ndarray, ftype) -> np.ndarray:
    """`scale` (float64/32) in the graph's float type, never rounded below its value (so |x| ≤ amax still
    quantizes into [-127, 127]) and never 0 (FP16 underflows below 6e-8)."""
    s = np.asarray(scale, np.float64)
    out = s.astype(ftype)
    low = out.astype(np.float64) < s
    if low.any():
        out = np.where(low, np.nextafter(out, ftype(np.inf)), out).astype(ftype)
    tiny = np.finfo(ftype).smallest_subnormal
    return np.maximum(out, tiny).astype(ftype)


def ranges_by_node(proto: onnx.ModelProto, amax: dict[str, float], targets: list[str]) -> dict[tuple, float]:
    """{(node name, input index): amax} for the activation inputs of `targets`: calibration ranges keyed by
    the layer that reads them, so they carry over to another export of the same model (the FP16 graph)."""
    nodes = {n.name: n for n in proto.graph.node}
    inits = {t.name for t in proto.graph.initializer}
    return {(name, i): amax[nodes[name].input[i]] for name in targets for i in (0, 1)
            if nodes[name].input[i] not in inits and nodes[name].input[i] in amax}


def ranges_for(proto: onnx.ModelProto, by_node: dict[tuple, float], targets: list[str]) -> dict[str, float]:
    """The tensor-keyed ranges of `proto` (another export of the model `ranges_by_node` read) for `targets`.
    Raises StexportError when a target layer is missing or reads a tensor with two different ranges."""
    nodes = {n.name: n for n in proto.graph.node}
    out: dict[str, float] = {}
    for (name, i), value in by_node.items():
        if name not in nodes:
            raise StexportError(f"the FP16 graph has no layer '{name}' to quantize (the FP32 graph has); "
                                "please report this model configuration")
        t = nodes[name].input[i]
        if t in out and out[t] != value:
            raise StexportError(f"tensor '{t}' of the FP16 graph has two calibration ranges; please report this "
                                "model configuration")
        out[t] = value
    missing = [n for n in targets if n not in nodes]
    if missing:
        raise StexportError(f"the FP16 graph lacks the layers {missing[:3]}; please report this model configuration")
    return out


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


def _quantize_weight(node: onnx.NodeProto, wname: str, inits: dict, done: set[str], new_inits: list,
                     added: list, ftype=np.float32) -> str:
    """INT8 copy of weight `wname` with per-output-channel scales and its DequantizeLinear; the DQ's output."""
    trans = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    axis = 0 if trans else 1
    wdq = f"{wname}_dq"
    if wname in done:  # an initializer the exporter shared between identical layers
        return wdq
    done.add(wname)
    w = numpy_helper.to_array(inits[wname]).astype(np.float64)
    wscale = scale_as(np.maximum(np.abs(w).max(axis=1 - axis), 1e-12) / 127.0, ftype)
    shape = (-1, 1) if axis == 0 else (1, -1)
    wq = np.clip(np.round(w / wscale.astype(np.float64).reshape(shape)), -127, 127).astype(np.int8)
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


def _dq_above(made: dict, tensor: str) -> tuple[onnx.NodeProto | None, int, onnx.NodeProto | None]:
    """The DequantizeLinear that makes `tensor` directly or through the Transposes/Reshapes insert_qdq puts
    Q/DQ above: (the node reading the DQ's output (None: the caller's GEMM), its input slot, the DQ)."""
    reader, slot, n = None, None, made.get(tensor)
    while n is not None and n.op_type in ("Transpose", "Reshape"):
        reader, slot, n = n, 0, made.get(n.input[0])
    return reader, slot, (n if n is not None and n.op_type == "DequantizeLinear" else None)


def quantized_layers(proto: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes of a Q/DQ graph (insert_qdq's) that read a DequantizeLinear output, in
    graph order: the INT8 GEMMs a layerwise report ranks and a float fallback can return to float."""
    made = {o: n for n in proto.graph.node for o in n.output}
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")
            and any(_dq_above(made, t)[2] is not None for t in n.input[:2])]


def to_float(proto: onnx.ModelProto, layers) -> onnx.ModelProto:
    """A copy of the Q/DQ graph `proto` with the GEMMs `layers` in float: each activation input reads the
    tensor before its QuantizeLinear (the pair is gone) and each INT8 weight becomes a float initializer
    (int8 × its per-channel scale, in the scale's float type: the numbers its DequantizeLinear made, so the
    activation's quantization error goes and the weight's, ≤ half a step of each output channel, stays).
    Nodes and initializers nothing reads any more are dropped. Raises StexportError for a name that is not a
    GEMM of the graph."""
    q = onnx.ModelProto()
    q.CopyFrom(proto)
    g = q.graph
    inits = {t.name: t for t in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    nodes = {n.name: n for n in g.node if n.op_type in ("MatMul", "Gemm")}
    added: dict[str, onnx.TensorProto] = {}
    for name in layers:
        if name not in nodes:
            raise StexportError(f"'{name}': no MatMul/Gemm of that name in the graph")
        node = nodes[name]
        for i in (0, 1):
            reader, slot, dq = _dq_above(made, node.input[i])
            if dq is None:
                continue
            reader, slot = (node, i) if reader is None else (reader, slot)
            if dq.input[0] in inits:  # a weight: INT8 initializer → its float values
                fname = f"{dq.output[0]}_float"
                if fname not in added:
                    w = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
                    s = numpy_helper.to_array(inits[dq.input[1]])
                    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                    shape = [1] * w.ndim
                    if s.ndim:
                        shape[axis] = -1
                    added[fname] = numpy_helper.from_array((w * s.astype(np.float64).reshape(shape))
                                                           .astype(s.dtype), fname)
                reader.input[slot] = fname
            else:  # an activation: bypass its Q/DQ pair
                reader.input[slot] = made[dq.input[0]].input[0]
    g.initializer.extend(added.values())
    keep = {o.name for o in g.output}
    while True:  # drop what nothing reads (the bypassed pairs, weight DQs no other layer shares)
        used = keep | {i for n in g.node for i in n.input}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return q
