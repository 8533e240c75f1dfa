"""Multi-task bundles: many tasks' adapters and heads stacked in one graph that mixes tasks inside one batch.

The graph takes a second input, `task` (int64 [B]): the index of each clip's task. The backbone runs once for
the whole batch; each adapter gathers its clip's rows of the stacked per-task tensors (Gather on the task
index) and runs them as batched MatMuls (fc1, fc2: one (D, W) / (W, D) matrix per clip, the way Punica's SGMV
and S-LoRA gather a request's LoRA weights inside one batched forward), the temporal conv as per-clip
per-channel taps, the head as per-clip gathered rows. Paper section 3: an ST-Adapter is a small module beside a
frozen backbone, so the tasks share everything else.

Per-task tensors, stacked over tasks (K tasks, D backbone width, W adapter width, kt temporal taps, R head rows):
`fc1_w` (K, D, W), `fc1_b` (K, W), `taps` (K, kt, W) (per channel: a swappable graph stores them per token,
(L, W) per tap, ~29 MB a task on ViT-B/16), `conv_b` (K, W), `fc2_w` (K, W, D), `fc2_b` (K, D), and the head's
`head_w` (K, D, R), `head_b` (K, R). The class token's conv output and fc2 update are exactly 0, as in the
single-task graph, by one shared 0/1 token mask.

Logits beyond a task's classes are cut, not masked: a task with fewer classes than R has zero head rows
there, the graph returns all R logits of every clip, and the runtimes keep a clip's first `classes` (as for a
swappable bundle's padded head). Masking in the graph (−inf) would make every such output non-finite, which
stexport treats as a broken model (stexport.runtime.scoring), and a finite large negative value would change
nothing a runtime that cuts does not already do; the output stays one dense float32 (B, R) tensor that any
runtime and Triton describe plainly.

Only adapters with a (kt, 1, 1) kernel (the official models') are stacked; spatial kernels are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from stexport.bundle.store import Bundle
from stexport.errors import StexportError

log = logging.getLogger("stexport")

TASK_INPUT = "task"
TASK_DELTAS = "task_deltas.safetensors"  # artifact 'task_deltas': task i's state dict under "i/<key>"


def gather(stacked: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """Each clip's task's row of a per-task tensor stacked over tasks: one ONNX Gather on axis 0 that reads
    the named initializer itself (indexing with [] exports as a GatherND of an unnamed copy)."""
    return torch.index_select(stacked, 0, task)


class StackedAdapter(nn.Module):
    """Every task's FoldedAdapter at one position, run per clip: x + fc2(tconv(fc1(x))) with clip b's task's
    tensors, on the token stream (B·T·L, D)."""

    def __init__(self, adapters: list):
        super().__init__()
        first = adapters[0]
        if not all(a.shift for a in adapters):
            raise StexportError("multi-task bundles stack adapters with a (kt, 1, 1) temporal kernel only")
        self.tokens = first.tokens
        self.pad = first.tconv.pad

        def stack(f):
            return nn.Parameter(torch.stack([f(a).detach() for a in adapters]), requires_grad=False)

        self.fc1_w = stack(lambda a: a.fc1.weight.t())  # (K, D, W)
        self.fc1_b = stack(lambda a: a.fc1.bias)  # (K, W)
        # row 1 of a TemporalShift's (L, W) taps is any patch token's: the per-channel tap
        self.taps = stack(lambda a: torch.stack([t[1] for t in a.tconv.taps]))  # (K, kt, W)
        self.conv_b = stack(lambda a: a.tconv.bias[1])  # (K, W)
        self.fc2_w = stack(lambda a: a.fc2.weight.t())  # (K, W, D)
        self.fc2_b = stack(lambda a: a.fc2_bias[1])  # (K, D)
        keep = torch.ones(self.tokens, 1, dtype=first.fc1.weight.dtype)
        keep[0] = 0  # the class token gets no conv output and no fc2 bias
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor, T: int, task: torch.Tensor) -> torch.Tensor:
        L, D, W = self.tokens, x.shape[-1], self.fc1_w.shape[-1]
        y = torch.bmm(x.reshape(-1, T * L, D), gather(self.fc1_w, task)) + gather(self.fc1_b, task)[:, None, :]
        y = y.reshape(-1, T, L, W)
        taps = gather(self.taps, task)[:, :, None, None, :] * self.keep  # (B, kt, 1, L, W)
        out = y * taps[:, self.pad] + gather(self.conv_b, task)[:, None, None, :] * self.keep
        if self.pad:
            p = F.pad(y, (0, 0, 0, 0, self.pad, self.pad))
            for k in range(taps.shape[1]):
                if k != self.pad:
                    out = out + p[:, k:k + T] * taps[:, k]
        z = torch.bmm(out.reshape(-1, T * L, W), gather(self.fc2_w, task)).reshape(-1, T, L, D)
        return x + (z + gather(self.fc2_b, task)[:, None, None, :] * self.keep).reshape(-1, D)


class MultiTaskViT(nn.Module):
    """Folded ST-Adapter ViT with K tasks: (frames (B, T, H, W, 3) uint8 or (B, T, 3, H, W) float, task int64
    (B,) in [0, K)) → float32 logits (B, head_rows); clip b's first classes[task[b]] logits are its task's."""

    module_prefix = "base."  # where the folded ViT's modules sit: left out of the graph's layer names

    def __init__(self, deploys: list, classes: list[int]):
        super().__init__()
        base = deploys[0]
        self.num_tasks, self.classes = len(deploys), list(classes)
        self.head_rows = max(classes)
        for i, block in enumerate(base.blocks):
            for where in ("pre_attn", "pre_mlp"):
                if getattr(block, where) is not None:
                    setattr(block, where, StackedAdapter([getattr(d.blocks[i], where) for d in deploys]))
        self.input_format, self.image_size = base.input_format, base.image_size
        rows = self.head_rows

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])

        self.head_w = nn.Parameter(torch.stack([padded(d.head.weight.detach()).t() for d in deploys]),
                                   requires_grad=False)  # (K, D, R)
        self.head_b = nn.Parameter(torch.stack([padded(d.head.bias.detach()) for d in deploys]),
                                   requires_grad=False)  # (K, R)
        base.head = nn.Identity()
        self.base = base
        self.eval()

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        h = self.base.pooled(x, task)  # (B, D)
        return torch.bmm(h[:, None, :], gather(self.head_w, task))[:, 0, :] + gather(self.head_b, task)


def stacked(bb, deltas: list, input_format: str = "uint8", compute_dtype: torch.dtype = torch.float32) -> MultiTaskViT:
    """The MultiTaskViT of backbone `bb` (a stexport Backbone) and every task's Deltas, in order: each task
    folded as `stexport build` folds it, then its adapters and head stacked onto the first's backbone."""
    from stexport.build.fold import fold
    from stexport.build.reference import build_reference

    deploys = []
    for i, d in enumerate(deltas):
        deploys.append(fold(build_reference(bb, d), input_format, compute_dtype=compute_dtype))
        if i:  # only the adapters and head are kept from the tasks after the first: drop their backbone now
            for block in deploys[-1].blocks:
                block.attn = block.fc = block.proj = None
    return MultiTaskViT(deploys, [d.spec.num_classes for d in deltas])


