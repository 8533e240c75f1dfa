"""Backbone + deltas → a bundle: reference → folded deploy model → ONNX (FP32 / FP16 / INT8) + manifest.

`build_bundle` is what `stexport build` runs and what tests and other tools call. The bundle is written into a
temporary directory and renamed into place (stexport.bundle.writing), so a failed build leaves nothing behind.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from stexport.backbone import Backbone, load_backbone
from stexport.bundle import Bundle, default_home, finish_manifest, writing
from stexport.deltas import Deltas, check_fits, infer_spec, load_deltas, unwrap
from stexport.errors import StexportError
from stexport.export import DTYPES, INPUT, OPSET, OUTPUT, export_onnx, external_files
from stexport.fold import fold
from stexport.labels import resolve_labels
from stexport.loaders import backbone_record
from stexport.reference import CLIP_MEAN, CLIP_STD, build_reference
from stexport.video import Sampling

log = logging.getLogger("stexport")

PRECISIONS = ("fp32", "fp16", "int8")
ARTIFACTS = {"onnx": "model.onnx", "deltas": "deltas.safetensors", "labels": "labels.txt"}
SSV2_CLASSES = 174


def default_sampling(spec) -> dict:
    """How the official code evaluates: SSv2 (adapters before attention, 174 classes) uses uniform segments
    and 3 spatial crops; Kinetics uses every 16th frame and 3 temporal clips."""
    if spec.pre_attn or spec.num_classes == SSV2_CLASSES:
        return {"rate": 0, "temporal_views": 1, "spatial_views": 3}
    return {"rate": 16, "temporal_views": 3, "spatial_views": 1}


def _deltas(adapter) -> Deltas:
    if isinstance(adapter, Deltas):
        return adapter
    if isinstance(adapter, dict):
        sd = unwrap(adapter, "deltas")
        return Deltas(spec=infer_spec(sd, "deltas"), state_dict={k: v.float() for k, v in sd.items()})
    return load_deltas(adapter)


def warn_activation(deltas: Deltas, bb: Backbone) -> None:
    """Warn when an official-layout adapter sits on a backbone resolved to exact GELU (see backbone)."""
    from stexport.backbone import official_layout_warning

    if deltas.official_layout:
        msg = official_layout_warning(bb.name, bb.config.act, bb.source.get("activation_reason", ""))
        if msg:
            log.warning(msg)


def input_record(input_format: str) -> dict:
    uint8 = input_format == "uint8"
    return {"name": INPUT, "dtype": "uint8" if uint8 else "float32", "layout": "BTHWC" if uint8 else "BTCHW",
            "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "normalized_in_graph": uint8}


def bundle_name(adapter, backbone: str, precision: str, frames: int, size: int) -> str:
    stem = Path(adapter).stem if isinstance(adapter, (str, Path)) else "stadapter"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{backbone}-{precision}-{frames}x{size}")


def build_bundle(adapter, backbone: str | Backbone = "ViT-B-16", pretrained: str = "openai",
                 precision: str = "fp32", frames: int = 8, size: int | None = None, out=None,
                 force: bool = False, calib=None, labels=None, calib_clips: int = 32,
                 calib_method: str = "minmax", calib_seed: int = 0, input_format: str = "uint8",
                 sampling: dict | None = None, external_data: bool | None = None,
                 int8_attention: bool = False, progress: bool = False) -> Bundle:
    """Build a bundle and return it.

    adapter: checkpoint path, a `Deltas`, or a delta state dict. backbone: open_clip name (loaded with
    `pretrained`) or a loaded `Backbone`. size: must equal the backbone's resolution (its positional
    embedding is fixed); None takes it. calib: clip list, directory or uint8 array (N, T, S, S, 3) (INT8 only;
    required there). sampling: overrides of the default {rate, temporal_views, spatial_views}. progress: tqdm
    bars on stderr when it is a terminal. int8_attention: also quantize the attention-score MatMul's inputs
    (q and kᵀ; softmax stays float).
    """
    if precision not in PRECISIONS:
        raise StexportError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if frames < 1:
        raise StexportError(f"--frames {frames}: need at least one frame")
    if precision == "int8" and calib is None:
        raise StexportError("--precision int8 needs --calib CLIPS (a '<video> <label>' list or a directory "
                            "of videos) to calibrate activation ranges")
    if precision == "fp32" and calib is not None:
        log.warning("--calib is only used for --precision int8 (and to check fp16); ignoring it")
    if precision == "int8":  # cheap checks of the calibration input before the slow part
        from stexport.calibration import METHODS, choose

        if calib_method not in METHODS:
            raise StexportError(f"--calib-method {calib_method}: choose one of {', '.join(METHODS)}")
        calib = choose(calib, calib_clips, calib_seed)
    if out is not None and Path(out).exists() and not force:  # before the slow part; writing() checks again
        raise StexportError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    steps = ["load", "fold", "export", *(["calibrate", "quantize"] if precision == "int8" else []), "write"]
    # progress bars only on a terminal (disable=None), so logs and pipes stay clean
    bar = tqdm(total=len(steps), desc="build", unit="step", disable=None if progress else True, leave=False)
    with bar:
        def step(name: str):
            bar.set_postfix_str(name)

        step("load")
        deltas = _deltas(adapter)
        if isinstance(backbone, Backbone):
            bb = backbone
        else:
            with warnings.catch_warnings():
                if pretrained in (None, "", "none"):
                    warnings.simplefilter("ignore")
                bb = load_backbone(backbone, pretrained)
        check_fits(deltas.spec, bb.config, bb.name)
        warn_activation(deltas, bb)
        size = size or bb.config.image_size
        if size != bb.config.image_size:
            raise StexportError(f"--size {size}: {bb.name} was trained at {bb.config.image_size} px and its "
                                f"positional embedding is fixed; use --size {bb.config.image_size}")
        names, labels_source = resolve_labels(str(labels) if labels else None, deltas.spec.num_classes)
        views = {**default_sampling(deltas.spec), **(sampling or {})}
        Sampling(frames=frames, size=size, **views)  # refuse what infer would refuse, before any work
        name = bundle_name(deltas.path or adapter, bb.name, precision, frames, size)
        out = Path(out) if out else default_home() / name
        ref = build_reference(bb, deltas)
        bar.update()

        with writing(out, force=force) as tmp:
            step("fold")
            dtype = DTYPES.get(precision, torch.float32)
            deploy = fold(ref, input_format, compute_dtype=dtype)
            bar.update()
            step("export")
            onnx_path = tmp / ARTIFACTS["onnx"]
            export_onnx(deploy, onnx_path, frames, external_data=external_data)
            fp16_check = None
            if precision == "fp16":  # FP16 must hold the activations: checked on the graph just written
                from stexport.fp16_check import check_fp16_graph

                fp16_check = check_fp16_graph(ref, onnx_path, input_format, frames, size, views, calib)
            bar.update()
            calibration = None
            if precision == "int8":
                from stexport.calibration import quantize_bundle_model

                step("calibrate")
                calibration = quantize_bundle_model(
                    onnx_path, calib, frames=frames, size=size, sampling=views, clips=calib_clips,
                    method=calib_method, seed=calib_seed, input_spec=input_record(input_format),
                    progress=progress, external_data=external_data, on_calibrated=lambda: step("quantize"),
                    attention=int8_attention)
                bar.update(2)
            step("write")
            from safetensors.torch import save_file

            tensors = {k: v.contiguous() for k, v in deltas.state_dict.items()}
            save_file(tensors, str(tmp / ARTIFACTS["deltas"]))
            (tmp / ARTIFACTS["labels"]).write_text("\n".join(names) + "\n")
            artifacts = dict(ARTIFACTS)
            data = external_files(onnx_path)
            if data:
                artifacts["onnx_data"] = data[0]
            manifest = {
                "name": out.name,
                "backbone": backbone_record(bb),
                "adapter": {"spec": deltas.spec.to_dict(), "sha256": deltas.sha256,
                            "file": str(Path(deltas.path).resolve()) if deltas.path else None},
                "precision": precision,
                "frames": frames,
                "size": size,
                "input": input_record(input_format),
                "output": {"name": OUTPUT, "dtype": "float32"},
                "opset": OPSET,
                "sampling": views,
                "labels": {"source": labels_source, "count": len(names)},
                "artifacts": artifacts,
            }
            if calibration is not None:
                manifest["calibration"] = calibration
            if fp16_check is not None:
                manifest["fp16_check"] = fp16_check
            finish_manifest(tmp, manifest)
            bar.update()
        return Bundle.load(out)
