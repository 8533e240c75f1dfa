"""Does an FP16 graph hold this model's activations? Checked on real numbers right after the export.

FP16 tops out at 65,504. Backbones trained in BF16 (same range as FP32) can carry activation channels far beyond
that; their FP16 graph then computes ±Inf, and the next GEMM or LayerNorm turns it into NaN logits, with no
error from any runtime (ONNX Runtime's CPU provider computes FP16 nodes in FP32 and hides it; GPUs and TensorRT
do not). `check_fp16_graph` runs the FP32 folded model with a hook on every module whose output
the FP16 graph keeps in FP16 (patch embedding, adapters, attention projections and scores, MLP layers, each
block's residual stream), records the largest magnitude each reaches on a few clips, runs the written FP16
ONNX on ONNX Runtime on the same clips. When an activation leaves FP16's range or the FP16 logits are not
finite, it either refuses the build (`overflow="refuse"`: StexportError naming the layers, their largest values
and the fix) or (`overflow="fp32"`, the default) keeps the overflowing nodes in FP32 inside the FP16 graph
(`keep_fp32`): every node whose FP16 output would leave FP16's range, and every node reading such an output, runs
in FP32 between explicit Casts (strongly typed: TensorRT reads precision only from the graph), and the check runs
again on the rewritten graph. Weights FP16 cannot store are refused either way.

Clips: the first view of up to `CLIPS` calibration videos when `--calib` is given (decoded as `infer` decodes),
else generated ones (smooth random colour fields, plus one all-white and one all-black clip: the extremes of
uint8 input).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from stexport.build.options import FP16_OVERFLOW
from stexport.errors import StexportError
from stexport.onnx_graph import external_files, stable_topo

FP16_MAX = 65504.0
CLIPS = 4


def generated_clips(frames: int, size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """uint8 (n + 2, frames, size, size, 3): smooth random colour fields, then all-white and all-black."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n * frames, 3, 4, 4), generator=g).float()
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    smooth = big.reshape(n, frames, 3, size, size).permute(0, 1, 3, 4, 2).round().clamp(0, 255).to(torch.uint8)
    flat = torch.stack([torch.full((frames, size, size, 3), v, dtype=torch.uint8) for v in (255, 0)])
    return torch.cat([smooth, flat]).numpy()


def calibration_clips(calib, frames: int, size: int, sampling: dict) -> np.ndarray:
    """The first view of up to CLIPS videos of `calib` (a list, directory, video or uint8 array)."""
    from stexport.calibration.clips import batches, choose
    from stexport.runtime.video import Sampling

    chosen = choose(calib, CLIPS, seed=0)
    view = Sampling(frames=frames, size=size, **{k: sampling[k] for k in ("rate", "temporal_views",
                                                                          "spatial_views")})
    out = []
    for clip in batches(chosen, view):
        out.append(clip[0])
        if len(out) == CLIPS:
            break
    return np.stack(out)


def _to_input(clips: np.ndarray, input_format: str) -> np.ndarray:
    if input_format == "uint8":
        return clips
    from stexport.build.reference import CLIP_MEAN, CLIP_STD

    x = (clips.astype(np.float32) / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3))


