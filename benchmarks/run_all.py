"""Every backend and precision side by side, in one run on one machine, written to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_all.py [--iters 5] [--batch 4] [--work /tmp/stexport-bench] [--quick]

Model: ViT-B/16 (random weights, FP16-representable like OpenAI's) + 12 ST-Adapters (12x384, before the MLP,
kernel 3x1x1), 400 classes, 8 frames of 224 px; the same random uint8 clips for every row. Each row runs in a
fresh Python process (its peak RSS is its own): warm-up, then per-clip latency at batch 1 (median of --iters)
and throughput at --batch. GEMM peaks (FP32, BF16, INT8) are measured in the same run, before and after the
rows. Accuracy per precision comes from `verify` on the trained demo model (examples/motion) when it is there,
and end-to-end `infer` (decoding included) is compared with model-only throughput on generated videos.

Not a test: CI runs `--quick` at most (a tiny model, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stexport.runtime import bench
from stexport.runtime.backends import names as backend_names
from stexport.bundle.store import Bundle
from stexport.build.verify import compare

sys.path.insert(0, str(ROOT / "benchmarks"))
from decode import write  # benchmarks/decode.py: a generated video with moving content

# (label, format, precision shown, bundle precision, how it runs, options)
ROWS = [
    ("PyTorch eager (reference)", "PyTorch", "fp32", "fp32", "eager", {}),
    ("PyTorch eager, BF16 autocast", "PyTorch", "bf16 autocast", "fp32", "eager-bf16", {}),
    ("Folded deploy model in PyTorch", "PyTorch", "fp32", "fp32", "folded", {}),
    ("TorchScript (traced, frozen)", "TorchScript", "fp32", "fp32", "torchscript", {}),
    ("AOTInductor (model.pt2)", "AOTI package", "fp32", "fp32", "aoti", {}),
    ("ONNX Runtime", "ONNX", "fp32", "fp32", "onnxruntime", {}),
    ("ONNX Runtime", "ONNX", "fp16", "fp16", "onnxruntime", {}),
    ("ONNX Runtime", "ONNX Q/DQ", "int8", "int8", "onnxruntime", {}),
    ("OpenVINO", "ONNX", "fp32", "fp32", "openvino", {}),
    ("OpenVINO, BF16 hint", "ONNX", "fp32 → bf16", "fp32", "openvino", {"compute": "bf16"}),
    ("OpenVINO", "ONNX", "fp16 (→ f32)", "fp16", "openvino", {}),
    ("OpenVINO, BF16 hint", "ONNX", "fp16 → bf16", "fp16", "openvino", {"compute": "bf16"}),
    ("OpenVINO", "ONNX Q/DQ", "int8 (+ f32)", "int8", "openvino", {}),
    ("OpenVINO, BF16 hint", "ONNX Q/DQ", "int8 (+ bf16)", "int8", "openvino", {"compute": "bf16"}),
    ("ONNX Runtime", "ONNX Q/DQ", "int8 + int8 q·kᵀ", "int8att", "onnxruntime", {}),
    ("OpenVINO", "ONNX Q/DQ", "int8 + int8 q·kᵀ (+ f32)", "int8att", "openvino", {}),
    ("OpenVINO, BF16 hint", "ONNX Q/DQ", "int8 + int8 q·kᵀ (+ bf16)", "int8att", "openvino",
     {"compute": "bf16"}),
    ("ONNX Runtime", "ONNX Q/DQ", "int8 (+ fp16 float parts)", "int8f16", "onnxruntime", {}),
    ("OpenVINO", "ONNX Q/DQ", "int8 (+ fp16 float parts → f32)", "int8f16", "openvino", {}),
    ("TensorRT", "engine", "fp16 / int8", "fp16", "tensorrt", {}),
]


# ------------------------------------------------------------------------------------------------------------
# rows that are not registry backends: the reference under autocast, the folded module, TorchScript


def torch_runner(kind: str, bundle: Bundle):
    import torch

    from stexport.build.loaders import reference_for_bundle
    from stexport.build.reference import normalize

    ref = reference_for_bundle(bundle)
    if kind == "eager-bf16":
        def run(clips):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return ref(normalize(torch.from_numpy(clips))).float().numpy()
        return run, {"backend": "torch", "precision": "fp32 weights", "autocast": "bf16", "compute_precision": "bf16"}
    if kind == "folded":
        from stexport.build.fold import fold

        model = fold(ref)

        def run(clips):
            with torch.inference_mode():
                return model(torch.from_numpy(clips)).numpy()
        return run, {"backend": "torch (folded)", "precision": "fp32", "compute_precision": "fp32"}
    if kind == "aoti":
        from torch._inductor import aoti_load_package

        compiled = aoti_load_package(str(bundle.file("aoti")))

        def run(clips):
            with torch.inference_mode():
                return compiled(torch.from_numpy(np.ascontiguousarray(clips))).numpy()
        return run, {"backend": "aoti", "precision": "fp32", "compute_precision": "fp32"}
    raise ValueError(kind)


def worker(job: dict) -> dict:
    """One custom row in this (fresh) process."""
    bundle = Bundle.load(job["bundle"])
    base = bench.rss_mb()
    t = time.perf_counter()
    run, described = torch_runner(job["kind"], bundle)
    load_s = time.perf_counter() - t
    res = bench.time_runner(run, lambda b: bench.clips_for(bundle, b), job["batches"], job["iters"],
                            job["warmup"])
    if job.get("probe"):
        np.save(job["probe"][1], run(np.load(job["probe"][0])))
    res.update(described=described, backend=described["backend"], load_s=load_s, rss_before_mb=base,
               peak_rss_mb=bench.peak_rss_mb())
    return res


def measure_row(kind: str, bundle: Bundle, options: dict, batches, iters, warmup: int, probe) -> dict:
    if kind in backend_names() or kind == "eager":
        backend = "torch" if kind == "eager" else kind
        return bench.measure_isolated(str(bundle.path), backend, options, batches, iters, warmup, probe=probe)
    job = {"kind": kind, "bundle": str(bundle.path), "batches": list(batches), "iters": iters,
           "warmup": warmup, "probe": probe}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
# inputs: bundles and videos


def make_bundles(work: Path, backbone: str, videos: Path, rebuild: bool) -> dict[str, Bundle]:
    from stexport.build.backbone import random_backbone
    from stexport.build.pipeline import build_bundle
    from stexport.build.synthetic import random_deltas

    bb, out = None, {}
    for p in ("fp32", "fp16", "int8", "int8att", "int8f16"):
        path = work / f"{backbone}-{p}"
        if path.is_dir() and not rebuild:
            out[p] = Bundle.load(path)
            continue
        bb = bb or random_backbone(backbone)
        t = time.perf_counter()
        int8 = p.startswith("int8")
        deltas = random_deltas(bb.config, width=bb.config.width // 2, num_classes=400)
        out[p] = build_bundle(deltas, backbone=bb, precision=p[:4], frames=8, out=path, force=True,
                              calib=videos if int8 else None,
                              calib_clips=2, int8_attention=p == "int8att",
                              int8_float="fp16" if p == "int8f16" else None, progress=True)
        print(f"built {path.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def add_torchscript(bundle: Bundle) -> str | None:
    """Add the TorchScript artifact to the FP32 bundle if stexport can; the reason when it cannot."""
    if "torchscript" not in backend_names():
        return "no TorchScript backend in this stexport"
    if bundle.has("torchscript"):
        return None
    try:
        from stexport.build.torchscript import add_to_bundle

        add_to_bundle(bundle)
    except Exception as e:  # noqa: BLE001 - the row says why instead of ending the run
        return f"cannot add TorchScript to the bundle ({type(e).__name__}: {str(e)[:120]})"
    return None


def add_aoti(bundle: Bundle) -> str | None:
    """Add model.pt2 (AOTInductor, CPU) to the FP32 bundle (minutes for ViT-B/16); the reason when it cannot."""
    if bundle.has("aoti"):
        return None
    try:
        from stexport.build.aoti import add_to_bundle

        add_to_bundle(bundle)
    except Exception as e:  # noqa: BLE001 - the row says why instead of ending the run
        return f"cannot add an AOTInductor package to the bundle ({type(e).__name__}: {str(e)[:120]})"
    return None


def probe_clips(work: Path, videos: list[Path], bundle: Bundle) -> Path:
    """The first view of each generated video, decoded: the inputs every row's logits are compared on."""
    from stexport.runtime.video import Sampling, decode_clips

    s = Sampling.from_manifest(bundle.manifest)
    path = work / "probe-clips.npy"
    np.save(path, np.concatenate([decode_clips(str(v), s)[:1] for v in videos]))
    return path


