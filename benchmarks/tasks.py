"""One backbone, many tasks: a swappable base + task packs vs a full bundle per task.

    python benchmarks/tasks.py --videos DIR_WITH_val.txt_AND_train.txt [--work DIR] [--precision fp32,int8]
    python benchmarks/tasks.py --model vit-b16 [--clips 8] [--work DIR] [--precision fp32,int8]

demo (default): per precision, a swappable base from examples/motion/motion_adapter.pt, full bundles of both
demo tasks (motion_adapter.pt and motion_adapter_seed1.pt: the same recipe, seed 1, 200 steps), and the second
task's pack, measured on the val videos (accuracy too). vit-b16: ViT-B/16 (random weights, FP16-representable
like OpenAI's; 8 frames of 224 px) with two random tasks of the paper's size (12 adapters of width 384 before
the MLP, kernel 3x1x1: 7.1 M parameters; 400 classes, and 174 classes on a 400-row head), measured on --clips
smooth random clips (INT8 calibrated on 8 others); no labels, so no accuracy. Reports, per runtime (ONNX
Runtime, OpenVINO):
- each task's logits on the base (its own, and the pack) vs its full export on the val videos: max |Δlogit|
  (FP32 gate 1e-4) and top-1 agreement (INT8: verify's gate, ≥ 95% without labels; accuracy with labels);
- bytes on disk for N tasks: N full bundles vs one base + N-1 packs;
- resident memory (RSS of a fresh process): two full bundles loaded vs the base with two tasks prepared;
- time to switch task (set_task on a prepared pack; the first set_task of a pack, which prepares it) vs
  opening a fresh bundle;
- ms/clip at batch 1 (median of interleaved rounds) of a pack on the base vs its plain full bundle.
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


def memory_cap() -> int:
    """Bytes of address space a measured child may take: 85% of this machine's memory (so a measurement that
    does not fit fails by itself instead of waking the kernel's OOM killer on a shared machine)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * 0.85)


def rss_child(code: str, cap: bool = False) -> float | str:
    """Peak RSS (MB) of a fresh Python running `code`: VmHWM (ru_maxrss would carry the forking parent's over
    exec). cap: limit its address space to memory_cap(); when it does not fit, returns 'over N MB' instead."""
    import resource

    full = code + ("\nprint(next(int(ln.split()[1]) for ln in open('/proc/self/status') "
                   "if ln.startswith('VmHWM')) / 1024)")
    limit = memory_cap()

    def preexec():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True,
                         preexec_fn=preexec if cap else None)
    if out.returncode != 0:
        if cap and ("bad_alloc" in out.stderr or "MemoryError" in out.stderr or "Failed to allocate" in out.stderr
                    or out.returncode < 0):
            return f"over {limit / 2**20:,.0f} MB (did not fit)"
        raise subprocess.CalledProcessError(out.returncode, "python -c ...", out.stdout, out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def smooth_clips(n: int, size: int, frames: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 (n, frames, size, size, 3) smooth random colour fields (bilinear 4x4 noise): image-like activations."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n * frames, 4, 4, 3)).astype(np.float32)
    big = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in small])
    return big.round().clip(0, 255).astype(np.uint8).reshape(n, frames, size, size, 3)


