"""Backbone + deltas → a bundle: reference → folded deploy model → ONNX (FP32 / FP16 / INT8) + manifest.

`BuildOptions` holds and checks what a build takes (the CLI only maps flags onto it); `build_bundle` is what
`stexport build` runs and what tests and other tools call. The bundle is written into a temporary directory and
renamed into place (stexport.bundle.writing), so a failed build leaves nothing behind.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from stexport.backbone import Backbone, load_backbone
from stexport.bundle import Bundle, default_home, finish, refuse_existing, writing
from stexport.deltas import Deltas, check_fits, infer_spec, load_deltas, unwrap
from stexport.errors import StexportError
from stexport.export import DTYPES, INPUT, OPSET, OUTPUT, export_onnx, external_files
from stexport.fold import fold
from stexport.labels import resolve_labels
from stexport.loaders import backbone_record
from stexport.manifest import (
    AdapterRecord,
    AdapterSpec,
    CalibrationRecord,
    InputRecord,
    Manifest,
    ModelRecord,
    OutputRecord,
    SamplingRecord,
)
from stexport.reference import build_reference
from stexport.video import Sampling

log = logging.getLogger("stexport")

PRECISIONS = ("fp32", "fp16", "int8")
INPUT_FORMATS = ("uint8", "float")
ARTIFACTS = {"onnx": "model.onnx", "deltas": "deltas.safetensors", "labels": "labels.txt"}
SSV2_CLASSES = 174


def default_sampling(spec: AdapterSpec) -> dict:
    """How the official code evaluates: SSv2 (adapters before attention, 174 classes) uses uniform segments
    and 3 spatial crops; Kinetics uses every 16th frame and 3 temporal clips."""
    if spec.pre_attn or spec.num_classes == SSV2_CLASSES:
        return {"rate": 0, "temporal_views": 1, "spatial_views": 3}
    return {"rate": 16, "temporal_views": 3, "spatial_views": 1}


def input_record(input_format: str, frames: int, size: int) -> InputRecord:
    """The graph input of a bundle built with --input `input_format` ('uint8' or 'float')."""
    if input_format == "uint8":
        return InputRecord(name=INPUT, dtype="uint8", layout="BTHWC", frames=frames, size=size)
    return InputRecord(name=INPUT, dtype="float32", layout="BTCHW", frames=frames, size=size)


def bundle_name(adapter, backbone: str, precision: str, frames: int, size: int) -> str:
    stem = Path(adapter).stem if isinstance(adapter, (str, Path)) else "stadapter"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{backbone}-{precision}-{frames}x{size}")


@dataclass
class BuildOptions:
    """Everything `stexport build` takes, validated in one place (cheap checks only: no model is loaded).

    adapter: checkpoint path, a `Deltas`, or a delta state dict. backbone: open_clip name (loaded with
    `pretrained`: an open_clip tag, a file, or "none") or a loaded `Backbone`. size: must equal the backbone's
    resolution (its positional embedding is fixed); None takes it. calib: clip list, directory, video or
    uint8 array (N, T, S, S, 3) (INT8 only; required there). sampling: overrides of the default
    {rate, temporal_views, spatial_views}. int8_attention: also quantize the attention-score MatMul's inputs
    (q and kᵀ; softmax stays float). progress: tqdm bars on stderr when it is a terminal.

    Raises StexportError naming the option and the fix.
    """

    adapter: object = None
    backbone: object = "ViT-B-16"
    pretrained: str = "openai"
    precision: str = "fp32"
    frames: int = 8
    size: int | None = None
    out: Path | None = None
    force: bool = False
    calib: object = None
    labels: str | Path | None = None
    calib_clips: int = 32
    calib_method: str = "minmax"
    calib_seed: int = 0
    input_format: str = "uint8"
    sampling: dict | None = None
    external_data: bool | None = None
    int8_attention: bool = False
    progress: bool = False

    def __post_init__(self):
        if self.adapter is None:
            raise StexportError("no adapter given: pass --adapter CHECKPOINT")
        if self.precision not in PRECISIONS:
            raise StexportError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.input_format not in INPUT_FORMATS:
            raise StexportError(f"--input {self.input_format}: choose one of {', '.join(INPUT_FORMATS)}")
        if self.frames < 1:
            raise StexportError(f"--frames {self.frames}: need at least one frame")
        if self.size is not None and self.size < 1:
            raise StexportError(f"--size {self.size}: must be a positive number of pixels")
        if self.precision == "int8":
            from stexport.calibration.ranges import METHODS

            if self.calib is None:
                raise StexportError("--precision int8 needs --calib CLIPS (a '<video> <label>' list, a directory "
                                    "of videos or a video) to calibrate activation ranges")
            if self.calib_method not in METHODS:
                raise StexportError(f"--calib-method {self.calib_method}: choose one of {', '.join(METHODS)}")
            if self.calib_clips < 1:
                raise StexportError(f"--calib-clips {self.calib_clips}: must be at least 1")
        elif self.calib is not None:
            log.warning("--calib is only used for --precision int8; ignoring it")
        if self.int8_attention and self.precision != "int8":
            raise StexportError("--int8-attention needs --precision int8")
        if isinstance(self.calib, (str, Path)) and not Path(self.calib).exists():
            raise StexportError(f"{self.calib}: no such clip list, directory or video (--calib)")
        if self.labels is not None and not Path(self.labels).is_file():
            raise StexportError(f"{self.labels}: no such labels file (--labels: one class name per line)")
        if self.out is not None:
            self.out = Path(self.out)
            refuse_existing(self.out, self.force)  # before the slow part; writing() checks again at the rename


def _deltas(adapter) -> Deltas:
    if isinstance(adapter, Deltas):
        return adapter
    if isinstance(adapter, dict):
        sd = unwrap(adapter, "deltas")
        return Deltas(spec=infer_spec(sd, "deltas"), state_dict={k: v.float() for k, v in sd.items()})
    return load_deltas(adapter)


def build_bundle(adapter=None, options: BuildOptions | None = None, **fields) -> Bundle:
    """Build a bundle and return it: `options`, or a BuildOptions made of `adapter` and `fields` (its field
    names). The bundle appears at options.out (default: default_home()/NAME) in one rename, or not at all.

    Raises StexportError for bad options or inputs (before any slow work where they can be checked cheaply)."""
    o = options or BuildOptions(adapter=adapter, **fields)
    calib = None
    if o.precision == "int8":
        from stexport.calibration import choose

        calib = choose(o.calib, o.calib_clips, o.calib_seed)
    steps = ["load", "fold", "export", *(["calibrate", "quantize"] if o.precision == "int8" else []), "write"]
    # progress bars only on a terminal (disable=None), so logs and pipes stay clean
    bar = tqdm(total=len(steps), desc="build", unit="step", disable=None if o.progress else True, leave=False)
    with bar:
        def step(name: str):
            bar.set_postfix_str(name)

        step("load")
        deltas = _deltas(o.adapter)
        if isinstance(o.backbone, Backbone):
            bb = o.backbone
        else:
            with warnings.catch_warnings():
                if o.pretrained in (None, "", "none"):
                    warnings.simplefilter("ignore")
                bb = load_backbone(o.backbone, o.pretrained)
        check_fits(deltas.spec, bb.config, bb.name)
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
            deploy = fold(ref, o.input_format, compute_dtype=DTYPES.get(o.precision, torch.float32))
            bar.update()
            step("export")
            onnx_path = tmp / ARTIFACTS["onnx"]
            export_onnx(deploy, onnx_path, o.frames, external_data=o.external_data)
            bar.update()
            calibration = None
            if o.precision == "int8":
                from stexport.calibration import quantize_bundle_model

                step("calibrate")
                calibration = quantize_bundle_model(
                    onnx_path, calib, frames=o.frames, size=size, sampling=views, clips=o.calib_clips,
                    method=o.calib_method, seed=o.calib_seed, input_spec=inp, progress=o.progress,
                    external_data=o.external_data, on_calibrated=lambda: step("quantize"),
                    attention=o.int8_attention)
                bar.update(2)
            step("write")
            from safetensors.torch import save_file

            tensors = {k: v.contiguous() for k, v in deltas.state_dict.items()}
            save_file(tensors, str(tmp / ARTIFACTS["deltas"]))
            (tmp / ARTIFACTS["labels"]).write_text("\n".join(names) + "\n", encoding="utf-8")
            artifacts = dict(ARTIFACTS)
            data = external_files(onnx_path)
            if data:
                artifacts["onnx_data"] = data[0]
            adapter_file = str(Path(deltas.path).resolve()) if deltas.path else None
            manifest = Manifest(
                name=out.name,
                model=ModelRecord(backbone=backbone_record(bb),
                                  adapter=AdapterRecord(spec=deltas.spec, sha256=deltas.sha256, file=adapter_file)),
                input=inp,
                output=OutputRecord(name=OUTPUT, classes=deltas.spec.num_classes, labels_source=labels_source),
                sampling=SamplingRecord(**views),
                precision=o.precision,
                opset=OPSET,
                artifacts=artifacts,
                calibration=CalibrationRecord(**calibration) if calibration else None,
            )
            finish(tmp, manifest)
            bar.update()
        bundle = Bundle.load(out)
        bundle.changed_files()  # prime the verified-hash cache: the first `infer` need not hash the model
        return bundle
