"""What a TensorRT engine was built for, and whether it may run here.

Pure functions over plain dicts (the manifest's EngineRecords dumped): no TensorRT, no GPU. An engine is only valid for the exact combination it
was built for: TensorRT version, GPU (name and compute capability) and ONNX file (sha256); its optimisation
profile says which batch sizes it takes. Records live in the bundle's manifest under "engines".
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass

from stexport.errors import StexportError
from stexport.bundle.manifest import InputRecord, Manifest

ENGINE_DIR = "engines"
DEFAULT_BATCH = 32
MAX_BATCH = 1024  # the ONNX export's dynamic batch axis goes up to this
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimisation level
OPT_LEVELS = range(6)


@dataclass(frozen=True)
class Host:
    """This machine as an engine sees it."""

    tensorrt: str  # full version, e.g. "10.16.1.11"
    gpu: str  # e.g. "NVIDIA H100 80GB HBM3"
    capability: str  # compute capability, e.g. "9.0"

    def __str__(self) -> str:
        return f"{self.gpu} (compute {self.capability}) with TensorRT {self.tensorrt}"


def input_shape(inp: InputRecord) -> tuple[int, ...]:
    """One sample's input shape (no batch axis), in the graph's layout, from the manifest's input record."""
    return tuple(inp.shape(1)[1:])


def task_input(manifest: Manifest) -> str | None:
    """The network's second input on a multi-task bundle (the task index of each clip, int64 [B]), else None."""
    return manifest.multitask.input if manifest.multitask is not None else None


def profile_for(inp: InputRecord, batch: int = DEFAULT_BATCH, views: int | None = None,
                index: str | None = None) -> dict:
    """The engine's whole batch range (its profiles together): min 1, max `batch`, opt `views` (the clips
    `infer` sends per call: a video's temporal × spatial views) when given, else `batch`; other axes fixed.
    `index`: a multi-task bundle's task input (task_input), whose only axis is the same batch axis."""
    if not 1 <= batch <= MAX_BATCH:
        raise StexportError(f"--batch {batch}: choose a batch size from 1 to {MAX_BATCH}")
    s = list(input_shape(inp))
    opt = min(views, batch) if views else batch
    return {"input": inp.name, "min": [1, *s], "opt": [opt, *s], "max": [batch, *s], "index": index}


def profiles_for(inp: InputRecord, batch: int = DEFAULT_BATCH, views: int | None = None,
                 index: str | None = None) -> list[dict]:
    """TensorRT optimisation profiles, in index order. Kernels are chosen for a profile's opt shape, so one
    profile for 1..batch tuned at `batch` runs infer's few clips per call with kernels made for 32. With
    `views` below `batch`: profile 0 covers 1..views tuned at views (what infer and verify send), profile 1
    covers views+1..batch tuned at batch (bench, batch jobs). Otherwise one profile 1..batch at batch."""
    whole = profile_for(inp, batch, index=index)
    if not views or views >= batch:
        return [whole]
    s = whole["min"][1:]
    return [{"input": inp.name, "min": [1, *s], "opt": [views, *s], "max": [views, *s], "index": index},
            {"input": inp.name, "min": [views + 1, *s], "opt": [batch, *s], "max": [batch, *s], "index": index}]


def profile_shapes(profile: dict) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """{network input: (min, opt, max) shape} of one optimisation profile: the clips' input and, on a
    multi-task bundle, its task index (the batch axis alone). What the build sets and the runtime feeds."""
    shapes = {profile["input"]: (profile["min"], profile["opt"], profile["max"])}
    if profile.get("index"):
        shapes[profile["index"]] = ([profile["min"][0]], [profile["opt"][0]], [profile["max"][0]])
    return shapes


def batch_shapes(profile: dict, n: int) -> dict[str, tuple[int, ...]]:
    """{network input: shape} for a batch of `n` clips under `profile` (see profile_shapes)."""
    return {name: (n, *lo[1:]) for name, (lo, _, _) in profile_shapes(profile).items()}