def size_mb(bundle: Bundle, kind: str) -> float | None:
    keys = {"torchscript": ["torchscript"], "aoti": ["aoti"], "tensorrt": []}.get(kind, ["onnx", "onnx_data"])
    if kind in ("eager", "eager-bf16", "folded"):
        return None
    files = [bundle.file(k) for k in keys if bundle.has(k)]
    return sum(f.stat().st_size for f in files) / 2**20 if files else None


# ------------------------------------------------------------------------------------------------------------
# accuracy (demo model) and end-to-end infer


DEMO = ROOT / "examples" / "motion"
DEMO_VIEWS = {"rate": 0, "temporal_views": 1, "spatial_views": 1}  # the demo's: 8 frames over the video
# (backend, bundle precision, backend options) verified on the demo; torch rows have no bundle of their own
# the rows `verify` checks on the demo model: every row that runs a bundle through a CPU backend
DEMO_RUNS = [(how, bp, opts) for _, _, _, bp, how, opts in ROWS if how in ("onnxruntime", "openvino", "torchscript")]


def demo_accuracy(work: Path, count: int, model: Path = DEMO) -> tuple[dict, str]:
    """`verify` on the trained demo model (examples/motion) per (backend, precision, options): INT8 calibrated
    on 64 train-split clips, everything verified on the first `count` clips of the val split."""
    adapter, backbone = model / "motion_adapter.pt", model / "backbone.safetensors"
    if not (adapter.is_file() and backbone.is_file()):
        return {}, f"not measured: the trained demo model ({adapter}) is not there"
    from stexport.build.pipeline import build_bundle
    from stexport.build.verify import GATES, verify

    data = work / "motion"
    for split, n in (("train", 64), ("val", count)):
        if not (data / f"{split}.txt").is_file():
            subprocess.run([sys.executable, str(DEMO / "generate.py"), "--splits", split, "--out", str(data),
                            "--count", str(n)], check=True, capture_output=True)
    out = {}
    bundles = {p: build_bundle(adapter, backbone="stexport-demo-vit", pretrained=str(backbone),
                               precision=p[:4], frames=8, out=work / f"motion-{p}", force=True,
                               sampling=DEMO_VIEWS,
                               calib=data / "train.txt" if p.startswith("int8") else None, calib_clips=64,
                               int8_attention=p == "int8att", labels=data / "labels.txt",
                               int8_float="fp16" if p == "int8f16" else None)
               for p in ("fp32", "fp16", "int8", "int8att", "int8f16")}
    if "torchscript" in backend_names():
        from stexport.build.torchscript import add_to_bundle

        add_to_bundle(bundles["fp32"], pretrained=str(backbone))
    for name, p, opts in DEMO_RUNS:
        if name not in backend_names():
            continue
        try:
            # FP16 and BF16-run float bundles: the demo's reduced-precision gate (≥99% agreement, ≤0.5 pt drop)
            reduced = p == "fp16" or (p == "fp32" and opts.get("compute") == "bf16")
            gate = replace(GATES["fp16"], max_accuracy_drop=0.5) if reduced else None
            report = verify(bundles[p], data / "val.txt", backend=name, gate=gate, **opts)
            out[(name, p, opts.get("compute", ""))] = report
        except Exception as e:
            print(f"verify {name} {p} {opts}: {e}", file=sys.stderr)
    ref = next(iter(out.values()), None)
    acc = ref and ref["metrics"].get("accuracy")
    note = (f"`verify` on the demo model ({model}, 9 motion classes) over {count} val-split "
            f"videos; INT8 calibrated on 64 train-split videos"
            + (f"; PyTorch reference top-1 {acc['reference_top1']:.1f}%" if acc else ""))
    return out, note


