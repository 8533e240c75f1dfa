"""TorchScript export of the deploy model, for C++ hosts (libtorch) and the `torchscript` backend.

The folded deploy model (stexport.build.fold) is traced on uint8 (B, T, H, W, 3) RGB clips and frozen (weights
become constants; frozen-graph optimisations run), so a host feeds decoded frames as they are and gets
float32 logits (B, classes); the batch size is free, frames and size are fixed. The bundle's manifest travels
inside the file as the extra file `stexport.json`, with the class names added, so a C++ host needs nothing
else: libtorch reads it with `torch::jit::load(path, device, extra_files)`.

A swappable bundle's module (`stexport build --swappable`) takes task packs: `forward_task(x, tensors)` runs
the per-task tensors given (a pack's, by the ONNX names and in the graph layout the record's `task_tensors`
lists), `forward(x)` the bundle's own task, read from the attributes task_0, task_1, … that freezing preserves
(everything else is frozen as usual). One module thus serves every task, per call, with no copy and no lock;
a C++ host calls `forward` as for any bundle. Its logits are the base task's classes (`forward_task` returns
every head row; the runtime keeps the pack's).

A multi-task bundle's module (`stexport multitask`) is `forward(x, task)`, task the int64 (B,) index of each
clip's task (stexport.build.multitask); its logits have the head's rows for every task.

`torch.jit.optimize_for_inference` is not applied: its output saves but fails to load (torch 2.14). torch 2.14
marks torch.jit deprecated; its warnings are silenced here. AOTInductor (`torch.export` +
`aoti_compile_and_package`) is the successor torch points to.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch

from stexport.bundle.precision import LIBTORCH_PRECISIONS, float_dtype
from stexport.bundle.precision import PRECISIONS as TABLE
from stexport.bundle.store import Bundle
from stexport import interrupt
from stexport.errors import StexportError
from stexport.fileutil import atomic_write_bytes
from stexport.bundle.manifest import TorchScriptRecord
from stexport.runtime.ts_runtime import EXTRA, load, quiet  # noqa: F401 - load: re-exported for tests and tools

log = logging.getLogger("stexport")

FILE = "model.ts"
PRECISIONS = {n: getattr(torch, float_dtype(n)) for n in LIBTORCH_PRECISIONS}
TRACE_BATCH = 2
# traced+frozen vs eager deploy model, on a batch of one
CHECK_TOLERANCE = {n: TABLE[n].libtorch_tolerance for n in LIBTORCH_PRECISIONS}


def default_precision(bundle: Bundle) -> str:
    """FP16 for an FP16 bundle (meant for GPUs), else FP32 (TorchScript has no Q/DQ INT8 path here)."""
    return "fp16" if bundle.precision == "fp16" else "fp32"


class SwappableModule(torch.nn.Module):
    """The deploy model with its per-task parameters taken from outside: `forward_task(x, tensors)` with
    `tensors` in the order of `names` (ONNX names, graph layout: a Linear weight the graph reads through a
    MatMul is stored transposed there), `forward(x)` with the base task's, held as attributes task_0, … in
    that layout. Traced, each parameter is the given tensor (or its transpose, a view) at the point it is used,
    so the frozen backbone keeps its constants and a task costs no copy."""

    def __init__(self, deploy, names: list[str], transposed: dict[str, bool], classes: int):
        super().__init__()
        self.deploy, self.names, self.classes = deploy, list(names), classes
        self.transposed = [transposed[n] for n in self.names]
        self.attrs = [f"task_{i}" for i in range(len(self.names))]
        self.owners = []
        for attr, name, t in zip(self.attrs, self.names, self.transposed):
            owner, _, leaf = name.rpartition(".")
            module = deploy.get_submodule(owner)
            param = module._parameters.pop(leaf)  # a plain attribute from now on, set per call by _run
            self.owners.append((module, leaf))
            value = param.detach()
            self.register_buffer(attr, (value.t() if t else value).contiguous().clone())

    def _run(self, x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        for (module, leaf), t, value in zip(self.owners, self.transposed, tensors):
            module.__dict__[leaf] = value.t() if t else value
        return self.deploy(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, [getattr(self, a) for a in self.attrs])[:, :self.classes]

    def forward_task(self, x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self._run(x, tensors)


def graph_layout(onnx_path: Path, deploy, names: list[str]) -> dict[str, bool] | None:
    """For each per-task tensor of the swappable graph at `onnx_path`: whether the graph holds it transposed
    relative to `deploy`'s parameter of that name (a 2-D weight read by MatMul; the export dropped the
    Transpose, task_graph.inputs_to_initializers). None when the names are not `deploy`'s parameters (an INT8
    graph's quantized tensors). Checked: the graph's tensors, so laid out, are the parameters' values (the
    bundle's own task); StexportError otherwise."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    params = dict(deploy.named_parameters())
    if not all(n in params for n in names):
        return None
    proto = onnx.load(str(onnx_path))
    inits = {t.name: t for t in proto.graph.initializer if t.name in set(names)}
    readers: dict[str, set] = {}
    for node in proto.graph.node:
        for k, i in enumerate(node.input):
            readers.setdefault(i, set()).add((node.op_type, k))
    out = {}
    for name in names:
        p = params[name].detach().float()
        t = p.dim() == 2 and readers.get(name) == {("MatMul", 1)}
        graph = numpy_helper.to_array(inits[name]).astype(np.float32)
        mine = (p.t() if t else p).numpy()
        if graph.shape != mine.shape or not np.allclose(graph, mine, rtol=2e-3, atol=1e-6):
            raise StexportError(f"per-task tensor '{name}' of {onnx_path.name} is not the reference's "
                                f"({list(graph.shape)} vs {list(mine.shape)}); rebuild the bundle with "
                                "`stexport build --swappable --force`")
        out[name] = t
    return out


