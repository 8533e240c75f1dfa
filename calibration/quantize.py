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

import numpy as np
import onnx
from stexport.calibration.clips import ClipSet, batches, choose
from stexport.calibration.qdq import insert_qdq, quant_targets, ranges_by_node, ranges_for
from stexport.calibration.ranges import PERCENTILE, RangeCollector
from tqdm import tqdm

from stexport.bundle.manifest import InputRecord
from stexport.bundle.multitask import round_robin_feed
from stexport.bundle.store import default_home
from stexport.errors import StexportError
from stexport.fileutil import json_bytes, write_cache
from stexport.onnx_graph import check, save

log = logging.getLogger("stexport")


def cache_dir() -> Path:
    return Path(os.environ.get("STEXPORT_CALIB_CACHE", default_home().parent / "calibration"))


def model_hash(proto: onnx.ModelProto) -> str:
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


BIG_PROTO = (1 << 31) - (1 << 26)  # larger protos go to ONNX Runtime as a file with external data


def _session(proto: onnx.ModelProto, workdir: Path | None, basic: bool = True):
    import onnxruntime as ort

    from stexport.runtime.backends.ort import session_options

    # basic: keep extra outputs' producers unfused: the ranges must be those of the tensors Q/DQ will see
    so = session_options("basic" if basic else "all")
    if proto.ByteSize() > BIG_PROTO:
        path = Path(workdir or ".") / "calibration.onnx"
        save(proto, path, external_data=True)
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def collect(proto: onnx.ModelProto, tensors: list[str], clips: ClipSet, sampling, method: str,
            input_spec: InputRecord, workdir: Path | None = None, progress: bool = False,
            channels=(), keep: int = 0, tasks: int = 0):
    """Run the FP32 graph on every calibration clip with the statistics of `tensors` as extra outputs (see
    calibration.ranges: reductions computed in the graph, streamed clip by clip); their thresholds.

    With `channels` (a subset of `tensors`) or `keep`, returns (thresholds, {tensor: per-channel (min, max)},
    [(feed, logits)] of the first `keep` clips) instead. Memory does not grow with the number of clips: one
    clip's feed and the running statistics (`keep` clips' feeds and logits).
    tasks: a multi-task graph's task count: clip i runs as task i % tasks (round_robin_feed)."""
    ranges = RangeCollector(method, channels=channels)
    g = proto.graph
    sizes = len(g.node), len(g.output), len(g.initializer)
    big = proto.ByteSize() > BIG_PROTO
    aug = proto
    if big:  # saved with external data, which rewrites the proto: a copy
        aug = onnx.ModelProto()
        aug.CopyFrom(proto)
    try:
        ranges.instrument(aug, tensors)
        session = _session(aug, workdir)
    finally:  # the graph as it came (no copy of a model that fits in one protobuf)
        if not big:
            del g.node[sizes[0]:], g.output[sizes[1]:], g.initializer[sizes[2]:]
        del aug
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    kept = []
    for i, views in enumerate(tqdm(batches(clips, sampling), total=len(clips), desc="calibrate", unit="clip",
                                   disable=None if progress else True, leave=False)):
        feed = round_robin_feed(inputs, input_spec.feed(views), i, tasks)
        outs = session.run(None, feed)
        ranges.add_outputs(dict(zip(names, outs)))
        if len(kept) < keep:
            kept.append((feed, outs[0]))
        del outs
    if not channels and not keep:
        return ranges.amax()
    return ranges.amax(), ranges.channel_range, kept


MIGRATE_ALPHAS = (0.25, 0.5, 0.75)  # the α tried by migrate="auto" (0.5: SmoothQuant's default)
SELECT_CLIPS = 8  # calibration clips the candidates are compared on


def _logits(proto: onnx.ModelProto, kept: list, workdir: Path | None) -> np.ndarray:
    session = _session(proto, workdir, basic=False)
    return np.concatenate([session.run(None, feed)[0] for feed, _ in kept])


def _migrated_amax(steps: dict, stats: dict, found: list, amax: dict) -> dict:
    """Minmax thresholds of the migrated graph, from the per-channel statistics (x/s, or (x − δ)/s)."""
    out = dict(amax)
    tensor = {site.readers[0]: site.tensor for site in found}
    for head, st in steps.items():
        lo, hi = stats[tensor[head]]
        lo, hi = (lo - st["shift"]) / st["s"], (hi - st["shift"]) / st["s"]
        name = tensor[head] if st["kind"] == "norm" else f"{head}.smoothed"
        out[name] = float(np.maximum(np.abs(lo), np.abs(hi)).max())
    return out


