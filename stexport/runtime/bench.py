"""Benchmarks: latency and throughput of a bundle on a backend, its FLOPs, and how near the device's limit.

- `model_flops(manifest)`: FLOPs of one clip counted from shapes (1 multiply-add = 2 FLOPs; GEMMs, attention
  and the adapters' depth-wise conv; LayerNorm, softmax, GELU and residual adds are not counted).
- `gemm_peaks(kinds)`: this device's square-GEMM rate per precision (FP32, BF16, INT8), the faster of torch
  (matmul, torch._int_mm) and OpenVINO's CPU kernels: the roofline the model is held against.
- `time_runner(run, ...)`: warm-up, then per-clip latency at batch 1 (p50/p90/p99), clips/s at larger batches.
- `bench(bundle, backend, ...)`: all of it for one backend; `isolated=True` runs the measurement in a fresh
  Python process so its peak RSS (the process's high-water mark, VmHWM) belongs to this run alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stexport.errors import StexportError
from stexport.fileutil import python_child

PEAK_SIZE = 2048


# ------------------------------------------------------------------------------------------------------------
# FLOPs


def model_flops(manifest) -> dict:
    """FLOPs of one clip for a bundle's stexport.bundle.manifest.Manifest (backbone config, adapter spec, frames, size).

    Returns {"total", "quantizable", "parts": {...}}; "quantizable" is the part INT8 bundles run as integer
    GEMMs (the transformer's linear layers, adapters' fc1/fc2 included, and q·kᵀ when the bundle quantizes
    attention scores), the rest stays float.
    """
    scores = bool(manifest.calibration and manifest.calibration.attention_scores_int8)
    return clip_flops(manifest.model.backbone.config.to_dict(), manifest.spec.to_dict(), manifest.frames,
                      manifest.size, int8_scores=scores)


def clip_flops(cfg: dict, spec: dict, frames: int, size: int, int8_scores: bool = False) -> dict:
    """int8_scores: the bundle also quantizes q·kᵀ (`stexport build --int8-attention`)."""
    D, M, p, layers = cfg["width"], cfg["mlp_width"], cfg["patch_size"], cfg["layers"]
    T = frames
    N = (size // p) ** 2  # patch tokens per frame
    L = N + 1  # with the class token
    w = spec["width"]
    kt, kh, kw = spec["kernel"]
    adapters = len(spec["pre_attn"]) + len(spec["pre_mlp"])
    parts = {
        "patch_embed": 2 * T * N * (3 * p * p) * D,
        "qkv": layers * 2 * T * L * D * 3 * D,
        "attn_scores": layers * 2 * T * L * L * D,  # q·kᵀ over all heads
        "attn_values": layers * 2 * T * L * L * D,  # softmax · v
        "attn_out": layers * 2 * T * L * D * D,
        "mlp": layers * 2 * 2 * T * L * D * M,
        "adapter_fc": adapters * 2 * 2 * T * N * D * w,  # fc1 and fc2 on the patch tokens
        "adapter_conv": adapters * 2 * T * N * w * kt * kh * kw,
        "head": 2 * D * spec["num_classes"],
    }
    quant = parts["qkv"] + parts["attn_out"] + parts["mlp"] + parts["adapter_fc"]
    if int8_scores:
        quant += parts["attn_scores"]
    return {"total": sum(parts.values()), "quantizable": quant, "parts": parts}


# ------------------------------------------------------------------------------------------------------------
# GEMM peaks


def _rate(fn, flops: float, seconds: float) -> float:
    fn()
    best, start = float("inf"), time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > seconds:
            return flops / best


def _ov_gemm(n: int, kind: str):
    """An n×n×n MatMul through OpenVINO's CPU plugin, the kernels its models use. int8: the activation passes
    a FakeQuantize (what a Q/DQ pair becomes) into an s8-weight MatMul, run as an integer GEMM."""
    from stexport.runtime.backends.openvino import import_openvino

    ov = import_openvino()
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], np.float32)
    if kind == "int8":
        a = ops.fake_quantize(x, -1.0, 1.0, -1.0, 1.0, 255)
        w = rng.integers(-127, 128, (n, n)).astype(np.int8)
        scale = ops.constant(np.full((n, 1), 0.01, np.float32))
        b = ops.multiply(ops.convert(ops.constant(w), np.float32), scale)
    else:
        a, b = x, ops.constant(rng.standard_normal((n, n)).astype(np.float32))
    model = ov.Model([ops.matmul(a, b, False, True)], [x])
    hint = "bf16" if kind == "bf16" else "f32"
    req = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint}).create_infer_request()
    xi = rng.standard_normal((n, n)).astype(np.float32)
    return lambda: req.infer({0: xi})


def gemm_peak(kind: str, n: int = PEAK_SIZE, seconds: float = 1.0) -> tuple[float, str, dict]:
    """Best GFLOP/s (GOP/s for int8) of an n×n×n GEMM on this CPU over torch and OpenVINO, which one gave it,
    and every method's rate."""
    import importlib.util

    if kind not in ("fp32", "bf16", "int8"):
        raise StexportError(f"no GEMM peak for precision '{kind}'")
    flops = 2.0 * n ** 3
    found = []
    if importlib.util.find_spec("torch") is not None:  # the runtime-only install measures OpenVINO's alone
        found += _torch_gemm(kind, n, flops, seconds)
    try:
        found.append((_rate(_ov_gemm(n, kind), flops, seconds) / 1e9, f"openvino MatMul {kind}"))
    except ImportError:
        pass
    if not found:
        raise StexportError(f"cannot measure a {kind} GEMM here (neither torch nor OpenVINO can run one)")
    return (*max(found), {m: r for r, m in found})


