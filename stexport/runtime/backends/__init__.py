"""Backend registry. Each runtime lives behind `Backend` (base.py) and is imported only when asked for."""

from __future__ import annotations

import importlib
import logging

from stexport.runtime.backends.base import Backend, Option
from stexport.bundle.store import Bundle
from stexport.errors import BundleChanged, StexportError

log = logging.getLogger("stexport")

# name -> "module:Class"; modules are imported lazily so a missing runtime never breaks `import stexport`.
REGISTRY: dict[str, str] = {
    "torch": "stexport.build.torch_backend:TorchBackend",
    "onnxruntime": "stexport.runtime.backends.ort:OrtBackend",
    "tensorrt": "stexport.trt_engines.runtime:TensorRTBackend",
    "openvino": "stexport.runtime.backends.openvino:OpenVINOBackend",
    "torchscript": "stexport.runtime.backends.torchscript:TorchScriptBackend",
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


def resolve(name: str, bundle: Bundle, skip: tuple[str, ...] = ()) -> str | None:
    """Turn 'auto' into a concrete backend name for this machine and bundle (passing over `skip`); None when
    no runtime here can run it. 'auto' never picks the PyTorch reference: a bundle whose model cannot run is an
    error, not a 10x slower answer."""
    if name != "auto":
        return name
    for candidate in AUTO_ORDER:
        if candidate in REGISTRY and candidate not in skip and load_class(candidate).usable(bundle):
            return candidate
    return None


# Tried in order by `auto`; each backend class has `usable(bundle) -> bool` (cheap, no model load).
# OpenVINO before ONNX Runtime: on x86-64 CPUs it runs the same ONNX faster (INT8 ~1.5x, FP32 ~1.1x in
# benchmarks/RESULTS.md); its usable() is False elsewhere.
AUTO_ORDER: list[str] = ["tensorrt", "openvino", "onnxruntime"]


def options_of(name: str) -> tuple[Option, ...]:
    """The options backend `name` declares (importing only its module)."""
    return load_class(name).OPTIONS


def options_help() -> str:
    """Every backend's options, one line each (for --help); imports the backend modules that import cheaply."""
    lines = []
    for name in REGISTRY:
        try:
            opts = options_of(name)
        except ImportError:
            continue
        lines.append(f"{name}: " + "; ".join(o.describe() for o in opts))
    return "\n".join(lines)


def create(name: str, bundle: Bundle, **options) -> Backend:
    """A backend for `bundle` with `options` (checked against its declared OPTIONS first: StexportError for
    an unknown or malformed one).

    With 'auto': an option no backend declares is refused like a misspelt one; options the chosen backend
    does not declare are dropped with a note (so `--threads` works with any); a backend that fails to open
    (e.g. a TensorRT engine built for another GPU that cannot be rebuilt here) is reported with its reason and
    the next usable one is tried, unless options were given for it (they were meant for that runtime: its
    refusal is the answer, not another runtime that ignores them). A bundle whose model file is missing is
    that error, never a fall-back."""
    failed: tuple[str, ...] = ()
    reasons: list[str] = []
    if name != "auto":
        options = load_class(name).check_options(options)
    else:
        check_auto_options(options)
    while True:
        chosen = resolve(name, bundle, skip=failed)
        if chosen is None:
            if not reasons:
                bundle.file("onnx")  # a missing or changed model file says so itself
            why = "; ".join(reasons) or "none of " + ", ".join(AUTO_ORDER) + " is installed or can run it"
            raise StexportError(f"{bundle.path}: no runtime here can run this bundle ({why}); install one "
                                "(pip install onnxruntime) or pass --backend NAME")
        cls = load_class(chosen)
        opts = options
        if name == "auto":
            known = {o.name for o in cls.OPTIONS} | set(cls.ALIASES)
            dropped = sorted(set(options) - known)
            if dropped:
                log.info("%s does not take option(s) %s; ignoring them", chosen, ", ".join(dropped))
            opts = cls.check_options({k: v for k, v in options.items() if k in known})
        try:
            backend = cls(bundle, **opts)
        except BundleChanged:
            raise  # the bundle is not what was built: no runtime may run it
        except StexportError as e:
            if name != "auto" or set(opts) - {"threads"}:
                raise
            failed += (chosen,)
            reasons.append(f"{chosen}: {e}")
            nxt = resolve(name, bundle, failed)
            if nxt is not None:
                log.warning(f"{chosen} cannot run {bundle.path.name}: {e}; falling back to {nxt}")
            continue
        log.info("backend: %s%s, options %s: %s", chosen, " (picked by auto)" if name == "auto" else "",
                 opts or "defaults", backend.describe())
        return backend


def check_auto_options(options: dict) -> None:
    """With `--backend auto`: refuse (StexportError, one line) an option that no registered backend declares
    (a misspelling), naming the closest one; options some backend declares pass."""
    import difflib

    known: set[str] = set()
    for n in REGISTRY:
        try:
            cls = load_class(n)
        except ImportError:
            continue
        known |= {o.name for o in cls.OPTIONS} | set(cls.ALIASES)
    for key in options:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise StexportError(f"no backend has an option '{key}'{hint}; `stexport bench --list-options` lists "
                                "each backend's options")


__all__ = ["Backend", "Option", "REGISTRY", "AUTO_ORDER", "create", "resolve", "names", "load_class", "options_of",
           "options_help"]
