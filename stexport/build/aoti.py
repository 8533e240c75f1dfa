"""AOTInductor export of the deploy model (`model.pt2`), for C++ hosts: torch.export + aoti_compile_and_package.

torch 2.14 deprecates TorchScript and points its users here. The folded deploy model (stexport.build.fold) is exported
with a dynamic batch axis (uint8 (B, T, H, W, 3) RGB in, float32 logits (B, classes) out; frames and size fixed)
and compiled ahead of time by Inductor into a package holding a shared library and the weights. libtorch's
`torch::inductor::AOTIModelPackageLoader` runs it without Python (examples/cpp), Python with
`torch._inductor.aoti_load_package`. The package is compiled for one device kind (cpu or cuda) and the CPU's
instruction set it was built on (recorded in its metadata as AOTI_CPU_ISA). The compiled model reads its input as C-contiguous whatever the
tensor's strides say (it does not check them): pass contiguous tensors (`.contiguous()`, np.ascontiguousarray).

The bundle's manifest, with the class names, travels in the package's metadata under the key `stexport.json`
(`loader.get_metadata()` in C++), as it does in model.ts.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from stexport import interrupt
from stexport.bundle.precision import LIBTORCH_PRECISIONS, float_dtype
from stexport.bundle.precision import PRECISIONS as TABLE
from stexport.bundle.store import Bundle
from stexport.errors import StexportError
from stexport.bundle.manifest import AOTIRecord

log = logging.getLogger("stexport")

FILE = "model.pt2"
METADATA_KEY = "stexport.json"
PRECISIONS = {n: getattr(torch, float_dtype(n)) for n in LIBTORCH_PRECISIONS}
DEVICES = ("cpu", "cuda")
MAX_BATCH = 1024  # as the ONNX export's dynamic batch axis
EXAMPLE_BATCH = 2
# compiled vs eager deploy model
CHECK_TOLERANCE = {n: TABLE[n].libtorch_tolerance for n in LIBTORCH_PRECISIONS}


def default_precision(bundle: Bundle, device: str) -> str:
    """FP16 for an FP16 bundle compiled for CUDA, else FP32 (CPU kernels run FP32 fastest; no INT8 path)."""
    return "fp16" if bundle.precision == "fp16" and device == "cuda" else "fp32"


def export_aoti(model: torch.nn.Module, path: str | Path, frames: int, size: int, manifest: dict | None = None,
                precision: str = "fp32", device: str = "cpu") -> AOTIRecord:
    """Export `model` (uint8 (B, T, S, S, 3) → logits) with a dynamic batch axis, compile it with AOTInductor
    for `device` and write the package to `path` in one rename, with `manifest` (plus this record) in its
    metadata under `stexport.json`. The compiled model is checked against `model` at batch sizes 1 and 3
    (neither the example's). Raises StexportError when export, compilation or the check fails. Compiling takes
    tens of seconds for small models and minutes for ViT-B/16 on a laptop CPU."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    if device not in DEVICES:
        raise StexportError(f"--device {device}: AOTInductor packages are compiled for cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise StexportError("--device cuda: PyTorch sees no CUDA GPU here; compile on a GPU host or use cpu")
    path = Path(path)
    dev = torch.device(device)
    model = model.eval().to(dev)
    g = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (EXAMPLE_BATCH, frames, size, size, 3), dtype=torch.uint8, generator=g)
    probes = [torch.randint(0, 256, (b, frames, size, size, 3), dtype=torch.uint8, generator=g) for b in (1, 3)]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.pt2")
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            for name in ("torch._inductor", "torch.export", "torch.utils.cpp_extension", "torch._dynamo"):
                logging.getLogger(name).setLevel(logging.ERROR)
            try:
                batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
                program = torch.export.export(model, (example.to(dev),), dynamic_shapes=({0: batch},))
                meta = {METADATA_KEY: "{}"}  # replaced below, once the record is known
                record = AOTIRecord(file=path.name, precision=precision, device=device, torch=torch.__version__,
                                    batch=[1, MAX_BATCH])
                meta[METADATA_KEY] = json.dumps({**(manifest or {}), "aoti": record.model_dump(mode="json")})
                aoti_compile_and_package(program, package_path=str(tmp),
                                         inductor_configs={"aot_inductor.metadata": meta})
                seconds = time.perf_counter() - t0
                compiled = aoti_load_package(str(tmp))
                diff = max((compiled(p.to(dev)).float() - model(p.to(dev)).float()).abs().max().item()
                           for p in probes)
            except Exception as e:  # export/compile failures are bugs or unsupported configs
                interrupt.reraise(e)
                why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                raise StexportError(f"AOTInductor export failed ({type(e).__name__}: {why})") from e
        tol = CHECK_TOLERANCE.get(precision, CHECK_TOLERANCE["fp32"])
        if not diff <= tol:  # also catches NaN
            raise StexportError(f"the AOTInductor-compiled model differs from the deploy model by {diff:.3g} "
                                f"(> {tol:g}); please report this model configuration")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return record.model_copy(update={"check_max_abs": diff, "compile_seconds": round(seconds, 1)})


def add_to_bundle(bundle: Bundle | str | Path, force: bool = False, precision: str | None = None,
                  device: str = "cpu", reference=None, pretrained: str | None = None) -> Bundle:
    """Write `model.pt2` into `bundle`; record it as artifacts['aoti'] and an 'aoti' section.

    The reference is rebuilt from the bundle's deltas and backbone record (`pretrained` overrides where the
    backbone weights are now), or given as `reference`. precision: fp32 or fp16 (default: default_precision).
    """
    from stexport.build.fold import fold
    from stexport.build.loaders import reference_for_bundle
    from stexport.build.torchscript import embedded_manifest

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if device not in DEVICES:
        raise StexportError(f"--device {device}: AOTInductor packages are compiled for cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise StexportError("--device cuda: PyTorch sees no CUDA GPU here; compile on a GPU host or use cpu")
    precision = precision or default_precision(b, device)
    if precision not in PRECISIONS:
        raise StexportError(f"--precision {precision}: AOTInductor export takes {' or '.join(PRECISIONS)}")
    if b.has("aoti") and not force:
        raise StexportError(f"{b.file('aoti')}: already exported; pass --force to replace it")
    ref = reference if reference is not None else reference_for_bundle(b, pretrained)
    deploy = fold(ref, "uint8", compute_dtype=PRECISIONS[precision])
    manifest = embedded_manifest(b, precision, role="aoti", file=FILE)
    record = export_aoti(deploy, b.path / FILE, b.frames, b.size, manifest, precision, device)
    b.update(artifacts={"aoti": FILE}, written=[FILE], aoti=record)
    return b
