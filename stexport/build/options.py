"""What `stexport build` takes, checked in one place before any model is loaded (no torch is imported here, so
a mistyped name, a missing file or an existing --out is refused in milliseconds)."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

from stexport.bundle.store import refuse_existing
from stexport.errors import StexportError
from stexport.bundle.precision import FLOAT_PRECISIONS
from stexport.bundle.precision import PRECISIONS as TABLE
from stexport.build.names import (CALIB_METHODS, INPUT_FORMATS, PRECISIONS, WEIGHT_SUFFIXES, check_backbone,
                            check_weights_file)

log = logging.getLogger("stexport")

INT8_FLOATS = FLOAT_PRECISIONS  # an INT8 graph's float parts
FP16_OVERFLOW = ("fp32", "refuse")  # --fp16-overflow: keep overflowing nodes in FP32 (default), or refuse


def choice(flag: str, value: str, allowed) -> None:
    """StexportError naming the closest allowed value when `value` is not one of `allowed`."""
    if value not in allowed:
        close = difflib.get_close_matches(str(value).lower(), allowed, n=1, cutoff=0.4)
        hint = f"did you mean {close[0]}? " if close else ""
        raise StexportError(f"{flag} {value}: {hint}choose one of {', '.join(allowed)}")


CALIB_UNUSED = "--calib is only used for --precision int8 (and to check fp16); ignoring it"


@dataclass
class BuildOptions:
    """Everything `stexport build` takes, validated in one place (cheap checks only: no model is loaded).

    adapter: checkpoint path, a `Deltas`, or a delta state dict. backbone: open_clip name (loaded with
    `pretrained`: an open_clip tag, a file, or "none") or a loaded `Backbone`. size: must equal the backbone's
    resolution (its positional embedding is fixed); None takes it. calib: clip list, directory, video or
    uint8 array (N, T, S, S, 3) (INT8 only; required there). sampling: overrides of the default
    {rate, temporal_views, spatial_views}. int8_attention: also quantize the attention-score MatMul's inputs
    (q and kᵀ; softmax stays float). int8_float: the float type of an INT8 graph's non-quantized parts, "fp32"
    or "fp16" (default: fp16 when `for_tensorrt`, i.e. `--engine`, else fp32). int8_migrate: outlier
    migration folded into the INT8 graph (stexport.calibration.smooth): "auto" (chosen on the calibration
    clips; off for swappable bundles, whose backbone every task pack shares), "off" or an α in [0, 1].
    min_agreement, max_drop: a gate for an INT8 build (stexport.build.fallback): top-1 agreement with the
    FP32 graph (a fraction, 0–1, as verify's --min-agreement) and/or top-1 accuracy drop against it in points
    (needs labelled clips) and/or, min_top5_agreement, the same top-5 set as the FP32 graph (a fraction) on
    `gate_clips` (default: the calibration clips); the most sensitive GEMMs return
    to the graph's float type until it holds, at most `max_float_layers` (default: a quarter of them).
    fp16_overflow: what an FP16 build does with activations beyond FP16's range, "fp32" (keep those nodes in
    FP32 inside the FP16 graph, recorded in the manifest's fp16_check) or "refuse" (stexport.build.fp16_check).
    swappable: export the per-task
    tensors (adapters, head, INT8 adapter scales) as named overridable initializers, so task packs
    (`stexport pack`) can replace them at run time; max_classes: the head's rows in a swappable graph (default:
    the adapter's classes). decode_timeout, max_decode_s: the decoder's limits for --calib videos (seconds
    without a frame; seconds in all, None: no limit; see stexport.runtime.decode_worker). progress: tqdm bars
    on stderr when it is a terminal.

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
    int8_float: str | None = None
    int8_migrate: str = "auto"
    min_agreement: float | None = None
    max_drop: float | None = None
    min_top5_agreement: float | None = None
    max_float_layers: int | None = None
    gate_clips: object = None
    fp16_overflow: str = "fp32"
    for_tensorrt: bool = False
    swappable: bool = False
    max_classes: int | None = None
    decode_timeout: float = 60.0
    max_decode_s: float | None = None
    progress: bool = False

    def __post_init__(self):
        if self.adapter is None:
            raise StexportError("no adapter given: pass --adapter CHECKPOINT")
        choice("--precision", self.precision, PRECISIONS)
        from stexport.runtime.decode_worker import limits_of

        limits_of(self.decode_timeout, self.max_decode_s)  # refuses a limit that is not positive
        choice("--input", self.input_format, INPUT_FORMATS)
        if isinstance(self.adapter, (str, Path)):
            p = Path(self.adapter)
            if p.is_dir():
                raise StexportError(f"{p}: is a directory; --adapter takes the checkpoint file "
                                    "(.pt/.pth/.safetensors)")
            if not p.is_file():
                raise StexportError(f"{p}: no such file (--adapter takes the ST-Adapter checkpoint)")
        if isinstance(self.backbone, str):
            check_backbone(self.backbone)
            if self.pretrained not in (None, "", "none"):
                w = Path(self.pretrained)
                if w.exists() or w.suffix in WEIGHT_SUFFIXES:
                    check_weights_file(w)
        if self.frames < 1:
            raise StexportError(f"--frames {self.frames}: need at least one frame")
        if self.size is not None and self.size < 1:
            raise StexportError(f"--size {self.size}: must be a positive number of pixels")
        if TABLE[self.precision].calibrated:
            if self.calib is None:
                raise StexportError(f"--precision {self.precision} needs --calib CLIPS (a '<video> <label>' list, "
                                    "a directory of videos or a video) to calibrate activation ranges")
            choice("--calib-method", self.calib_method, CALIB_METHODS)
            if self.calib_clips < 1:
                raise StexportError(f"--calib-clips {self.calib_clips}: must be at least 1")
        elif self.calib is not None and self.precision == "fp32":
            log.warning(CALIB_UNUSED)
        if self.max_classes is not None:
            if not self.swappable:
                raise StexportError("--max-classes needs --swappable (it sizes the head task packs replace)")
            if self.max_classes < 1:
                raise StexportError(f"--max-classes {self.max_classes}: must be at least 1")
        if self.int8_attention and self.precision != "int8":
            raise StexportError("--int8-attention needs --precision int8")
        if self.int8_float is not None:
            choice("--int8-float", self.int8_float, INT8_FLOATS)
            if self.precision != "int8":
                raise StexportError(f"--int8-float {self.int8_float} needs --precision int8 (use --precision "
                                    f"{self.int8_float} for a float bundle)")
        elif self.precision == "int8":
            # TensorRT runs an INT8 graph's float parts in the graph's float type (strongly typed): FP16 there
            self.int8_float = "fp16" if self.for_tensorrt else "fp32"
        if self.int8_migrate not in ("auto", "off"):
            try:
                alpha = float(self.int8_migrate)
            except (TypeError, ValueError):
                alpha = -1.0
            if not 0.0 <= alpha <= 1.0:
                close = difflib.get_close_matches(str(self.int8_migrate).lower(), ("auto", "off"), n=1,
                                                  cutoff=0.4)
                hint = f"did you mean {close[0]}? " if close else ""
                raise StexportError(f"--int8-migrate {self.int8_migrate}: {hint}use auto, off or an alpha "
                                    "between 0 and 1")
        if self.int8_migrate != "auto" and self.precision != "int8":
            raise StexportError(f"--int8-migrate {self.int8_migrate} needs --precision int8")
        if self.swappable and self.int8_migrate not in ("auto", "off"):
            raise StexportError(f"--int8-migrate {self.int8_migrate}: a --swappable bundle's backbone is shared by "
                                "every task pack, so it cannot take one task's migration; use --int8-migrate off")
        choice("--fp16-overflow", self.fp16_overflow, FP16_OVERFLOW)
        if self.fp16_overflow != "fp32" and self.precision != "fp16":
            raise StexportError(f"--fp16-overflow {self.fp16_overflow} needs --precision fp16")
        if self.swappable:
            self.int8_migrate = "off"  # see above: auto means off for swappable bundles and their packs
        self._check_gate()
        if isinstance(self.calib, (str, Path)) and not Path(self.calib).exists():
            raise StexportError(f"{self.calib}: no such clip list, directory or video (--calib)")
        if self.labels is not None and not Path(self.labels).is_file():
            raise StexportError(f"{self.labels}: no such labels file (--labels: one class name per line)")
        if self.out is not None:
            self.out = Path(self.out)
            refuse_existing(self.out, self.force)  # before the slow part; writing() checks again at the rename

    @property
    def gated(self) -> bool:
        """An INT8 build with a float-fallback gate (--min-agreement / --max-drop / --min-top5-agreement)."""
        return self.min_agreement is not None or self.max_drop is not None or self.min_top5_agreement is not None

    def _check_gate(self) -> None:
        if not self.gated:
            if self.max_float_layers is not None or self.gate_clips is not None:
                flag = "--max-float-layers" if self.max_float_layers is not None else "--gate-clips"
                raise StexportError(f"{flag} needs --min-agreement, --max-drop or --min-top5-agreement (the gate "
                                    "the float fallback meets)")
            return
        flag = next(f for f, v in (("--min-agreement", self.min_agreement), ("--max-drop", self.max_drop),
                                   ("--min-top5-agreement", self.min_top5_agreement)) if v is not None)
        if self.precision != "int8":
            raise StexportError(f"{flag} needs --precision int8 (it returns INT8 layers to float)")
        if self.swappable:
            raise StexportError(f"{flag}: a --swappable bundle's layers are shared by every task pack; build it "
                                "without a gate")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise StexportError(f"--min-agreement {self.min_agreement}: a fraction between 0 and 1 (e.g. 0.95)")
        if self.min_top5_agreement is not None and not 0.0 <= self.min_top5_agreement <= 1.0:
            raise StexportError(f"--min-top5-agreement {self.min_top5_agreement}: a fraction between 0 and 1 "
                                "(e.g. 0.95)")
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 100.0:
            raise StexportError(f"--max-drop {self.max_drop}: accuracy points between 0 and 100 (e.g. 1)")
        if self.max_float_layers is not None and self.max_float_layers < 1:
            raise StexportError(f"--max-float-layers {self.max_float_layers}: must be at least 1")
        clips = self.gate_clips if self.gate_clips is not None else self.calib
        if isinstance(clips, (str, Path)):
            if not Path(clips).exists():
                raise StexportError(f"{clips}: no such clip list, directory or video (--gate-clips)")
            if self.max_drop is not None:
                from stexport.runtime.video import read_clip_list

                if any(label is None for _, label in read_clip_list(clips)):
                    raise StexportError(f"--max-drop {self.max_drop}: {clips} has videos without labels; pass a "
                                        "'<video> <label>' list (--gate-clips), or use --min-agreement")
        elif self.max_drop is not None:
            raise StexportError(f"--max-drop {self.max_drop}: needs labelled clips (a '<video> <label>' list as "
                                "--gate-clips or --calib); use --min-agreement for unlabelled ones")