def _torch_gemm(kind: str, n: int, flops: float, seconds: float) -> list[tuple[float, str]]:
    import torch

    g = torch.Generator().manual_seed(0)
    if kind == "int8":
        a, b = (torch.randint(-127, 128, (n, n), generator=g, dtype=torch.int8) for _ in range(2))
        name, fn = "torch._int_mm s8×s8", lambda: torch._int_mm(a, b)
    else:
        a, b = (torch.randn(n, n, generator=g).to(getattr(torch, {"fp32": "float32"}.get(kind, "bfloat16")))
                for _ in range(2))
        name, fn = f"torch.matmul {kind}", lambda: a @ b
    try:
        with torch.inference_mode():
            return [(_rate(fn, flops, seconds) / 1e9, name)]
    except (RuntimeError, AttributeError):  # no int8 matmul in this torch build
        pass
    return []


def gemm_peaks(kinds=("fp32", "bf16", "int8"), seconds: float = 1.0) -> dict[str, dict]:
    return {k: dict(zip(("gflops", "method", "methods"), gemm_peak(k, seconds=seconds))) for k in kinds}


def compute_precision(bundle_precision: str, described: dict) -> tuple[str, str]:
    """(precision of the quantized GEMMs, precision of the float ones) as they run, from the backend's
    describe()["compute_precision"] (stexport.runtime.backends.base.COMPUTE_PRECISIONS).

    There is no FP16 GEMM peak measured on CPUs: FP16 and TF32 compute are held against the FP32 peak (CPUs
    without FP16 arithmetic convert FP16 weights on load)."""
    fl = "bf16" if described.get("compute_precision") == "bf16" else "fp32"
    return ("int8" if bundle_precision == "int8" else fl), fl


# ------------------------------------------------------------------------------------------------------------
# Timing


def clips_for(bundle, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, bundle.frames, bundle.size, bundle.size, 3), dtype=np.uint8)


# `stexport bench`'s defaults, sized for the machine: batch 1 (latency) and a throughput batch of
# default_batches(); with iters=None, as many timed calls per batch size as fill AUTO_BUDGET_S (AUTO_ITERS).
AUTO_BUDGET_S = 10.0
AUTO_ITERS = (3, 10)
CPU_CLIPS_PER_CORE = 4
MAX_BATCH = 32


