"""INT8 multi-task bundle of the two demo tasks vs each task's own INT8 bundle (issue 33), ONNX Runtime and
OpenVINO on CPU.

    python examples/motion/generate.py --out demo-data --splits train,val
    python benchmarks/multitask_int8.py --data demo-data [--work DIR] [--compare-clips 90]

Builds the multi-task INT8 bundle (rate 0, 1x1 views, 64 calibration clips of DATA/train.txt, clip i run as
task i mod 2) and runs `verify --task` for each task on DATA/val.txt against its own FP32 reference, on each
backend; then builds each task's own INT8 bundle with the same options, verifies it (ONNX Runtime), and compares
its logits with the multi-task bundle's for that task on the first --compare-clips val clips. Prints one JSON
line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import HERE, TASKS, dir_bytes  # noqa: E402 - benchmarks/tasks.py

VIEWS = {"rate": 0, "temporal_views": 1, "spatial_views": 1}
BB = dict(backbone="stexport-demo-vit", pretrained=str(HERE / "backbone.safetensors"))


def summary(report: dict) -> dict:
    m = report["metrics"]
    return {"passed": report["passed"], "max_abs": m["max_abs"], "mean_abs": m["mean_abs"],
            "top1_agreement": m["top1_agreement"], "accuracy": m.get("accuracy"),
            "checks": report["checks"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the demo videos (examples/motion/generate.py --out)")
    ap.add_argument("--work", type=Path, default=None, help="where the bundles go (default: a temporary folder)")
    ap.add_argument("--compare-clips", type=int, default=90)
    a = ap.parse_args()

    from stexport.build.multitask import build_multitask
    from stexport.build.pipeline import build_bundle
    from stexport.build.verify import verify
    from stexport.runtime import backends
    from stexport.runtime.video import Sampling, decode

    work = a.work or Path(tempfile.mkdtemp(prefix="multitask-int8-"))
    calib, val, labels = a.data / "train.txt", a.data / "val.txt", HERE / "labels.txt"
    multi = build_multitask(list(TASKS.values()), out=work / "multitask-int8", **BB, names=list(TASKS),
                            labels=[labels] * len(TASKS), samplings=[VIEWS] * len(TASKS), precision="int8",
                            calib=calib, calib_clips=64, force=True)
    print(json.dumps({"multitask_int8_bytes": dir_bytes(multi.path)}), flush=True)
    for backend in ("onnxruntime", "openvino"):
        for task in TASKS:
            r = verify(multi, val, backend=backend, task=task, use_cache=False)
            print(json.dumps({"multitask_int8": task, "backend": backend, **summary(r)}), flush=True)
    paths = [line.split()[0] for line in val.read_text().splitlines() if line.strip()][:a.compare_clips]
    for task, ckpt in TASKS.items():
        own = build_bundle(ckpt, **BB, labels=str(labels), sampling=VIEWS, precision="int8", calib=str(calib),
                           calib_clips=64, out=work / f"{task}-int8", force=True)
        r = verify(own, val, backend="onnxruntime", use_cache=False)
        print(json.dumps({"own_int8": task, "backend": "onnxruntime", "bytes": dir_bytes(own.path), **summary(r)}),
              flush=True)
        s = Sampling.from_manifest(own.manifest)
        clips = np.concatenate([decode(val.parent / p, s).clips for p in paths])
        with backends.create("onnxruntime", own) as o, backends.create("onnxruntime", multi) as m:
            x, y = o.run(clips), m.run(clips, task=task)
        print(json.dumps({"own_vs_multitask_int8": task, "views": len(clips),
                          "max_abs": float(np.abs(x - y).max()),
                          "top1_agreement": float((x.argmax(1) == y.argmax(1)).mean())}), flush=True)


if __name__ == "__main__":
    main()
