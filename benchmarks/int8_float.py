"""INT8 bundles with FP32 vs FP16 float parts (`build --int8-float`), on the CPU runtimes (not a test).

    .venv/bin/python benchmarks/int8_float.py [--val 90] [--iters 10] [--work /tmp/stexport-int8-float]

Model: the trained demo (examples/motion: stexport-demo-vit, 4 blocks, width 192, 96 px, 8 frames), INT8
calibrated on 64 generated train clips, verified on the first --val clips of the generated val split (the
PyTorch reference is the gate's yardstick, as `stexport verify` does). Speed: ms/clip at batch 1 (median of
--iters calls) and clips/s at batch 4, after warm-up. The FP16 float parts exist for TensorRT (a strongly typed
network runs them in the graph's type); on a CPU they show what the FP16 graph costs or saves there and that
it keeps the accuracy gate. ViT-B/16 rows: benchmarks/run_all.py (variant "int8f16").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "motion"
VIEWS = {"rate": 0, "temporal_views": 1, "spatial_views": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=int, default=90, help="val clips verified (of 270)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/stexport-int8-float"))
    args = ap.parse_args()

    from stexport.runtime.bench import clips_for, time_runner
    from stexport.runtime.backends import create, names
    from stexport.build.pipeline import build_bundle
    from stexport.build.verify import verify

    data = args.work / "motion"
    for split, n in (("train", 64), ("val", args.val)):
        if not (data / f"{split}.txt").is_file():
            subprocess.run([sys.executable, str(DEMO / "generate.py"), "--splits", split, "--out", str(data),
                            "--count", str(n)], check=True, capture_output=True)
    rows = []
    for fl in ("fp32", "fp16"):
        b = build_bundle(DEMO / "motion_adapter.pt", backbone="stexport-demo-vit",
                         pretrained=str(DEMO / "backbone.safetensors"), precision="int8", frames=8,
                         out=args.work / f"int8-{fl}", force=True, sampling=VIEWS, calib=data / "train.txt",
                         calib_clips=64, labels=data / "labels.txt", int8_float=fl)
        for backend in ("onnxruntime", "openvino"):
            if backend not in names():
                continue
            rep = verify(b, data / "val.txt", backend=backend)
            with create(backend, b) as be:
                t = time_runner(be.run, lambda n, b=b: clips_for(b, n), batches=(1, 4), iters=args.iters)
                compute = be.describe().get("compute_precision")
            rows.append((backend, fl, compute, rep, t))
    print(f"demo model, val clips: {args.val}; reference top-1 from verify\n")
    print("| runtime | INT8 float parts | compute | top-1 | ref top-1 | agreement | max |Δlogit| | gate "
          "| ms/clip b1 | clips/s b4 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for backend, fl, compute, rep, t in rows:
        m = rep["metrics"]
        acc = m.get("accuracy") or {}
        print(f"| {backend} | {fl} | {compute} | {acc.get('backend_top1', float('nan')):.1f}% | "
              f"{acc.get('reference_top1', float('nan')):.1f}% | {m['top1_agreement'] * 100:.1f}% | "
              f"{m['max_abs']:.3g} | {'pass' if rep['passed'] else 'FAIL'} | {t['latency_ms']['p50']:.1f} | "
              f"{t['throughput']['clips_per_s']:.1f} |")

if __name__ == "__main__":
    main()