def export_torchscript(model: torch.nn.Module, path: str | Path, frames: int, size: int,
                       manifest: dict | None = None, precision: str = "fp32") -> TorchScriptRecord:
    """Trace `model` (uint8 (B, T, H, W, 3) → logits), freeze it and save it to `path` in one rename, with
    `manifest` as the extra file `stexport.json`. The frozen module is checked against `model` on a batch size
    other than the traced one. A SwappableModule is traced with both its methods and frozen keeping its task
    attributes (both checked). Returns a record of the export (embedded in the manifest too)."""
    path = Path(path)
    g = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (TRACE_BATCH, frames, size, size, 3), dtype=torch.uint8, generator=g)
    probe = torch.randint(0, 256, (1, frames, size, size, 3), dtype=torch.uint8, generator=g)
    model = model.eval()
    swappable = isinstance(model, SwappableModule)
    tasks = getattr(model, "num_tasks", None)  # a multi-task model: forward(x, task index int64 (B,))
    with quiet(), torch.no_grad():
        try:
            if tasks:
                example = (example, torch.arange(TRACE_BATCH) % tasks)
                probe = (probe, torch.tensor([tasks - 1]))
                frozen = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
            elif swappable:
                own = [getattr(model, a).clone() for a in model.attrs]
                traced = torch.jit.trace_module(model, {"forward": (example,), "forward_task": (example, own)},
                                                check_trace=False)
                frozen = torch.jit.freeze(traced, preserved_attrs=["forward_task", *model.attrs])
            else:
                frozen = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
        except Exception as e:  # noqa: BLE001 - tracer failures are bugs or unsupported configs
            interrupt.reraise(e)
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise StexportError(f"TorchScript trace failed ({type(e).__name__}: {why})") from e
        probe = probe if tasks else (probe,)
        diff = (frozen(*probe).float() - model(*probe).float()).abs().max().item()
        if swappable:  # another task's tensors (the base's, scaled) through the traced method
            other = [(a * 0.5).to(a.dtype) for a in own]
            diff = max(diff, (frozen.forward_task(*probe, other).float()
                              - model.forward_task(*probe, other).float()).abs().max().item())
    tol = CHECK_TOLERANCE.get(precision, CHECK_TOLERANCE["fp32"])
    if not diff <= tol:  # also catches NaN
        raise StexportError(f"the traced TorchScript module differs from the deploy model by {diff:.3g} "
                            f"(> {tol:g}) at batch size 1; please report this model configuration")
    record = TorchScriptRecord(file=path.name, precision=precision, frozen=True, trace_check_max_abs=diff,
                               torch=torch.__version__, task_tensors=model.names if swappable else None)
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
    from stexport.build.pipeline import input_record

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
    from stexport.build.fold import fold
    from stexport.build.loaders import reference_for_bundle

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    precision = precision or default_precision(b)
    if precision not in PRECISIONS:
        raise StexportError(f"--precision {precision}: TorchScript export takes {' or '.join(PRECISIONS)}")
    if b.has("torchscript") and not force:
        raise StexportError(f"{b.file('torchscript')}: already exported; pass --force to replace it")
    if b.manifest.multitask is not None:  # every task in one module: forward(x, task)
        from stexport.build.multitask import rebuilt

        deploy = rebuilt(b, pretrained, compute_dtype=PRECISIONS[precision])
        record = export_torchscript(deploy, b.path / FILE, b.frames, b.size, embedded_manifest(b, precision),
                                    precision)
        b.update(artifacts={"torchscript": FILE}, written=[FILE], torchscript=record)
        return b
    ref = reference if reference is not None else reference_for_bundle(b, pretrained)
    deploy = fold(ref, "uint8", compute_dtype=PRECISIONS[precision])
    tasks = b.manifest.tasks
    if tasks is not None:  # a swappable bundle: the module takes its task packs (SwappableModule)
        deploy.pad_head(tasks.head_rows)
        names = [t.name for t in tasks.tensors]
        layout = graph_layout(b.file("onnx"), deploy, names)
        if layout is not None:
            deploy = SwappableModule(deploy, names, layout, b.manifest.output.classes)
        else:
            log.info("%s: the TorchScript module of an INT8 bundle holds float weights, not the pack's INT8 "
                     "tensors: it runs the bundle's own task only", b.path.name)
            deploy = fold(ref, "uint8", compute_dtype=PRECISIONS[precision])
    manifest = embedded_manifest(b, precision)
    record = export_torchscript(deploy, b.path / FILE, b.frames, b.size, manifest, precision)
    b.update(artifacts={"torchscript": FILE}, written=[FILE], torchscript=record)
    return b
