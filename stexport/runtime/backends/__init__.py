"""Backend registry. Each runtime lives behind `Backend` (base.py), registers itself beside its class with
`@register(...)` (name, `auto` priority, artifact, task packs; options on the class), and is imported only when
asked for. The CLI's `--backend` names and help, `bench --list-options` and `auto` all read this registry."""

from __future__ import annotations

import functools
import importlib
import logging

from stexport.runtime.backends.base import REGISTERED, Backend, Option, Registration, register
from stexport.bundle.store import Bundle
from stexport.errors import BundleChanged, StexportError

log = logging.getLogger("stexport")

# Built-in backends: name -> the module that registers it (`@register` beside its class). A module is imported
# only when its backend is asked for, so `import stexport` and the CLI's start-up load no runtime, and naming one
# backend imports only its module. Other packages add backends through the entry-point group below
# (`NAME = "package.module"` in their pyproject's [project.entry-points."stexport.backends"]) or by importing a
# module that registers one. Listed in the order names are shown.
BUILTIN: dict[str, str] = {
    "openvino": "stexport.runtime.backends.openvino",
    "onnxruntime": "stexport.runtime.backends.ort",
    "tensorrt": "stexport.trt_engines.runtime",
    "torchscript": "stexport.runtime.backends.torchscript",
    "torch": "stexport.build.torch_backend",
}
ENTRY_POINTS = "stexport.backends"


@functools.lru_cache(maxsize=1)
def _plugins() -> dict[str, str]:
    """name -> module of backends other packages declare in the `stexport.backends` entry-point group."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINTS) if ep.name not in BUILTIN}


def _modules() -> dict[str, str | None]:
    """Every backend name known without importing a backend module (None: registered by an imported module)."""
    out: dict[str, str | None] = {**BUILTIN, **_plugins()}
    for n in REGISTERED:
        out.setdefault(n, None)
    return out


def names(auto: bool = True) -> list[str]:
    """'auto' (with `auto`) and every backend name: the built-in ones, then other packages'."""
    return (["auto"] if auto else []) + list(_modules())


def registration(name: str) -> Registration:
    """The Registration of backend `name`, importing its module. Raises StexportError for an unknown name
    (naming the closest), ImportError when the module cannot be imported."""
    reg = REGISTERED.get(name)
    if reg is not None:
        return reg
    module = BUILTIN.get(name) or _modules().get(name)
    if module is None:
        import difflib

        close = difflib.get_close_matches(name.lower(), names(), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise StexportError(f"unknown backend '{name}'; {hint}choose one of: {', '.join(names())}")
    importlib.import_module(module)
    if name not in REGISTERED:
        raise StexportError(f"backend '{name}': module {module} registers no backend of that name "
                            "(decorate its class with @register)")
    return REGISTERED[name]


def registrations() -> list[Registration]:
    """Every backend's Registration, in `names()` order; backends whose module cannot be imported here are left
    out."""
    out = []
    for n in names(auto=False):
        try:
            out.append(registration(n))
        except ImportError:
            continue
    return out


def load_class(name: str) -> type[Backend]:
    return registration(name).cls


def auto_order() -> list[str]:
    """The backends `auto` tries, highest declared priority first. The build wing's PyTorch reference is never
    automatic, so its module is not even imported here: running a bundle loads nothing of the build wing."""
    regs = []
    for n, module in _modules().items():
        if module is not None and module.startswith("stexport.build."):
            continue
        try:
            reg = registration(n)
        except ImportError:
            continue
        if reg.auto is not None:
            regs.append(reg)
    return [r.name for r in sorted(regs, key=lambda r: -r.auto)]


def task_backends(conj: str = "and", conditions: bool = False) -> str:
    """'a, b, … and c' naming the backends that run task packs; with `conditions`, each conditional one is
    followed by its condition in parentheses."""
    found = [r.name + (f" ({r.tasks})" if conditions and isinstance(r.tasks, str) else "")
             for r in registrations() if r.tasks]
    return ", ".join(found[:-1]) + f" {conj} " + found[-1] if len(found) > 1 else "".join(found)


def multitask_backends(conj: str = "or") -> str:
    """'a, b … or c' naming the backends that run multi-task bundles (their class says MULTITASK). Imports
    each backend's module (no runtime is loaded)."""
    found = [r.name for r in registrations() if r.cls.MULTITASK]
    return ", ".join(found[:-1]) + f" {conj} " + found[-1] if len(found) > 1 else "".join(found)


def resolve(name: str, bundle: Bundle, skip: tuple[str, ...] = ()) -> str | None:
    """Turn 'auto' into a concrete backend name for this machine and bundle (passing over `skip`); None when
    no runtime here can run it. 'auto' tries the backends registered with an `auto` priority, highest first,
    taking the first whose usable(bundle) (cheap, no model load) says yes; it never picks the PyTorch reference:
    a bundle whose model cannot run is an error, not a 10x slower answer."""
    if name != "auto":
        return name
    for candidate in auto_order():
        if candidate not in skip and load_class(candidate).usable(bundle):
            return candidate
    return None


def options_of(name: str) -> tuple[Option, ...]:
    """The options backend `name` declares (importing only its module)."""
    return load_class(name).OPTIONS


def options_help() -> str:
    """Every backend's options, one line each (for --help); imports the backend modules that import cheaply."""
    return "\n".join(f"{r.name}: " + "; ".join(o.describe() for o in r.cls.OPTIONS) for r in registrations())


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
            why = "; ".join(reasons) or "none of " + ", ".join(auto_order()) + " is installed or can run it"
            raise StexportError(f"{bundle.path}: no runtime here can run this bundle ({why}); install one "
                                "(pip install onnxruntime) or pass --backend NAME")
        cls = load_class(chosen)
        opts = options
        if name == "auto":
            known = {o.name for o in cls.OPTIONS} | set(cls.ALIASES)
            dropped = sorted(set(options) - known)
            if dropped:
                log.warning("auto picked %s, which does not take option(s) %s: ignoring them (pass --backend "
                            "to choose the runtime they are for)", chosen, ", ".join(dropped))
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
    (a misspelling), naming the closest one, and a value that every backend declaring the option refuses
    (that backend's message), whichever backend `auto` then picks; options some backend takes pass."""
    import difflib

    known: set[str] = set()
    for r in registrations():
        known |= {o.name for o in r.cls.OPTIONS} | set(r.cls.ALIASES)
    for key, value in options.items():
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise StexportError(f"no backend has an option '{key}'{hint}; `stexport bench --list-options` lists "
                                "each backend's options")
        refusals = []
        for r in registrations():
            opt = next((o for o in r.cls.OPTIONS if o.name == r.cls.ALIASES.get(key, key)), None)
            if opt is None:
                continue
            try:
                opt.coerce(value, r.name)
                break
            except StexportError as e:
                refusals.append(e)
        else:
            if refusals:
                raise refusals[0]


__all__ = ["Backend", "Option", "Registration", "register", "BUILTIN", "ENTRY_POINTS", "create", "resolve", "names",
           "registration", "registrations", "auto_order", "task_backends", "load_class", "options_of", "options_help"]
