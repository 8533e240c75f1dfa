"""FP32 ONNX → INT8 Q/DQ ONNX: calibrate the transformer's linear-layer inputs on real clips, insert Q/DQ.

Calibration results are cached under `<stexport home>/calibration/<key>.json`; the key hashes the FP32 graph,
the chosen clips (paths, sizes, mtimes), the sampling and the method, so the same inputs give the same model
without running calibration again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import onnx
from stexport.calibration.clips import ClipSet, batches, choose
from stexport.calibration.qdq import insert_qdq, quant_targets, ranges_by_node, ranges_for
from stexport.calibration.ranges import PERCENTILE, RangeCollector
from tqdm import tqdm

from stexport.bundle.store import default_home
from stexport.errors import StexportError
from stexport.onnx_graph import check, save
from stexport.fileutil import atomic_write_json
from stexport.bundle.manifest import InputRecord

log = logging.getLogger("stexport")


def cache_dir() -> Path:
    return Path(os.environ.get("STEXPORT_CALIB_CACHE", default_home().parent / "calibration"))


def model_hash(proto: onnx.ModelProto) -> str:
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def collect(proto: onnx.ModelProto, tensors: list[str], clips: ClipSet, sampling, method: str,
            input_spec: InputRecord, workdir: Path | None = None,
            progress: bool = False) -> dict[str, float]:
    """Run the FP32 graph on every calibration clip with `tensors` as extra outputs; their thresholds."""
    import onnxruntime as ort

    aug = onnx.ModelProto()
    aug.CopyFrom(proto)
    known = {o.name for o in aug.graph.output}
    for t in tensors:
        if t not in known:
            aug.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Keep the extra outputs' producers unfused: the ranges must be those of the tensors Q/DQ will see.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if aug.ByteSize() > (1 << 31) - (1 << 26):
        path = Path(workdir or ".") / "calibration.onnx"
        save(aug, path, external_data=True)
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    else:
        session = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inp = session.get_inputs()[0].name
    ranges = RangeCollector(method)
    for views in tqdm(batches(clips, sampling), total=len(clips), desc="calibrate", unit="clip",
                      disable=None if progress else True, leave=False):
        outs = session.run(None, {inp: input_spec.feed(views)})
        ranges.add({n: o for n, o in zip(names, outs) if n in tensors})
    return ranges.amax()


def quantize_bundle_model(onnx_path: Path, calib, frames: int, size: int, sampling: dict, clips: int = 32,
                          method: str = "minmax", seed: int = 0, input_spec: InputRecord | None = None,
                          progress: bool = False, external_data: bool | None = None, use_cache: bool = True,
                          on_calibrated=None, attention: bool = False, float_graph: Path | None = None) -> dict:
    """Rewrite the FP32 graph at `onnx_path` as INT8 Q/DQ in place; returns the manifest's `calibration`.

    float_graph: an FP16 export of the same model (fold(compute_dtype=float16)). Ranges are calibrated on the
    FP32 graph (as TensorRT's ModelOpt does), then the Q/DQ pairs go into the FP16 graph, which replaces the
    one at `onnx_path`: INT8 GEMMs with FP16 float parts (LayerNorm/Softmax statistics stay FP32 as the FP16
    graph has them). The file at `float_graph` is removed."""
    from stexport.runtime.video import Sampling

    view = Sampling(frames=frames, size=size, **{k: sampling[k] for k in ("rate", "temporal_views",
                                                                           "spatial_views")})
    chosen = choose(calib, clips, seed)
    if chosen.arrays is not None and tuple(chosen.arrays.shape[1:]) != (frames, size, size, 3):
        raise StexportError(f"calibration clips have shape {tuple(chosen.arrays.shape[1:])}, the model takes "
                            f"({frames}, {size}, {size}, 3)")
    proto = onnx.load(str(onnx_path))
    targets = quant_targets(proto, attention)
    if not targets:
        raise StexportError(f"{onnx_path}: no linear layers to quantize (was it exported by stexport?)")
    inits = {t.name for t in proto.graph.initializer}
    tensors = sorted({t for n in targets for t in n.input[:2] if t not in inits})
    key_src = {"model": model_hash(proto), "clips": chosen.key(), "sampling": view.to_dict(),
               "method": method, "seed": seed, "percentile": PERCENTILE if method == "percentile" else None,
               "attention": attention}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:32]
    cache = cache_dir() / f"{key}.json"
    amax, cached = None, False
    if use_cache and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if set(stored["amax"]) >= set(tensors):
                amax, cached = stored["amax"], True
        except (OSError, ValueError, KeyError):
            log.warning("%s: unreadable calibration cache entry; recalibrating", cache)
    if amax is None:
        spec = input_spec or InputRecord(frames=frames, size=size)
        amax = collect(proto, tensors, chosen, view, method, spec, onnx_path.parent, progress)
        if use_cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            videos = [str(v) for v in chosen.videos]
            atomic_write_json(cache, {"key": key_src, "amax": amax, "videos": videos})
    if on_calibrated:
        on_calibrated()
    names = [n.name for n in targets]
    float_precision = "fp32"
    if float_graph is not None:
        by_node = ranges_by_node(proto, amax, names)
        proto = onnx.load(str(float_graph))
        amax, float_precision = ranges_for(proto, by_node, names), "fp16"
        float_graph.unlink()
        data = float_graph.with_name(float_graph.name + ".data")
        data.unlink(missing_ok=True)
    insert_qdq(proto, amax, names, float_precision=float_precision)
    save(proto, onnx_path, external_data if external_data is not None else proto.ByteSize() > (1 << 30))
    check(onnx_path)
    return {
        "method": method, "percentile": key_src["percentile"], "clips": len(chosen) - len(chosen.failed),
        "source": chosen.source,
        "seed": seed, "sampling": view.to_dict(),
        "quantized_layers": len(targets), "activation_ranges": len(tensors), "cache_key": key,
        "cached": cached,
        "scheme": "int8 symmetric Q/DQ, zero point 0; weights per output channel, activations per tensor",
        "attention_scores_int8": attention,
        "float_precision": float_precision,
    }
