"""TorchScript export of the deploy model, for C++ hosts (libtorch) and the `torchscript` backend.

The folded deploy model (stexport.fold) is traced on uint8 (B, T, H, W, 3) RGB clips and frozen (weights
become constants; frozen-graph optimisations run), so a host feeds decoded frames as they are and gets
float32 logits (B, classes); the batch size is free, frames and size are fixed. The bundle's manifest travels
inside the file as the extra file `stexport.json`, with the class names added, so a C++ host needs nothing
else: libtorch reads it with `torch::jit::load(path, device, extra_files)`.

`torch.jit.optimize_for_inference` is not applied: its output saves but fails to load (torch 2.14). torch 2.14
marks torch.jit deprecated; its warnings are silenced here. AOTInductor (`torch.export` +
`aoti_compile_and_package`) is the successor torch points to.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from stexport.bundle import Bundle
from stexport import interrupt
from stexport.errors import StexportError
from stexport.fileutil import atomic_write_bytes
from stexport.manifest import TorchScriptRecord
from stexport.ts_runtime import EXTRA, load, quiet  # noqa: F401 - load: re-exported for tests and tools

FILE = "model.ts"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
TRACE_BATCH = 2
CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}  # traced+frozen vs eager deploy model, on a batch of one


def default_precision(bundle: Bundle) -> str:
    """FP16 for an FP16 bundle (meant for GPUs), else FP32 (TorchScript has no Q/DQ INT8 path here)."""
    return "fp16" if bundle.precision == "fp16" else "fp32"


def export_torchscript(model: torch.nn.Module, path: str | Path, frames: int, size: int,
                       manifest: dict | None = None, precision: str = "fp32") -> TorchScriptRecord:
    """Trace `model` (uint8 (B, T, H, W, 3) → logits), freeze it and save it to `path` in one rename, with
    `manifest` as the extra file `stexport.json`. The frozen module is checked against `model` on a batch size
    other than the traced one. Returns a record of the export (embedded in the manifest too)."""
    path = Path(path)
    g = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (TRACE_BATCH, frames, size, size, 3), dtype=torch.uint8, generator=g)
    probe = torch.randint(0, 256, (1, frames, size, size, 3), dtype=torch.uint8, generator=g)
    model = model.eval()
    with quiet(), torch.no_grad():
        try:
            frozen = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
        except Exception as e:  # noqa: BLE001 - tracer failures are bugs or unsupported configs
            interrupt.reraise(e)
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise StexportError(f"TorchScript trace failed ({type(e).__name__}: {why})") from e
        diff = (frozen(probe).float() - model(probe).float()).abs().max().item()
    tol = CHECK_TOLERANCE.get(precision, CHECK_TOLERANCE["fp32"])
    if not diff <= tol:  # also catches NaN
        raise StexportError(f"the traced TorchScript module differs from the deploy model by {diff:.3g} "
                            f"(> {tol:g}) at batch size 1; please report this model configuration")
    record = TorchScriptRecord(file=path.name, precision=precision, frozen=True, trace_check_max_abs=diff,
                               torch=torch.__version__)
    extra = {**(manifest or {}), "torchscript": record.model_dump(mode="json")}
    buf = io.BytesIO()
    with quiet():
        torch.jit.save(frozen, buf, _extra_files={EXTRA: json.dumps(extra, indent=1)})
    atomic_write_bytes(path, buf.getbuffer())
    return record


def embedded_manifest(bundle: Bundle, precision: str, role: str = "torchscript", file: str = FILE) -> dict:
    """What a host needs, without Python: the bundle's manifest (format 2) with the class names, its input
    (uint8 (B, T, S, S, 3): the compiled module normalises itself) and precision those of the module written
    as artifact `role` (`file`; not the ONNX graph's), less the ONNX opset, the file hashes (which would include
    the module itself) and the records of the other compiled modules."""
    from stexport.build import input_record

    modules = {"torchscript", "aoti"}
    m = bundle.manifest.model_dump(mode="json", exclude_none=True,
                                   exclude={"files", "opset", "engines", *modules})
    others = {k: v for k, v in bundle.manifest.artifacts.items() if k not in modules}
    m.update(precision=precision, class_names=bundle.labels,
             input=input_record("uint8", bundle.frames, bundle.size).model_dump(mode="json"),
             artifacts={**others, role: file})
    return m


def add_to_bundle(bundle: Bundle | str | Path, force: bool = False, precision: str | None = None,
                  reference=None, pretrained: str | None = None) -> Bundle:
    """Write `model.ts` into `bundle`; record it as artifacts['torchscript'] and a 'torchscript' section.

    The reference is rebuilt from the bundle's deltas and backbone record (`pretrained` overrides where the
    backbone weights are now), or given as `reference`. precision: fp32 or fp16 (default: default_precision).
    """
    from stexport.fold import fold
    from stexport.loaders import reference_for_bundle

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    precision = precision or default_precision(b)
    if precision not in PRECISIONS:
        raise StexportError(f"--precision {precision}: TorchScript export takes {' or '.join(PRECISIONS)}")
    if b.has("torchscript") and not force:
        raise StexportError(f"{b.file('torchscript')}: already exported; pass --force to replace it")
    ref = reference if reference is not None else reference_for_bundle(b, pretrained)
    deploy = fold(ref, "uint8", compute_dtype=PRECISIONS[precision])
    manifest = embedded_manifest(b, precision)
    record = export_torchscript(deploy, b.path / FILE, b.frames, b.size, manifest, precision)
    b.update(artifacts={"torchscript": FILE}, written=[FILE], torchscript=record)
    return b