def activation_peaks(reference, clips: np.ndarray, input_format: str,
                     tasks: int = 0) -> tuple[dict[str, float], np.ndarray]:
    """Largest |output| of each module the FP16 graph runs in FP16 (and of each weight it stores in FP16),
    from the FP32 folded model; and its logits (N, classes). tasks: `reference` is an FP32 multi-task model
    (stexport.build.multitask.MultiTaskViT) of that many tasks, clip i run as task i % tasks."""
    from stexport.build.fold import Norm, fold

    model = reference if tasks else fold(reference, input_format, compute_dtype=torch.float32)
    prefix = getattr(model, "module_prefix", "")
    peaks: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if prefix and not name.startswith(prefix):  # the multi-task model's stacked head: FP32, like `head`
            continue
        name = name[len(prefix):]
        # LayerNorms compute in FP32 (their weights stay FP32) but give FP16 back, except ln_post (the head's)
        if not name or name.startswith(("ln_post", "head")) or name == "blocks":
            continue
        if not isinstance(mod, Norm):
            for pname, param in mod.named_parameters(recurse=False):  # weights FP16 must store too
                peaks[f"{name}.{pname} (weight)"] = float(param.detach().abs().max())

        def hook(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                peaks[name] = max(peaks.get(name, 0.0), float(out.detach().abs().max()))

        hooks.append(mod.register_forward_hook(hook))
    x = torch.from_numpy(_to_input(clips, input_format))
    try:
        with torch.no_grad():
            logits = (model(x, torch.arange(len(x)) % tasks) if tasks else model(x)).numpy()
    finally:
        for h in hooks:
            h.remove()
    return peaks, logits


def run_onnx(onnx_path: Path, clips: np.ndarray, input_format: str, tasks: int = 0) -> np.ndarray:
    import onnxruntime as ort

    from stexport.bundle.multitask import round_robin_feed
    from stexport.runtime.backends.ort import session_options

    # ONNX Runtime 1.32's CPU provider crashes on FP16 graphs at ORT_ENABLE_ALL (docs/troubleshooting.md)
    sess = ort.InferenceSession(str(onnx_path), session_options("extended"),
                                providers=["CPUExecutionProvider"])
    x = _to_input(clips, input_format)
    names = [i.name for i in sess.get_inputs()]
    return np.concatenate([sess.run(None, round_robin_feed(names, x[i:i + 1], i, tasks))[0] for i in range(len(x))])


def _layer(name: str) -> str:
    """'blocks.3.fc' → 'block 3 fc' for messages."""
    parts = name.split(".")
    return f"block {parts[1]} {'.'.join(parts[2:]) or 'output'}" if parts[0] == "blocks" else name


def _types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of `proto` (shape inference where the exporter left none)."""
    g = proto.graph
    found = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    found.update({t.name: t.data_type for t in g.initializer})
    if any(o and o not in found for n in g.node for o in n.output):
        inferred = onnx.shape_inference.infer_shapes(proto)
        found.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
    return found


def fp16_peaks(proto: onnx.ModelProto, clips: np.ndarray, input_format: str, tasks: int = 0) -> dict[str, float]:
    """max |x| of every FP16 tensor the FP16 graph `proto` computes, computed in FP32 (the same graph with its
    FP16 initializers and casts made FP32) on `clips`; streamed (calibration.ranges' in-graph reductions)."""
    import onnxruntime as ort

    from stexport.bundle.multitask import round_robin_feed
    from stexport.calibration.ranges import RangeCollector

    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    types = _types(proto)
    shadow = onnx.ModelProto()
    shadow.CopyFrom(proto)
    g = shadow.graph
    for t in g.initializer:
        if t.data_type == F16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == F16:
                a.i = F32
            elif n.op_type == "Constant" and a.name == "value" and a.t.data_type == F16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32)))
    for v in (*g.value_info, *g.output):
        if v.type.tensor_type.elem_type == F16:
            v.type.tensor_type.elem_type = F32
    tensors = [o for n in g.node for o in n.output if o and types.get(o) == F16]
    ranges = RangeCollector("minmax")
    ranges.instrument(shadow, tensors)
    from stexport.runtime.backends.ort import session_options

    sess = ort.InferenceSession(shadow.SerializeToString(), session_options("basic"),
                                providers=["CPUExecutionProvider"])
    del shadow
    names = [o.name for o in sess.get_outputs()]
    x = _to_input(clips, input_format)
    inputs = [i.name for i in sess.get_inputs()]
    for i in range(len(x)):
        ranges.add_outputs(dict(zip(names, sess.run(None, round_robin_feed(inputs, x[i:i + 1], i, tasks)))))
    return ranges.amax()


def keep_fp32(proto: onnx.ModelProto, peaks: dict[str, float]) -> list[dict]:
    """Rewrite the FP16 graph `proto` in place: every node whose FP16 output exceeds FP16_MAX in `peaks` (see
    fp16_peaks), and every node reading such an output, computes in FP32 (`in_fp32`). Returns one record per
    FP32 node: {node, op, max_abs_activation, why}."""
    over = {t for t, v in peaks.items() if not v <= FP16_MAX}
    producer = {o: n for n in proto.graph.node for o in n.output}

    def pick(n: onnx.NodeProto) -> dict | None:
        big = [(peaks[o], o) for o in n.output if o in over]
        read = [(peaks[i], i) for i in n.input if i in over]
        if big:
            v, t = max(big)
            return {"node": n.name, "op": n.op_type, "max_abs_activation": round(v, 1),
                    "why": f"its output '{t}' reaches {v:,.0f}, beyond FP16's ±{FP16_MAX:,.0f}"}
        if read:
            v, t = max(read)
            return {"node": n.name, "op": n.op_type, "max_abs_activation": round(v, 1),
                    "why": f"it reads '{t}' ({v:,.0f}) from {producer[t].name or producer[t].op_type}"}
        return None

    return in_fp32(proto, pick)