def rebuilt(bundle: Bundle, pretrained: str | None = None, compute_dtype: torch.dtype = torch.float32,
            input_format: str = "uint8") -> MultiTaskViT:
    """The MultiTaskViT of a multi-task bundle, from its backbone record (`pretrained`: where the weights are
    now) and its tasks' state dicts (artifact task_deltas). StexportError for a bundle that is not one."""
    from stexport.build.deltas import as_deltas
    from stexport.build.loaders import backbone_from_record
    from stexport.bundle.multitask import task_of

    mt = bundle.manifest.multitask
    if mt is None:
        raise StexportError(f"{bundle.path}: not a multi-task bundle")
    deltas = []
    for t in mt.tasks:
        sd = {k: torch.from_numpy(v.copy()) for k, v in task_of(bundle, t.name).deltas.items()}
        deltas.append(as_deltas(sd))
    return stacked(backbone_from_record(bundle.manifest.model.backbone, pretrained), deltas, input_format,
                   compute_dtype)


def task_name(adapter, index: int) -> str:
    return Path(adapter).stem if isinstance(adapter, (str, Path)) else f"task{index}"


def build_multitask(adapters: list, out: str | Path | None = None, backbone="stexport-tiny-vit",
                    pretrained: str | None = None, names: list[str] | None = None, labels: list | None = None,
                    samplings: list[dict | None] | None = None, frames: int = 8, input_format: str = "uint8",
                    precision: str = "fp32", force: bool = False, external_data: bool | None = None,
                    calib=None, calib_clips: int = 32, calib_method: str = "minmax", calib_seed: int = 0,
                    int8_migrate="auto", fp16_overflow: str = "fp32", progress: bool = False) -> Bundle:
    """One bundle running every task of `adapters` (checkpoint paths, Deltas or state dicts; one backbone)
    in one graph with a second input, the task index per clip (see the module docstring). The manifest's
    `multitask` record lists each task (name, index, labels, classes, default sampling, checkpoint sha256); the
    bundle's own task (output, labels.txt, sampling, adapter record) is the first.

    precision: fp32, fp16 or int8, made as `stexport build` makes them (stexport.bundle.precision), the task
    index fed round-robin wherever the build runs the graph on clips: fp16's overflow check (fp16_overflow)
    runs clip i as task i % K; int8 calibrates the shared backbone's activation ranges on the clips of `calib`
    (calib_clips of them, seeded choice; calib_method; int8_migrate) with clip i run as task i % K, so the
    ranges cover every task. INT8 quantizes the backbone's GEMMs; the adapters' per-clip GEMMs read gathered
    per-task weights and stay float (measured per task against verify's INT8 gate in
    docs/guides/task-packs.md).

    names: task names (default: the checkpoints' file stems; unique); labels: per task a labels file, a list of
    names or None; samplings: per task overrides of the default sampling (rate, temporal_views,
    spatial_views). backbone: a stexport Backbone or an open_clip name (with `pretrained`).
    Raises StexportError (one line, before any export) for adapters whose layout differs from the first's,
    spatial adapter kernels, duplicate names, an unknown precision, int8 without `calib`, or an existing `out`
    without force."""
    import warnings

    from safetensors.torch import save_file

    from stexport.build.backbone import Backbone, load_backbone, random_weights_warning
    from stexport.build.deltas import as_deltas, check_fits
    from stexport.build.export import DTYPES, OPSET, OUTPUT, export_onnx
    from stexport.build.loaders import backbone_record
    from stexport.build.packing import spec_mismatch
    from stexport.build.pipeline import ARTIFACTS, bundle_name, default_sampling, input_record
    from stexport.bundle.labels import resolve_labels
    from stexport.bundle.manifest import (AdapterRecord, CalibrationRecord, FP16CheckRecord, Manifest, ModelRecord,
                                          MultiTaskRecord, OutputRecord, SamplingRecord, TaskEntry)
    from stexport.bundle.precision import NAMES, PRECISIONS, choices_help
    from stexport.bundle.store import default_home, finish, writing
    from stexport.onnx_graph import external_files
    from stexport.runtime.video import Sampling

    if precision not in PRECISIONS:
        raise StexportError(f"--precision {precision}: choose {choices_help(NAMES)}")
    if PRECISIONS[precision].calibrated and calib is None:
        raise StexportError(f"--precision {precision} needs calibration videos: pass --calib LIST|DIR (clips of "
                            "every task; they are run round-robin, one task each)")
    if calib is not None and precision == "fp32":
        from stexport.build.options import CALIB_UNUSED

        log.warning(CALIB_UNUSED)
    if not adapters:
        raise StexportError("a multi-task bundle needs at least one adapter checkpoint")
    deltas = [as_deltas(a) for a in adapters]
    names = list(names) if names else [task_name(d.path or a, i) for i, (d, a) in enumerate(zip(deltas, adapters))]
    if len(names) != len(deltas) or len(set(names)) != len(names):
        raise StexportError(f"task names {names}: give one distinct name per adapter (--name)")
    for n in names:  # `--task` takes a name or an index: a name must be neither blank nor one an index reads as
        if not str(n).strip() or str(n).strip() != str(n) or str(n).isdigit():
            raise StexportError(f"task name {str(n)!r}: a task name must not be blank, start or end with a space, "
                                "or be a number (`--task N` is the task at index N); pass --name NAME")
    rows = max(d.spec.num_classes for d in deltas)
    for d, n in zip(deltas[1:], names[1:]):
        why = spec_mismatch(d.spec, deltas[0].spec, rows)
        if why:
            raise StexportError(f"{d.path or n}: cannot share a graph with {names[0]}: {why}")
    if tuple(deltas[0].spec.kernel[1:]) != (1, 1):
        raise StexportError(f"{deltas[0].path or names[0]}: adapter kernel {'x'.join(map(str, deltas[0].spec.kernel))}"
                            ": multi-task bundles stack (kt, 1, 1) temporal kernels only")
    if isinstance(backbone, Backbone):
        bb = backbone
    else:
        with warnings.catch_warnings():
            if pretrained in (None, "", "none"):
                warnings.simplefilter("ignore")
                log.warning(random_weights_warning(backbone))
            bb = load_backbone(backbone, pretrained)
    for d in deltas:
        check_fits(d.spec, bb.config, bb.name)
    size = bb.config.image_size
    labels = list(labels) if labels else [None] * len(deltas)
    samplings = list(samplings) if samplings else [None] * len(deltas)
    entries = []
    for i, (d, n) in enumerate(zip(deltas, names)):
        task_labels, source = resolve_labels(str(labels[i]) if isinstance(labels[i], (str, Path)) else None,
                                             d.spec.num_classes)
        if isinstance(labels[i], list):
            if len(labels[i]) != d.spec.num_classes:
                raise StexportError(f"task {n}: {len(labels[i])} labels for {d.spec.num_classes} classes")
            task_labels, source = list(labels[i]), "given"
        views = {**default_sampling(d.spec), **(samplings[i] or {})}
        Sampling(frames=frames, size=size, **views)  # refuse what infer would refuse, before any work
        entries.append(TaskEntry(name=n, index=i, classes=d.spec.num_classes, labels=task_labels,
                                 labels_source=source, sampling=SamplingRecord(**views),
                                 adapter=AdapterRecord(spec=d.spec, sha256=d.sha256,
                                                       file=str(Path(d.path).resolve()) if d.path else None)))
    calib_set = None
    if precision == "int8":  # the clips are chosen (and a bad list refused) before any export
        from stexport.calibration import choose

        calib_set = choose(calib, calib_clips, calib_seed)
    dtype = DTYPES.get(precision, torch.float32)
    model = stacked(bb, deltas, input_format, compute_dtype=dtype)
    name = bundle_name(f"multitask{len(deltas)}-{names[0]}", bb.name, precision, frames, size)
    out = Path(out) if out is not None else default_home() / name
    inp = input_record(input_format, frames, size)
    fp16_check = calibration = None
    with writing(out, force=force) as tmp:
        onnx_path = tmp / ARTIFACTS["onnx"]
        log.info("export: %d tasks in one graph, head of %d rows, task index input '%s' (%s)", len(deltas), rows,
                 TASK_INPUT, precision)
        export_onnx(model, onnx_path, frames, external_data=external_data, task_input=TASK_INPUT)
        if precision == "fp16":
            from stexport.build.fp16_check import check_fp16_graph

            fp32 = stacked(bb, deltas, input_format)
            fp16_check = check_fp16_graph(fp32, onnx_path, input_format, frames, size,
                                          entries[0].sampling.model_dump(), calib, overflow=fp16_overflow,
                                          tasks=len(deltas))
            del fp32
        if precision == "int8":
            from stexport.build.pipeline import release_heap
            from stexport.calibration import quantize_bundle_model

            model = None
            release_heap()
            calibration = quantize_bundle_model(
                onnx_path, calib_set, frames=frames, size=size, sampling=entries[0].sampling.model_dump(),
                clips=calib_clips, method=calib_method, seed=calib_seed, input_spec=inp, progress=progress,
                external_data=external_data, migrate=int8_migrate, tasks=len(deltas))
            log.info("calibration: %s ranges from %s clips of %s, round-robin over %d tasks; %s layers quantized",
                     calibration["method"], calibration["clips"], calibration.get("source", calib), len(deltas),
                     calibration["quantized_layers"])
        first = deltas[0]
        save_file({k: v.contiguous() for k, v in first.state_dict.items()}, str(tmp / ARTIFACTS["deltas"]))
        # every task's checkpoint state dict, for the reference of each (verify --task) and other exports
        save_file({f"{i}/{k}": v.contiguous() for i, d in enumerate(deltas) for k, v in d.state_dict.items()},
                  str(tmp / TASK_DELTAS))
        (tmp / ARTIFACTS["labels"]).write_text("\n".join(entries[0].labels) + "\n", encoding="utf-8")
        artifacts = {**ARTIFACTS, "task_deltas": TASK_DELTAS}
        data = external_files(onnx_path)
        if data:
            artifacts["onnx_data"] = data[0]
        manifest = Manifest(
            name=out.name,
            model=ModelRecord(backbone=backbone_record(bb), adapter=entries[0].adapter),
            input=inp,
            output=OutputRecord(name=OUTPUT, classes=entries[0].classes, labels_source=entries[0].labels_source),
            sampling=entries[0].sampling, precision=precision, opset=OPSET, artifacts=artifacts,
            calibration=CalibrationRecord(**calibration) if calibration else None,
            fp16_check=FP16CheckRecord(**fp16_check) if fp16_check else None,
            multitask=MultiTaskRecord(input=TASK_INPUT, head_rows=rows, tasks=entries),
        )
        finish(tmp, manifest)
    bundle = Bundle.load(out)
    bundle.changed_files()
    return bundle


