"""Backbone + deltas → a bundle: reference → folded deploy model → ONNX (FP32 / FP16 / INT8) + manifest.

`BuildOptions` holds and checks what a build takes (the CLI only maps flags onto it); `build_bundle` is what
`stexport build` runs and what tests and other tools call. The bundle is written into a temporary directory and
renamed into place (stexport.bundle.store.writing), so a failed build leaves nothing behind.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from stexport import interrupt
from stexport.build.backbone import Backbone, load_backbone, random_weights_warning
from stexport.bundle.precision import INPUT_FORMATS
from stexport.bundle.store import Bundle, default_home, finish, writing
from stexport.fileutil import as_os_error
from stexport.build.deltas import Deltas, as_deltas, check_fits
from stexport.errors import StexportError
from stexport.build.export import DTYPES, INPUT, OPSET, OUTPUT, export_onnx
from stexport.onnx_graph import external_files
from stexport.build.fold import fold
from stexport.bundle.labels import resolve_labels
from stexport.build.loaders import backbone_record
from stexport.bundle.manifest import (
    AdapterRecord,
    AdapterSpec,
    CalibrationRecord,
    FP16CheckRecord,
    InputRecord,
    Manifest,
    ModelRecord,
    OutputRecord,
    SamplingRecord,
)
from stexport.build.options import BuildOptions  # noqa: F401 - part of this module's API
from stexport.build.reference import build_reference
from stexport.runtime.video import Sampling

log = logging.getLogger("stexport")

ARTIFACTS = {"onnx": "model.onnx", "deltas": "deltas.safetensors", "labels": "labels.txt"}
SSV2_CLASSES = 174


def default_sampling(spec: AdapterSpec) -> dict:
    """How the official code evaluates: SSv2 (adapters before attention, 174 classes) uses uniform segments
    and 3 spatial crops; Kinetics uses every 16th frame and 3 temporal clips."""
    if spec.pre_attn or spec.num_classes == SSV2_CLASSES:
        return {"rate": 0, "temporal_views": 1, "spatial_views": 3}
    return {"rate": 16, "temporal_views": 3, "spatial_views": 1}


def input_record(input_format: str, frames: int, size: int) -> InputRecord:
    """The graph input of a bundle built with --input `input_format` (a name in INPUT_FORMATS)."""
    f = INPUT_FORMATS[input_format]
    return InputRecord(name=INPUT, dtype=f.dtype, layout=f.layout, frames=frames, size=size)


def bundle_name(adapter, backbone: str, precision: str, frames: int, size: int) -> str:
    stem = Path(adapter).stem if isinstance(adapter, (str, Path)) else "stadapter"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{backbone}-{precision}-{frames}x{size}")


def warn_activation(deltas: Deltas, bb: Backbone) -> None:
    """Warn when an official-layout adapter sits on a backbone resolved to exact GELU (see backbone)."""
    from stexport.build.backbone import official_layout_warning

    if deltas.official_layout:
        msg = official_layout_warning(bb.name, bb.config.act, bb.source.get("activation_reason", ""))
        if msg:
            log.warning(msg)


def _nbytes(t) -> int:
    import numpy as np

    return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize


def release_heap() -> None:
    """Collect garbage and give the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere a no-op):
    the exporter's temporary memory otherwise stays in the process's resident set."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_bundle(adapter=None, options: BuildOptions | None = None, **fields) -> Bundle:
    """Build a bundle and return it: `options`, or a BuildOptions made of `adapter` and `fields` (its field
    names). The bundle appears at options.out (default: default_home()/NAME) in one rename, or not at all.

    Raises StexportError for bad options or inputs (before any slow work where they can be checked cheaply)."""
    o = options or BuildOptions(adapter=adapter, **fields)
    calib = None
    if o.precision == "int8":
        from stexport.calibration import choose
        from stexport.runtime.decode_worker import limits_of

        limits = limits_of(o.decode_timeout, o.max_decode_s)
        calib = choose(o.calib, o.calib_clips, o.calib_seed, limits=limits)
        gate_clips = calib if o.gate_clips is None else choose(o.gate_clips, o.calib_clips, o.calib_seed, limits,
                                                                        role="gate")
    steps = ["load", "fold", "export", *(["calibrate", "quantize"] if o.precision == "int8" else []), "write"]
    # progress bars only on a terminal (disable=None), so logs and pipes stay clean
    bar = tqdm(total=len(steps), desc="build", unit="step", disable=None if o.progress else True, leave=False)
    started: list = []  # (stage, perf_counter) of the stage running

    def step(name: str | None):
        interrupt.check()
        now = time.perf_counter()
        if started:
            log.info("%s: done in %.2f s", started[0][0], now - started[0][1])
            started.clear()
        if name:
            bar.set_postfix_str(name)
            started.append((name, now))

    with bar:
        step("load")
        deltas = as_deltas(o.adapter)
        log.info("adapter: %s (%s adapters, kernel %s, %d classes)", deltas.path or "in memory",
                 deltas.spec.layout, "x".join(map(str, deltas.spec.kernel)), deltas.spec.num_classes)
        if isinstance(o.backbone, Backbone):
            bb = o.backbone
        else:
            from stexport.build.backbone import shape_config

            shape = shape_config(o.backbone)  # the fit from the config file, before any weights are fetched
            if shape is not None:
                check_fits(deltas.spec, shape, o.backbone)
            with warnings.catch_warnings():
                if o.pretrained in (None, "", "none"):
                    warnings.simplefilter("ignore")  # said once per build through the log below
                    log.warning(random_weights_warning(o.backbone))
                bb = load_backbone(o.backbone, o.pretrained)
        check_fits(deltas.spec, bb.config, bb.name)
        warn_activation(deltas, bb)
        size = o.size or bb.config.image_size
        if size != bb.config.image_size:
            raise StexportError(f"--size {size}: {bb.name} was trained at {bb.config.image_size} px and its "
                                f"positional embedding is fixed; use --size {bb.config.image_size}")
        names, labels_source = resolve_labels(str(o.labels) if o.labels else None, deltas.spec.num_classes)
        views = {**default_sampling(deltas.spec), **(o.sampling or {})}
        Sampling(frames=o.frames, size=size, **views)  # refuse what infer would refuse, before any work
        name = bundle_name(deltas.path or o.adapter, bb.name, o.precision, o.frames, size)
        out = o.out or default_home() / name
        inp = input_record(o.input_format, o.frames, size)
        ref = build_reference(bb, deltas)
        bar.update()

        with writing(out, force=o.force) as tmp:
            step("fold")
            dtype = DTYPES.get(o.precision, torch.float32)
            deploy = fold(ref, o.input_format, compute_dtype=dtype)
            head_rows = None
            if o.swappable:
                head_rows = o.max_classes or deltas.spec.num_classes
                if head_rows < deltas.spec.num_classes:
                    raise StexportError(f"--max-classes {head_rows}: the adapter has {deltas.spec.num_classes} "
                                        f"classes; pass at least {deltas.spec.num_classes}")
                deploy.pad_head(head_rows)
            log.info("graph: %s input (%s), %s compute, %s, attention as MatMul/Softmax, adapters as "
                     "Gemm + depth-wise Conv (%s)", o.input_format,
                     INPUT_FORMATS[o.input_format].help, str(dtype).replace("torch.", ""), bb.config.act,
                     o.precision)
            bar.update()
            step("export")
            onnx_path = tmp / ARTIFACTS["onnx"]
            log.info("export: ONNX opset %d, dynamic batch, %d frames x %d px", OPSET, o.frames, size)
            export_onnx(deploy, onnx_path, o.frames, external_data=o.external_data, swappable=o.swappable)
            fp16_check = None
            if o.precision == "fp16":  # FP16 must hold the activations: checked on the graph just written
                from stexport.build.fp16_check import check_fp16_graph

                fp16_check = check_fp16_graph(ref, onnx_path, o.input_format, o.frames, size, views, o.calib,
                                              overflow=o.fp16_overflow)
                if fp16_check["fp32_nodes"]:
                    log.warning("fp16: %d nodes kept in FP32 inside the FP16 graph for activations beyond FP16's "
                                "range: %s", len(fp16_check["fp32_nodes"]), ", ".join(
                                    f"{r['layer']} {r['max_abs_activation']:,.0f}"
                                    for r in fp16_check["overflow_layers"][:4]))
            bar.update()
            calibration = None
            float_graph = None
            if o.precision == "int8" and o.int8_float == "fp16":
                # the same model folded in FP16 (LayerNorm/Softmax in FP32): Q/DQ go into it after calibration
                float_graph = tmp / ".model-fp16.onnx"
                log.info("export: FP16 graph for the INT8 bundle's float parts")
                export_onnx(fold(ref, o.input_format, compute_dtype=torch.float16), float_graph, o.frames,
                            external_data=o.external_data)
            if o.precision == "int8":
                from stexport.calibration import quantize_bundle_model

                # calibration needs only the graphs on disk: the PyTorch models (and the exporter's freed heap)
                # go back before ONNX Runtime loads the graph, so the peak stays near the FP32 build's
                task_parameters = deploy.task_parameters() if o.swappable else None
                record = backbone_record(bb)
                ref = deploy = bb = None
                release_heap()
                step("calibrate")
                fallback = None
                if o.gated:
                    from stexport.build.fallback import FallbackGate, make_fallback

                    fallback = make_fallback(FallbackGate(o.min_agreement, o.max_drop, o.max_float_layers,
                                                          o.min_top5_agreement),
                                             onnx_path, gate_clips, Sampling(frames=o.frames, size=size, **views),
                                             inp, o.progress)
                calibration = quantize_bundle_model(
                    onnx_path, calib, frames=o.frames, size=size, sampling=views, clips=o.calib_clips,
                    method=o.calib_method, seed=o.calib_seed, input_spec=inp, progress=o.progress,
                    external_data=o.external_data, on_calibrated=lambda: step("quantize"),
                    attention=o.int8_attention, float_graph=float_graph, migrate=o.int8_migrate,
                    fallback=fallback)
                log.info("calibration: %s ranges from %s clips of %s%s; %s layers quantized",
                         calibration.get("method"), calibration.get("clips"), calibration.get("source", calib),
                         " (cached)" if calibration.get("cached") else "", calibration.get("quantized_layers"))
                bar.update(2)
            step("write")
            tasks = None
            if o.swappable:
                from stexport.bundle.manifest import TasksRecord
                from stexport.bundle.task_graph import finalize

                if deploy is not None:
                    task_parameters = deploy.task_parameters()
                tensors, structure = finalize(onnx_path, task_parameters, o.external_data)
                tasks = TasksRecord(head_rows=head_rows, structure=structure, tensors=tensors)
                log.info("swappable: %d per-task tensors (%.1f MB), head of %d rows", len(tensors),
                         sum(_nbytes(t) for t in tensors) / 1e6, head_rows)
            from safetensors.torch import save_file

            tensors = {k: v.contiguous() for k, v in deltas.state_dict.items()}
            try:
                save_file(tensors, str(tmp / ARTIFACTS["deltas"]))
            except Exception as e:  # safetensors' Rust writer: a full disk arrives as text, made an OSError
                raise as_os_error(e, out) from None
            (tmp / ARTIFACTS["labels"]).write_text("\n".join(names) + "\n", encoding="utf-8")
            artifacts = dict(ARTIFACTS)
            data = external_files(onnx_path)
            if data:
                artifacts["onnx_data"] = data[0]
            adapter_file = str(Path(deltas.path).resolve()) if deltas.path else None
            manifest = Manifest(
                name=out.name,
                model=ModelRecord(backbone=backbone_record(bb) if bb is not None else record,
                                  adapter=AdapterRecord(spec=deltas.spec, sha256=deltas.sha256, file=adapter_file)),
                input=inp,
                output=OutputRecord(name=OUTPUT, classes=deltas.spec.num_classes, labels_source=labels_source),
                sampling=SamplingRecord(**views),
                precision=o.precision,
                opset=OPSET,
                artifacts=artifacts,
                calibration=CalibrationRecord(**calibration) if calibration else None,
                fp16_check=FP16CheckRecord(**fp16_check) if fp16_check else None,
                tasks=tasks,
            )
            finish(tmp, manifest)
            bar.update()
            step(None)
        log.info("bundle: %s", out)
        bundle = Bundle.load(out)
        bundle.changed_files()  # prime the verified-hash cache: the first `infer` need not hash the model
        return bundle