def default_batches() -> tuple[int, int]:
    """(1, N): N = 32 where an NVIDIA GPU is visible, else 4 clips per CPU core (at most 32; 8 on 2 cores),
    so that one call of a ViT-B/16-size bundle takes seconds on a small CPU instead of a minute."""
    from stexport.runtime.device import gpu_visible

    if gpu_visible():
        return (1, MAX_BATCH)
    return (1, max(2, min(MAX_BATCH, CPU_CLIPS_PER_CORE * (os.cpu_count() or 1))))


def calls(iters: int | dict | None, batch: int, call_s: float | None = None) -> int:
    """Timed calls for `batch`: `iters`, or iters[batch] when given per batch size (JSON keys are strings);
    None: as many as fill AUTO_BUDGET_S at `call_s` seconds a call, within AUTO_ITERS (the most before it
    is known)."""
    if iters is None:
        lo, hi = AUTO_ITERS
        return hi if not call_s else max(lo, min(hi, int(AUTO_BUDGET_S / call_s)))
    return int(iters.get(batch, iters.get(str(batch), 1))) if isinstance(iters, dict) else int(iters)


def time_runner(run, make_clips, batches=(1, 32), iters: int | dict | None = 10, warmup: int = 2,
                progress=None) -> dict:
    """Time `run(clips)`. Batch 1: per-call latency percentiles; larger batches: clips/s from the median call.

    make_clips(batch) -> uint8 clips. Each batch size is warmed up `warmup` times before its timed calls
    (`iters`, {batch: calls}, or None: sized from the last warm-up call, see `calls`). The first warm-up
    call's time is kept as first_call_s: backends that compile a model per batch size (OpenVINO) do it
    there. progress(clips, total_clips, what): called after every call (warm-up too) with the clips it ran
    and the whole run's clips as now planned.
    """
    out: dict = {"batches": {}}
    planned = {b: warmup + calls(iters, b) for b in batches}

    def done(b: int, what: str):
        if progress:
            progress(b, sum(n * c for c, n in planned.items()), what)

    for b in batches:
        x = make_clips(b)
        first = last = None
        for i in range(warmup):
            t = time.perf_counter()
            run(x)
            last = time.perf_counter() - t
            first = last if i == 0 else first
            done(b, f"batch {b} warm-up")
        times = []
        n = calls(iters, b, last if warmup > 1 else None)  # the first call may include compiling
        planned[b] = warmup + n
        for _ in range(n):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
            if iters is None and len(times) == 1 and warmup <= 1:  # no warm-up call to size it by
                n = calls(iters, b, times[0])
                planned[b] = warmup + n
            done(b, f"batch {b}")
            if len(times) >= n:
                break
        ms = np.asarray(times) * 1e3 / b
        out["batches"][str(b)] = {
            "batch": b, "iters": len(times), "first_call_s": first,
            "ms_per_clip": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                            "p99": float(np.percentile(ms, 99)), "min": float(ms.min())},
            "clips_per_s": float(b / np.median(times)),
        }
    one = out["batches"].get("1")
    out["latency_ms"] = one["ms_per_clip"] if one else None
    big = max(batches)
    out["throughput"] = {"batch": big, "clips_per_s": out["batches"][str(big)]["clips_per_s"]}
    return out


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process in MiB (0 where /proc is missing)."""
    return _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """RSS high-water mark of this process in MiB. Linux: VmHWM, which starts afresh at exec; ru_maxrss
    would also count the parent's RSS at the fork that started this process."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def measure(bundle_path: str, backend: str = "auto", options: dict | None = None, batches=(1, 32),
            iters: int | None = 10, warmup: int = 2, progress: bool = False,
            probe: tuple[str, str] | None = None, task: str | None = None) -> dict:
    """Open the backend, time it, and report what ran and this process's memory (in this process).

    probe: (clips.npy, logits.npy): after timing, also run those clips and save the logits (for comparing
    backends with each other on the same inputs). task: a task pack's path, timed as the backend runs it
    (`bench --task`; its preparation counts in load_s)."""
    from tqdm import tqdm

    from stexport.runtime.backends import create
    from stexport.bundle.store import Bundle

    bundle = Bundle.load(bundle_path)
    options = dict(options or {})
    base = rss_mb()
    t = time.perf_counter()
    be = create(backend, bundle, **options)
    if task:
        be.set_task(task)
    load_s = time.perf_counter() - t
    # on a terminal only (disable=None): a redirected stderr gets no progress frames. Counted in clips, warm-up
    # included, so the estimate tqdm shows after the first calls holds across batch sizes.
    bar = tqdm(total=sum((warmup + calls(iters, b)) * b for b in batches), desc=f"bench {be.name}", unit="clip",
               disable=None if progress else True, leave=False)

    shown = [None]  # the postfix last drawn

    def advance(clips: int, total: int, what: str) -> None:
        # a new batch size is drawn at once; tqdm's own refreshes are rate-limited (mininterval), so on a busy
        # machine a whole batch size could pass undrawn
        changed, shown[0] = shown[0] != what, what
        bar.total = total
        bar.set_postfix_str(what, refresh=False)
        bar.update(clips)
        if changed:
            bar.refresh()

    with be, bar:
        res = time_runner(be.run, lambda b: clips_for(bundle, b), batches, iters, warmup, advance)
        bar.refresh()  # the final state reaches the terminal before the bar is cleared and the result printed
        res["described"] = be.describe()
        if probe:
            np.save(probe[1], be.run(np.load(probe[0])))
    alone = os.environ.get("STEXPORT_BENCH_CHILD")
    if task:
        res["task"] = {"path": str(task), "name": be.task.name if be.task is not None else None}
    res.update(backend=be.name, load_s=load_s, rss_before_mb=base, peak_rss_mb=peak_rss_mb(),
               memory_method="RSS high-water mark of a process that ran only this measurement" if alone
               else "RSS high-water mark of this process (includes earlier work)")
    return res