def pick_profile(profiles: list[dict], n: int) -> int:
    """Index of the profile to run a batch of `n` with: among those whose min..max covers n, the one whose opt
    is nearest to n (ties: the lower index). Raises StexportError when none covers n."""
    covering = [i for i, p in enumerate(profiles) if p["min"][0] <= n <= p["max"][0]]
    if not covering:
        ranges = ", ".join(f"{p['min'][0]}-{p['max'][0]}" for p in profiles)
        raise StexportError(f"batch {n} is outside the engine's profiles ({ranges})")
    return min(covering, key=lambda i: (abs(profiles[i]["opt"][0] - n), i))


def views_per_call(manifest: Manifest) -> int:
    """Clips per `infer` call: one video's temporal × spatial views."""
    return manifest.sampling.temporal_views * manifest.sampling.spatial_views


TENSOR_LIMIT = 2**31 - 1  # elements: TensorRT's tensors (and the volumes of their shapes) are 32-bit indexed


def largest_tensor(manifest: Manifest) -> tuple[int, str]:
    """Elements per clip of the model's largest activation tensor, and what it is (from the ViT config)."""
    cfg, T = manifest.model.backbone.config, manifest.input.frames
    L = cfg.grid ** 2 + 1
    spec = manifest.model.adapter.spec
    sizes = {"the attention scores": T * cfg.heads * L * L, "the MLP's hidden layer": T * L * cfg.mlp_width,
             "the token stream": T * L * cfg.width, "the adapters' bottleneck": T * L * spec.width,
             "the input": T * manifest.input.size ** 2 * 3}
    what = max(sizes, key=sizes.get)
    return sizes[what], what


