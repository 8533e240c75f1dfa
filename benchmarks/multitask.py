"""Many tasks in one forward (issue 33): a multi-task bundle vs a swappable base + task packs vs a full bundle
per task, on the demo backbone (examples/motion) and on ViT-B/16, FP32.

    python benchmarks/multitask.py [--model demo,vit-b16] [--tasks 1,4,16] [--batches 8,32] [--rounds 5]
                                   [--runtimes onnxruntime,openvino] [--work DIR]

Tasks, demo: the two demo adapters (motion_adapter.pt, motion_adapter_seed1.pt), then random adapters of the
same layout (seeded; 9 classes each). vit-b16: OpenAI CLIP ViT-B/16 (QuickGELU) with random weights, 8 frames
at 224 px, and random adapters of the paper's size (width 384, kernel 3x1x1, before each MLP: 7.1 M
parameters a task), heads of 400 and 174 classes in turn (Kinetics-400 and SSv2 sized).

For each task count K: bytes on disk (one multi-task bundle; K full bundles; one base + K-1 packs, for K up to
--max-packs: a pack is a full build) and, on each of --runtimes, resident memory (peak RSS of a fresh process
that opens the model(s) and runs one batch of 8 per task: the multi-task bundle; the base with K-1 packs
prepared as that runtime prepares them; K full bundles: two built, each opened K/2 times: every task's graph
has the same shapes). For the largest K and for --max-packs, on ONNX Runtime: ms per clip of batches whose
clips have tasks drawn at random, run as one multi-task call vs today's one call per task in the batch
(packs on the base; full bundles), at each batch size (median of --rounds interleaved rounds). Prints one
JSON object (a list of them for several --model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import HERE, dir_bytes, memory_cap, rss_child, smooth_clips  # noqa: E402 - benchmarks/tasks.py

MODELS = {  # --model: the backbone (build keywords), its checkpoints' classes, and what the report calls it
    "demo": dict(bb=dict(backbone="stexport-demo-vit", pretrained=str(HERE / "backbone.safetensors")),
                 name="stexport-demo-vit (examples/motion)"),
    "vit-b16": dict(bb=dict(backbone="ViT-B-16-quickgelu", pretrained="none", frames=8),
                    name="ViT-B-16-quickgelu (random weights), 8 frames, adapters of width 384"),
}


def checkpoints(model: str, work: Path, k: int) -> list[Path]:
    from stexport.build.backbone import shape_config
    from stexport.build.deltas import as_deltas, save_official
    from stexport.build.synthetic import random_deltas

    bb = MODELS[model]["bb"]
    cfg = shape_config(bb["backbone"])
    if model == "demo":
        spec = as_deltas(HERE / "motion_adapter.pt").spec
        out = [HERE / "motion_adapter.pt", HERE / "motion_adapter_seed1.pt"][:k]
        kw = dict(width=spec.width, kernel=spec.kernel, pre_attn=bool(spec.pre_attn), pre_mlp=bool(spec.pre_mlp))
        classes = [spec.num_classes]
    else:
        out, kw, classes = [], dict(width=384, kernel=(3, 1, 1), pre_mlp=True), [400, 174]
    for i in range(len(out), k):
        p = work / f"task{i}.pt"
        if not p.exists():
            save_official(p, random_deltas(cfg, num_classes=classes[i % len(classes)], seed=100 + i, **kw))
        out.append(p)
    return out


def mixed_batches(multi, base, packs, full, batches: list[int], rounds: int, rng) -> dict:
    """ms per clip (median of `rounds`) of batches whose clips have tasks drawn at random among len(full):
    one multi-task call; one call per task in the batch on the base with `packs` (None: not measured); one
    call per task on its full bundle. Interleaved per round, same clips and tasks for all three."""
    from stexport.runtime import backends

    k, out = len(full), {}
    with backends.create("onnxruntime", multi) as mt, backends.create("onnxruntime", base) as sw:
        # a session per task, as K full bundles run, where K of them fit in memory (~4x the bundle's bytes
        # each, within a quarter of memory_cap: batch 32's activations need the rest); otherwise one per built
        # bundle, reused (ViT-B/16: a call's compute is the same, though a reused session's weights may still
        # be in cache)
        distinct = k * 4 * dir_bytes(full[0].path) < memory_cap() / 4
        opened = {}
        for i, f in enumerate(full):
            opened.setdefault(i if distinct else str(f.path), backends.create("onnxruntime", f))
        fulls = [opened[i if distinct else str(f.path)] for i, f in enumerate(full)]
        loaded = [None, *(sw.load_task(p) for p in packs)] if packs is not None else None
        for batch in batches:
            x = smooth_clips(batch, base.size, base.frames, seed=batch)
            times = {"multitask_one_call": [], "packs_call_per_task": [], "full_bundles_call_per_task": []}
            seen = []
            for _ in range(rounds):
                task = rng.integers(0, k, batch)
                groups = {int(t): np.flatnonzero(task == t) for t in np.unique(task)}
                seen.append(len(groups))
                t0 = time.perf_counter()
                mt.run_tasks(x, [int(t) for t in task])
                t1 = time.perf_counter()
                for t, rows in groups.items():
                    if loaded is not None:
                        sw.run(x[rows], task=loaded[t]) if t else sw.run(x[rows])
                t2 = time.perf_counter()
                for t, rows in groups.items():
                    fulls[t].run(x[rows])
                t3 = time.perf_counter()
                for key, sec in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[key].append(sec * 1e3 / batch)
            out[batch] = {key: round(statistics.median(v), 3) for key, v in times.items()
                          if loaded is not None or key != "packs_call_per_task"}
            out[batch]["tasks_per_batch_median"] = statistics.median(seen)
            out[batch]["full_bundle_sessions"] = len(opened)
        for f in opened.values():
            f.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", help="demo, vit-b16, or both: demo,vit-b16 (one report each)")
    ap.add_argument("--tasks", default="1,4,16")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtimes", default="onnxruntime", help="runtimes whose resident memory is measured "
                    "(onnxruntime,openvino); mixed-batch speed is measured on ONNX Runtime")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stexport-bench-multitask"))
    ap.add_argument("--max-packs", type=int, default=4, help="tasks measured as base + packs (each pack is a "
                    "full build: slow on 2 cores)")
    a = ap.parse_args()
    counts = [int(x) for x in a.tasks.split(",")]
    reports = []
    for model in a.model.split(","):
        if model not in MODELS:
            ap.error(f"--model {model}: choose from {', '.join(MODELS)}")
        work = a.work / model if "," in a.model or model != "demo" else a.work
        work.mkdir(parents=True, exist_ok=True)
        print(f"{model}: building in {work}", file=sys.stderr, flush=True)
        reports.append(measure(model, work, counts, a))
        (work / "report.json").write_text(json.dumps(reports[-1], indent=1) + "\n")  # each as soon as it is done
    print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    return 0


def measure(model: str, work: Path, counts: list[int], a) -> dict:
    from stexport.build.multitask import build_multitask
    from stexport.build.packing import build_pack
    from stexport.build.pipeline import build_bundle

    BB = MODELS[model]["bb"]
    ckpts = checkpoints(model, work, max(counts))
    # two full bundles, opened as many times as there are tasks (every task's graph has the same shapes, and
    # each session holds its own copy of the weights); packs only up to --max-packs (each is a full build)
    from stexport.bundle.store import Bundle
    from stexport.bundle.taskpack import TaskPack

    def made(out: Path, make):  # what an earlier run in --work built is reused
        if out.is_file():
            return TaskPack.load(out)
        return Bundle.load(out) if (out / "stexport.json").is_file() else make(out)

    full_built = [made(work / f"full{i}", lambda o, c=c: build_bundle(c, out=o, precision="fp32", **BB))
                  for i, c in enumerate(ckpts[:2])]
    full = [full_built[i % 2] for i in range(len(ckpts))]
    from stexport.build.deltas import as_deltas

    rows = max(as_deltas(c).spec.num_classes for c in ckpts[:a.max_packs])
    base = made(work / "base", lambda o: build_bundle(ckpts[0], out=o, precision="fp32", swappable=True,
                                                      max_classes=rows, **BB))
    packs = [made(work / f"task{i}.stpack", lambda o, c=c: build_pack(c, base, out=o))
             for i, c in enumerate(ckpts[:a.max_packs]) if i]
    multi = {k: made(work / f"multi{k}", lambda o, k=k: build_multitask(ckpts[:k], out=o, **BB)) for k in counts}
    size, frames = base.size, base.frames
    report = {"model": MODELS[model]["name"], "runtime": "onnxruntime CPU, FP32 (memory: each of --runtimes)",
              "input": f"{frames}x{size}", "per_task_count": {}}
    head = "import numpy as np\nfrom stexport.runtime import backends\nfrom stexport.bundle.store import Bundle\n"
    for k in counts:
        print(f"{model}: memory and disk, {k} tasks", file=sys.stderr, flush=True)
        run8 = f"x=np.zeros((8,{frames},{size},{size},3),np.uint8)\n"
        with_packs = k <= len(packs) + 1
        row = {"disk_mb": {"multitask": dir_bytes(multi[k].path) / 1e6,
                           "base_plus_packs": (dir_bytes(base.path) + sum(p.path.stat().st_size for p in packs[:k - 1]))
                           / 1e6 if with_packs else None,
                           "full_bundles": sum(dir_bytes(f.path) for f in full[:k]) / 1e6}}
        for rt in [r for r in a.runtimes.split(",") if r]:  # --runtimes '': disk only
            code_multi = (f"{head}{run8}be=backends.create('{rt}',Bundle.load('{multi[k].path}'))\n"
                          f"be.run_tasks(x,[i % {k} for i in range(8)])")
            code_packs = (f"{head}{run8}be=backends.create('{rt}',Bundle.load('{base.path}'))\nbe.run(x)\n"
                          + "".join(f"be.run(x,task='{p.path}')\n" for p in packs[:k - 1]))
            code_full = head + run8 + "".join(f"b{i}=backends.create('{rt}',Bundle.load('{f.path}'));b{i}.run(x)\n"
                                              for i, f in enumerate(full[:k]))
            key = "rss_mb" if rt == "onnxruntime" else f"rss_mb_{rt}"
            row[key] = {"multitask": rss_child(code_multi, cap=True),
                        "base_plus_packs": rss_child(code_packs, cap=True) if with_packs else None,
                        "full_bundles": rss_child(code_full, cap=True)}
        report["per_task_count"][k] = row
    rng = np.random.default_rng(0)
    batches = [int(x) for x in a.batches.split(",") if x]
    if not batches:  # --batches '': memory and disk only
        return report
    print(f"{model}: mixed batches", file=sys.stderr, flush=True)
    report["ms_per_clip_mixed_batches"] = {
        k: mixed_batches(multi[k], base, packs[:k - 1] if k <= len(packs) + 1 else None, full[:k], batches,
                         a.rounds, rng)
        for k in sorted({max(counts), min(max(counts), len(packs) + 1)})}
    return report


if __name__ == "__main__":
    raise SystemExit(main())