def measure_isolated(bundle_path: str, backend: str = "auto", options: dict | None = None, batches=(1, 32),
                     iters: int | None = 10, warmup: int = 2, progress: bool = False,
                     probe: tuple[str, str] | None = None, verbose: bool = False, task: str | None = None) -> dict:
    """`measure` in a fresh Python process, so the peak RSS is this run's own. The child shares this
    process's stderr when `progress` (its bar shows only on a terminal) and logs at INFO when `verbose`."""
    job = {"bundle": str(bundle_path), "backend": backend, "options": options or {}, "batches": list(batches),
           "iters": iters, "warmup": warmup, "progress": progress, "probe": probe, "verbose": verbose,
           "task": task}
    env = {**os.environ, "STEXPORT_BENCH_CHILD": "1"}
    proc = subprocess.run(python_child("stexport.runtime.bench", "_child", json.dumps(job)), stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE, text=True, env=env, check=False)
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if "error" in res:  # a StexportError in the child: the user's mistake, told as it is
        raise StexportError(res["error"])
    if proc.returncode != 0 or not res:
        err = (proc.stderr or "").strip().splitlines()
        why = err[-1] if err else f"exit code {proc.returncode}"
        raise StexportError(f"benchmark of {backend} on {bundle_path} failed: {why}")
    return res


