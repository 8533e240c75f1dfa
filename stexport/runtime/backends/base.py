"""The one interface every runtime implements, and the options each declares."""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from stexport.bundle.store import Bundle
from stexport.errors import BundleChanged, StexportError

# Compute precisions a backend reports (describe()["compute_precision"]): the float format its GEMMs run in.
# Distinct from the bundle's precision (fp32 | fp16 | int8: what the graph holds). INT8 bundles run their
# quantized GEMMs in int8 and the rest in this precision.
COMPUTE_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass(frozen=True)
class Option:
    """A backend option (`-o NAME=VALUE` on the command line, a keyword in Python)."""

    name: str
    type: type  # int, float, bool or str
    default: object
    help: str
    choices: tuple | None = None
    minimum: float | None = None  # numbers below it are refused

    def coerce(self, value, backend: str):
        """`value` (from the command line: a string) as this option's type; StexportError if it is not one."""
        kind = self.type.__name__
        if value is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = low in ("true", "1", "yes")
                elif not isinstance(value, bool):
                    raise ValueError(value)
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                value = int(value)
            elif self.type is float:
                value = float(value)
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise StexportError(f"{backend} option {self.name}={value!r}: expected {kind} ({self.help})") from None
        if self.minimum is not None and value < self.minimum:
            raise StexportError(f"{backend} option {self.name}={value!r}: must be at least {self.minimum:g}")
        if self.choices and value not in self.choices:
            raise StexportError(f"{backend} option {self.name}={value!r}: choose one of "
                                f"{', '.join(map(str, self.choices))}")
        return value

    def describe(self) -> str:
        what = "|".join(map(str, self.choices)) if self.choices else self.type.__name__
        return f"{self.name}={what} (default {self.default}): {self.help}"


THREADS = Option("threads", int, None, "CPU threads for inference, 1 or more (default: the runtime's)", minimum=1)


@dataclass(frozen=True)
class Registration:
    """How a backend is offered, declared beside its class with `@register(...)`; the registry
    (`stexport.runtime.backends`) derives the CLI's `--backend` names and help, `bench --list-options` and
    `auto`'s order from these. The backend's options stay on its class (`OPTIONS`)."""

    name: str  # `--backend NAME`
    artifact: str  # the bundle artifact role it runs ('onnx', 'torchscript', 'deltas')
    auto: int | None = None  # `auto` tries the usable() ones highest first; None: only when named
    auto_note: str = ""  # what `auto` picking it means, for the help ("OpenVINO on an x86-64 CPU")
    tasks: bool | str = False  # runs task packs: True, False, or the condition under which it does (text)
    cls: type | None = None


# name -> Registration of every backend class registered so far (by importing its module)
REGISTERED: dict[str, Registration] = {}


def register(name: str, artifact: str, auto: int | None = None, auto_note: str = "", tasks: bool | str = False):
    """Class decorator registering a Backend subclass as backend `name` (see Registration); sets its `name`,
    and `SWAPS_TASKS` when `tasks` is True. Raises ValueError when another class already holds the name."""

    def deco(cls):
        held = REGISTERED.get(name)
        if held is not None and held.cls is not None and held.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"backend name '{name}' is registered twice ({held.cls.__module__} and {cls.__module__})")
        cls.name = name
        if tasks is True:
            cls.SWAPS_TASKS = True
        cls.REGISTRATION = REGISTERED[name] = Registration(name, artifact, auto, auto_note, tasks, cls)
        return cls

    return deco


