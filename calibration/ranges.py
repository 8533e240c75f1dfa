"""Activation ranges (symmetric |max|) from calibration data: minmax, percentile or entropy (KL)."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from stexport.errors import StexportError

METHODS = ("minmax", "percentile", "entropy")  # --calib-method: the one list (the CLI reads it too)
PERCENTILE = 99.999


class RangeCollector:
    """Feed it {tensor: array} batches; `amax()` gives each tensor's clipping threshold."""

    def __init__(self, method: str = "minmax", percentile: float = PERCENTILE, channels=()):
        if method not in METHODS:
            raise StexportError(f"--calib-method {method}: choose one of {', '.join(METHODS)}")
        self.method, self.percentile = method, percentile
        self.max: dict[str, float] = {}
        self.channels = set(channels)  # tensors whose per-channel (last axis) [min, max] is kept too
        self.channel_range: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.hist = None
        if method != "minmax":
            from onnxruntime.quantization.calibrate import HistogramCollector

            # ORT's collector: percentile on |x| (2048 bins), entropy = TensorRT-style KL search (128 levels).
            self.hist = HistogramCollector(method=method, symmetric=True,
                                           num_bins=2048 if method == "percentile" else 512,
                                           num_quantized_bins=128, percentile=percentile, scenario="same")

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        for k, v in tensors.items():
            if not np.all(np.isfinite(v)):
                raise StexportError(f"calibration: tensor '{k}' has non-finite values; the model "
                                    "overflows on these clips")
            m = float(np.abs(v).max()) if v.size else 0.0
            self.max[k] = max(self.max.get(k, 0.0), m)
            if k in self.channels and v.size:
                flat = v.reshape(-1, v.shape[-1])
                lo, hi = flat.min(axis=0).astype(np.float64), flat.max(axis=0).astype(np.float64)
                if k in self.channel_range:
                    lo = np.minimum(lo, self.channel_range[k][0])
                    hi = np.maximum(hi, self.channel_range[k][1])
                self.channel_range[k] = (lo, hi)
        if self.hist is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                self.hist.collect({k: [np.ascontiguousarray(v, np.float32)] for k, v in tensors.items()})

    def amax(self) -> dict[str, float]:
        if self.hist is None:
            return dict(self.max)
        with contextlib.redirect_stdout(io.StringIO()):
            found = self.hist.compute_collection_result()
        out = {}
        for k, t in found.items():
            lo, hi = float(np.asarray(t[0])), float(np.asarray(t[1]))
            out[k] = min(max(abs(lo), abs(hi)), self.max[k]) or self.max[k]
        return out
