"""ONNX export of the folded deploy model (FP32, FP16); INT8 is a rewrite of the FP32 graph (calibration.qdq).

Opset 18: inside the TensorRT 10 parser's range (9–20), and the lowest the torch dynamo exporter writes
without a lossy down-conversion (its Pad cannot be converted to 17). Batch is dynamic; frames and resolution
are fixed.
"""

from __future__ import annotations

import ast
import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnx import helper

from stexport import interrupt
from stexport.bundle.precision import FLOAT_PRECISIONS, float_dtype
from stexport.errors import StexportError
from stexport.onnx_graph import check, perm_of, save, stable_topo, swaps_last_axes

log = logging.getLogger("stexport")

OPSET = 18
INPUT, OUTPUT = "frames", "logits"
EXTERNAL_DATA_BYTES = 1 << 30  # models with more weight bytes than this get a model.onnx.data file
DTYPES = {n: getattr(torch, float_dtype(n)) for n in FLOAT_PRECISIONS}  # the float parts' torch dtype


def example_input(model, frames: int, batch: int = 2) -> torch.Tensor:
    s = model.image_size
    if model.input_format == "uint8":
        return torch.randint(0, 256, (batch, frames, s, s, 3), dtype=torch.uint8)
    return torch.randn(batch, frames, 3, s, s)


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def export_onnx(model: torch.nn.Module, path: str | Path, frames: int,
                external_data: bool | None = None, swappable: bool = False, task_input: str | None = None) -> Path:
    """Export a folded `DeployViT` to `path` (opset 18, dynamic batch); checked and shape-inferred.

    swappable: every per-task parameter (model.task_parameters()) stays a distinct initializer named after
    it, in the layout its operator reads, that no exporter pass can fold or share (stexport.bundle.task_graph).
    task_input: a multi-task model (stexport.build.multitask.MultiTaskViT, forward(x, task)): the name of its
    second graph input, the task index of each clip (int64 [B], B the frames input's batch)."""
    path = Path(path)
    x = example_input(model, frames)
    batch = {0: torch.export.Dim("batch", min=1, max=1024)}
    if task_input:
        return _export(model, (x, torch.arange(x.shape[0]) % model.num_tasks), [INPUT, task_input], (batch, batch),
                       path, external_data)
    if not swappable:
        return _export(model, (x,), [INPUT], (batch,), path, external_data)
    params = dict(model.named_parameters())
    task = {n: params[n].detach().clone() for n in model.task_parameters()}
    # per-task parameters in as graph inputs: the optimizer cannot fold or deduplicate them
    program = _program(model, (x,), [INPUT, *task], {"x": batch, "task": {n: None for n in task}}, {"task": task})
    from stexport.bundle.task_graph import inputs_to_initializers

    proto = program.model_proto  # a new proto at each access
    inputs_to_initializers(proto, {n: v.numpy() for n, v in task.items()})
    return _finish(proto, model, path, external_data)


