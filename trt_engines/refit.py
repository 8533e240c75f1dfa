"""Task packs on TensorRT: refittable engines, and switching task by refitting the per-task tensors.

A swappable bundle (`stexport build --swappable`) keeps every per-task tensor as its own ONNX initializer; the
ONNX parser names each TensorRT weight after its initializer (INetworkDefinition::setWeightsName), so a task
pack's tensors, keyed by those names in the graph's layout and type, are what `Refitter.set_named_weights`
takes: the same values TensorRT's own IParserRefitter would read from an ONNX file of that task.

Which refit flag (TensorRT 10.x/11.x, NvInfer.h):
- REFIT_INDIVIDUAL with `network.mark_weights_refittable(name)` for each per-task tensor: only those are
  refittable, "by default, all weights are non-refittable when this flag is enabled", so the backbone's
  weights are optimised (constant-folded, fused) as in a plain engine. This is what stexport builds.
- REFIT makes every weight refittable, which keeps the builder from folding the backbone's; stexport falls back
  to it only on a TensorRT without REFIT_INDIVIDUAL or mark_weights_refittable (none of 10.x/11.x that it
  supports lacks them; the fallback is for odd builds). TensorRT 11.3's docs also warn that REFIT can drop a
  GEMM bias from the refit API.
- REFIT_IDENTICAL is for refitting the build's own weights (weight-stripped plans); with other values
  "behavior is undefined": never for tasks.

INT8: a Q/DQ graph's per-task tensors include its quantized weights, their per-channel scales and activation
scales. In explicit quantization TensorRT quantizes weights with the Q scale at build time and fuses the
activation scales into the INT8 kernels it picks; its refit documentation covers named weights, never Q/DQ
scales (only TensorRT-RTX's parser documents DequantizeLinear scales as refittable), and NVIDIA's own diffusion
demo refuses engine refit for INT8/FP8 models with LoRA. So INT8 swappable bundles get a plain engine (their
own task runs) and packs on them are refused in one line naming the fix.

The pure functions here (names, host arrays, the switch decision, the missing-weights check) are tested on CPU;
`refit_engine` is the only part that needs TensorRT.
"""

from __future__ import annotations

import numpy as np

from stexport.errors import StexportError
from stexport.trt_engines.trt import last_error
from stexport.bundle.manifest import Manifest

INT8_REFUSED = ("TensorRT cannot refit an INT8 engine's quantization scales (its Q/DQ scales are fused into the "
                "INT8 kernels when the engine is built), so its engine holds the base task only; run INT8 packs "
                "on onnxruntime or openvino, or build an FP16 or FP32 swappable base (`stexport build "
                "--swappable --precision fp16`), or a full INT8 bundle for the task")


def refit_names(manifest: Manifest) -> list[str] | None:
    """The per-task tensors (ONNX initializer names) an engine of this bundle is built refittable for: every
    tensor of a swappable FP32/FP16 bundle; None for plain bundles and INT8 ones (see INT8_REFUSED)."""
    if manifest.tasks is None or manifest.precision == "int8":
        return None
    return [t.name for t in manifest.tasks.tensors]


def no_tasks_reason(manifest: Manifest) -> str:
    """Why a TensorRT engine of this bundle runs no task packs (for the one-line refusal)."""
    if manifest.tasks is None:
        return "the bundle is not swappable; rebuild it with `stexport build --swappable`"
    if manifest.precision == "int8":
        return INT8_REFUSED
    return "its engine was built without refittable task tensors; rebuild it with `stexport engine BUNDLE --force`"


def mark_refittable(trt, network, config, names: list[str]) -> str:
    """Make exactly `names` refittable in `network` (parsed from the ONNX) built with `config`. Returns the
    flag used: "individual" (REFIT_INDIVIDUAL + mark_weights_refittable) or "all" (REFIT, older builds).
    StexportError naming the tensor TensorRT will not make refittable."""
    if hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(network, "mark_weights_refittable"):
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        for name in names:
            if not network.mark_weights_refittable(name):
                raise StexportError(f"TensorRT {trt.__version__} cannot make per-task tensor '{name}' refittable "
                                    "(no weights of that name in the parsed network, or not refittable); "
                                    "rebuild the bundle with `stexport build --swappable --force`")
        return "individual"
    config.set_flag(trt.BuilderFlag.REFIT)
    return "all"