def demo_setup(a, precision: str, w: Path):
    """(base, {task: full bundle}, second task's pack, clips, per-clip labels, pack build seconds): the demo."""
    from stexport.build.pipeline import build_bundle
    from stexport.build.packing import build_pack
    from stexport.runtime.video import Sampling, decode_clips, read_clip_list

    bb = dict(backbone="stexport-demo-vit", pretrained=str(HERE / "backbone.safetensors"), force=True)
    extra = dict(calib=str(a.videos / "train.txt"), calib_clips=32) if precision == "int8" else {}
    base = build_bundle(TASKS["motion"], out=w / "base", precision=precision, swappable=True, **bb, **extra)
    full = {k: build_bundle(v, out=w / f"full-{k}", precision=precision, **bb, **extra) for k, v in TASKS.items()}
    t = time.perf_counter()
    pack = build_pack(TASKS["motion_seed1"], base, out=w / "motion_seed1.stpack", force=True,
                      **({"calib": extra["calib"]} if extra else {}))
    pack_s = time.perf_counter() - t
    sampling = Sampling.from_manifest(base.manifest)
    entries = read_clip_list(a.videos / "val.txt")
    views = [decode_clips(str(p), sampling) for p, _ in entries]
    labels = np.repeat([lb for _, lb in entries], [len(v) for v in views])  # per view
    return base, full, pack, np.concatenate(views), labels, pack_s


