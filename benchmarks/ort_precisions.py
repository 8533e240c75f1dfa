"""PyTorch eager FP32 reference vs ONNX Runtime FP32 / FP16 / INT8, side by side in one run (not a test).

    .venv/bin/python benchmarks/ort_precisions.py [--rounds 7] [--threads 2] [--calib-clips 8] [--act gelu]

Model: ViT-B/16 (random FP16-representable weights with non-zero biases and LayerNorm affines) + 12 ST-Adapters
(12x384, before the MLP, kernel 3x1x1), 400 classes, 8 frames of 224 px, batch 1. Bundles are built with
stexport.build.pipeline.build_bundle into a temp dir (INT8 calibrated with minmax on --calib-clips smooth random clips).
Timing: one warm-up per runtime, then --rounds rounds that run every runtime once in turn (so load from other
work on the machine hits all alike); the median per runtime is reported, with its ratio to eager FP32.
Fidelity: each ORT variant against the reference on --eval-clips other clips (max |Δlogit|, cosine, top-1
agreement).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def trained_like(bb, seed: int = 1, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    for k, v in bb.state_dict.items():
        if k.endswith("bias") or ".ln_" in k or k.startswith("ln_"):
            bb.state_dict[k] = (v + scale * torch.randn(v.shape, generator=g)).half().float()
    return bb


def smooth_clips(n: int, size: int, frames: int = 8, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n * frames, 3, 4, 4), generator=g).float()
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    big = big.reshape(n, frames, 3, size, size).permute(0, 1, 3, 4, 2)
    return big.round().clamp(0, 255).to(torch.uint8).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-clips", type=int, default=8)
    ap.add_argument("--eval-clips", type=int, default=8)
    ap.add_argument("--act", choices=["gelu", "quick_gelu"], default="gelu",
                    help="gelu: open_clip ViT-B-16; quick_gelu: ViT-B-16-quickgelu (OpenAI CLIP weights)")
    ap.add_argument("--precisions", default="fp32,fp16,int8,int8-attn",
                    help="int8-attn: INT8 with the attention scores quantized too (build --int8-attention)")
    ap.add_argument("--work", default=None, help="where bundles go (default: a temp dir)")
    args = ap.parse_args()

    from stexport.build.backbone import random_backbone
    from stexport.runtime.backends import create
    from stexport.build.pipeline import build_bundle
    from stexport.build.deltas import Deltas, infer_spec
    from stexport.build.reference import build_reference, normalize
    from stexport.build.synthetic import random_deltas
    from stexport.build.verify import compare

    torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="stexport-ort-bench-")
    os.environ.setdefault("STEXPORT_CALIB_CACHE", os.path.join(work, "calibration"))
    name = "ViT-B-16" if args.act == "gelu" else "ViT-B-16-quickgelu"
    bb = trained_like(random_backbone(name))
    sd = random_deltas(bb.config, width=384)
    ref = build_reference(bb, Deltas(infer_spec(sd), sd))
    size = bb.config.image_size
    clip = smooth_clips(1, size, seed=99)
    evals = smooth_clips(args.eval_clips, size, seed=7)

    backends, fidelity = {}, {}
    for p in args.precisions.split(","):
        t = time.perf_counter()
        int8 = p.startswith("int8")
        b = build_bundle(sd, backbone=bb, precision="int8" if int8 else p, out=os.path.join(work, p), force=True,
                         calib=smooth_clips(args.calib_clips, size, seed=3) if int8 else None,
                         int8_attention=p == "int8-attn")
        print(f"built {p} in {time.perf_counter() - t:.0f} s", flush=True)
        backends[f"ORT {p}"] = create("onnxruntime", b, threads=args.threads)
    with torch.inference_mode():
        want = ref(normalize(torch.from_numpy(evals))).numpy()
    for label, be in backends.items():
        fidelity[label] = compare(want, np.concatenate([be.run(evals[i:i + 1]) for i in range(len(evals))]))

    def eager():
        with torch.inference_mode():
            ref(normalize(torch.from_numpy(clip)))

    runs = {"PyTorch eager fp32": eager, **{k: (lambda be=be: be.run(clip)) for k, be in backends.items()}}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)

    base = statistics.median(times["PyTorch eager fp32"])
    print(f"\n{name} + 12x384 adapters, 8x{size}, batch 1, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'runtime':22s} {'s/clip':>8s} {'min':>7s} {'max':>7s} {'speed-up':>9s}   fidelity vs reference")
    for k, ts in times.items():
        med = statistics.median(ts)
        f = fidelity.get(k)
        fid = (f"max|Δ| {f['max_abs']:.2g}  cos≥{f['cosine_min']:.5f}  top-1 agree {f['top1_agreement']:.0%}"
               if f else "(reference)")
        print(f"{k:22s} {med:8.3f} {min(ts):7.3f} {max(ts):7.3f} {base / med:8.2f}x   {fid}")


if __name__ == "__main__":
    main()