def host_weights(tensors: dict[str, np.ndarray], wanted: dict[str, tuple[tuple[int, ...], str]],
                 what: str = "the task pack") -> dict[str, np.ndarray]:
    """The arrays to refit the engine with, by ONNX name: each of `tensors` (a pack's, graph layout) as a
    C-contiguous array of the type the engine was built with (`wanted`: name → (shape, numpy dtype name) of
    its refittable tensors). Floats of another width are converted; an unknown name, a missing one, another
    shape, or an integer/float mix is a StexportError naming the tensor."""
    for name in tensors:
        if name not in wanted:
            raise StexportError(f"{what}: tensor '{name}' is not a refittable weight of the TensorRT engine; "
                                "make the pack against this bundle with `stexport pack`")
    out = {}
    for name, (shape, dtype) in wanted.items():
        if name not in tensors:
            raise StexportError(f"{what}: no tensor '{name}', which the TensorRT engine refits per task; "
                                "make the pack against this bundle with `stexport pack`")
        a, want = np.asarray(tensors[name]), np.dtype(dtype)
        if tuple(a.shape) != tuple(shape):
            raise StexportError(f"{what}: tensor '{name}' has shape {list(a.shape)}, the engine's "
                                f"{list(shape)}; make the pack against this bundle with `stexport pack`")
        if a.dtype != want and not (a.dtype.kind == "f" and want.kind == "f"):
            raise StexportError(f"{what}: tensor '{name}' is {a.dtype}, the engine's {want}; make the pack "
                                "against this bundle with `stexport pack`")
        out[name] = np.ascontiguousarray(a, dtype=want)
    return out


def needs_switch(active, wanted) -> bool:
    """Whether the engine (holding task `active`: a pack key, or None for the bundle's own) must be refitted
    before running task `wanted`."""
    return active != wanted


def check_missing(missing: list[str], engine: str) -> None:
    """StexportError naming what TensorRT still wants before it can refit (get_missing_weights())."""
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise StexportError(f"{engine}: TensorRT wants weights '{missing[0]}'{more} refitted with the task's, "
                            "which no task pack holds; rebuild the engine with `stexport engine BUNDLE --force`")


def refit_engine(trt, engine, logger, weights: dict[str, np.ndarray], label: str = "engine") -> None:
    """Refit `engine` with `weights` (host_weights' arrays). The caller guarantees no work is pending on the
    engine (refit_cuda_engine's contract); its execution contexts stay valid. StexportError naming the tensor
    TensorRT rejects, or what it still misses."""

    mark = len(logger.errors)
    refitter = trt.Refitter(engine, logger)
    held = []  # the Weights wrap the arrays without copying: keep both alive until the refit returns
    for name, array in weights.items():
        prototype = refitter.get_weights_prototype(name)
        if prototype.size < 0:
            raise StexportError(f"{label}: '{name}' is not a refittable weight of this engine; rebuild it with "
                                "`stexport engine BUNDLE --force`")
        dtype = np.dtype(trt.nptype(prototype.dtype))
        if prototype.size != array.size or dtype != array.dtype:
            raise StexportError(f"{label}: tensor '{name}' is {array.dtype}[{array.size}], the engine's "
                                f"{dtype}[{prototype.size}]; rebuild the engine with `stexport engine BUNDLE --force`")
        w = trt.Weights(array)
        held.append((w, array))
        if not refitter.set_named_weights(name, w):
            raise StexportError(f"{label}: TensorRT rejected tensor '{name}' ({last_error(logger, mark)})")
    check_missing(list(refitter.get_missing_weights()), label)
    if not refitter.refit_cuda_engine():
        raise StexportError(f"{label}: TensorRT could not refit the engine ({last_error(logger, mark)}); "
                            "it may hold a mix of two tasks now: reopen the backend")
    del held