def vitb16_setup(a, precision: str, w: Path):
    """The same on ViT-B/16 with random weights and two random tasks of the paper's size; labels None."""
    from stexport.build.backbone import random_backbone
    from stexport.build.pipeline import build_bundle
    from stexport.build.deltas import save_official
    from stexport.build.packing import build_pack
    from stexport.build.synthetic import random_deltas

    if a.reuse and (w / "base" / "stexport.json").exists():
        from stexport.bundle.store import Bundle
        from stexport.bundle.taskpack import TaskPack

        base = Bundle.load(w / "base")
        full = {k: Bundle.load(w / f"full-{k}") for k in ("k400_like", "ssv2_like")}
        try:
            pack = TaskPack.load(w / "ssv2_like.stpack")
        except Exception:  # noqa: BLE001 - missing, or made by an older stexport: make it again
            pack = build_pack(w / "ssv2_like.pt", base, out=w / "ssv2_like.stpack", force=True,
                              **({"calib": smooth_clips(8, 224, seed=100), "calib_clips": 8} if precision == "int8" else {}))
        return base, full, pack, smooth_clips(a.clips, 224, seed=7), None, float("nan")
    bb = random_backbone("ViT-B-16-quickgelu")  # OpenAI CLIP, as the official ST-Adapter code runs it
    kw = dict(width=384, kernel=(3, 1, 1), pre_mlp=True)
    w.mkdir(parents=True, exist_ok=True)
    ckpt = {"k400_like": w / "k400_like.pt", "ssv2_like": w / "ssv2_like.pt"}
    save_official(ckpt["k400_like"], random_deltas(bb.config, num_classes=400, seed=0, **kw))
    save_official(ckpt["ssv2_like"], random_deltas(bb.config, num_classes=174, seed=1, **kw))
    extra = dict(calib=smooth_clips(8, 224, seed=100), calib_clips=8) if precision == "int8" else {}
    opts = dict(backbone=bb, precision=precision, frames=8, size=224, force=True, progress=True)
    base = build_bundle(ckpt["k400_like"], out=w / "base", swappable=True, max_classes=400, **opts, **extra)
    full = {k: build_bundle(v, out=w / f"full-{k}", **opts, **extra) for k, v in ckpt.items()}
    t = time.perf_counter()
    pack = build_pack(ckpt["ssv2_like"], base, out=w / "ssv2_like.stpack", force=True, backbone=bb,
                      **({"calib": extra["calib"]} if extra else {}))
    pack_s = time.perf_counter() - t
    return base, full, pack, smooth_clips(a.clips, 224, seed=7), None, pack_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("demo", "vit-b16"), default="demo")
    ap.add_argument("--videos", type=Path, help="demo: folder with val.txt (and train.txt for INT8)")
    ap.add_argument("--clips", type=int, default=8, help="vit-b16: clips compared per task")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--precision", default="fp32,int8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--backends", default="onnxruntime,openvino",
                    help="runtimes, each optionally with options: e.g. onnxruntime:tasks=adapters;threads=2")
    ap.add_argument("--reuse", action="store_true", help="vit-b16: reuse the bundles and pack of an earlier run in "
                    "--work (timing again without building)")
    a = ap.parse_args()
    if a.model == "demo" and a.videos is None:
        ap.error("--videos DIR is needed for the demo model (examples/motion/generate.py writes one)")
    a.work = a.work or Path(f"/tmp/stexport-tasks-bench-{a.model}")
    from stexport.runtime import backends

    os.environ.setdefault("STEXPORT_CALIB_CACHE", str(a.work / "calibration"))
    a.work.mkdir(parents=True, exist_ok=True)
    report = {}
    for precision in a.precision.split(","):
        w = a.work / precision
        setup = demo_setup if a.model == "demo" else vitb16_setup
        base, full, pack, clips, labels, pack_s = setup(a, precision, w)
        first, second = list(full)
        r = {"pack_build_s": round(pack_s, 2), "pack_bytes": pack.path.stat().st_size,
             "pack_tensor_bytes": pack.nbytes(), "base_bytes": dir_bytes(base.path),
             "full_bundle_bytes": {k: dir_bytes(v.path) for k, v in full.items()}, "clips": len(clips)}
        fb = r["full_bundle_bytes"][first]
        r["disk_bytes_for_n_tasks"] = {n: {"full_bundles": n * fb, "base_plus_packs": r["base_bytes"] + (n - 1) * r["pack_bytes"]}
                                       for n in (2, 10, 100)}
        for spec in a.backends.split(","):
            name, _, opt = spec.partition(":")  # e.g. onnxruntime:tasks=adapters
            opts = dict(kv.split("=", 1) for kv in opt.split(";") if kv)
            rr = {}
            t = time.perf_counter()
            be = backends.create(name, base, **opts)
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
            got = {first: be.run(clips), second: be.run(clips, task=pack)}
            want = {}
            for k, b in full.items():
                t = time.perf_counter()
                with backends.create(name, b) as fbe:
                    fbe.run(clips[:1])
                    if k == second:
                        rr["open_fresh_bundle_s"] = time.perf_counter() - t
                    want[k] = fbe.run(clips)
            for k in got:
                rr[k] = {"max_abs": float(np.abs(got[k] - want[k]).max()),
                         "top1_agreement": float((got[k].argmax(1) == want[k].argmax(1)).mean())}
                if labels is not None:
                    rr[k].update(top1_accuracy_base=float((got[k].argmax(1) == labels).mean()),
                                 top1_accuracy_full=float((want[k].argmax(1) == labels).mean()))
            with backends.create(name, full[second]) as plain:
                x = clips[:1]
                plain.run(x); be.run(x, task=pack)
                tp, tq = [], []
                for _ in range(a.rounds):
                    t = time.perf_counter(); plain.run(x); tp.append(time.perf_counter() - t)
                    t = time.perf_counter(); be.run(x, task=pack); tq.append(time.perf_counter() - t)
            rr["ms_per_clip"] = {"plain_bundle": 1e3 * float(np.median(tp)), "pack_on_base": 1e3 * float(np.median(tq))}
            be_describe = be.describe()
            be.close()
            imp = "from stexport import backends; from stexport.bundle.store import Bundle; import numpy as np\n"
            x_shape = f"np.zeros((1, {base.frames}, {base.size}, {base.size}, 3), np.uint8)"
            rr["describe"] = be_describe
            rr["rss_mb"] = {
                "two_full_bundles": rss_child(imp + "\n".join(
                    f"b{i} = backends.create('{name}', Bundle.load('{full[k].path}')); b{i}.run({x_shape})"
                    for i, k in enumerate(full))),
                "base_plus_two_tasks": rss_child(imp + f"b = backends.create('{name}', Bundle.load('{base.path}'), **{opts!r})\n"
                                                 f"b.run({x_shape}); b.run({x_shape}, task='{pack.path}')"),
            }
            r[spec] = rr
        report[precision] = r
        print(json.dumps({precision: r}, indent=1), flush=True)
    out = a.work / "tasks.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
