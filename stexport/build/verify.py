"""Verify a bundle: run its backend and the PyTorch reference on the same decoded clips and compare.

Per view: max and mean |Δlogit|, cosine similarity, top-1 agreement (same argmax) and top-5 agreement (same
top-5 set). Per video, when the clip list has labels: top-1/top-5 accuracy of each (softmax averaged over
views, as `infer` and the official evaluation do) and the difference. A per-precision gate decides pass or
fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stexport.bundle.store import Bundle
from stexport.runtime.classify import softmax
from stexport.errors import StexportError

log = logging.getLogger("stexport")


@dataclass(frozen=True)
class Gate:
    """Thresholds; None means not checked. Accuracy drop in points (0–100), agreement as a fraction."""

    max_abs: float | None = None
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "min_top1_agreement": self.min_top1_agreement,
                "max_accuracy_drop_pt": self.max_accuracy_drop}


# int8: the accuracy drop when labels are given; without labels, top-1 agreement stands in for it.
GATES = {
    "fp32": Gate(max_abs=1e-3, min_top1_agreement=1.0),
    "fp16": Gate(min_top1_agreement=0.99),
    "int8": Gate(max_accuracy_drop=1.0, min_top1_agreement=0.95),
}


def compare(ref: np.ndarray, out: np.ndarray) -> dict:
    """Logit-level agreement of `out` with `ref`, both (N, classes)."""
    d = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    num = (out * ref).sum(-1, dtype=np.float64)
    den = np.linalg.norm(out.astype(np.float64), axis=-1) * np.linalg.norm(ref.astype(np.float64), axis=-1)
    cos = num / np.maximum(den, 1e-30)
    k = min(5, ref.shape[1])
    top_r = np.sort(np.argsort(-ref, axis=1, kind="stable")[:, :k], axis=1)
    top_o = np.sort(np.argsort(-out, axis=1, kind="stable")[:, :k], axis=1)
    return {
        "views": int(len(ref)),
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
        "top5_agreement": float((top_r == top_o).all(axis=1).mean()),
    }


def accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())


def judge(precision: str, metrics: dict, gate: Gate) -> list[dict]:
    """The gate's checks on `metrics`; each {check, value, limit, passed}."""
    checks = []
    labelled = metrics.get("accuracy") is not None
    if gate.max_abs is not None:
        checks.append({"check": "max |Δlogit|", "value": metrics["max_abs"],
                       "limit": f"≤ {gate.max_abs:g}", "passed": metrics["max_abs"] <= gate.max_abs})
    if gate.max_accuracy_drop is not None and labelled:
        drop = metrics["accuracy"]["reference_top1"] - metrics["accuracy"]["backend_top1"]
        checks.append({"check": "top-1 accuracy drop (pt)", "value": drop,
                       "limit": f"≤ {gate.max_accuracy_drop:g}", "passed": drop <= gate.max_accuracy_drop})
    elif gate.min_top1_agreement is not None:
        checks.append({"check": "top-1 agreement", "value": metrics["top1_agreement"],
                       "limit": f"≥ {gate.min_top1_agreement:.1%}",
                       "passed": metrics["top1_agreement"] >= gate.min_top1_agreement - 1e-12})
    return checks


REFERENCE_BATCH_ELEMENTS = 1 << 24  # views per reference call: about this many activations (tokens × width)
MAX_REFERENCE_BATCH = 64


def reference_cache_dir() -> Path:
    """Where the reference's logits are kept (`<stexport home>/reference`, or $STEXPORT_REFERENCE_CACHE)."""
    from stexport.bundle.store import default_home

    return Path(os.environ.get("STEXPORT_REFERENCE_CACHE", default_home().parent / "reference"))


