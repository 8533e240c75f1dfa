"""Backend registry. Each runtime lives behind `Backend` (base.py) and is imported only when asked for."""

from __future__ import annotations

import importlib

from stexport.backends.base import Backend
from stexport.bundle import Bundle
from stexport.errors import StexportError

# name -> "module:Class"; modules are imported lazily so a missing runtime never breaks `import stexport`.
REGISTRY: dict[str, str] = {
    "torch": "stexport.backends.torch_ref:TorchBackend",
    "onnxruntime": "stexport.backends.ort:OrtBackend",
}


def names() -> list[str]:
    return ["auto", *REGISTRY]


def load_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise StexportError(f"unknown backend '{name}'; choose one of: {', '.join(names())}")
    mod, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def resolve(name: str, bundle: Bundle) -> str:
    """Turn 'auto' into a concrete backend name for this machine and bundle."""
    if name != "auto":
        return name
    for candidate in AUTO_ORDER:
        if candidate in REGISTRY and load_class(candidate).usable(bundle):
            return candidate
    return "torch"


# Tried in order by `auto`; each backend class has `usable(bundle) -> bool` (cheap, no model load).
AUTO_ORDER: list[str] = ["onnxruntime"]


def create(name: str, bundle: Bundle, **options) -> Backend:
    return load_class(resolve(name, bundle))(bundle, **options)


__all__ = ["Backend", "REGISTRY", "AUTO_ORDER", "create", "resolve", "names", "load_class"]
