"""One backbone, many tasks (issue 23): a swappable base + task packs vs a full bundle per task, on the motion demo.

    python benchmarks/tasks.py --videos DIR_WITH_val.txt_AND_train.txt [--work DIR] [--precision fp32,int8]

Builds, per precision: a swappable base from examples/motion/motion_adapter.pt, full bundles of both demo
tasks (motion_adapter.pt and motion_adapter_seed1.pt: the same recipe, seed 1, 200 steps), and the second
task's pack. Reports, per runtime (ONNX Runtime, OpenVINO):
- each task's logits on the base (its own, and the pack) vs its full export on the val videos: max |Δlogit|
  (FP32 gate 1e-4) and top-1 agreement (INT8: verify's gate, ≥ 95% without labels; accuracy with labels);
- bytes on disk for N tasks: N full bundles vs one base + N-1 packs;
- resident memory (RSS of a fresh process): two full bundles loaded vs the base with two tasks prepared;
- time to switch task (set_task on a prepared pack; the first set_task of a pack, which prepares it) vs
  opening a fresh bundle;
- ms/clip at batch 1 (median of interleaved rounds) of a pack on the base vs its plain full bundle.
The demo model is small (4 blocks, width 192, 96 px): relative costs on ViT-B/16 differ (say so when quoting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent / "examples" / "motion"
TASKS = {"motion": HERE / "motion_adapter.pt", "motion_seed1": HERE / "motion_adapter_seed1.pt"}


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def rss_child(code: str) -> float:
    """Peak RSS (MB) of a fresh Python running `code`: VmHWM (ru_maxrss would carry the forking parent's over
    exec)."""
    full = code + ("\nprint(next(int(ln.split()[1]) for ln in open('/proc/self/status') "
                   "if ln.startswith('VmHWM')) / 1024)")
    out = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=Path, required=True, help="folder with val.txt (and train.txt for INT8)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stexport-tasks-bench"))
    ap.add_argument("--precision", default="fp32,int8")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    from stexport import backends
    from stexport.build import build_bundle
    from stexport.packing import build_pack
    from stexport.video import Sampling, decode_clips, read_clip_list

    os.environ.setdefault("STEXPORT_CALIB_CACHE", str(a.work / "calibration"))
    a.work.mkdir(parents=True, exist_ok=True)
    bb = dict(backbone="stexport-demo-vit", pretrained=str(HERE / "backbone.safetensors"), force=True)
    report = {}
    for precision in a.precision.split(","):
        extra = dict(calib=str(a.videos / "train.txt"), calib_clips=32) if precision == "int8" else {}
        w = a.work / precision
        base = build_bundle(TASKS["motion"], out=w / "base", precision=precision, swappable=True, **bb, **extra)
        full = {k: build_bundle(v, out=w / f"full-{k}", precision=precision, **bb, **extra) for k, v in TASKS.items()}
        t = time.perf_counter()
        pack = build_pack(TASKS["motion_seed1"], base, out=w / "motion_seed1.stpack", force=True,
                          **({"calib": extra["calib"]} if extra else {}))
        pack_s = time.perf_counter() - t
        sampling = Sampling.from_manifest(base.manifest)
        entries = read_clip_list(a.videos / "val.txt")
        views = [decode_clips(str(p), sampling) for p, _ in entries]
        clips = np.concatenate(views)
        labels = np.repeat([lb for _, lb in entries], [len(v) for v in views])  # per view
        r = {"pack_build_s": round(pack_s, 2), "pack_bytes": pack.path.stat().st_size,
             "pack_tensor_bytes": pack.nbytes(), "base_bytes": dir_bytes(base.path),
             "full_bundle_bytes": {k: dir_bytes(v.path) for k, v in full.items()}, "val_videos": len(entries), "val_views": len(clips)}
        fb = r["full_bundle_bytes"]["motion"]
        r["disk_bytes_for_n_tasks"] = {n: {"full_bundles": n * fb, "base_plus_packs": r["base_bytes"] + (n - 1) * r["pack_bytes"]}
                                       for n in (2, 10, 100)}
        for name in ("onnxruntime", "openvino"):
            rr = {}
            t = time.perf_counter()
            be = backends.create(name, base)
            rr["open_base_s"] = time.perf_counter() - t
            t = time.perf_counter()
            be.set_task(pack)
            be.run(clips[:1])
            rr["first_switch_s"] = time.perf_counter() - t  # prepares the pack (+ OpenVINO's compile)
            switch = []
            for _ in range(10):
                t = time.perf_counter(); be.set_task(None); be.set_task(pack); switch.append(time.perf_counter() - t)
            rr["switch_s"] = float(np.median(switch))
            be.set_task(None)
            got = {"motion": be.run(clips), "motion_seed1": be.run(clips, task=pack)}
            want = {}
            for k, b in full.items():
                t = time.perf_counter()
                with backends.create(name, b) as fbe:
                    fbe.run(clips[:1])
                    if k == "motion_seed1":
                        rr["open_fresh_bundle_s"] = time.perf_counter() - t
                    want[k] = fbe.run(clips)
            for k in got:
                rr[k] = {"max_abs": float(np.abs(got[k] - want[k]).max()),
                         "top1_agreement": float((got[k].argmax(1) == want[k].argmax(1)).mean()),
                         "top1_accuracy_base": float((got[k].argmax(1) == labels).mean()),
                         "top1_accuracy_full": float((want[k].argmax(1) == labels).mean())}
            with backends.create(name, full["motion_seed1"]) as plain:
                x = clips[:1]
                plain.run(x); be.run(x, task=pack)
                tp, tq = [], []
                for _ in range(a.rounds):
                    t = time.perf_counter(); plain.run(x); tp.append(time.perf_counter() - t)
                    t = time.perf_counter(); be.run(x, task=pack); tq.append(time.perf_counter() - t)
            rr["ms_per_clip"] = {"plain_bundle": 1e3 * float(np.median(tp)), "pack_on_base": 1e3 * float(np.median(tq))}
            be.close()
            imp = "from stexport import backends; from stexport.bundle import Bundle; import numpy as np\n"
            x_shape = f"np.zeros((1, {base.frames}, {base.size}, {base.size}, 3), np.uint8)"
            rr["rss_mb"] = {
                "two_full_bundles": rss_child(imp + "\n".join(
                    f"b{i} = backends.create('{name}', Bundle.load('{full[k].path}')); b{i}.run({x_shape})"
                    for i, k in enumerate(full))),
                "base_plus_two_tasks": rss_child(imp + f"b = backends.create('{name}', Bundle.load('{base.path}'))\n"
                                                 f"b.run({x_shape}); b.run({x_shape}, task='{pack.path}')"),
            }
            r[name] = rr
        report[precision] = r
        print(json.dumps({precision: r}, indent=1), flush=True)
    out = a.work / "tasks.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