def _quantized(proto: onnx.ModelProto, steps: dict, amax: dict, names: list[str]) -> onnx.ModelProto:
    from stexport.calibration import smooth

    q = onnx.ModelProto()
    q.CopyFrom(proto)
    smooth.apply(q, steps)
    return insert_qdq(q, amax, names)


def choose_migration(proto: onnx.ModelProto, names: list[str], found: list, stats: dict, amax: dict,
                     kept: list, migrate, workdir: Path | None = None) -> tuple[dict, dict | None]:
    """The migration plan to use and its manifest record (None when off). migrate: "off", a float α (norm and
    stream sites at that α), or "auto": each candidate (none; norm sites, then norm and stream sites, at each of
    MIGRATE_ALPHAS) is quantized and run on the kept calibration clips, and the one with the
    smallest mean |Δlogit| against the FP32 graph wins (ties keep the simpler one)."""
    from stexport.calibration import smooth

    if migrate == "off":
        return {}, {"alpha": None, "why": "off: --int8-migrate off, or a swappable bundle (its backbone is shared "
                                          "by every task)"}
    if not found:
        return {}, {"alpha": None, "why": "no LayerNorm or adapter input to migrate"}
    if migrate != "auto":
        alpha = float(migrate)
        steps = smooth.plan(proto, found, stats, alpha)
        return steps, smooth.record(steps, alpha, [], 0)
    ref = np.concatenate([logits for _, logits in kept])

    def score(steps: dict) -> float:
        out = _logits(_quantized(proto, steps, _migrated_amax(steps, stats, found, amax), names), kept, workdir)
        return float(np.abs(out.astype(np.float64) - ref).mean())

    tried = [{"alpha": None, "stream": False, "mean_abs_logit_diff": score({})}]
    best, best_steps = tried[0], {}
    streams = (False, True) if any(site.kind == "stream" for site in found) else (False,)
    for stream in streams:
        for alpha in MIGRATE_ALPHAS:
            steps = smooth.plan(proto, found, stats, alpha, stream=stream)
            tried.append({"alpha": alpha, "stream": stream, "mean_abs_logit_diff": score(steps)})
            if tried[-1]["mean_abs_logit_diff"] < best["mean_abs_logit_diff"]:
                best, best_steps = tried[-1], steps
    for t in tried:
        log.info("migration candidate alpha=%s stream=%s: mean |dlogit| %.4g on %d calibration clips",
                 t["alpha"], t["stream"], t["mean_abs_logit_diff"], len(kept))
    if not best_steps:
        return {}, {"alpha": None, "norm_sites": 0, "stream_sites": 0, "chosen_on_clips": len(kept),
                    "candidates": tried, "scheme": "none (no candidate beat plain per-tensor ranges)"}
    return best_steps, smooth.record(best_steps, best["alpha"], tried, len(kept))


def _steps_json(steps: dict) -> dict:
    return {k: {**v, "s": np.asarray(v["s"]).tolist(), "shift": np.asarray(v["shift"]).tolist()}
            for k, v in steps.items()}