class Backend(ABC):
    """Runs a bundle: uint8 RGB clips (B, T, H, W, 3) in, float32 logits (B, classes) out.

    Subclasses declare OPTIONS; `backends.create` checks user options against them (an unknown or mistyped
    option is a one-line error listing the valid ones) before constructing the backend."""

    name: str = "?"  # set by @register
    REGISTRATION: Registration | None = None
    OPTIONS: tuple[Option, ...] = ()
    ALIASES: dict[str, str] = {}  # old option name -> new name (accepted with a deprecation warning)
    SWAPS_TASKS = False  # whether run() takes task packs (stexport.bundle.taskpack) on a swappable bundle
    MULTITASK = False  # whether it runs multi-task bundles (stexport.bundle.multitask): run_indexed

    def __init__(self, bundle: Bundle, **options):
        self.bundle = bundle
        self.options = options
        reg = self.REGISTRATION
        if bundle.manifest.multitask is not None and not self.MULTITASK and reg is not None and reg.artifact == "onnx":
            from stexport.runtime.backends import multitask_backends

            raise StexportError(f"{bundle.path}: a multi-task bundle (a second input, the task index per clip), "
                                f"which the {self.name} backend does not feed; use {multitask_backends()}")
        self.input = bundle.manifest.input
        self.task = None  # the TaskPack run() uses when given none; None: the bundle's own task
        self._tasks: dict[str, object] = {}  # pack sha256 -> what prepare_task made for it
        self._packs: dict[tuple, object] = {}  # (path, size, mtime) -> TaskPack, for tasks given by path

    # -- tasks (swappable bundles) ------------------------------------------------------------------------------

    def load_task(self, task):
        """`task` (a TaskPack or a pack's path) checked against this bundle and prepared for this runtime,
        once per pack (cached by the file's sha256); returns the TaskPack. Raises StexportError (one line) when
        this backend cannot swap tasks, the bundle is not swappable, or the pack was made for another base."""
        from stexport.bundle.taskpack import TaskPack

        multitask = self.bundle.manifest.multitask is not None
        if multitask and (self.MULTITASK or not self.SWAPS_TASKS):
            return self.bundle_task(task)
        if not self.SWAPS_TASKS:
            from stexport.runtime.backends import task_backends

            raise StexportError(f"the {self.name} backend cannot run task packs; use {task_backends('or')} "
                                "(or a bundle built for the task)")
        if multitask:  # a backend that runs one task per model (the PyTorch reference): the task as a pack
            from stexport.bundle.multitask import task_of

            pack = task_of(self.bundle, task)
        elif isinstance(task, TaskPack):
            pack = task
        else:
            from pathlib import Path

            p = Path(task)
            st = p.stat() if p.is_file() else None
            key = (str(p.resolve()), st.st_size, st.st_mtime_ns) if st else None
            pack = self._packs.get(key) if key else None
            if pack is None:
                pack = TaskPack.load(p)
                self._packs[key] = pack
        if pack.key not in self._tasks:
            pack.check_fits(self.bundle)
            self._tasks[pack.key] = self.prepare_task(pack)
        return pack

    # -- multi-task bundles (one graph, a task index per clip) ------------------------------------------------

    def bundle_task(self, task):
        """`task` (a name, an index or a BundleTask) of this multi-task bundle, as a BundleTask. StexportError
        (one line) when this backend cannot run multi-task bundles or the bundle has no such task."""
        from stexport.bundle.multitask import task_of

        if not self.MULTITASK:
            from stexport.runtime.backends import multitask_backends

            raise StexportError(f"the {self.name} backend cannot run multi-task bundles; use {multitask_backends()}")
        return task_of(self.bundle, task)  # nothing to prepare: the task is data (an index)

    def run_indexed(self, clips: np.ndarray, index: np.ndarray) -> np.ndarray:
        """A multi-task bundle's graph on uint8 clips (B, T, H, W, 3) with task indices int64 (B,): float32
        (B, head_rows) logits, every head row (a clip's first `classes` are its task's)."""
        from stexport.runtime.backends import multitask_backends

        raise StexportError(f"the {self.name} backend cannot run multi-task bundles; use {multitask_backends()}")

    def run_tasks(self, clips: np.ndarray, tasks) -> np.ndarray:
        """One call over clips of several tasks of a multi-task bundle: `tasks` holds one task per clip (a
        BundleTask, a name, an index, or None: the default task). Returns float32 (B, head_rows) logits; keep
        clip b's first tasks[b].classes. StexportError for a bundle that is not multi-task, an unknown task or
        a count that is not the clips'."""
        from stexport.bundle.multitask import indices

        if self.bundle.manifest.multitask is None:
            raise StexportError(f"{self.bundle.path}: not a multi-task bundle (build one with `stexport multitask`)")
        loaded = [None if t is None else self.bundle_task(t) for t in tasks]
        return self.run_indexed(clips, indices(loaded, len(clips), self.default_index()))

    def default_index(self) -> int:
        """The task index run() uses when given none: the current task's (set_task), else 0 (the bundle's
        own task, the first)."""
        return self.task.index if self.task is not None else 0

    def run_multitask(self, clips: np.ndarray, task=None) -> np.ndarray:
        """run() on a multi-task bundle: every clip with `task` (None: the current one), its classes' logits."""
        from stexport.bundle.multitask import indices

        pack = self.bundle_task(task) if task is not None else self.task
        return self.trim(self.run_indexed(clips, indices(pack, len(clips), self.default_index())), pack)

    def set_task(self, task):
        """Make `task` (a TaskPack, a pack's path, or None: the bundle's own task) the one run() uses when given
        none; switching is this call (no re-export, no rebuild). Returns the TaskPack (or None)."""
        self.task = None if task is None else self.load_task(task)
        return self.task

    def prepare_task(self, pack):
        """What this runtime needs to run `pack` (an ONNX Runtime adapter, an OpenVINO compiled model, …)."""
        raise NotImplementedError

    def task_state(self, task=None) -> tuple:
        """(TaskPack or None, its prepared state or None) for a run with `task` (None: the default task)."""
        pack = self.load_task(task) if task is not None else self.task
        return pack, (self._tasks[pack.key] if pack is not None else None)

    def classes(self, pack=None) -> int:
        """Logits per clip for `pack` (None: the bundle's own task)."""
        return pack.classes if pack is not None else self.bundle.manifest.output.classes

    def trim(self, logits: np.ndarray, pack=None) -> np.ndarray:
        """The task's logits: a swappable graph's head has rows for the largest task; keep the task's."""
        n = self.classes(pack)
        return logits[:, :n] if logits.ndim == 2 and logits.shape[1] > n else logits

    @classmethod
    def check_options(cls, options: dict) -> dict:
        """`options` coerced to their declared types, defaults not filled in. Raises StexportError naming the
        unknown or malformed option and the valid ones."""
        import logging

        known = {o.name: o for o in cls.OPTIONS}
        out = {}
        for key, value in options.items():
            if key in cls.ALIASES:
                new = cls.ALIASES[key]
                logging.getLogger("stexport").warning("%s option '%s' is deprecated; use '%s'", cls.name, key, new)
                key = new
            opt = known.get(key)
            if opt is None:
                near = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                valid = ", ".join(known) or "none"
                raise StexportError(f"{cls.name} has no option '{key}'{hint}; its options: {valid} "
                                    f"(see `stexport bench --list-options`)")
            out[key] = opt.coerce(value, cls.name)
        return out

    @classmethod
    def usable(cls, bundle: Bundle) -> bool:
        """Cheap check (no model load) whether this runtime can run `bundle` on this machine; used by 'auto'.
        By default: the bundle holds the artifact the backend registered (Registration.artifact)."""
        return cls.REGISTRATION is None or bundle.has(cls.REGISTRATION.artifact)

    @abstractmethod
    def run(self, clips: np.ndarray, task=None) -> np.ndarray:
        """clips: uint8 array (B, T, H, W, 3) in the bundle's size and frame count → float32 logits (B, classes).
        task: a TaskPack or a pack's path to run this call with (backends with SWAPS_TASKS; see load_task),
        None for the default (set_task). Raises StexportError for clips of another shape or dtype, or a task
        this backend or bundle cannot run."""

    def compute_precision(self) -> str:
        """The float precision this runtime computes in (one of COMPUTE_PRECISIONS); INT8 bundles run their
        quantized GEMMs in int8 on top of it."""
        return self.bundle.manifest.float_precision

    def describe(self) -> dict:
        """What actually runs: runtime, device/provider, the bundle's precision and the compute precision."""
        return {"backend": self.name, "precision": self.bundle.precision,
                "compute_precision": self.compute_precision()}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_graph(self, path, name: str, dims: list) -> None:
        """The model file's input (`name`, `dims` after the batch axis) must be the manifest's: a manifest that
        disagrees with its graph is refused in one line before anything runs."""
        want = list(self.input.shape(1)[1:])
        got = [int(d) if str(d).isdigit() else d for d in dims]
        if name != self.input.name or got != want:
            raise BundleChanged(f"{path}: the graph takes '{name}' of shape (B, {', '.join(map(str, got))}) but "
                                f"stexport.json says '{self.input.name}' (B, {', '.join(map(str, want))}); "
                                "rebuild the bundle with `stexport build --force`")

    def check_input(self, clips: np.ndarray) -> np.ndarray:
        """uint8 (B, T, H, W, 3) clips of the bundle's frames and size, C-contiguous; StexportError otherwise."""
        want = (self.bundle.frames, self.bundle.size, self.bundle.size, 3)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != want:
            raise StexportError(f"clips must have shape (B, {', '.join(map(str, want))}), got {tuple(clips.shape)}")
        if clips.dtype != np.uint8:
            raise StexportError(f"clips must be uint8, got {clips.dtype}")
        return np.ascontiguousarray(clips)
