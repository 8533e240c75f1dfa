"""The bundle precisions, one row each, and the graph input formats: what every stage does with them.

A bundle's precision (`stexport build --precision`, the manifest's `precision`) is what its ONNX graph holds;
it is not a runtime's compute precision (`Backend.compute_precision`). The CLI's choices, the manifest schema,
the ONNX export's float type, INT8's float parts, the TorchScript/AOTInductor exports and verify's default gates
all read this table. Imports nothing (the CLI checks `--precision` before torch or numpy load).

TensorRT 10.12+ and 11 build these graphs as strongly typed networks (TensorRT 11 has no weak typing): the
precision lives in the ONNX file, and TensorRT runs each layer in the type the graph gives it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    """One bundle precision. Gate thresholds: None means not checked; agreement as a fraction of views,
    accuracy drop in points (0–100)."""

    name: str  # fp32 | fp16 | int8
    float_dtype: str | None  # numpy/ONNX dtype name of the graph's float parts; None: chosen at build (INT8)
    onnx: str  # what the ONNX export writes (README's precision table)
    tensorrt: str  # what TensorRT does with that graph
    max_abs: float | None  # verify's default gate: max |Δlogit| against the PyTorch reference
    min_top1_agreement: float | None  # … top-1 agreement (for INT8: only when the clips carry no labels)
    max_accuracy_drop: float | None  # … top-1 accuracy drop in points, when the clips carry labels
    calibrated: bool = False  # needs calibration clips (`--calib`)
    note: str = ""  # `build --precision` help's word on it
    # libtorch exports (TorchScript, AOTInductor) of the folded model in this float type: the largest max
    # |Δlogit| of the traced/compiled module against the eager one (batch 1); None: no such export
    libtorch_tolerance: float | None = None
    # what `verify --layers` ranks in a bundle of this precision (each such layer alone in this precision
    # against the FP32 graph: stexport.build.verify.rank_layers); None: nothing, the graph is the reference's
    layers: str | None = None


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", onnx="float32 throughout",
              tensorrt="a strongly typed FP32 network",
              max_abs=1e-3, min_top1_agreement=1.0, max_accuracy_drop=None, libtorch_tolerance=1e-4),
    Precision("fp16", "float16",
              onnx="strongly typed FP16: FP16 weights, MatMul and Conv; LayerNorm, Softmax and the temporal mean "
                   "in FP32; uint8/float32 in, float32 logits out",
              tensorrt="the graph's own types (strongly typed): FP16 GEMMs, FP32 statistics",
              max_abs=None, min_top1_agreement=0.99, max_accuracy_drop=None, libtorch_tolerance=5e-2,
              note="strongly typed", layers="FP16 GEMMs (MatMul, Gemm, Conv)"),
    Precision("int8", None,
              onnx="explicit INT8 QuantizeLinear/DequantizeLinear on every GEMM's input and weight (symmetric, "
                   "zero point 0, weights per output channel, activations per tensor); the rest in the float "
                   "type `--int8-float` chose (fp32 or fp16)",
              tensorrt="INT8 GEMMs where the Q/DQ pairs are, the float parts in the graph's float type",
              max_abs=None, min_top1_agreement=0.95, max_accuracy_drop=1.0, calibrated=True,
              note="explicit Q/DQ; needs --calib", layers="quantized GEMMs"),
)}
NAMES: tuple[str, ...] = tuple(PRECISIONS)  # `--precision` choices
# precisions a graph's float parts can have (an INT8 graph's `--int8-float`, the libtorch exports)
FLOAT_PRECISIONS: tuple[str, ...] = tuple(n for n, p in PRECISIONS.items() if p.float_dtype)
LIBTORCH_PRECISIONS: tuple[str, ...] = tuple(n for n, p in PRECISIONS.items() if p.libtorch_tolerance)
LAYER_PRECISIONS: tuple[str, ...] = tuple(n for n, p in PRECISIONS.items() if p.layers)  # `verify --layers`


def float_dtype(name: str) -> str:
    """'float32' or 'float16': the dtype name (numpy, ONNX, torch) of float precision `name` (fp32 | fp16).
    Raises KeyError for a precision whose float type is not its own (int8: see Manifest.float_precision)."""
    dtype = PRECISIONS[name].float_dtype
    if dtype is None:
        raise KeyError(f"{name} has no float type of its own")
    return dtype


@dataclass(frozen=True)
class InputFormat:
    """A graph input format (`stexport build --input`): the manifest's input dtype and axis order."""

    name: str  # uint8 | float
    dtype: str  # the graph input's dtype (manifest input.dtype)
    layout: str  # its axes (manifest input.layout)
    normalized_in_graph: bool  # the graph casts, scales by 1/255 and applies CLIP mean/std itself
    help: str


INPUT_FORMATS: dict[str, InputFormat] = {f.name: f for f in (
    InputFormat("uint8", "uint8", "BTHWC", True, "B,T,H,W,3 RGB; normalised in the graph"),
    InputFormat("float", "float32", "BTCHW", False, "B,T,3,H,W, normalised by the host"),
)}


def input_format_of(dtype: str) -> InputFormat:
    """The InputFormat whose graph input has `dtype` ('uint8' or 'float32')."""
    return next(f for f in INPUT_FORMATS.values() if f.dtype == dtype)


def choices_help(names) -> str:
    """'a, b or c'."""
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def precision_help() -> str:
    """`build --precision`'s choices with their notes: 'fp32, fp16 (strongly typed) or int8 (…)'."""
    return choices_help(p.name + (f" ({p.note})" if p.note else "") for p in PRECISIONS.values())


def short(x: float) -> str:
    """A threshold as the help writes it: 1e-3, 0.99, 1."""
    return f"{x:.0e}".replace("e-0", "e-") if x < 0.01 else f"{x:g}"


def gate_text(name: str) -> str:
    """verify's default gate for precision `name` in words, e.g. 'max|Δ| ≤ 1e-3 and 100% top-1 agreement'."""
    p = PRECISIONS[name]
    parts = [f"max|Δ| ≤ {short(p.max_abs)}"] if p.max_abs is not None else []
    if p.max_accuracy_drop is not None:
        parts.append(f"≤ {short(p.max_accuracy_drop)} pt accuracy drop" + (
            f" (≥ {p.min_top1_agreement:.0%} agreement without labels)" if p.min_top1_agreement is not None else ""))
    elif p.min_top1_agreement is not None:
        at_least = "" if p.min_top1_agreement == 1 else "≥ "
        parts.append(f"{at_least}{p.min_top1_agreement:.0%} top-1 agreement")
    return " and ".join(parts)
