"""Does an FP16 graph hold this model's activations? Checked on real numbers right after the export.

FP16 tops out at 65,504. Backbones trained in BF16 (same range as FP32) can carry activation channels far beyond
that; their FP16 graph then computes ±Inf, and the next GEMM or LayerNorm turns it into NaN logits, with no
error from any runtime (ONNX Runtime's CPU provider computes FP16 nodes in FP32 and hides it; GPUs and TensorRT
do not). `check_fp16_graph` runs the FP32 folded model with a hook on every module whose output
the FP16 graph keeps in FP16 (patch embedding, adapters, attention projections and scores, MLP layers, each
block's residual stream), records the largest magnitude each reaches on a few clips, runs the written FP16
ONNX on ONNX Runtime on the same clips, and refuses the build (StexportError naming the layers, their largest
values and the fix) when an activation leaves FP16's range or the FP16 logits are not finite.

Clips: the first view of up to `CLIPS` calibration videos when `--calib` is given (decoded as `infer` decodes),
else generated ones (smooth random colour fields, plus one all-white and one all-black clip: the extremes of
uint8 input).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stexport.errors import StexportError

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


def activation_peaks(reference, clips: np.ndarray, input_format: str) -> tuple[dict[str, float], np.ndarray]:
    """Largest |output| of each module the FP16 graph runs in FP16 (and of each weight it stores in FP16),
    from the FP32 folded model; and its logits (N, classes)."""
    from stexport.build.fold import Norm, fold

    model = fold(reference, input_format, compute_dtype=torch.float32)
    peaks: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not name or name.startswith(("ln_", "head")) or isinstance(mod, Norm) or name == "blocks":
            continue
        for pname, param in mod.named_parameters(recurse=False):  # weights FP16 must store too
            peaks[f"{name}.{pname} (weight)"] = float(param.detach().abs().max())

        def hook(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                peaks[name] = max(peaks.get(name, 0.0), float(out.detach().abs().max()))

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(_to_input(clips, input_format))).numpy()
    finally:
        for h in hooks:
            h.remove()
    return peaks, logits


def run_onnx(onnx_path: Path, clips: np.ndarray, input_format: str) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # ONNX Runtime 1.32's CPU provider crashes on FP16 graphs at ORT_ENABLE_ALL (see README)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = _to_input(clips, input_format)
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])


def _layer(name: str) -> str:
    """'blocks.3.fc' → 'block 3 fc' for messages."""
    parts = name.split(".")
    return f"block {parts[1]} {'.'.join(parts[2:]) or 'output'}" if parts[0] == "blocks" else name


def check_fp16_graph(reference, onnx_path: Path, input_format: str, frames: int, size: int, sampling: dict,
                     calib=None) -> dict:
    """Check the FP16 ONNX at `onnx_path` against the FP32 model on a few clips (see the module docstring).

    Returns the record for the manifest: {clips, source, max_abs_activation, layer, fp16_max, max_abs_logit_diff,
    top1_agreement}. Raises StexportError naming the overflowing layers when FP16 cannot hold the activations
    or the FP16 logits are not finite.
    """
    if calib is not None:
        clips, source = calibration_clips(calib, frames, size, sampling), "calibration videos"
    else:
        clips, source = generated_clips(frames, size), "generated clips"
    peaks, ref_logits = activation_peaks(reference, clips, input_format)
    out = run_onnx(Path(onnx_path), clips, input_format)
    over = sorted(((v, k) for k, v in peaks.items() if not v <= FP16_MAX), reverse=True)
    weights = [(v, k[: -len(" (weight)")]) for v, k in over if k.endswith(" (weight)")]
    acts = [(v, k) for v, k in over if not k.endswith(" (weight)")]
    finite = bool(np.isfinite(out).all())
    if over or not finite:
        def listed(items):
            return ", ".join(f"{_layer(k)} reaches {v:,.0f}" for v, k in items[:4]) + (" …" if len(items) > 4 else "")

        what = []
        if weights:
            what.append(f"weights FP16 cannot store (they become ±Inf): {listed(weights)}")
        if acts:
            what.append(f"activations leave FP16's range (±{FP16_MAX:,.0f}): {listed(acts)}, so runtimes that "
                        "compute in FP16 (GPUs, TensorRT) get ±Inf and then NaN logits")
        if not finite:
            bad = int((~np.isfinite(out)).any(axis=1).sum())
            what.append(f"the FP16 graph returned NaN/Inf logits on ONNX Runtime for {bad} of {len(out)} clips")
        raise StexportError(f"--precision fp16 refused: {'; '.join(what)} (checked on {len(clips)} {source}). "
                            "The backbone's values (typical of weights trained in BF16) do not fit FP16; "
                            "build --precision fp32, or int8 (its float parts are FP32; check it with verify)")
    top = peaks and max(peaks.items(), key=lambda kv: kv[1])
    return {"clips": len(clips), "source": source, "max_abs_activation": round(top[1], 3),
            "layer": _layer(top[0]), "fp16_max": FP16_MAX,
            "max_abs_logit_diff": float(np.abs(out.astype(np.float64) - ref_logits).max()),
            "top1_agreement": float((out.argmax(1) == ref_logits.argmax(1)).mean()), "passed": True}