def end_to_end(bundle: Bundle, backend: str, options: dict, videos: list[Path], rounds: int = 2) -> dict:
    """videos/s of `Classifier.classify_many` (decoding in its background thread) vs the backend alone on the
    same already-decoded views; best of `rounds` alternating rounds each."""
    from stexport.runtime.classify import Classifier
    from stexport.runtime.video import decode

    with Classifier(bundle, backend=backend, **options) as clf:
        clips = [decode(str(p), clf.sampling).clips for p in videos]
        clf.probabilities(clips[0])
        best = {"model": 0.0, "e2e": 0.0}
        for _ in range(rounds):
            t = time.perf_counter()
            for c in clips:
                clf.probabilities(c)
            best["model"] = max(best["model"], len(videos) / (time.perf_counter() - t))
            t = time.perf_counter()
            results = list(clf.classify_many([str(p) for p in videos]))
            best["e2e"] = max(best["e2e"], len(videos) / (time.perf_counter() - t))
        views = clf.sampling.views
        decode_s = float(np.mean([r.decode_s for r in results]))
    return {"videos": len(videos), "views_per_video": views, "model_videos_per_s": best["model"],
            "e2e_videos_per_s": best["e2e"], "fraction": best["e2e"] / best["model"],
            "decode_s_per_video": decode_s}


