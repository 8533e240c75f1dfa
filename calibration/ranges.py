"""Activation ranges (symmetric |max|) from calibration data: minmax, percentile or entropy (KL).

Streaming: `RangeCollector.instrument` adds reductions to the graph itself (max |x| per tensor, a finiteness
probe, per-channel min and max), so a calibration run returns a few numbers per tensor instead of the tensors,
and the collector keeps only those running statistics (and, for percentile and entropy, one fixed-size histogram
per tensor). Memory does not grow with the number of clips, and no run holds more than one clip's activations
(percentile and entropy) or none of them (minmax).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
from onnx import helper

from stexport.errors import StexportError

METHODS = ("minmax", "percentile", "entropy")  # --calib-method: the one list (the CLI reads it too)
PERCENTILE = 99.999
STATS = ("amax", "probe", "lo", "hi")  # the in-graph statistics' output suffixes


def _rank(proto: onnx.ModelProto, t: str) -> int:
    for v in (*proto.graph.value_info, *proto.graph.output, *proto.graph.input):
        if v.name == t and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    raise StexportError(f"calibration: the graph declares no shape for tensor '{t}'; please report this model")


class RangeCollector:
    """Running per-tensor statistics; `amax()` gives each tensor's clipping threshold.

    Feed it either whole tensors (`add`) or the outputs of a graph `instrument` rewrote (`add_outputs`): the
    results are the same numbers (max and min are exact in float)."""

    def __init__(self, method: str = "minmax", percentile: float = PERCENTILE, channels=()):
        if method not in METHODS:
            raise StexportError(f"--calib-method {method}: choose one of {', '.join(METHODS)}")
        self.method, self.percentile = method, percentile
        self.max: dict[str, float] = {}
        self.channels = set(channels)  # tensors whose per-channel (last axis) [min, max] is kept too
        self.channel_range: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.outputs: dict[str, tuple[str, str]] = {}  # instrumented graph output -> (tensor, statistic)
        self.hist = None
        if method != "minmax":
            from onnxruntime.quantization.calibrate import HistogramCollector

            # ORT's collector: percentile on |x| (2048 bins), entropy = TensorRT-style KL search (128 levels).
            self.hist = HistogramCollector(method=method, symmetric=True,
                                           num_bins=2048 if method == "percentile" else 512,
                                           num_quantized_bins=128, percentile=percentile, scenario="same")

    def instrument(self, proto: onnx.ModelProto, tensors: list[str]) -> list[str]:
        """Add to `proto` (in place) the reductions of each of `tensors` as graph outputs: max |x|, a probe
        that is NaN where x has a non-finite value (Σ x·0), and for `channels` the min and max over every axis
        but the last. Percentile and entropy also need the tensors themselves (histograms): they become outputs
        too. Returns the names of the added outputs (the graph's own outputs come first)."""
        g = proto.graph
        known = {o.name for o in g.output}
        zero = "stexport_stats_zero"
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), zero))
        added = []

        def out(name: str, tensor: str, stat: str) -> None:
            g.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            self.outputs[name] = (tensor, stat)
            added.append(name)

        for i, t in enumerate(tensors):
            p = f"stexport_stats_{i}"
            g.node.extend([helper.make_node("Abs", [t], [f"{p}_abs"]),
                           helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_amax"], keepdims=0),
                           helper.make_node("Mul", [t, zero], [f"{p}_zero"]),
                           helper.make_node("ReduceSum", [f"{p}_zero"], [f"{p}_probe"], keepdims=0)])
            out(f"{p}_amax", t, "amax")
            out(f"{p}_probe", t, "probe")
            if t in self.channels:
                axes = f"{p}_axes"
                g.initializer.append(onnx.numpy_helper.from_array(
                    np.arange(_rank(proto, t) - 1, dtype=np.int64), axes))
                g.node.extend([helper.make_node("ReduceMin", [t, axes], [f"{p}_lo"], keepdims=0),
                               helper.make_node("ReduceMax", [t, axes], [f"{p}_hi"], keepdims=0)])
                out(f"{p}_lo", t, "lo")
                out(f"{p}_hi", t, "hi")
            if self.hist is not None and t in known:
                self.outputs[t] = (t, "tensor")
            elif self.hist is not None:
                out(t, t, "tensor")
        return added

    def add_outputs(self, named: dict[str, np.ndarray]) -> None:
        """One run's outputs of an `instrument`ed graph (by output name; others are ignored)."""
        stats: dict[str, dict] = {}
        for name, value in named.items():
            if name in self.outputs:
                t, stat = self.outputs[name]
                stats.setdefault(t, {})[stat] = value
        for t, s in stats.items():
            if not np.isfinite(s["probe"]):
                self._non_finite(t)
            self._update(t, float(s["amax"]), s.get("lo"), s.get("hi"))
        if self.hist is not None:
            self._histogram({t: s["tensor"] for t, s in stats.items() if "tensor" in s})

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        """Whole tensors of one run, {name: array}."""
        for k, v in tensors.items():
            if not np.all(np.isfinite(v)):
                self._non_finite(k)
            lo = hi = None
            if k in self.channels and v.size:
                flat = v.reshape(-1, v.shape[-1])
                lo, hi = flat.min(axis=0), flat.max(axis=0)
            self._update(k, float(np.abs(v).max()) if v.size else 0.0, lo, hi)
        if self.hist is not None:
            self._histogram(tensors)

    @staticmethod
    def _non_finite(k: str):
        raise StexportError(f"calibration: tensor '{k}' has non-finite values; the model overflows on these clips")

    def _update(self, k: str, m: float, lo, hi) -> None:
        self.max[k] = max(self.max.get(k, 0.0), m if m > 0 else 0.0)  # an empty tensor's max is -inf
        if k in self.channels and lo is not None:
            lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
            if k in self.channel_range:
                lo = np.minimum(lo, self.channel_range[k][0])
                hi = np.maximum(hi, self.channel_range[k][1])
            self.channel_range[k] = (lo, hi)

    def _histogram(self, tensors: dict[str, np.ndarray]) -> None:
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
