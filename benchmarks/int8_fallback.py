"""INT8 float fallback on a planted-outlier stand-in of the demo: layers kept in float, agreement, ms/clip (not a test).

    .venv/bin/python benchmarks/int8_fallback.py [--val 60] [--calib 16] [--scale 256] [--channels 6] \
        [--norms ln_2] [--min-agreement 0.98] [--max-float-layers N] [--work /tmp/stexport-int8-outliers]

Model: the trained demo (examples/motion: stexport-demo-vit, 4 blocks, width 192, 96 px, 8 frames) with exact
planted LayerNorm outliers (stexport.build.outliers.plant_norm_outliers: `--channels` channels of each block's
`--norms` ×`--scale`, the readers' columns ÷scale; the FP32 function is unchanged) and outlier migration off, so
per-tensor INT8 meets real-CLIP-like channels unaided. Built FP32, INT8, and INT8 with `min_agreement`
(stexport.build.fallback, gate measured on the calibration clips), then each verified on the first --val
generated val clips on ONNX Runtime and (if installed) OpenVINO against the shipped FP32 model. ms/clip: verify's
backend seconds per video (one call per video, 1 view, 2 cores shared with whatever else runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

VIEWS = {"rate": 0, "temporal_views": 1, "spatial_views": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=int, default=60, help="val clips verified")
    ap.add_argument("--calib", type=int, default=16, help="train clips calibrated on (and the gate's clips)")
    ap.add_argument("--scale", type=float, default=256.0)
    ap.add_argument("--channels", type=int, default=6)
    ap.add_argument("--norms", default="ln_2", help="LayerNorms planted: ln_2 (MLP input) and/or ln_1 (q, k, v)")
    ap.add_argument("--min-agreement", type=float, default=0.98)
    ap.add_argument("--max-float-layers", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/stexport-int8-outliers"))
    args = ap.parse_args()

    from int8_outliers import demo_model  # this folder's other benchmark: the same demo, data and reference

    from stexport.build.outliers import plant_norm_outliers
    from stexport.build.pipeline import build_bundle
    from stexport.build.verify import verify
    from stexport.runtime.backends import names

    data, bb0, sd, reference = demo_model(args.work, args.calib, args.val)
    bb = plant_norm_outliers(bb0, args.scale, args.channels, norms=tuple(args.norms.split(",")))
    common = {"backbone": bb, "frames": 8, "force": True, "sampling": VIEWS, "labels": data / "labels.txt"}
    int8 = {"precision": "int8", "calib": data / "train.txt", "calib_clips": args.calib, "int8_migrate": "off"}
    bundles = {"fp32": build_bundle(sd, precision="fp32", out=args.work / "fb-fp32", **common),
               "int8": build_bundle(sd, out=args.work / "fb-int8", **common, **int8),
               "int8 + fallback": build_bundle(sd, out=args.work / "fb-gated", min_agreement=args.min_agreement,
                                               max_float_layers=args.max_float_layers, **common, **int8)}
    fb = bundles["int8 + fallback"].manifest.calibration.float_fallback
    runtimes = [r for r in ("onnxruntime", "openvino") if r in names()]
    print(f"demo + {args.norms} x{args.scale:g} in {args.channels} channels each, migration off; gate: top-1 "
          f"agreement >= {args.min_agreement:.0%} on {fb['clips']} calibration clips; verified on {args.val} val "
          "clips against the shipped FP32 model\n")
    print(f"float layers: {', '.join(x['layer'] for x in fb['float_layers']) or 'none'} "
          f"(of {bundles['int8'].manifest.calibration.quantized_layers}); build-time ms/clip on ONNX Runtime: "
          + ", ".join(f"{k} {v:.1f}" for k, v in fb["ms_per_clip"].items() if k != "runtime") + "\n")
    print("| bundle | runtime | top-1 agr. | top-5 agr. | mean |Δlogit| | top-1 acc (ref) | ms/clip | gate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, b in bundles.items():
        for rt in runtimes:
            rep = verify(b, data / "val.txt", backend=rt, reference=reference, max_clips=args.val)
            m, acc = rep["metrics"], rep["metrics"].get("accuracy") or {}
            print(f"| {name} | {rt} | {m['top1_agreement']:.1%} | {m['top5_agreement']:.1%} | {m['mean_abs']:.4f} | "
                  f"{acc.get('backend_top1', float('nan')):.1f}% ({acc.get('reference_top1', float('nan')):.1f}%) | "
                  f"{1e3 * rep['seconds_per_video']['backend']:.1f} | {'pass' if rep['passed'] else 'FAIL'} |",
                  flush=True)


if __name__ == "__main__":
    main()
