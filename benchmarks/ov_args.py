"""Command-line arguments the OpenVINO benchmark scripts share."""

from __future__ import annotations

import argparse
from pathlib import Path


def best_float() -> str:
    """bf16 where this CPU computes in BF16 (AMX/AVX512-BF16), else f32: the benchmarks' default for the
    float parts, so they run on every CPU (OpenVINOBackend refuses a precision the device lacks)."""
    from stexport.runtime.backends.openvino import import_openvino

    caps = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in caps else "f32"


def parser(doc: str) -> argparse.ArgumentParser:
    """BUNDLE, --precision (of the float parts; default best_float()) and --batch; the script adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--precision", default=None, help="OpenVINO inference precision for the float parts "
                    "(default: bf16 where the CPU offers it, else f32)")
    ap.add_argument("--batch", type=int, default=4)
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """ap.parse_args() with --precision resolved."""
    args = ap.parse_args()
    args.precision = args.precision or best_float()
    return args