def in_fp32(proto: onnx.ModelProto, pick, weights: dict | None = None) -> list:
    """Rewrite the FP16 graph `proto` in place so that the nodes `pick` chooses compute in FP32: pick(node) →
    a record (any non-None value) for a node to move, None to leave it. The moved nodes' FP16 inputs come
    through a Cast to FP32 (FP16 initializers become FP32 copies of the same values), their outputs that FP16
    nodes read go back through a Cast to FP16; Casts to FP16 among them cast to FP32 instead (`weights`: FP32
    values for FP16 initializers, by name, used instead of their FP16 values). Constant nodes
    are never moved (a Cast follows them). Returns the records of the moved nodes, in graph order. Raises
    StexportError when a graph output would change type."""
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    g = proto.graph
    types = _types(proto)
    producer = {o: n for n in g.node for o in n.output}
    island: dict[int, object] = {}
    for n in g.node:
        if n.op_type != "Constant":
            record = pick(n)
            if record is not None:
                island[id(n)] = record
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    up: dict[str, str] = {}  # FP16 tensor -> its FP32 copy
    down: dict[str, str] = {}  # island output -> its FP16 cast
    added: list[onnx.NodeProto] = []
    rank = {id(n): float(i) for i, n in enumerate(g.node)}
    for n in g.node:
        if id(n) not in island:
            continue
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == F16:
                    a.i = F32
        for k, t in enumerate(n.input):
            if not t or types.get(t) != F16 or (t in producer and id(producer[t]) in island):
                continue
            if t not in up:
                up[t] = f"{t}_fp32"
                if t in inits:
                    values = (weights or {}).get(t)
                    g.initializer.append(numpy_helper.from_array(
                        numpy_helper.to_array(inits[t]).astype(np.float32) if values is None
                        else np.asarray(values, np.float32), up[t]))
                else:
                    cast = helper.make_node("Cast", [t], [up[t]], name=f"{t}_to_fp32", to=F32)
                    rank[id(cast)] = rank[id(n)] - 0.5
                    added.append(cast)
            n.input[k] = up[t]
    for n in list(g.node):
        if id(n) in island:
            continue
        for k, t in enumerate(n.input):
            if t in producer and id(producer[t]) in island and types.get(t) == F16:
                if t not in down:
                    down[t] = f"{t}_fp16"
                    cast = helper.make_node("Cast", [t], [down[t]], name=f"{t}_to_fp16", to=F16)
                    rank[id(cast)] = rank[id(producer[t])] + 0.5
                    added.append(cast)
                n.input[k] = down[t]
    changed = {o for n in g.node if id(n) in island for o in n.output if types.get(o) == F16}
    if changed & outputs:
        raise StexportError(f"the FP16 graph's output {min(changed & outputs)} would have to be FP32; "
                            "please report this model configuration")
    for v in g.value_info:
        if v.name in changed:
            v.type.tensor_type.elem_type = F32
    ordered = stable_topo([*g.node, *added], rank, {t.name for t in g.initializer} | {i.name for i in g.input})
    used = {i for n in ordered for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(ordered)
    del g.initializer[:]
    g.initializer.extend(kept)
    return [island[id(n)] for n in ordered if id(n) in island]


LAYER_OPS = ("MatMul", "Gemm", "Conv")  # the layers the FP16 layer report ranks


def fp16_layers(proto: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm/Conv nodes of the FP16 graph `proto` that compute in FP16 (an FP16 output), in
    graph order: the layers `verify --layers` ranks in an FP16 bundle (nodes kept in FP32 are not among them)."""
    types = _types(proto)
    return [n.name for n in proto.graph.node
            if n.op_type in LAYER_OPS and n.name and types.get(n.output[0]) == onnx.TensorProto.FLOAT16]


def layers_in_fp32(proto: onnx.ModelProto, layers, only: bool = False, weights: dict | None = None
                   ) -> onnx.ModelProto:
    """A copy of the FP16 graph `proto` with the nodes named `layers` in FP32 (`in_fp32`), or with `only`,
    every FP16 node but those in FP32: the FP32 graph with only `layers` in FP16. weights: FP32 values of
    initializers by name (`fp32_weights`) for the nodes moved to FP32 (with `only`, also for the nodes the
    build kept in FP32, whose weights hold FP16 values); those without keep their FP16 values, stored as FP32."""
    F16 = onnx.TensorProto.FLOAT16
    q = onnx.ModelProto()
    q.CopyFrom(proto)
    names = set(layers)
    if only:
        types = _types(q)
        in_fp32(q, lambda n: n.name not in names and any(types.get(t) == F16 for t in (*n.input, *n.output))
                or None, weights)
        for t in q.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and t.name in (weights or {}):
                t.CopyFrom(numpy_helper.from_array(np.asarray(weights[t.name], np.float32), t.name))
    else:
        in_fp32(q, lambda n: n.name in names or None, weights)
    return q


def fp32_weights(fp16: onnx.ModelProto, fp32: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{float initializer name of the FP16 graph `fp16`: its FP32 values (float32 arrays)} from `fp32`, the same
    model exported in FP32 (the exporter names nodes and parameters after the model's modules,
    stexport.build.names): matched by initializer name, else by node name, op and input slot, and kept only
    where they are the graph's own values or round to them in FP16 (within one FP16 step), so a differently
    folded or wrong model matches nothing. The FP32 initializers of `fp16` (nodes the build kept in FP32: FP16
    values) are among them. Initializers without a match are left out (their FP16 values stay)."""
    inits16 = {t.name: t for t in fp16.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)}
    inits32 = {t.name: t for t in fp32.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    nodes32 = {n.name: n for n in fp32.graph.node if n.name}
    pairs = [(name, name) for name in inits16 if name in inits32]
    for n in fp16.graph.node:
        m = nodes32.get(n.name)
        if m is not None and m.op_type == n.op_type:
            pairs += [(t16, t32) for t16, t32 in zip(n.input, m.input) if t16 in inits16 and t32 in inits32]
    out: dict[str, np.ndarray] = {}
    for t16, t32 in pairs:
        if t16 in out or tuple(inits16[t16].dims) != tuple(inits32[t32].dims):
            continue
        own = numpy_helper.to_array(inits16[t16]).astype(np.float32)
        values = numpy_helper.to_array(inits32[t32]).astype(np.float32)
        with np.errstate(over="ignore"):
            rounded = values.astype(np.float16).astype(np.float32)
        if np.array_equal(values, own) or np.all(np.abs(rounded - own) <= np.abs(own) * 2.0 ** -10 + 2.0 ** -24):
            out[t16] = values
    return out


def _refuse(over: list, finite: bool, out: np.ndarray, clips: np.ndarray, source: str, fallback: str = "",
            first: str | None = None):
    """Raise the refusal. over: (peak, name) largest first; first: the overflowing activation that the forward
    reaches first (what the layers after it carry is blamed on it)."""

    def listed(items):
        return ", ".join(f"{_layer(k)} reaches {v:,.0f}" for v, k in items[:4]) + (" …" if len(items) > 4 else "")

    weights = [(v, k[: -len(" (weight)")]) for v, k in over if k.endswith(" (weight)")]
    acts = [(v, k) for v, k in over if not k.endswith(" (weight)")]
    what = []
    if weights:
        what.append(f"weights FP16 cannot store (they become ±Inf): {listed(weights)}")
    if acts:
        what.append(f"activations leave FP16's range (±{FP16_MAX:,.0f}): {listed(acts)}, so runtimes that "
                    "compute in FP16 (GPUs, TensorRT) get ±Inf and then NaN logits")
    if not finite:
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        what.append(f"the FP16 graph{fallback} returned NaN/Inf logits on ONNX Runtime for {bad} of {len(out)} "
                    "clips")
    names = [k for _, k in weights] or [first or k for _, k in acts[:1]]
    where = ("The adapters' or head's values" if names and all(map(_is_delta, names)) else
             "The backbone's values (typical of weights trained in BF16)" if names and not any(map(_is_delta, names))
             else "The model's values")
    fixes = ("--fp16-overflow fp32 (keeps the overflowing nodes in FP32 inside the FP16 graph), "
             if weights == [] and acts and not fallback else "")
    raise StexportError(f"--precision fp16 refused: {'; '.join(what)} (checked on {len(clips)} {source}). "
                        f"{where} do not fit FP16; build with {fixes}--precision fp32, or int8 (its float parts "
                        "are FP32; check it with verify)")


def _is_delta(name: str) -> bool:
    """Whether a folded module name belongs to the task's deltas (adapters, head) rather than the backbone."""
    return name.startswith("head") or ".pre_attn" in name or ".pre_mlp" in name  # fold.task_parameters' rule


def check_fp16_graph(reference, onnx_path: Path, input_format: str, frames: int, size: int, sampling: dict,
                     calib=None, overflow: str = "fp32", tasks: int = 0) -> dict:
    """Check the FP16 ONNX at `onnx_path` against the FP32 model on a few clips (see the module docstring).

    overflow: "fp32" keeps the nodes whose activations leave FP16's range in FP32 (the graph at `onnx_path` is
    rewritten; see keep_fp32), "refuse" refuses the build instead.
    Returns the record for the manifest: {clips, source, max_abs_activation, layer, fp16_max, max_abs_logit_diff,
    top1_agreement, overflow, fp32_nodes, overflow_layers (the folded model's modules whose FP32 output leaves
    FP16's range: {layer, max_abs_activation})}. Raises StexportError naming the overflowing layers when FP16 cannot
    store a weight, or (overflow "refuse", or still after the FP32 fallback) cannot hold the activations or
    the FP16 logits are not finite.
    tasks: a multi-task graph of that many tasks (stexport.build.multitask): `reference` is then its FP32
    MultiTaskViT, and clip i runs as task i % tasks on both.
    """
    from stexport.onnx_graph import check, save

    if overflow not in FP16_OVERFLOW:
        raise StexportError(f"--fp16-overflow {overflow}: choose one of {', '.join(FP16_OVERFLOW)}")
    if calib is not None:
        clips, source = calibration_clips(calib, frames, size, sampling), "calibration videos"
    else:
        clips, source = generated_clips(frames, size), "generated clips"
    peaks, ref_logits = activation_peaks(reference, clips, input_format, tasks)
    out = run_onnx(Path(onnx_path), clips, input_format, tasks)
    over = sorted(((v, k) for k, v in peaks.items() if not v <= FP16_MAX), reverse=True)
    # peaks holds the activations in the order the forward finished them
    first = next((k for k, v in peaks.items() if not v <= FP16_MAX and not k.endswith(" (weight)")), None)
    finite = bool(np.isfinite(out).all())
    fp32_nodes: list[dict] = []
    if over or not finite:
        if overflow == "refuse" or any(k.endswith(" (weight)") for _, k in over):
            _refuse(over, finite, out, clips, source, first=first)
        proto = onnx.load(str(onnx_path))
        fp32_nodes = keep_fp32(proto, fp16_peaks(proto, clips, input_format, tasks))
        save(proto, Path(onnx_path), external_data=bool(external_files(Path(onnx_path))))
        check(Path(onnx_path))
        del proto
        out = run_onnx(Path(onnx_path), clips, input_format, tasks)
        if not np.isfinite(out).all() or not fp32_nodes:
            _refuse(over, False, out, clips, source, fallback=f" with {len(fp32_nodes)} nodes kept in FP32",
                    first=first)
    out = out[:, :ref_logits.shape[1]]  # a swappable base's head has rows beyond a smaller pack's classes
    top = peaks and max(peaks.items(), key=lambda kv: kv[1])
    top = (_layer(top[0]), top[1])
    if fp32_nodes:  # the FP32 nodes' activations, seen on the graph itself (LayerNorm outputs, residual adds)
        worst = max(fp32_nodes, key=lambda r: r["max_abs_activation"])
        if worst["max_abs_activation"] > top[1]:
            top = (worst["node"], worst["max_abs_activation"])
    return {"clips": len(clips), "source": source, "max_abs_activation": round(top[1], 3),
            "layer": top[0], "fp16_max": FP16_MAX,
            "max_abs_logit_diff": float(np.abs(out.astype(np.float64) - ref_logits).max()),
            "top1_agreement": float((out.argmax(1) == ref_logits.argmax(1)).mean()), "passed": True,
            "overflow": overflow, "fp32_nodes": fp32_nodes,
            "overflow_layers": [{"layer": _layer(k), "max_abs_activation": round(v, 1)} for v, k in over]}