# ------------------------------------------------------------------------------------------------------------
# report


def fmt(v, spec=".2f", none="—"):
    return none if v is None else format(v, spec)


def table(rows: list[dict], ref: dict, batch: int) -> str:
    head = ("| runtime | format | precision | size MB | accuracy / agreement (demo) | "
            "max abs Δlogit vs eager | "
            f"ms/clip b=1 p50 (p90) | clips/s b={batch} | × eager b=1 | × eager b={batch} | GFLOP/s | "
            "% of GEMM peak | % of roofline | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['label']} | {r['format']} | {r['precision']} | — | — | "
                         f"— | not run: {r['skipped']} | — | — | — | — | — | — | — |")
            continue
        lat, thr = r["latency_ms"], r["throughput"]["clips_per_s"]
        peak, roof = r.get("fraction_of_peak"), r.get("fraction_of_roofline")
        lines.append(
            f"| {r['label']} | {r['format']} | {r['precision']} | {fmt(r.get('size_mb'), '.0f')} | "
            f"{r.get('accuracy', '—')} | {fmt(r.get('fidelity', {}).get('max_abs'), '.2g')} | "
            f"{lat['p50']:.4g} ({lat['p90']:.4g}) | {thr:.3g} | "
            f"{ref['latency_ms']['p50'] / lat['p50']:.2f} | {thr / ref['throughput']['clips_per_s']:.2f} | "
            f"{r['achieved_gflops']['throughput']:.0f} | "
            f"{fmt(100 * peak['throughput'] if peak else None, '.0f')} ({r['compute_precision']}) | "
            f"{fmt(100 * roof['throughput'] if roof else None, '.0f')} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def accuracy_cell(acc: dict, kind: str, bundle_precision: str, options: dict) -> str:
    r = acc.get((kind, bundle_precision, options.get("compute", "")))
    if r is None:
        return "—"
    m = r["metrics"]
    a = m.get("accuracy")
    top1 = f"top-1 {a['backend_top1']:.1f}% (Δ {a['top1_difference']:+.1f}), " if a else ""
    failed = [f"{c['check']} {c['value']:.3g} (limit {c['limit']})" for c in r["checks"] if not c["passed"]]
    bf16 = bundle_precision == "fp32" and options.get("compute") == "bf16"
    verdict = ("bf16 run, fp16 gate " if bf16 else f"{r['precision']} gate ") + (
        "pass" if r["passed"] else "FAIL: " + "; ".join(failed))
    return f"{top1}agree {100 * m['top1_agreement']:.1f}%, max abs Δ {m['max_abs']:.2g}; {verdict}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5, help="timed calls at batch 1")
    ap.add_argument("--batch-iters", type=int, default=3, help="timed calls at the throughput batch")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="throughput batch")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stexport-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--demo", type=Path, default=DEMO, help="folder with the demo's backbone.safetensors and "
                    "motion_adapter.pt")
    ap.add_argument("--demo-clips", type=int, default=270, help="val-split videos for the accuracy column")
    ap.add_argument("--quick", action="store_true", help="tiny model smoke run (writes into --work only)")
    ap.add_argument("--only", default=None, help="comma-separated row kinds to run (e.g. eager,openvino)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker)), default=str))
        return

    started = time.time()
    backbone = "stexport-tiny-vit" if args.quick else "ViT-B-16"
    out_md = args.work / "RESULTS.md" if args.quick else args.out
    args.work.mkdir(parents=True, exist_ok=True)
    vids = args.work / "videos"
    vids.mkdir(exist_ok=True)
    paths = [vids / f"v{i}.mp4" for i in range(4)]
    videos = [p if p.exists() else write(p, seconds=6.0, height=360) for p in paths]
    bundles = make_bundles(args.work, backbone, vids, args.rebuild)
    flops = bench.model_flops(bundles["fp32"].manifest)
    ts_reason = add_torchscript(bundles["fp32"])
    aoti_reason = add_aoti(bundles["fp32"]) if not args.only or "aoti" in args.only.split(",") else None

    probe_in, ref_logits = probe_clips(args.work, videos, bundles["fp32"]), None

    print("GEMM peaks ...", file=sys.stderr)
    peaks_before = bench.gemm_peaks()
    load_before = os.getloadavg()
    rows, only = [], set(args.only.split(",")) | {"eager"} if args.only else None  # eager: the ratios' base
    for label, form, shown, bp, kind, opts in ROWS:
        row = {"label": label, "format": form, "precision": shown, "kind": kind, "options": opts}
        if only and kind not in only:
            continue
        if kind == "tensorrt":
            row["skipped"] = "no NVIDIA GPU here, and TensorRT's libraries cannot be installed from PyPI here"
        elif kind == "torchscript" and ts_reason:
            row["skipped"] = ts_reason
        elif kind == "aoti" and aoti_reason:
            row["skipped"] = aoti_reason
        if "skipped" in row:
            rows.append(row)
            continue
        print(f"{label} {shown} ...", file=sys.stderr)
        try:
            iters = {1: args.iters, args.batch: args.batch_iters}
            probe = (str(probe_in), str(args.work / f"logits-{len(rows)}.npy"))
            res = measure_row(kind, bundles[bp], opts, (1, args.batch), iters, args.warmup, probe)
            logits = np.load(probe[1])
            ref_logits = ref_logits if ref_logits is not None else logits
            row["fidelity"] = compare(ref_logits, logits)
        except Exception as e:
            row["skipped"] = f"failed: {str(e)[:160]}"
            rows.append(row)
            continue
        row.update(res, size_mb=size_mb(bundles[bp], kind), bundle_precision=bp)
        b = bundles[bp]
        row.update(bench.summarize(res, bench.model_flops(b.manifest), peaks_before, b.precision))
        print(f"  {res['latency_ms']['p50']:.0f} ms/clip, {res['throughput']['clips_per_s']:.2f} clips/s",
              file=sys.stderr)
        rows.append(row)
    peaks_after = bench.gemm_peaks()
    load_after = os.getloadavg()

    print("accuracy on the demo model ...", file=sys.stderr)
    acc, acc_note = demo_accuracy(args.work, args.demo_clips, args.demo)
    for r in rows:
        if "skipped" not in r:
            r["accuracy"] = accuracy_cell(acc, r["kind"], r["bundle_precision"], r["options"])

    print("end-to-end infer ...", file=sys.stderr)
    e2e = []
    for bp, backend, opts in (("int8", "openvino", {}), ("fp32", "openvino", {})):
        try:
            e2e.append((bp, backend, end_to_end(bundles[bp], backend, opts, videos)))
        except Exception as e:
            e2e.append((bp, backend, {"error": str(e)[:200]}))

    man = bundles["fp32"].manifest
    model = {"backbone": backbone, "flops": flops, "adapters": man.spec.layout,
             "clip": f"{man.frames} × {man.size}"}
    report = {"machine": bench.machine(), "model": model,
              "gemm_peaks": {"before": peaks_before, "after": peaks_after},
              "load_average": {"before": load_before, "after": load_after}, "rows": rows,
              "accuracy_note": acc_note, "end_to_end": e2e, "seconds": time.time() - started,
              "command": " ".join(["benchmarks/run_all.py", *sys.argv[1:]])}
    (args.work / "results.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(out_md, report, args)
    print(f"wrote {out_md} and {args.work / 'results.json'} in {report['seconds'] / 60:.1f} min",
          file=sys.stderr)


def targets(rep: dict, ref: dict) -> list[str]:
    """The project's targets against this run's figures, one line each."""
    ok = [r for r in rep["rows"] if "skipped" not in r]
    int8 = [r for r in ok if r["kind"] == "openvino" and r["bundle_precision"].startswith("int8")]
    out = []
    if int8:
        fast = max(int8, key=lambda r: r["throughput"]["clips_per_s"])
        lat = min(int8, key=lambda r: r["latency_ms"]["p50"])
        out.append(f"- INT8 ≥3× the eager FP32 reference at batch 1: OpenVINO {lat['precision']} "
                   f"{ref['latency_ms']['p50'] / lat['latency_ms']['p50']:.2f}× "
                   f"({lat['latency_ms']['p50']:.0f} vs {ref['latency_ms']['p50']:.0f} ms per clip).")
        if fast.get("fraction_of_peak"):
            peak, roof = fast["fraction_of_peak"]["throughput"], fast["fraction_of_roofline"]["throughput"]
            ratio = fast["throughput"]["clips_per_s"] / ref["throughput"]["clips_per_s"]
            gops = fast["achieved_gflops"]["throughput"]
            out.append(f"- OpenVINO INT8 model-only throughput ≥95% of the INT8 GEMM roofline: "
                       f"best row {fast['precision']} {gops:.0f} GOP/s = {100 * peak:.0f}% of the INT8 peak "
                       f"measured before the rows; {100 * roof:.0f}% of the mixed roofline that runs the "
                       f"float GEMMs at the float peak; {ratio:.2f}× eager FP32.")
        gates = [r.get("accuracy", "—") for r in int8]
        out.append("- INT8 accuracy gate on the demo model: " + (
            "; ".join(f"{r['precision']}: {g.split('; ')[-1]}" for r, g in zip(int8, gates)) if any(
                g != "—" for g in gates) else "not measured in this run (no trained demo model)") + ".")
    for bp, be, e in rep["end_to_end"]:
        if "error" not in e:
            out.append(f"- End-to-end `infer` ≥90% of model-only throughput: {be} {bp} "
                       f"{100 * e['fraction']:.0f}%.")
    return out


def write_markdown(path: Path, rep: dict, args) -> None:
    m = rep["machine"]
    ref = next(r for r in rep["rows"] if r["kind"] == "eager" and "skipped" not in r)
    pb, pa = rep["gemm_peaks"]["before"], rep["gemm_peaks"]["after"]
    f = rep["model"]["flops"]
    lines = [
        "# Benchmarks: every backend and precision side by side",
        "",
        f"One run of `.venv/bin/python {rep['command']}` ({rep['seconds'] / 60:.1f} min), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- Machine: {m.get('cpu', '?')}, {m['cpus']} logical CPUs ({m.get('cores_per_socket', '?')} cores "
        f"per socket, {m.get('threads_per_core', '?')} threads per core), {m['machine']}, Python "
        f"{m['python']}; ISA: {', '.join(m.get('isa', []))}. Load average (1 min) "
        f"{rep['load_average']['before'][0]:.2f} before the rows, "
        f"{rep['load_average']['after'][0]:.2f} after "
        "(a shared machine: other work may have been running).",
        f"- Model: {rep['model']['backbone']} + {rep['model']['adapters']} ST-Adapters (before the MLP, "
        f"kernel 3x1x1), 400 classes, {rep['model']['clip']} px, random FP16-representable weights; "
        f"{f['total'] / 1e9:.1f} GFLOP per clip "
        f"({f['quantizable'] / 1e9:.1f} in the linear layers INT8 bundles quantize).",
        f"- Each row: a fresh process; {args.warmup} warm-up call(s), then the median of {args.iters} calls "
        f"at batch 1 (latency) and of {args.batch_iters} at batch {args.batch} (throughput). Peak RSS: that "
        "process's high-water mark (VmHWM), imports included.",
        "- GEMM peaks (square 2048, best call), before / after the rows: "
        + ", ".join(f"{k} {pb[k]['gflops']:.0f} / {pa[k]['gflops']:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s "
                    f"({pb[k]['method']})" for k in pb)
        + " (by method, before: " + "; ".join(f"{m} {v:.0f}" for k in pb for m, v in pb[k]["methods"].items())
        + "). \"% of GEMM peak\": achieved GFLOP/s at the throughput batch over the before peak of the "
        "precision the GEMMs run in. \"% of roofline\": clips/s over the fastest a clip could go at those "
        "peaks, with the GEMMs an INT8 bundle keeps in float (patch embedding, attention, head) at the float "
        "rate.",
        "",
        table(rep["rows"], ref, args.batch),
        "",
        "Ratios are to the PyTorch eager FP32 reference in the same run. \"max abs Δlogit vs eager\": every "
        "row runs the same decoded clips (the first view of each generated video) after timing; the "
        f"difference to the eager FP32 logits (the model's random head gives logits of order 1). Accuracy: "
        f"{rep['accuracy_note']}.",
        "",
        "## Targets",
        "",
        *targets(rep, ref),
        "",
        "## End-to-end `infer` vs model only",
        "",
        "| bundle | backend | videos | views/video | model only videos/s | end to end videos/s | fraction | "
        "decode s/video |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bp, be, e in rep["end_to_end"]:
        if "error" in e:
            lines.append(f"| {bp} | {be} | failed: {e['error']} | | | | | |")
        else:
            lines.append(f"| {bp} | {be} | {e['videos']} | {e['views_per_video']} | "
                         f"{e['model_videos_per_s']:.3f} | {e['e2e_videos_per_s']:.3f} | "
                         f"{100 * e['fraction']:.0f}% | {e['decode_s_per_video']:.2f} |")
    lines += ["", "Generated 6 s 360p MPEG-4 videos; end to end = `Classifier.classify_many` (what "
              "`stexport infer` runs: decoding in a background thread); model only = the same views already "
              "decoded. Best of 2 alternating rounds.", ""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
