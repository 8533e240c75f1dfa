"""`stexport pack`: an adapter checkpoint → a task pack for an existing swappable bundle (build wing).

The pack's tensors come from the same fold and export `stexport build` runs (and, for INT8, the same
calibration and Q/DQ rewrite), made for the new task in a scratch directory; the result must have exactly the
base graph's structure and per-task tensor list, else nothing is written. So a pack's logits are those of a
full export of its task (on INT8, where the runtime takes all of its scales: OpenVINO, ONNX Runtime's
per-task sessions; ONNX Runtime's adapters keep the base's backbone activation scales).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from stexport.bundle.precision import input_format_of
from stexport.bundle.store import Bundle
from stexport.errors import StexportError
from stexport.bundle.manifest import AdapterRecord, PackBase, TaskPackRecord
from stexport.bundle.taskpack import CONTENT_KEY, DELTAS, METADATA_KEY, SUFFIX, TaskPack, content_hash

log = logging.getLogger("stexport")


def spec_mismatch(spec, base_spec, head_rows: int) -> str | None:
    """Why an adapter with `spec` cannot be a task of a base with `base_spec` (one clause), or None."""
    for what, a, b in (("positions", (spec.pre_attn, spec.pre_mlp), (base_spec.pre_attn, base_spec.pre_mlp)),
                       ("backbone width", spec.dim, base_spec.dim), ("adapter width", spec.width, base_spec.width),
                       ("kernel", spec.kernel, base_spec.kernel)):
        if a != b:
            if what == "positions":
                a, b = (f"pre_attn {list(x[0])}, pre_mlp {list(x[1])}" for x in (a, b))
            elif what == "kernel":
                a, b = ("x".join(map(str, x)) for x in (a, b))
            return f"{what} {a} vs the base's {b}"
    if spec.num_classes > head_rows:
        return (f"{spec.num_classes} classes, the base's head has {head_rows} rows (rebuild the base with "
                f"--swappable --max-classes {spec.num_classes})")
    return None


def default_out(adapter, base: Bundle) -> Path:
    stem = Path(adapter).stem if isinstance(adapter, (str, Path)) else "task"
    return base.path.parent / f"{stem}.{base.path.name}{SUFFIX}"


def build_pack(adapter, base, out: str | Path | None = None, backbone=None, pretrained: str | None = None,
               calib=None, calib_clips: int | None = None, labels=None, sampling: dict | None = None,
               name: str | None = None, force: bool = False, progress: bool = False) -> TaskPack:
    """Make a task pack for `base` (a swappable bundle or its path) from `adapter` (checkpoint path, Deltas or
    state dict) and return it (written to `out`, default beside the base: <adapter>.<base>.stpack).

    sampling: overrides of the task's default sampling (keys rate, temporal_views, spatial_views; the default
    follows the adapter's layout and classes as `stexport build` does: stexport.build.pipeline.default_sampling).
    backbone/pretrained: the base's backbone (default: reloaded from its manifest record, checked against its
    sha256). calib: INT8 calibration clips (default: the base's calibration source, same clip count and seed).
    Raises StexportError (one line) for a base that is not swappable, an adapter whose spec (positions,
    widths, kernel) does not match it, more classes than its head has rows, or an existing `out` without
    `force`."""
    from stexport.build.deltas import as_deltas
    from stexport.build.pipeline import build_bundle
    from stexport.build.loaders import backbone_from_record
    from stexport.bundle.task_graph import tensors as read_tensors

    b = base if isinstance(base, Bundle) else Bundle.load(base)
    m = b.manifest
    if m.tasks is None:
        raise StexportError(f"{b.path}: not a swappable bundle (its task tensors are folded into the graph); "
                            "rebuild it with `stexport build --swappable`")
    out = Path(out) if out is not None else default_out(adapter if not isinstance(adapter, dict) else "task", b)
    if out.is_dir():
        raise StexportError(f"{out}: is a directory; --out takes the pack file to write (e.g. task{SUFFIX})")
    if out.exists() and not force:
        raise StexportError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    deltas = as_deltas(adapter)
    where = deltas.path or "adapter"
    why = spec_mismatch(deltas.spec, m.spec, m.tasks.head_rows)
    if why:
        raise StexportError(f"{where}: does not fit base {b.path.name}: {why}")
    calib_opts = {}
    if m.precision == "int8":
        c = m.calibration
        source = calib if calib is not None else (c.source if c is not None else None)
        if source is None or (isinstance(source, str) and not Path(source).exists()):
            raise StexportError(f"{b.path.name} is INT8: the pack's adapter scales need calibration clips; pass "
                                "--calib CLIPS (the base's calibration source is not available here)")
        calib_opts = dict(calib=source, calib_clips=calib_clips or (c.clips if c else 32),
                          calib_method=c.method if c else "minmax", calib_seed=c.seed if c else 0,
                          int8_attention=bool(c and c.attention_scores_int8),
                          int8_float=getattr(c, "float_precision", None) or "fp32")
    if backbone is None:
        backbone = backbone_from_record(m.model.backbone, pretrained)
    with tempfile.TemporaryDirectory(prefix=".stexport-pack-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        full = build_bundle(deltas, backbone=backbone, precision=m.precision, frames=m.input.frames,
                            size=m.input.size, input_format=input_format_of(m.input.dtype).name,
                            labels=labels, sampling=sampling, swappable=True, max_classes=m.tasks.head_rows,
                            out=Path(tmp) / "task", progress=progress, **calib_opts)
        t = full.manifest.tasks
        if t.structure != m.tasks.structure or t.tensors != m.tasks.tensors:
            raise StexportError(f"{where}: its export differs in structure from base {b.path.name} (another "
                                "stexport version or build options?); rebuild the base with this stexport")
        fm = full.manifest
        bb = fm.model.backbone
        if (bb.weights.sha256, bb.weights.seed) != (m.model.backbone.weights.sha256, m.model.backbone.weights.seed):
            raise StexportError(f"backbone weights differ from the ones base {b.path.name} was built from; pass "
                                "the base's with --pretrained")
        values = read_tensors(full.file("onnx"), [x.name for x in t.tensors])
        labels_list = full.labels
    record = TaskPackRecord(
        name=name or (Path(deltas.path).stem if deltas.path else "task"),
        adapter=AdapterRecord(spec=deltas.spec, sha256=deltas.sha256,
                              file=str(Path(deltas.path).resolve()) if deltas.path else None),
        classes=deltas.spec.num_classes, labels=labels_list, labels_source=fm.output.labels_source,
        sampling=fm.sampling,
        base=PackBase(bundle=m.name, backbone=m.model.backbone.name, weights_sha256=m.model.backbone.weights.sha256,
                      weights_seed=m.model.backbone.weights.seed, spec=m.spec, precision=m.precision,
                      frames=m.input.frames, size=m.input.size, input_dtype=m.input.dtype,
                      head_rows=m.tasks.head_rows, structure=m.tasks.structure),
        tensors=list(m.tasks.tensors),
        calibration=fm.calibration,
    )
    write(out, record, values, {k: v.detach().float().numpy() for k, v in deltas.state_dict.items()})
    pack = TaskPack.load(out)
    pack.check_fits(b)
    return pack


def write(out: Path, record: TaskPackRecord, tensors: dict[str, np.ndarray], deltas: dict[str, np.ndarray]) -> None:
    """The pack file, written through a temporary sibling and one rename."""
    from safetensors.numpy import save

    from stexport.fileutil import atomic_write_bytes

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    arrays.update({DELTAS + k: np.ascontiguousarray(v) for k, v in deltas.items()})
    text = json.dumps(record.model_dump(mode="json", exclude_none=True))
    meta = {METADATA_KEY: text, CONTENT_KEY: content_hash(arrays, text)}
    atomic_write_bytes(out, save(arrays, metadata=meta))
