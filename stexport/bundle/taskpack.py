"""Task packs: one task's per-task tensors for a swappable bundle, in one small file (runtime wing: numpy only).

A pack is a safetensors file: the tensors a swappable bundle's graph takes per task (stexport.bundle.manifest
TasksRecord: adapters, head, and for INT8 the adapters' INT8 weights, their scales and the adapter GEMMs'
activation scales), stored under their ONNX initializer names in the graph's own layout, and a
`TaskPackRecord` (JSON in the file's metadata): the adapter spec and checkpoint sha256, classes and labels,
default sampling, and what base it was built against. `stexport pack` writes them (stexport.build.packing).

    pack = TaskPack.load("ssv2.stpack")
    pack.check_fits(bundle)              # StexportError, one line, when it was made for another base
    backend.run(clips, task=pack)        # every swapping backend; see stexport.runtime.backends.base.Backend
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from stexport.errors import StexportError
from stexport.fileutil import sha256_file
from stexport.bundle.manifest import TaskPackRecord, describe_error

METADATA_KEY = "stexport_task_pack"
CONTENT_KEY = "stexport_task_pack_sha256"  # of every tensor (content_hash): a changed value is refused
SUFFIX = ".stpack"
DELTAS = "deltas/"  # the checkpoint's own state dict rides along under this prefix (for the torch backend)


@dataclass
class TaskPack:
    """A loaded task pack. `tensors`: name → array, in the graph's layout and dtype; `key`: the file's sha256
    (what backends cache a prepared task by)."""

    path: Path
    record: TaskPackRecord
    key: str
    tensors: dict[str, np.ndarray] = field(repr=False)
    deltas: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the official-layout state dict

    @classmethod
    def load(cls, path: str | Path) -> "TaskPack":
        """Read and validate a pack. Raises StexportError, one line naming the file and the fix."""
        path = Path(path)
        if path.is_dir():
            raise StexportError(f"{path}: is a directory; --task takes a task pack file (`stexport pack` writes "
                                f"one, <name>{SUFFIX})")
        if not path.is_file():
            raise StexportError(f"{path}: no such task pack (make one with `stexport pack --adapter CKPT "
                                "--base BUNDLE`)")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                everything = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise StexportError(f"{path}: not a task pack (unreadable safetensors: {str(e)[:120]}); make one "
                                "with `stexport pack`") from None
        if METADATA_KEY not in meta:
            raise StexportError(f"{path}: not a task pack (a safetensors file without a stexport record); "
                                "make one with `stexport pack --adapter CKPT --base BUNDLE`")
        if meta.get(CONTENT_KEY) != content_hash(everything, meta[METADATA_KEY]):
            raise StexportError(f"{path}: its tensors or record changed since `stexport pack` wrote it (their "
                                "sha256 is not the one it recorded); rebuild it with `stexport pack --force`")
        try:
            record = TaskPackRecord.model_validate(json.loads(meta[METADATA_KEY]))
        except json.JSONDecodeError as e:
            raise StexportError(f"{path}: the pack's record is not valid JSON ({e}); rebuild it with "
                                "`stexport pack --force`") from None
        except ValidationError as e:
            raise StexportError(f"{path}: {describe_error(e)}; rebuild it with `stexport pack --force`") from None
        tensors = {k: v for k, v in everything.items() if not k.startswith(DELTAS)}
        deltas = {k[len(DELTAS):]: v for k, v in everything.items() if k.startswith(DELTAS)}
        want = {t.name: t for t in record.tensors}
        if set(want) != set(tensors):
            odd = sorted(set(want) ^ set(tensors))[0]
            raise StexportError(f"{path}: tensor '{odd}' is {'missing' if odd in want else 'not in its record'}; "
                                "rebuild it with `stexport pack --force`")
        for name, t in want.items():
            a = tensors[name]
            if t.shape == () and a.shape == (1,):  # safetensors stores a scalar as one element
                a = tensors[name] = a.reshape(())
            if tuple(a.shape) != tuple(t.shape) or str(a.dtype) != t.dtype:
                raise StexportError(f"{path}: tensor '{name}' is {a.dtype}{list(a.shape)}, its record says "
                                    f"{t.dtype}{list(t.shape)}; rebuild it with `stexport pack --force`")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise StexportError(f"{path}: tensor '{name}' holds NaN or infinity; retrain or re-export "
                                    "the adapter")
        return cls(path=path, record=record, key=sha256_file(path), tensors=tensors, deltas=deltas)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def classes(self) -> int:
        return self.record.classes

    @property
    def labels(self) -> list[str]:
        return list(self.record.labels)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def mismatch(self, bundle) -> str | None:
        """Why this pack cannot run on `bundle` (a stexport Bundle), or None when it fits."""
        m, base = bundle.manifest, self.record.base
        if m.multitask is not None:  # its tasks are built in: a pack joins one with `multitask --base --pack`
            return (f"bundle {bundle.path.name} is a multi-task bundle, which takes its own tasks (--task NAME: "
                    f"{', '.join(t.name for t in m.multitask.tasks)}), not packs; to add this task, rebuild it "
                    "with `stexport multitask --base SWAPPABLE_BASE --pack ...` including this pack")
        if m.tasks is None:
            return (f"bundle {bundle.path.name} is not swappable; rebuild it with `stexport build --swappable`")
        mine, theirs = base.spec, m.spec
        for what, a, b in (("adapter positions", (mine.pre_attn, mine.pre_mlp), (theirs.pre_attn, theirs.pre_mlp)),
                           ("backbone width", mine.dim, theirs.dim), ("adapter width", mine.width, theirs.width),
                           ("adapter kernel", mine.kernel, theirs.kernel), ("frames", base.frames, m.input.frames),
                           ("input size", base.size, m.input.size), ("input dtype", base.input_dtype, m.input.dtype),
                           ("precision", base.precision, m.precision),
                           ("backbone", base.backbone, m.model.backbone.name),
                           ("backbone weights", base.weights_sha256, m.model.backbone.weights.sha256),
                           ("backbone seed", base.weights_seed, m.model.backbone.weights.seed),
                           ("head rows", base.head_rows, m.tasks.head_rows)):
            if a != b:
                return f"{what} {_show(a)} (pack) vs {_show(b)} (bundle {bundle.path.name})"
        if base.structure != m.tasks.structure:
            return f"graph differs from bundle {bundle.path.name}'s (built by another stexport or options)"
        if [t.model_dump() for t in self.record.tensors] != [t.model_dump() for t in m.tasks.tensors]:
            return f"per-task tensors differ from bundle {bundle.path.name}'s"
        return None

    def check_fits(self, bundle) -> None:
        """StexportError (one line) when this pack was not made for `bundle`'s graph."""
        why = self.mismatch(bundle)
        if why and bundle.manifest.tasks is None:
            raise StexportError(f"{self.path}: does not fit {bundle.path}: bundle {bundle.path.name} is not "
                                f"swappable (its task tensors are folded into the graph); run the pack on the base "
                                f"it was made for ({self.record.base.bundle}), or build a swappable base with "
                                "`stexport build --swappable` and make the pack against it")
        if why:
            raise StexportError(f"{self.path}: does not fit {bundle.path}: {why}; make the pack against this "
                                f"bundle with `stexport pack --adapter CKPT --base {bundle.path}`")