def summarize(res: dict, flops: dict, peaks: dict | None, bundle_precision: str) -> dict:
    """Add achieved GFLOP/s and the fraction of the device's GEMM peak / mixed-precision roofline."""
    q, fl = compute_precision(bundle_precision, res.get("described", {}))
    total = flops["total"]
    out = {"gflop_per_clip": total / 1e9, "compute_precision": q}
    rates = {"latency": 1e3 / res["latency_ms"]["p50"] if res.get("latency_ms") else None,
             "throughput": res["throughput"]["clips_per_s"]}
    out["achieved_gflops"] = {k: v * total / 1e9 if v else None for k, v in rates.items()}
    if peaks and q in peaks and fl in peaks:
        pq, pf = peaks[q]["gflops"], peaks[fl]["gflops"]
        quant = flops["quantizable"] if q == "int8" else total
        # the fastest a clip could go: quantized GEMMs at the int8 rate, the rest at the float rate
        roof_s = quant / (pq * 1e9) + (total - quant) / (pf * 1e9)
        out["peak_gflops"] = pq
        out["fraction_of_peak"] = {k: v / pq if v else None for k, v in out["achieved_gflops"].items()}
        out["roofline_clips_per_s"] = 1 / roof_s
        out["fraction_of_roofline"] = {k: v * roof_s if v else None for k, v in rates.items()}
    return out


def machine() -> dict:
    """CPU model and core count (lscpu where present), for the record next to any figure."""
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        for key, name in (("Model name", "cpu"), ("Thread(s) per core", "threads_per_core"),
                          ("Core(s) per socket", "cores_per_socket"), ("Flags", "flags")):
            if key in fields:
                info[name] = fields[key].strip()
        flags = set(info.pop("flags", "").split())
        isa = ("avx512_vnni", "avx512_bf16", "amx", "avx2", "avx512f")
        info["isa"] = sorted(f for f in flags if f.startswith(isa))
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return info


def bench(bundle_path, backend: str = "auto", options: dict | None = None, batches=None, iters: int | None = None,
          warmup: int = 2, peaks: bool | dict = True, isolated: bool = True, progress: bool = False,
          verbose: bool = False, task: str | None = None) -> dict:
    """Everything `stexport bench` prints: timings, memory, FLOPs, and the fraction of the GEMM roofline.
    batches None: default_batches(); iters None: timed calls sized per batch (see `calls`). task: a task
    pack's path to time on the swappable bundle. With `progress`, a bar on a terminal (stderr)."""
    from stexport.runtime.backends import load_class
    from stexport.bundle.store import Bundle

    bundle = Bundle.load(bundle_path)
    batches = tuple(batches or default_batches())
    if (iters is not None and iters < 1) or warmup < 0 or not batches or min(batches) < 1:
        raise StexportError("--iters must be ≥1, --warmup ≥0 and every --batch ≥1")
    if backend != "auto":  # a mistyped option is refused here, before a child process starts
        options = load_class(backend).check_options(options or {})
    if isolated:
        res = measure_isolated(str(bundle.path), backend, options, tuple(batches), iters, warmup, progress,
                               verbose=verbose, task=task)
    else:
        res = measure(str(bundle.path), backend, options, tuple(batches), iters, warmup, progress, task=task)
    flops = model_flops(bundle.manifest)
    if peaks is True:
        from tqdm import tqdm

        q, fl = compute_precision(bundle.precision, res.get("described", {}))
        peaks = {}
        for kind in tqdm(sorted({q, fl}), desc="GEMM peak", unit="precision", leave=False,
                         disable=None if progress else True):  # ~1 s each, after loading torch or OpenVINO
            peaks.update(gemm_peaks([kind]))
    return {"bundle": str(bundle.path), "precision": bundle.precision, "frames": bundle.frames,
            "size": bundle.size, **res, "flops": flops, "gemm_peaks": peaks or None,
            **summarize(res, flops, peaks or None, bundle.precision), "machine": machine()}


def _child(job: str) -> None:
    from stexport.logs import setup_logging

    j = json.loads(job)
    setup_logging(bool(j.get("verbose")))
    try:
        res = measure(j["bundle"], j["backend"], j["options"], tuple(j["batches"]), j["iters"], j["warmup"],
                      j["progress"], j.get("probe"), task=j.get("task"))
    except StexportError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(2)
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    _child(sys.argv[1])