def multitask_from_packs(base, packs: list, out: str | Path | None = None, pretrained: str | None = None,
                         force: bool = False, **options) -> Bundle:
    """`build_multitask` from a swappable base bundle (its own task first) and task packs made for it: each
    pack carries its checkpoint's state dict, labels, name and default sampling; the backbone is the base's
    (reloaded from its manifest record, or `pretrained`). options: build_multitask's precision, calib, ….
    Raises StexportError for a pack made for another base (TaskPack.check_fits) and what build_multitask
    raises."""
    from stexport.build.loaders import backbone_from_record
    from stexport.bundle.taskpack import as_pack

    b = base if isinstance(base, Bundle) else Bundle.load(base)
    m = b.manifest
    loaded = [as_pack(p) for p in packs]
    for p in loaded:
        p.check_fits(b)
    from dataclasses import replace

    from safetensors.torch import load_file

    from stexport.build.deltas import as_deltas

    def deltas(state: dict, rec):  # the checkpoint's own sha256 and path, as its record says
        return replace(as_deltas(state), sha256=rec.sha256, path=rec.file)

    adapters = [deltas(load_file(str(b.file("deltas"))), m.model.adapter),
                *(deltas({k: torch.from_numpy(v.copy()) for k, v in p.deltas.items()}, p.record.adapter)
                  for p in loaded)]
    if pretrained == "none" and not m.model.backbone.weights.random:
        from stexport.build.backbone import random_weights_warning

        log.warning(random_weights_warning(m.model.backbone.name) + " (the base was built with real weights)")
    own_name = Path(m.model.adapter.file).stem if m.model.adapter.file else b.path.name
    return build_multitask(
        adapters, out=out, backbone=backbone_from_record(m.model.backbone, pretrained), force=force,
        names=[own_name, *(p.name for p in loaded)], labels=[b.labels, *(p.labels for p in loaded)],
        samplings=[m.sampling.model_dump(), *(p.record.sampling.model_dump() for p in loaded)],
        frames=m.input.frames, input_format=_input_format(m), **options)


def _input_format(m) -> str:
    from stexport.bundle.precision import input_format_of

    return input_format_of(m.input.dtype).name
