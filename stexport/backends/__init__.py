"""Backend registry. Each runtime lives behind `Backend` (base.py) and is imported only when asked for."""

from __future__ import annotations

import importlib
import logging

from stexport.backends.base import Backend
from stexport.bundle import Bundle
from stexport.errors import StexportError

log = logging.getLogger("stexport")

# name -> "module:Class"; modules are imported lazily so a missing runtime never breaks `import stexport`.
REGISTRY: dict[str, str] = {
    "torch": "stexport.backends.torch_ref:TorchBackend",
    "onnxruntime": "stexport.backends.ort:OrtBackend",
    "tensorrt": "stexport.trt_engines.runtime:TensorRTBackend",
    "openvino": "stexport.backends.openvino:OpenVINOBackend",
    "torchscript": "stexport.backends.torchscript:TorchScriptBackend",
}


def names() -> list[str]:
    return ["auto", *REGISTRY]


def load_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name.lower(), names(), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise StexportError(f"unknown backend '{name}'; {hint}choose one of: {', '.join(names())}")
    mod, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def resolve(name: str, bundle: Bundle, skip: tuple[str, ...] = ()) -> str:
    """Turn 'auto' into a concrete backend name for this machine and bundle (passing over `skip`)."""
    if name != "auto":
        return name
    for candidate in AUTO_ORDER:
        if candidate in REGISTRY and candidate not in skip and load_class(candidate).usable(bundle):
            return candidate
    return "torch"


# Tried in order by `auto`; each backend class has `usable(bundle) -> bool` (cheap, no model load).
# OpenVINO before ONNX Runtime: on x86-64 CPUs it runs the same ONNX faster (INT8 ~1.5x, FP32 ~1.1x in
# benchmarks/RESULTS.md); its usable() is False elsewhere.
AUTO_ORDER: list[str] = ["tensorrt", "openvino", "onnxruntime"]


def create(name: str, bundle: Bundle, **options) -> Backend:
    """A backend for `bundle`. With 'auto', one that fails to open (e.g. a TensorRT engine built for another GPU
    that cannot be rebuilt here) is reported with its reason and the next usable one is tried."""
    failed: tuple[str, ...] = ()
    while True:
        chosen = resolve(name, bundle, skip=failed)
        try:
            backend = load_class(chosen)(bundle, **options)
            log.info("backend: %s%s, options %s: %s", chosen, " (picked by auto)" if name == "auto" else "",
                     options or "defaults", backend.describe())
            return backend
        except StexportError as e:
            if name != "auto" or chosen == "torch":
                raise
            failed += (chosen,)
            log.warning(f"{chosen} cannot run {bundle.path.name}: {e}; "
                        f"falling back to {resolve(name, bundle, failed)}")


__all__ = ["Backend", "REGISTRY", "AUTO_ORDER", "create", "resolve", "names", "load_class"]