def reference_key(b: Bundle, entries, sampling, pretrained: str | None) -> str:
    """What the reference's logits depend on: the deltas (their bytes' hash), the backbone record (name,
    config, weights source and hash, seed), a --pretrained override (path, size, mtime), the sampling, and
    each video (resolved path, size, mtime)."""
    from stexport.fileutil import sha256_file

    def stamp(p: Path):
        try:
            st = p.stat()
            return [str(p.resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            return [str(p), None, None]

    src = {"deltas": sha256_file(b.file("deltas", verify=False)),
           "backbone": b.manifest.model.backbone.model_dump(mode="json"),
           "pretrained": stamp(Path(pretrained)) if pretrained and os.path.exists(pretrained) else pretrained,
           "sampling": sampling.to_dict(), "videos": [stamp(Path(p)) for p, _ in entries], "format": 1}
    return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _reference_batch(b: Bundle) -> int:
    cfg = b.manifest.model.backbone.config
    per_view = b.frames * (cfg.grid * cfg.grid + 1) * cfg.mlp_width
    return max(1, min(MAX_REFERENCE_BATCH, REFERENCE_BATCH_ELEMENTS // max(per_view, 1)))


def verify(bundle: Bundle | str, clips, backend: str = "auto", max_clips: int | None = None,
           gate: Gate | None = None, pretrained: str | None = None, progress: bool = False,
           reference=None, use_cache: bool = True, task=None, decode_timeout: float | None = None,
           max_decode_s: float | None = None, **backend_options) -> dict:
    """Compare `backend` on `bundle` with the PyTorch reference on the videos of `clips` (a '<video> <label>'
    list, a directory, a video file, or a list of those). Returns the report; report['passed'] is the gate's
    verdict. Videos are decoded in a child process (stexport.runtime.decode_worker): one that cannot be decoded is
    listed in report['failed'] and the rest go on: one that crashes the decoder, reads no frame for
    `decode_timeout` seconds (default 60) or takes longer than `max_decode_s` in all (default: no limit) too.
    Non-finite logits fail the gate ("finite logits").

    The backend runs each video's views as `infer` does (one call per video). The reference runs views of
    several videos per call (same logits, far fewer calls), and its logits are cached by model, sampling and
    videos (see `reference_key`; `use_cache=False` recomputes), so verifying another runtime or precision of
    the same model on the same videos skips it.

    reference: an already-built reference model (tests; never cached); otherwise it is rebuilt from the
    bundle's deltas and backbone record (`pretrained` overrides where the backbone weights are now).
    task: a task pack (TaskPack or path) of a swappable bundle: the backend runs it, the reference is the
    backbone with the pack's deltas, and the pack's sampling is used.
    Raises StexportError for bad input (no decodable video, labels outside the classes, …).
    """
    from stexport.runtime import backends
    from stexport.runtime.classify import _prefetched
    from stexport.runtime.decode_worker import DecodeWorker, limits_of
    from stexport.runtime.video import Sampling, VideoError, display, read_clip_lists

    if backend not in backends.names():
        backends.load_class(backend)  # an unknown name: refused (with the closest one) before any work
    limits = limits_of(decode_timeout, max_decode_s)
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    b.check_hashes = False  # verify looks at the bundle as it is; changed files fail its gate instead
    precision = b.precision
    gate = gate or GATES.get(precision, GATES["fp32"])
    entries = read_clip_lists(clips)
    where = display(clips) if isinstance(clips, (str, Path)) else ", ".join(display(c) for c in clips)
    if max_clips is not None:
        if max_clips < 1:
            raise StexportError(f"--max-clips {max_clips}: must be at least 1")
        entries = entries[:max_clips]
    modified = b.changed_files()
    if modified:
        log.warning("%s: files changed since the build: %s", b.path, ", ".join(modified))
    sampling = Sampling.from_manifest(b.manifest)
    pack = None
    if task is not None:
        from stexport.bundle.taskpack import as_pack

        pack = as_pack(task)
        pack.check_fits(b)
        sampling = Sampling(frames=b.frames, size=b.size, **pack.record.sampling.model_dump())
    name = backends.resolve(backend, b)
    if name is None:
        raise StexportError("no runtime to verify on this machine (auto found neither OpenVINO nor ONNX Runtime); "
                            "install one: pip install onnxruntime")
    if name == "torch":
        raise StexportError("--backend torch is the reference itself; verify another (e.g. onnxruntime)")

    cache = None
    stored: dict[str, np.ndarray] = {}
    if reference is None and use_cache:
        cache = reference_cache_dir() / (f"{reference_key(b, entries, sampling, pretrained)}"
                                         f"{'-' + pack.key[:16] if pack else ''}.npz")
        if cache.is_file():
            try:
                with np.load(cache) as z:
                    stored = {k: z[k] for k in z.files}
                log.info("reference: logits from the cache %s", cache)
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable reference cache entry (%s); recomputing", cache, e)
                stored = {}
    ref = None
    t_ref = 0.0
    if not stored:
        from stexport.build.torch_backend import TorchBackend

        t = time.perf_counter()
        if reference is None and pack is not None:
            from stexport.build.loaders import task_reference

            reference = task_reference(b, pack, pretrained)
        ref = TorchBackend(b, model=reference, pretrained=pretrained)
        log.info("reference: PyTorch model rebuilt from the bundle's deltas and backbone record in %.2f s",
                 time.perf_counter() - t)
    test = backends.create(backend, b, **backend_options)  # 'auto' falls back past a backend that cannot open
    if pack is not None:
        test.set_task(pack)
    batch = _reference_batch(b)
    ref_logits, out_logits, labels, failed, done = [], [], [], [], []
    pending: list[tuple[int, np.ndarray]] = []  # (index in done, views) waiting for the reference
    t_out = 0.0

    def flush():
        nonlocal t_ref
        if not pending:
            return
        t = time.perf_counter()
        logits = ref.run(np.concatenate([v for _, v in pending]))
        t_ref += time.perf_counter() - t
        at = 0
        for i, v in pending:
            ref_logits[i] = logits[at:at + len(v)]
            at += len(v)
        pending.clear()

    # a child process: a decoder crash or stall costs one video
    decoder = DecodeWorker(threads=None, limits=limits)

    def work(path):
        return decoder.decode(str(path), sampling).clips

    try:
        bar = tqdm(total=len(entries), desc="verify", unit="video", disable=None if progress else True,
                   leave=False)
        tasks = (((path, label), lambda path=path: work(path)) for path, label in entries)
        for (path, label), views in _prefetched(tasks, 2):
            bar.update()
            if isinstance(views, Exception):
                if not isinstance(views, VideoError):
                    raise views
                failed.append({"video": display(path), "error": str(views)})
                log.warning("%s", views)  # one line per video that could not be decoded (the report counts them)
                continue
            t = time.perf_counter()
            out_logits.append(test.run(views))
            t_out += time.perf_counter() - t
            labels.append(label)
            done.append(str(path))
            if stored:
                key = str(len(done) - 1)
                if key not in stored or len(stored[key]) != len(views):
                    raise StexportError(f"{cache}: reference cache entry does not match the videos; delete it "
                                        "or pass --no-cache")
                ref_logits.append(stored[key])
                continue
            ref_logits.append(None)
            pending.append((len(ref_logits) - 1, views))
            if sum(len(v) for _, v in pending) >= batch:
                flush()
        flush()
        bar.close()
        described = test.describe()
    finally:
        decoder.close()
        test.close()
    if not out_logits:
        raise StexportError(f"{where}: none of the {len(entries)} videos could be decoded "
                            f"(first error: {failed[0]['error'] if failed else 'none'})")
    if cache is not None and not stored:
        import io

        from stexport.fileutil import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, **{str(i): r for i, r in enumerate(ref_logits)})
        atomic_write_bytes(cache, buf.getbuffer())
    ref_probs = [softmax(r).mean(0) for r in ref_logits]
    out_probs = [softmax(o).mean(0) for o in out_logits]
    ref_all, out_all = np.concatenate(ref_logits), np.concatenate(out_logits)
    non_finite = {"reference": int((~np.isfinite(ref_all)).any(axis=1).sum()),
                  "backend": int((~np.isfinite(out_all)).any(axis=1).sum())}
    metrics = compare(np.nan_to_num(ref_all, nan=0.0), np.nan_to_num(out_all, nan=0.0))
    metrics["non_finite_views"] = non_finite
    metrics["accuracy"] = None
    n = len(ref_probs)
    if all(lb is not None for lb in labels):
        y = np.asarray(labels)
        classes = ref_probs[0].shape[0]
        if y.min() < 0 or y.max() >= classes:
            bad = int(y.max() if y.max() >= classes else y.min())
            raise StexportError(f"{where}: label {bad} is outside the model's {classes} classes")
        rp, op = np.stack(ref_probs), np.stack(out_probs)
        acc = {"reference_top1": accuracy(rp, y, 1), "backend_top1": accuracy(op, y, 1),
               "reference_top5": accuracy(rp, y, 5), "backend_top5": accuracy(op, y, 5)}
        acc["top1_difference"] = acc["backend_top1"] - acc["reference_top1"]
        acc["top5_difference"] = acc["backend_top5"] - acc["reference_top5"]
        metrics["accuracy"] = acc
    elif any(lb is not None for lb in labels):
        log.warning("%s: only some videos have labels; accuracy is not reported", where)
    checks = judge(precision, metrics, gate)
    if modified:
        checks.insert(0, {"check": "files unchanged since the build", "value": len(modified), "limit": "0 changed",
                          "passed": False})
    ref_described = (ref.describe() if ref is not None
                     else {"backend": "torch", "device": "cpu", "precision": "fp32 (reference)"})
    ref_described["cached"] = bool(stored)
    if cache is not None:
        ref_described["cache"] = str(cache)
    if any(non_finite.values()):  # never a pass on NaN/Inf, whatever the other numbers say
        checks.insert(0, {"check": "finite logits", "value": non_finite["backend"] + non_finite["reference"],
                          "limit": "0 non-finite views", "passed": False})
    return {
        "bundle": str(b.path),
        **({"task": {"pack": str(pack.path), "name": pack.name, "sha256": pack.key}} if pack else {}),
        "precision": precision,
        "backend": described,
        "reference": ref_described,
        "sampling": sampling.to_dict(),
        "videos": n,
        "failed": failed,
        "modified_files": modified,
        "metrics": metrics,
        "seconds_per_video": {"backend": t_out / n, "reference": t_ref / n},
        "reference_batch": batch,
        "gate": {"precision": precision, **gate.to_dict()},
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }


def format_report(report: dict) -> str:
    m = report["metrics"]
    be = report["backend"]
    where = ", ".join(be.get("providers", [])[:1]) or be.get("device", "")
    lines = [
        f"bundle           {report['bundle']} ({report['precision']})",
        *([f"task             {report['task']['name']} ({report['task']['pack']})"] if report.get("task") else []),
        f"backend          {be.get('backend')}{f' ({where})' if where else ''} vs PyTorch reference",
        f"videos           {report['videos']} ({m['views']} views)"
        + (f", {len(report['failed'])} could not be decoded" if report["failed"] else ""),
        f"max |Δlogit|     {m['max_abs']:.3g}",
        f"mean |Δlogit|    {m['mean_abs']:.3g}",
        f"cosine           min {m['cosine_min']:.6f}  mean {m['cosine_mean']:.6f}",
        f"top-1 agreement  {m['top1_agreement']:.1%}",
        f"top-5 agreement  {m['top5_agreement']:.1%} (same top-5 set)",
    ]
    acc = m.get("accuracy")
    if acc:
        lines += [
            f"top-1 accuracy   reference {acc['reference_top1']:.1f}%  backend {acc['backend_top1']:.1f}%  "
            f"Δ {acc['top1_difference']:+.1f} pt",
            f"top-5 accuracy   reference {acc['reference_top5']:.1f}%  backend {acc['backend_top5']:.1f}%  "
            f"Δ {acc['top5_difference']:+.1f} pt",
        ]
    s = report["seconds_per_video"]
    cached = report.get("reference", {}).get("cached")
    lines.append(f"seconds/video    backend {s['backend']:.3f}  reference "
                 + ("(cached logits)" if cached else f"{s['reference']:.3f} (batched)"))
    for c in report["checks"]:
        v = c["value"]
        shown = f"{v:.1%}" if "agreement" in c["check"] else f"{v:.3g}"
        if c["check"] == "finite logits":
            nf = m["non_finite_views"]
            shown = f"{nf['backend']} backend / {nf['reference']} reference views with NaN/Inf"
        lines.append(f"gate             {c['check']} = {shown} (limit {c['limit']}): "
                     f"{'pass' if c['passed'] else 'FAIL'}")
    if report["modified_files"]:
        lines.append(f"warning          files changed since the build: {', '.join(report['modified_files'])}")
    lines.append(f"result           {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)