def quantize_bundle_model(onnx_path: Path, calib, frames: int, size: int, sampling: dict, clips: int = 32,
                          method: str = "minmax", seed: int = 0, input_spec: InputRecord | None = None,
                          progress: bool = False, external_data: bool | None = None, use_cache: bool = True,
                          on_calibrated=None, attention: bool = False, float_graph: Path | None = None,
                          migrate="auto", fallback=None, tasks: int = 0) -> dict:
    """Rewrite the FP32 graph at `onnx_path` as INT8 Q/DQ in place; returns the manifest's `calibration`.

    migrate: outlier migration before quantization (calibration.smooth): "auto" (default: chosen on the
    calibration clips, see choose_migration), "off", or an α in [0, 1]. Recorded as `migration`.
    float_graph: an FP16 export of the same model (fold(compute_dtype=float16)). Ranges are calibrated on the
    FP32 graph (as TensorRT's ModelOpt does), then the Q/DQ pairs go into the FP16 graph, which replaces the
    one at `onnx_path`: INT8 GEMMs with FP16 float parts (LayerNorm/Softmax statistics stay FP32 as the FP16
    graph has them). The file at `float_graph` is removed.
    fallback: called as fallback(graph ready for Q/DQ, ranges, layer names, float type) before the Q/DQ go in;
    returns (layers to leave in float, their record), stored as `float_fallback` (stexport.build.fallback).
    tasks: the task count of a multi-task graph (stexport.build.multitask; its second input, the task index):
    calibration clip i runs as task i % tasks, so the shared backbone's ranges are those of every task's clips.
    Its adapters' GEMMs read gathered per-task weights (no weight initializer): they stay float."""
    from stexport.calibration import smooth

    from stexport.runtime.video import Sampling

    if migrate not in ("auto", "off"):
        try:
            ok = 0.0 <= float(migrate) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise StexportError(f"--int8-migrate {migrate}: use auto, off or an alpha between 0 and 1")
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
    names = [n.name for n in targets]
    inits = {t.name for t in proto.graph.initializer}
    tensors = sorted({t for n in targets for t in n.input[:2] if t not in inits})
    found = smooth.sites(proto, names) if migrate != "off" else []
    key_src = {"model": model_hash(proto), "clips": chosen.key(), "sampling": view.to_dict(),
               "method": method, "seed": seed, "percentile": PERCENTILE if method == "percentile" else None,
               "attention": attention, "migrate": migrate, "format": 3,
               **({"tasks": tasks} if tasks else {})}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:32]
    cache = cache_dir() / f"{key}.json"
    amax, cached, steps, migration = None, False, {}, None
    if use_cache and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            steps = {k: {**v, "s": np.asarray(v["s"]), "shift": np.asarray(v["shift"])}
                     for k, v in stored.get("steps", {}).items()}
            migration = stored.get("migration")
            amax, cached = stored["amax"], True
        except (OSError, ValueError, KeyError):
            log.warning("%s: unreadable calibration cache entry; recalibrating", cache)
            amax, steps, migration = None, {}, None
    if amax is None:
        spec = input_spec or InputRecord(frames=frames, size=size)
        if found:
            amax, stats, kept = collect(proto, tensors, chosen, view, method, spec, onnx_path.parent, progress,
                                        channels={site.tensor for site in found},
                                        keep=SELECT_CLIPS if migrate == "auto" else 0, tasks=tasks)
            # minmax thresholds for choosing; the chosen graph is then calibrated with `method`
            plain = amax if method == "minmax" else {t: max(abs(stats[t][0]).max(), abs(stats[t][1]).max())
                                                    if t in stats else v for t, v in amax.items()}
            steps, migration = choose_migration(proto, names, found, stats, plain, kept, migrate,
                                                onnx_path.parent)
            if steps and method == "minmax":
                amax = _migrated_amax(steps, stats, found, amax)
            elif steps:
                moved = onnx.ModelProto()
                moved.CopyFrom(proto)
                smooth.apply(moved, steps)
                changed = sorted({n.input[0] for n in moved.graph.node if n.name in
                                  {r for st in steps.values() for r in st["readers"]}})
                amax = {**amax, **collect(moved, changed, chosen, view, method, spec, onnx_path.parent, progress,
                                          tasks=tasks)}
        else:
            amax = collect(proto, tensors, chosen, view, method, spec, onnx_path.parent, progress, tasks=tasks)
            steps, migration = choose_migration(proto, names, found, {}, amax, [], migrate)
        if use_cache:
            videos = [str(v) for v in chosen.videos]
            write_cache(cache, json_bytes({"key": key_src, "amax": amax, "videos": videos,
                                           "steps": _steps_json(steps), "migration": migration}),
                        "calibration", "STEXPORT_CALIB_CACHE")
    if on_calibrated:
        on_calibrated()
    smooth.apply(proto, steps)
    float_precision = "fp32"
    if float_graph is not None:
        by_node = ranges_by_node(proto, amax, names)
        proto = smooth.apply(onnx.load(str(float_graph)), steps)
        amax, float_precision = ranges_for(proto, by_node, names), "fp16"
        float_graph.unlink()
        data = float_graph.with_name(float_graph.name + ".data")
        data.unlink(missing_ok=True)
    float_fallback = None
    if fallback is not None:
        kept, float_fallback = fallback(proto, amax, names, float_precision)
        names = [n for n in names if n not in set(kept)]
    insert_qdq(proto, amax, names, float_precision=float_precision)
    save(proto, onnx_path, external_data if external_data is not None else proto.ByteSize() > (1 << 30))
    check(onnx_path)
    return {
        "method": method, "percentile": key_src["percentile"], "clips": len(chosen) - len(chosen.failed),
        "source": chosen.source,
        "seed": seed, "sampling": view.to_dict(),
        "quantized_layers": len(names), "activation_ranges": len(tensors), "cache_key": key,
        "cached": cached,
        "scheme": "int8 symmetric Q/DQ, zero point 0; weights per output channel, activations per tensor",
        "attention_scores_int8": attention,
        "float_precision": float_precision,
        "migration": migration,
        "float_fallback": float_fallback,
    }
