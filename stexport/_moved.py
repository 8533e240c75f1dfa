"""Module paths that moved when the package took its wings (0.1 → 0.2), kept importable for one release.

`import stexport.video` (or `stexport.backends.ort`, …) still works: it returns the module at its new path,
the same object, after a DeprecationWarning naming that path. One table; `stexport/__init__.py` installs the
finder. The old paths go in the next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module path -> new module path; a moved package's submodules follow it (stexport.backends.ort ->
# stexport.runtime.backends.ort), except where listed on their own.
MOVED: dict[str, str] = {
    "stexport.manifest": "stexport.bundle.manifest",
    "stexport.taskpack": "stexport.bundle.taskpack",
    "stexport.task_graph": "stexport.bundle.task_graph",
    "stexport.labels": "stexport.bundle.labels",
    "stexport.video": "stexport.runtime.video",
    "stexport.decode_worker": "stexport.runtime.decode_worker",
    "stexport.backends.torch_ref": "stexport.build.torch_backend",
    "stexport.backends": "stexport.runtime.backends",
    "stexport.classify": "stexport.runtime.classify",
    "stexport.batch": "stexport.runtime.batch",
    "stexport.bench": "stexport.runtime.bench",
    "stexport.results": "stexport.runtime.results",
    "stexport.ts_runtime": "stexport.runtime.ts_runtime",
    "stexport.device": "stexport.runtime.device",
    "stexport.serve": "stexport.serving.app",
    "stexport.ray_infer": "stexport.serving.ray_data",
    "stexport.build_options": "stexport.build.options",
    "stexport.backbone": "stexport.build.backbone",
    "stexport.deltas": "stexport.build.deltas",
    "stexport.reference": "stexport.build.reference",
    "stexport.fold": "stexport.build.fold",
    "stexport.export": "stexport.build.export",
    "stexport.fp16_check": "stexport.build.fp16_check",
    "stexport.torchscript": "stexport.build.torchscript",
    "stexport.aoti": "stexport.build.aoti",
    "stexport.packing": "stexport.build.packing",
    "stexport.triton": "stexport.build.triton",
    "stexport.verify": "stexport.build.verify",
    "stexport.loaders": "stexport.build.loaders",
    "stexport.synthetic": "stexport.build.synthetic",
    "stexport.names": "stexport.build.names",
}
# Old modules whose name is now a wing's package: `from stexport.bundle import Bundle` and
# `from stexport.build import build_bundle` keep working through the package's lazy attributes.
OLD_MODULE_OF_PACKAGE: dict[str, str] = {
    "stexport.bundle": "stexport.bundle.store",
    "stexport.build": "stexport.build.pipeline",
}


# Names that left their module: (module, name) -> the module that holds the name now.
MOVED_NAMES: dict[tuple[str, str], str] = {
    ("stexport.runtime.batch", "ClassifierSpec"): "stexport.runtime.spec",
    ("stexport.runtime.batch", "spec_from"): "stexport.runtime.spec",
    ("stexport.runtime.batch", "DEFAULT_BATCH"): "stexport.runtime.spec",
}


def moved_name(module: str, name: str):
    """`name` from the module it moved to (for the old module's `__getattr__`), with a warning; AttributeError
    when it did not move."""
    target = MOVED_NAMES.get((module, name))
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} moved to {target}.{name}; the old path goes in the next release",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(target), name)


def new_path(old: str) -> str | None:
    """The module path `old` moved to, or None when it did not move."""
    if old in MOVED:
        return MOVED[old]
    parent, _, leaf = old.rpartition(".")
    if parent in MOVED:
        return f"{MOVED[parent]}.{leaf}"
    return None


def package_attribute(package: str, name: str):
    """`name` from the module a wing's package replaced (for that package's `__getattr__`), with a warning."""
    old = OLD_MODULE_OF_PACKAGE[package]
    if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
        # a submodule: `from package import submodule` asks the package first and must fall through to import
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(old)
    if not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warnings.warn(f"{package}.{name} moved to {old}.{name}; the old path goes in the next release",
                  DeprecationWarning, stacklevel=3)
    return getattr(module, name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("stexport.") and new_path(fullname) is not None:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = new_path(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)  # the same module object under both names

    def exec_module(self, module):
        pass


def install() -> None:
    """Put the finder first: an old submodule path (stexport.backends.ort) must not be found by the path finder
    through the moved package's __path__, which would load a second copy of the module."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