def _program(model, args: tuple, names: list[str], dynamic, kwargs: dict | None = None):
    """torch.onnx.export (dynamo, opset OPSET, optimized) of model(*args, **kwargs) with graph inputs `names`;
    StexportError (one line) when the exporter fails."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            return torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, opset_version=OPSET, input_names=names,
                                     output_names=[OUTPUT], dynamic_shapes=dynamic, verbose=False, optimize=True)
        except Exception as e:  # noqa: BLE001 - exporter failures are bugs or unsupported configs
            interrupt.reraise(e)  # the exporter wraps a Ctrl-C in its own error
            why = str(e).splitlines()[0][:200] if str(e) else ""
            raise StexportError(f"ONNX export failed ({type(e).__name__}: {why})") from e


def _export(model, args: tuple, names: list[str], dynamic: tuple, path: Path, external_data: bool | None) -> Path:
    return _finish(_program(model, args, names, dynamic).model_proto, model, path, external_data)


def _finish(proto: onnx.ModelProto, model, path: Path, external_data: bool | None) -> Path:
    """Name the GEMMs, split kᵀ, tidy, save (external data past EXTERNAL_DATA_BYTES), check."""
    name_linear_nodes(proto, getattr(model, "module_prefix", ""))
    split_key_transposes(proto)
    _tidy(proto)
    if external_data is None:
        external_data = _weight_bytes(model) > EXTERNAL_DATA_BYTES
    save(proto, path, external_data)
    check(path)
    return path


def _tidy(proto: onnx.ModelProto) -> None:
    """Drop exporter bookkeeping that bloats the file, name the graph, read the batch size from the Cast.

    TensorRT takes UINT8 only as a network input feeding a Cast, but the exporter reads the dynamic batch size
    with a Shape of the input itself; the Cast's output has the same shape.
    """
    proto.graph.name = "stexport"
    inp = proto.graph.input[0].name
    cast = next((n for n in proto.graph.node if n.op_type == "Cast" and n.input[0] == inp), None)
    if cast is not None:
        for n in proto.graph.node:
            if n is not cast and inp in n.input:
                n.input[list(n.input).index(inp)] = cast.output[0]
        _topo_sort(proto.graph)
    proto.producer_name = "stexport"
    for n in proto.graph.node:
        del n.metadata_props[:]
    del proto.metadata_props[:]


def _topo_sort(g: onnx.GraphProto) -> None:
    nodes = list(g.node)
    ready = {t.name for t in g.initializer} | {i.name for i in g.input}
    ordered = stable_topo(nodes, {id(n): float(i) for i, n in enumerate(nodes)}, ready)
    del g.node[:]
    g.node.extend(ordered)


def scope_of(node: onnx.NodeProto) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(p.value)
    return []


def name_linear_nodes(proto: onnx.ModelProto, prefix: str = "") -> None:
    """Name MatMul/Gemm nodes after their torch module (e.g. 'blocks.3.attn.q', 'blocks.3.attn.scores') so Q/DQ
    can find them after the exporter's metadata is gone. prefix: where the ViT's modules sit in the exported
    model ('base.' in a multi-task model), left out of the names so every graph's layers have the same names."""
    seen: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = [s for s in scope_of(n) if s]
        if len(scopes) < 2:
            continue
        base = scopes[-2]  # the module; scopes[-1] is the aten op inside it
        base = base[len(prefix):] if prefix and base.startswith(prefix) else base
        k = seen.get(base, 0)
        seen[base] = k + 1
        n.name = base if k == 0 else f"{base}#{k}"


def split_key_transposes(proto: onnx.ModelProto) -> None:
    """kᵀ of each q·kᵀ as two Transposes, the last swapping only the last two axes and feeding the MatMul.

    The exporter merges them into one (0, 2, 3, 1) permute; OpenVINO folds a last-two-axes Transpose into the
    MatMul and then runs the whole attention in its fused kernel (~17% faster attention and no standalone
    Transpose of k on ViT-B/16), while TensorRT and ONNX Runtime fuse either form.
    """
    g = proto.graph
    made = {o: n for n in g.node for o in n.output}
    extra: dict[int, onnx.NodeProto] = {}
    for mm in g.node:
        src = made.get(mm.input[1]) if mm.op_type == "MatMul" and mm.name.endswith(".attn.scores") else None
        if src is None or src.op_type != "Transpose":
            continue
        perm = perm_of(src)
        if len(perm) < 3 or swaps_last_axes(perm):
            continue
        first = [*perm[:-2], perm[-1], perm[-2]]
        mid = f"{src.output[0]}_heads"
        del src.attribute[:]
        src.attribute.append(helper.make_attribute("perm", first))
        out = src.output[0]
        src.output[0] = mid
        swap = [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]
        extra[id(src)] = helper.make_node("Transpose", [mid], [out], name=f"{src.name}_kT", perm=swap)
    if not extra:
        return
    nodes = []
    for n in g.node:
        nodes.append(n)
        if id(n) in extra:
            nodes.append(extra[id(n)])
    del g.node[:]
    g.node.extend(nodes)
