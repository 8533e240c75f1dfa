"""Outlier migration folded into the graph (SmoothQuant, Xiao et al. 2023, §4; Outlier Suppression+, Wei et al.
2023, for the shift): per-channel scales moved out of the INT8 activations into the GEMM weights.

Two kinds of site, each exact in FP32 (the same values up to float rounding):

- "norm": a LayerNormalization whose output only quantized GEMMs read (ln_1 → q, k, v; ln_2 → MLP fc). Its
  weight and bias are divided by s (per channel) and each reader's weight rows (input channels) multiplied
  by s. No op is added: the LayerNorm puts out x/s.
- "stream": an adapter's fc1, which reads the un-normalised residual stream. Two elementwise ops go in front of
  its quantization, (x − δ)·(1/s), and fc1 takes s into its weight rows and δ into its bias (b + δW). δ is the
  middle of each channel's calibrated [min, max], so token-constant offsets of the stream leave the INT8 range.

s_j = max|X_j|^α / max|W_j|^(1−α) (SmoothQuant's eq. 4; for stream sites |X_j| is the half range around δ_j),
with max|W_j| over all of the site's readers. Where a channel never varies on the calibration clips, s_j = 1.
`plan` computes s (and δ) from per-channel statistics; `apply` rewrites a graph by layer names, so the same plan
goes into the FP32 graph calibration ran on and into the FP16 graph of an `--int8-float fp16` bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

S_LIMITS = (2.0 ** -10, 2.0 ** 10)  # keep migrated weights and LayerNorm affines well inside FP16's range
PASS_THROUGH = ("Cast",)  # between a LayerNorm and its readers in the FP16 graph (LayerNorm runs in FP32)


@dataclass
class Site:
    kind: str  # "norm" | "stream"
    readers: list[str]  # GEMM node names (for "stream": the one fc1)
    tensor: str  # the activation tensor the readers quantize (in the graph `sites` read)


def _gemm_weight(node: onnx.NodeProto, inits: dict) -> tuple[np.ndarray, bool] | None:
    """(weight, transposed) of a MatMul/Gemm with an initializer weight, or None."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    trans = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        return None
    return numpy_helper.to_array(inits[node.input[1]]), trans


def _producer_through(made: dict, t: str) -> onnx.NodeProto | None:
    n = made.get(t)
    while n is not None and n.op_type in PASS_THROUGH:
        n = made.get(n.input[0])
    return n


