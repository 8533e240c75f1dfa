"""INT8 on planted-outlier stand-ins for real CLIP weights, without and with outlier migration (not a test).

    .venv/bin/python benchmarks/int8_outliers.py [--val 90] [--calib 32] [--work /tmp/stexport-int8-outliers]

Model: the trained demo (examples/motion: stexport-demo-vit, 4 blocks, width 192, 96 px, 8 frames) as shipped
("plain") and with exact planted outliers (stexport.build.outliers; the FP32 function is unchanged, so
`verify`'s reference, rebuilt from the shipped backbone, is the yardstick for every row): LayerNorm channels
×S (k channels per ln_1/ln_2, the readers' columns ÷S) at several S and k, and residual-stream offsets. Each is
built INT8 (minmax ranges on --calib generated train clips) with `int8_migrate="off"` (per-tensor ranges as
before) and "auto" (calibration.smooth, α chosen on the calibration clips), and verified on ONNX Runtime on the
first --val generated val clips. ratio: mean |Δlogit| over that of the plain demo without migration (the
done-when bar: ≤ 1.5, with top-5 agreement ≥ 95%). `--modes ...,gate` adds a row per stand-in built with
migration and the float fallback (stexport.build.fallback) gated on --min-agreement and --min-top5-agreement
on the calibration clips; its last column names the GEMMs it returned to float.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "motion"
VIEWS = {"rate": 0, "temporal_views": 1, "spatial_views": 1}
# (row name, kind, args): kind "norm" → plant_norm_outliers(scale, channels); "resid" → plant_residual_offset
# migration's scales are powers of two: on the demo, LN ×32 with migration gave plain's figures to the digit;
# ×40 is not a power of two
STAND_INS = [("plain", None, ()), ("LN ×32, k=6", "norm", (32.0, 6)), ("LN ×40, k=6", "norm", (40.0, 6)),
             ("LN ×128, k=2", "norm", (128.0, 2)),
             ("LN ×16, k=24", "norm", (16.0, 24)), ("residual +16", "resid", (16.0,)),
             ("residual +64", "resid", (64.0,))]


def demo_model(work: Path, calib: int, val: int):
    """(data folder with train/val lists of at least `calib`/`val` generated clips, the shipped demo backbone,
    its adapter state dict, the shipped FP32 reference model)."""
    from stexport.build.backbone import load_backbone
    from stexport.build.deltas import Deltas, infer_spec, load_deltas
    from stexport.build.reference import build_reference

    data = work / "motion"
    for split, n in (("train", calib), ("val", val)):
        if not (data / f"{split}.txt").is_file() or len((data / f"{split}.txt").read_text().splitlines()) < n:
            subprocess.run([sys.executable, str(DEMO / "generate.py"), "--splits", split, "--out", str(data),
                            "--count", str(n)], check=True, capture_output=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb0 = load_backbone("stexport-demo-vit", str(DEMO / "backbone.safetensors"))
    sd0 = dict(load_deltas(DEMO / "motion_adapter.pt").state_dict)
    # the shipped FP32 model: every stand-in computes its function, so it is every row's yardstick
    return data, bb0, sd0, build_reference(bb0, Deltas(infer_spec(sd0), sd0))


def outlier_size(bb, sd, clips) -> float:
    """The largest ratio, over the ln_1/ln_2 outputs of the model (backbone `bb`, adapter state dict `sd`) on
    `clips` (uint8, (n, frames, size, size, 3)), of a channel's max |activation| to the median channel's: the
    size of a stand-in's outlier channels (real CLIP ViTs: tens, see stexport.build.outliers). The residual
    offsets shift every channel alike, so they do not show here."""
    import torch

    from stexport.build.deltas import Deltas, infer_spec
    from stexport.build.reference import build_reference, normalize

    model = build_reference(bb, Deltas(infer_spec(sd), sd)).eval()
    peaks = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: peaks.append(o.abs().flatten(0, -2).amax(0)))
             for n, m in model.named_modules() if n.endswith(("ln_1", "ln_2"))]
    with torch.no_grad():
        model(normalize(torch.from_numpy(clips)))
    for h in hooks:
        h.remove()
    return max(float(p.max() / p.median()) for p in peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=int, default=90, help="val clips verified (of 270)")
    ap.add_argument("--calib", type=int, default=32, help="train clips calibrated on")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stexport-int8-outliers"))
    ap.add_argument("--only", default=None, help="row names to run, separated by ';' (default: all)")
    ap.add_argument("--modes", default="off,auto", help="comma-separated: off (no migration), auto (migration), "
                    "gate (migration + the float fallback, gated on the calibration clips)")
    ap.add_argument("--min-agreement", type=float, default=0.98, help="the 'gate' mode's top-1 agreement")
    ap.add_argument("--min-top5-agreement", type=float, default=0.98, help="the 'gate' mode's top-5 agreement")
    args = ap.parse_args()

    from stexport.build.fp16_check import calibration_clips
    from stexport.build.outliers import plant_norm_outliers, plant_residual_offset
    from stexport.build.pipeline import build_bundle
    from stexport.build.verify import verify

    data, bb0, sd0, reference = demo_model(args.work, args.calib, args.val)
    clips = calibration_clips(data / "train.txt", 8, 96, VIEWS)  # for outlier_size
    rows = []
    wanted = set(args.only.split(";")) if args.only else None
    for name, kind, a in STAND_INS:
        if wanted and name not in wanted:
            continue
        bb, sd = bb0, sd0
        if kind == "norm":
            bb = plant_norm_outliers(bb0, *a)
        elif kind == "resid":
            bb, sd = plant_residual_offset(bb0, sd0, *a)
        size = outlier_size(bb, sd, clips)
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            gate = {"min_agreement": args.min_agreement, "min_top5_agreement": args.min_top5_agreement} \
                if mode == "gate" else {}
            b = build_bundle(sd, backbone=bb, precision="int8", frames=8, out=args.work / "bundle", force=True,
                             sampling=VIEWS, calib=data / "train.txt", calib_clips=args.calib,
                             labels=data / "labels.txt", int8_migrate="off" if mode == "off" else "auto", **gate)
            built = time.perf_counter() - t0
            rep = verify(b, data / "val.txt", backend="onnxruntime", reference=reference)
            mig = b.manifest.calibration.migration or {}
            fb = b.manifest.calibration.float_fallback or {}
            floats = ",".join(r["layer"] for r in fb.get("float_layers", [])) if mode == "gate" else ""
            rows.append((name, mode, mig, rep["metrics"], rep["passed"], built, floats, size))
            print(f"done: {name} / {mode} ({built:.0f} s build) {floats}", file=sys.stderr, flush=True)
    base = next((m["mean_abs"] for n, mg, _, m, *_ in rows if n == "plain" and mg == "off"), None)
    print(f"demo model INT8 (ONNX Runtime), {args.calib} calibration clips, {args.val} val clips; "
          "reference: the shipped FP32 model; outlier ×: outlier_size on the FP32 model\n")
    print("| stand-in | outlier × | migration | chosen α (stream sites) | mean |Δlogit| | ratio to plain | max |Δlogit| "
          "| top-1 agr. | top-5 agr. | INT8 top-1 | ref top-1 | verify | float GEMMs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, migrate, mig, m, passed, _, floats, size in rows:
        acc = m.get("accuracy") or {}
        chosen = "-" if not mig or mig.get("alpha") is None else \
            f"{mig['alpha']} ({mig['stream_sites']})"
        ratio = f"{m['mean_abs'] / base:.2f}" if base else "-"
        print(f"| {name} | {size:.1f} | {migrate} | {chosen} | {m['mean_abs']:.4f} | {ratio} | {m['max_abs']:.3f} | "
              f"{m['top1_agreement'] * 100:.1f}% | {m['top5_agreement'] * 100:.1f}% | "
              f"{acc.get('backend_top1', float('nan')):.1f}% | {acc.get('reference_top1', float('nan')):.1f}% | "
              f"{'pass' if passed else 'FAIL'} | {floats or '-'} |")


if __name__ == "__main__":
    main()
