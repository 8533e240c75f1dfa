"""Engines for bundles, as commands ask for them: `stexport engine` (build now) and `stexport build --engine`
(build now on a GPU host with TensorRT, else save the settings and build on first use there)."""

from __future__ import annotations

import logging
import time

from stexport.trt_engines.build import build_plan
from stexport.trt_engines.cache import load_timing, onnx_identity, record_request, records, refuse_unwritable, save
from stexport.trt_engines.cuda import host_mismatch, open_device
from stexport.trt_engines.record import (Host, check_batch, make_record, mismatches, profile_for, profiles_for,
                                          record_profiles, request, settings, task_input,
                                          views_per_call)
from stexport.trt_engines.refit import INT8_REFUSED, refit_names
from stexport.trt_engines.trt import import_tensorrt

from stexport.bundle.store import Bundle
from stexport.errors import StexportError

log = logging.getLogger("stexport")

DEFERRED = "TensorRT engine: will be built on first use on a GPU host with stexport[tensorrt] ({why})"


def build_for_bundle(bundle: Bundle, batch: int | None = None, workspace_gb: float | None = None,
                     opt_level: int | None = None, force: bool = False, progress: bool = False,
                     cuda: str | None = None, gpu: int = 0) -> tuple[dict, bool]:
    """Build (or find the cached) engine for this GPU; returns (record, built). The settings are saved in the
    bundle, so a later rebuild on another GPU uses them. Raises StexportError with the reason when this host
    cannot build (no TensorRT, no GPU, a failed build, a read-only bundle, a batch too large for the model)."""
    req = settings(request(bundle.manifest), batch, workspace_gb, opt_level)
    check_batch(bundle.manifest, req["batch"])
    if req != request(bundle.manifest):
        refuse_unwritable(bundle)  # before anything is written (or TensorRT loads)
    why = host_mismatch()
    if why:
        raise StexportError(f"TensorRT cannot build here: {why}")
    trt = import_tensorrt()
    device = open_device(cuda, gpu)
    try:
        host = Host(trt.__version__, *device.info())
        if req != request(bundle.manifest):
            record_request(bundle, **req)
        return ensure_engine(bundle, trt, host, force=force, progress=progress)
    finally:
        device.close()


def build_or_defer(bundle: Bundle, batch: int | None = None, workspace_gb: float | None = None,
                   opt_level: int | None = None, progress: bool = False) -> str:
    """For `stexport build --engine`: build the engine here if this host can, else save the settings so the
    first use on a GPU host builds it. Returns one line for the user."""
    req = settings(request(bundle.manifest), batch, workspace_gb, opt_level)
    check_batch(bundle.manifest, req["batch"])
    refuse_unwritable(bundle)
    record_request(bundle, **req)
    try:
        why = host_mismatch()
        if why:
            raise StexportError(why)
        import_tensorrt()
        open_device().close()
    except StexportError as e:
        return DEFERRED.format(why=str(e).split(" (")[0].split(";")[0])
    rec, _ = build_for_bundle(bundle, progress=progress)  # this host can build: a failure here is an error
    return (f"TensorRT engine: {rec['file']} for {rec['gpu']} (compute {rec['capability']}), TensorRT "
            f"{rec['tensorrt']}, batch 1-{rec['profile']['max'][0]} (tuned for {profile_opts(rec)}), "
            f"{rec['bytes'] / 1e6:.1f} MB")


def profile_opts(rec: dict) -> str:
    """'3 and 32': the batch sizes the engine's profiles are tuned for."""
    from stexport.trt_engines.record import record_profiles

    return " and ".join(str(p["opt"][0]) for p in record_profiles(rec))


def ensure_engine(bundle: Bundle, trt, host: Host, batch: int | None = None,
                  workspace_gb: float | None = None, opt_level: int | None = None, force: bool = False,
                  progress: bool = False) -> tuple[dict, bool]:
    """An engine valid on `host` for this bundle: the cached one, or a new build. Returns (record, built)."""
    req = settings(request(bundle.manifest), batch, workspace_gb, opt_level)
    check_batch(bundle.manifest, req["batch"])
    onnx = onnx_identity(bundle)
    views = views_per_call(bundle.manifest)
    index = task_input(bundle.manifest)
    profile = profile_for(bundle.manifest.input, req["batch"], views, index)
    profiles = profiles_for(bundle.manifest.input, req["batch"], views, index)
    refit = refit_names(bundle.manifest)
    cached = [r for r in records(bundle) if r["profile"] == profile and record_profiles(r) == profiles
              and not mismatches(r, host, onnx, refit)]
    if cached and not force:
        return cached[0], False
    refuse_unwritable(bundle)
    if bundle.precision == "int8" and bundle.manifest.float_precision == "fp32":
        log.warning("%s: an INT8 bundle with FP32 float parts: TensorRT runs its LayerNorm, Softmax, GELU and "
                    "residuals in FP32 (the network is strongly typed). For FP16 ones rebuild it with "
                    "`stexport build --precision int8 --int8-float fp16`", bundle.path.name)
    onnx_path = bundle.file("onnx")
    t0 = time.perf_counter()
    if bundle.manifest.tasks is not None and refit is None:
        log.warning("%s: %s", bundle.path.name, INT8_REFUSED)
    plan, timing = build_plan(trt, onnx_path, profiles, req["workspace_gb"], req["opt_level"],
                              load_timing(bundle, host), progress=progress, refit=refit)
    rec = make_record(host, onnx, profile, bundle.precision, workspace_gb=req["workspace_gb"],
                      opt_level=req["opt_level"], seconds=time.perf_counter() - t0, size=plan.nbytes,
                      profiles=profiles, refit=refit)
    return save(bundle, rec, plan, timing, host), True