def sites(proto: onnx.ModelProto, targets: list[str]) -> list[Site]:
    """The migration sites among the quantized GEMMs `targets` (see the module docstring)."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    made = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    wanted = set(targets)
    out: list[Site] = []
    by_norm: dict[str, list[str]] = {}
    stream = []
    for name in targets:
        node = nodes[name]
        if _gemm_weight(node, inits) is None:
            continue
        src = _producer_through(made, node.input[0])
        if src is not None and src.op_type == "LayerNormalization" and len(src.input) >= 3 \
                and src.input[1] in inits and src.input[2] in inits:
            by_norm.setdefault(src.name, []).append(name)
        elif name.endswith(".fc1"):
            stream.append(name)
    for norm, names in by_norm.items():
        ln = nodes[norm]
        # every reader of the LayerNorm's output (through casts) must be a quantized GEMM this site scales
        frontier, ok, seen = [ln.output[0]], True, []
        while frontier:
            t = frontier.pop()
            for r in readers.get(t, []):
                if r.op_type in PASS_THROUGH:
                    frontier.append(r.output[0])
                elif r.name in wanted and r.input[0] == t and _gemm_weight(r, inits) is not None:
                    seen.append(r.name)
                else:
                    ok = False
        if ok and sorted(seen) == sorted(names):
            out.append(Site("norm", names, nodes[names[0]].input[0]))
        else:  # ln_pre: its output is the residual stream itself, which the first adapter's fc1 reads
            stream += [n for n in names if n.endswith(".fc1")]
    for name in stream:
        node = nodes[name]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            out.append(Site("stream", [name], node.input[0]))
    return out


def _wmax(node: onnx.NodeProto, inits: dict) -> np.ndarray:
    w, trans = _gemm_weight(node, inits)
    return np.abs(w.astype(np.float64)).max(axis=0 if trans else 1)  # per input channel


def plan(proto: onnx.ModelProto, found: list[Site], stats: dict, alpha: float,
         stream: bool = True) -> dict:
    """{reader name of each site: {"kind", "readers", "s", "shift"}} for `alpha`. stats[tensor]: per-channel
    (min, max) arrays of the site's activation on the calibration clips. Stream sites only with `stream`."""
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    out = {}
    for site in found:
        if site.kind == "stream" and not stream:
            continue
        lo, hi = (np.asarray(a, np.float64) for a in stats[site.tensor])
        if site.kind == "norm":
            shift = np.zeros_like(lo)
            xmax = np.maximum(np.abs(lo), np.abs(hi))
        else:
            shift = (lo + hi) / 2
            xmax = (hi - lo) / 2
        wmax = np.max([_wmax(nodes[r], inits) for r in site.readers], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(xmax, alpha) / np.power(wmax, 1.0 - alpha)
        s = np.where(np.isfinite(s) & (s > 0) & (xmax > 0) & (wmax > 0), s, 1.0)
        # a power of two per channel: x/s and W·s are then exact in float, and FP16 weights stay representable
        s = np.exp2(np.round(np.log2(np.clip(s, *S_LIMITS))))
        out[site.readers[0]] = {"kind": site.kind, "readers": list(site.readers), "s": s, "shift": shift}
    return out


def apply(proto: onnx.ModelProto, steps: dict) -> onnx.ModelProto:
    """Rewrite `proto` (in place, also returned) with a `plan`, by layer names; every changed initializer is
    a new one (the exporter shares equal initializers between layers)."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    made = {o: n for n in g.node for o in n.output}
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (added node, the node it goes before)

    def replace(node: onnx.NodeProto, i: int, arr: np.ndarray, suffix: str) -> None:
        old = inits[node.input[i]]
        name = f"{node.name}.{suffix}"
        new_inits.append(numpy_helper.from_array(arr.astype(numpy_helper.to_array(old).dtype), name))
        node.input[i] = name

    def scale_rows(node: onnx.NodeProto, s: np.ndarray) -> np.ndarray:
        w, trans = _gemm_weight(node, inits)
        ws = w.astype(np.float64) * (s[None, :] if trans else s[:, None])
        replace(node, 1, ws, "smoothed_weight")
        return w.astype(np.float64)

    for head, step in steps.items():
        s, shift = np.asarray(step["s"], np.float64), np.asarray(step["shift"], np.float64)
        if step["kind"] == "norm":
            ln = _producer_through(made, nodes[head].input[0])
            for i, k in ((1, "smoothed_scale"), (2, "smoothed_bias")):
                replace(ln, i, numpy_helper.to_array(inits[ln.input[i]]).astype(np.float64) / s, k)
            for r in step["readers"]:
                scale_rows(nodes[r], s)
            continue
        fc1 = nodes[head]
        trans = _gemm_weight(fc1, inits)[1]
        dtype = numpy_helper.to_array(inits[fc1.input[1]]).dtype
        w = scale_rows(fc1, s)
        bias = numpy_helper.to_array(inits[fc1.input[2]]).astype(np.float64)
        replace(fc1, 2, bias + (w @ shift if trans else shift @ w), "smoothed_bias")
        x = fc1.input[0]
        add = helper.make_node("Add", [x, f"{head}.smooth_shift"], [f"{head}.shifted"], name=f"{head}.smooth_shift")
        mul = helper.make_node("Mul", [f"{head}.shifted", f"{head}.smooth_inv"], [f"{head}.smoothed"],
                               name=f"{head}.smooth_scale")
        new_inits += [numpy_helper.from_array((-shift).astype(dtype), f"{head}.smooth_shift"),
                      numpy_helper.from_array((1.0 / s).astype(dtype), f"{head}.smooth_inv")]
        fc1.input[0] = mul.output[0]
        new_nodes += [(add, fc1), (mul, fc1)]
    if new_nodes:
        order = list(g.node)
        for add, before in new_nodes:
            order.insert(order.index(before), add)
        del g.node[:]
        g.node.extend(order)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    return proto


def record(steps: dict, alpha: float | None, chosen_by: list[dict], clips: int) -> dict:
    """The manifest's `calibration.migration`."""
    kinds = [st["kind"] for st in steps.values()]
    return {"scheme": "smoothquant per-channel scale (norm sites) and shift+scale (stream sites), folded "
                      "into the GEMM weights", "alpha": alpha,
            "norm_sites": kinds.count("norm"), "stream_sites": kinds.count("stream"),
            "chosen_on_clips": clips, "candidates": chosen_by}