def content_hash(arrays: dict[str, np.ndarray], record: str) -> str:
    """sha256 over a pack's record (its JSON text) and every tensor: names (sorted), dtypes and bytes (shapes
    are checked against the record apart: safetensors may store a scalar as one element)."""
    import hashlib

    h = hashlib.sha256(record.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.size};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _show(v) -> str:
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, tuple) for x in v):
        return f"pre_attn {list(v[0])}, pre_mlp {list(v[1])}"
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def as_pack(task) -> TaskPack:
    """A TaskPack from a TaskPack or a path."""
    return task if isinstance(task, TaskPack) else TaskPack.load(task)


def patched_onnx(source: Path, tensors: dict, out: Path, constant: bool = False) -> Path:
    """A copy of the ONNX model at `source` with the initializers named like the keys of `tensors` (name →
    array) holding those arrays instead, written to `out` (with its weights beside it as `<out>.data` past
    1 GiB). constant: also drop every overridable initializer from the graph's inputs, so a runtime treats the
    task's tensors as constants and folds and fuses around them (ONNX Runtime fuses Q/DQ into integer GEMMs
    only around constant scales). Raises StexportError when a tensor is missing from the graph or has another
    shape or dtype. (Replacing constants in a model OpenVINO has read is not enough: its ONNX reader folds a
    QuantizeLinear's constant scale into the FakeQuantize limits it makes, hence a new file.)"""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(source))
    inits = {t.name: t for t in proto.graph.initializer}
    for name, value in tensors.items():
        old = inits.get(name)
        if old is None:
            raise StexportError(f"{source}: no initializer '{name}' to replace; rebuild the bundle with "
                                "`stexport build --swappable`")
        value = np.array(value, order="C")
        if list(old.dims) != list(value.shape) or numpy_helper.to_array(old).dtype != value.dtype:
            raise StexportError(f"task tensor '{name}' is {value.dtype}{list(value.shape)}, the model's "
                                f"{numpy_helper.to_array(old).dtype}{list(old.dims)}")
        old.CopyFrom(numpy_helper.from_array(value, name))
    if constant:
        kept = [i for i in proto.graph.input if i.name not in inits]
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
    big = proto.ByteSize() > (1 << 30)
    onnx.save_model(proto, str(out), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=out.name + ".data")
    return out


def task_graph(source: Path, pack: TaskPack | None, out: Path, constant: bool = False) -> Path:
    """`patched_onnx(source, pack.tensors, out, constant)` (pack None: no tensors replaced) in a fresh
    interpreter: onnx reads the whole graph into memory, and that transient (about twice the graph's size)
    then never counts in the resident memory of a process that serves. The child reads the pack from its file
    and checks it is the one loaded here. Raises StexportError (one line) as patched_onnx does."""
    import subprocess

    from stexport.fileutil import python_child

    args = [str(source), str(pack.path) if pack else "", pack.key if pack else "", str(out), "1" if constant else ""]
    p = subprocess.run(python_child("stexport.bundle.taskpack", "_task_graph_child", *args), capture_output=True,
                       text=True, check=False)
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {p.returncode}"
        if p.returncode == 2:
            raise StexportError(why)
        raise StexportError(f"{source}: writing the task's graph failed ({why[:200]})")
    return out


def _task_graph_child(source: str, pack_path: str, key: str, out: str, constant: str) -> None:
    import sys

    try:
        tensors = {}
        if pack_path:
            pack = TaskPack.load(pack_path)
            if pack.key != key:
                raise StexportError(f"{pack_path}: changed since it was loaded; load the task again")
            tensors = pack.tensors
        patched_onnx(Path(source), tensors, Path(out), constant=bool(constant))
    except StexportError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)


__all__ = ["TaskPack", "as_pack", "patched_onnx", "task_graph", "METADATA_KEY", "SUFFIX", "DELTAS"]