def batch_limit(manifest: Manifest) -> int:
    """The largest batch whose every tensor stays within TensorRT's 2^31 elements (at most MAX_BATCH)."""
    return max(1, min(MAX_BATCH, TENSOR_LIMIT // largest_tensor(manifest)[0]))


def check_batch(manifest: Manifest, batch: int) -> None:
    """StexportError naming the model's limit when `batch` clips would overflow a tensor."""
    limit = batch_limit(manifest)
    if batch > limit:
        per, what = largest_tensor(manifest)
        raise StexportError(f"--batch {batch}: {manifest.model.backbone.name} at {manifest.input.frames}x"
                            f"{manifest.input.size} px holds {per / 1e6:.2f} M elements per clip in {what}, and "
                            f"TensorRT tensors hold at most 2^31 elements: choose --batch {limit} or less")


def max_batch(record: dict) -> int:
    return int(record["profile"]["max"][0])


def record_profiles(record: dict) -> list[dict]:
    """The record's TensorRT profiles in index order (records from before multi-profile engines: one)."""
    return record.get("profiles") or [record["profile"]]


def engine_key(host: Host, onnx: dict, profile: dict, precision: str, profiles: list[dict] | None = None,
               refit: list[str] | None = None) -> str:
    """Cache key: everything an engine's validity depends on (not build options like workspace)."""
    key = {"tensorrt": host.tensorrt, "gpu": host.gpu, "capability": host.capability,
           "onnx": onnx, "profile": profile, "precision": precision}
    if profiles and profiles != [profile]:
        key["profiles"] = profiles
    if refit:
        key["refit"] = sorted(refit)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_record(host: Host, onnx: dict, profile: dict, precision: str, *, workspace_gb: float | None,
                opt_level: int, seconds: float, size: int, profiles: list[dict] | None = None,
                refit: list[str] | None = None) -> dict:
    profiles = profiles or [profile]
    key = engine_key(host, onnx, profile, precision, profiles, refit)
    return {"key": key, "file": f"{ENGINE_DIR}/{key}.engine", "tensorrt": host.tensorrt, "gpu": host.gpu,
            "capability": host.capability, "onnx": onnx, "precision": precision, "profile": profile,
            "profiles": profiles,
            "workspace_gb": workspace_gb, "opt_level": opt_level, "build_seconds": round(seconds, 1),
            "bytes": size, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "refit": list(refit) if refit else None}


def mismatches(record: dict, host: Host, onnx: dict, refit: list[str] | None = None) -> list[str]:
    """Why `record`'s engine cannot run on `host` with this ONNX (empty: it can). `refit`: the tensors the
    bundle wants refittable (refit_names); an engine built with others (or none) does not fit."""
    why = []
    if record.get("tensorrt") != host.tensorrt:
        why.append(f"built with TensorRT {record.get('tensorrt')}, this host has {host.tensorrt}")
    if record.get("gpu") != host.gpu or record.get("capability") != host.capability:
        why.append(f"built for {record.get('gpu')} (compute {record.get('capability')}), this host has "
                   f"{host.gpu} (compute {host.capability})")
    if record.get("onnx") != onnx:
        old = (record.get("onnx") or {}).get("sha256", "?")
        why.append(f"built from another ONNX model (sha256 {old[:12]}…, "
                   f"the bundle's is {onnx['sha256'][:12]}…)")
    if (record.get("refit") or None) != (refit or None):
        why.append("built without refittable task tensors (the bundle is swappable)" if refit else
                   "built refittable for task packs (the bundle is not swappable)")
    return why


def choose(records: list[dict], host: Host, onnx: dict, batch: int | None = None,
           refit: list[str] | None = None) -> tuple[dict | None, str]:
    """The engine to run here, or None and the reason none fits (for the rebuild / fallback message).

    Among valid engines prefer the smallest one whose profile covers `batch`, else the largest (the backend
    splits bigger batches into chunks it takes). `refit`: as in mismatches."""
    if not records:
        return None, "the bundle has no TensorRT engine yet"
    valid = [r for r in records if not mismatches(r, host, onnx, refit)]
    if batch is not None and valid:
        covering = [r for r in valid if max_batch(r) >= batch]
        if not covering:
            best = max(valid, key=max_batch)
            return best, (f"batch {batch} exceeds the engine's profile (max {max_batch(best)}); "
                          "running in chunks")
        return min(covering, key=max_batch), ""
    if valid:
        return max(valid, key=max_batch), ""
    newest = max(records, key=lambda r: r.get("built", ""))
    return None, "its engine was " + "; ".join(mismatches(newest, host, onnx, refit))


def replaces(old: dict, new: dict) -> bool:
    """Whether `new` makes `old` useless: same host and profile, or `old` was built from another ONNX."""
    same_host = all(old.get(k) == new.get(k) for k in ("tensorrt", "gpu", "capability"))
    return old.get("onnx") != new["onnx"] or (same_host and record_profiles(old) == record_profiles(new))


def timing_cache_file(host: Host) -> str:
    """Timing caches are per GPU and TensorRT version; kept beside the engines and reused by later builds."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{host.gpu}-sm{host.capability}-trt{host.tensorrt}").strip("-")
    return f"{ENGINE_DIR}/timing-{slug}.cache"


def request(manifest: Manifest) -> dict | None:
    """Build settings recorded by `stexport build --engine` on a host that could not build then."""
    req = manifest.tensorrt_request
    return req.model_dump(mode="json") if req is not None else None


def make_request(batch: int = DEFAULT_BATCH, workspace_gb: float | None = None,
                 opt_level: int = DEFAULT_OPT_LEVEL) -> dict:
    if not 1 <= batch <= MAX_BATCH:
        raise StexportError(f"--batch {batch}: choose a batch size from 1 to {MAX_BATCH}")
    if opt_level not in OPT_LEVELS:
        raise StexportError(f"--opt-level {opt_level}: TensorRT's builder optimisation levels are 0 to 5")
    if workspace_gb is not None and workspace_gb <= 0:
        raise StexportError(f"--workspace-gb {workspace_gb}: give a positive number of GiB, or leave it out")
    return {"batch": batch, "workspace_gb": workspace_gb, "opt_level": opt_level}


def settings(saved: dict | None, batch: int | None = None, workspace_gb: float | None = None,
             opt_level: int | None = None) -> dict:
    """Build settings: explicit values, else the ones saved in the bundle, else the defaults."""
    saved = saved or {}
    if workspace_gb is None:
        workspace_gb = saved.get("workspace_gb")
    if opt_level is None:
        opt_level = saved.get("opt_level", DEFAULT_OPT_LEVEL)
    return make_request(batch=batch or saved.get("batch", DEFAULT_BATCH), workspace_gb=workspace_gb,
                        opt_level=opt_level)
