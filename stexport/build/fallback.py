"""Automatic float fallback for INT8 builds: return the most sensitive GEMMs to float until a gate holds.

`build --precision int8 --min-agreement A` (top-1 agreement with the FP32 graph, no labels needed) and/or
`--max-drop PT` (top-1 accuracy drop against it, labelled clips) quantize as usual, measure the INT8 graph on
the gate clips (default: the calibration clips) against the FP32 graph on ONNX Runtime, and when the gate fails,
rank the quantized GEMMs (stexport.build.verify.rank_layers, the layer report's ranking: the error each adds
alone in INT8) and leave out of quantization the 1, 2, … most sensitive ones until the gate holds or
`--max-float-layers` is reached (then the build fails, writing nothing). Once it holds, the next ranked GEMMs
whose error alone is over OUTLIER_FACTOR × the median GEMM's go to float too (within the limit): top-1 on the
gate clips can miss them, held-out clips do not. Measured on the demo with ln_2 ×256 in 6 channels, migration
off, gate top-1 agreement ≥ 98% on 48 training clips: the gate alone stopped at the planted GEMMs of blocks 0
and 1, and the bundle dropped 1.7 pt of top-1 accuracy on 60 held-out val clips (verify's labelled gate: 1 pt);
with the outlier rule the planted GEMMs of blocks 2 and 3 (alone 3.6× and 2.8× the median on the gate
clips, every unplanted GEMM ≤ 1.06×) go to float too and it passes there (docs/guides/int8.md has the
figures). The float GEMMs keep their float weights and have no Q/DQ: their precision is in the graph (the
bundle's float type, fp32 or fp16), where a strongly typed TensorRT network reads it.
Method after NNCF's accuracy control (quantize_with_accuracy_control: rank, then revert groups to float until
the metric holds).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from stexport.build.verify import RANKING, Gate, graph_logits, graph_session, judge, logit_metrics, rank_layers
from stexport.errors import StexportError

log = logging.getLogger("stexport")

DEFAULT_FLOAT_SHARE = 0.25  # --max-float-layers default: a quarter of the quantized GEMMs (at least one)
OUTLIER_FACTOR = 2.0  # after the gate holds: also to float what adds alone > this × the median GEMM's error


@dataclass(frozen=True)
class FallbackGate:
    """min_agreement: top-1 agreement with the FP32 graph, a fraction 0–1; max_drop: top-1 accuracy drop in
    points (labelled clips); max_float_layers: most GEMMs returned to float (None: DEFAULT_FLOAT_SHARE);
    min_top5_agreement: the same top-5 set as the FP32 graph, a fraction 0–1."""

    min_agreement: float | None = None
    max_drop: float | None = None
    max_float_layers: int | None = None
    min_top5_agreement: float | None = None

    def limit(self, quantized: int) -> int:
        if self.max_float_layers is not None:
            return min(self.max_float_layers, quantized)
        return min(quantized, max(1, math.ceil(quantized * DEFAULT_FLOAT_SHARE)))

    def flags(self) -> str:
        """The gate as its flags, e.g. '--min-agreement 0.95 --max-drop 1'."""
        return " ".join(f"{f} {v:g}" for f, v in (("--min-agreement", self.min_agreement),
                                                    ("--max-drop", self.max_drop),
                                                    ("--min-top5-agreement", self.min_top5_agreement))
                        if v is not None)

    def checks(self, metrics: dict) -> list[dict]:
        """verify's checks (`judge`) for each part of the gate that is set."""
        out = []
        if self.min_agreement is not None:
            out += judge("int8", metrics, Gate(min_top1_agreement=self.min_agreement))
        if self.max_drop is not None:
            out += judge("int8", metrics, Gate(max_accuracy_drop=self.max_drop))
        if self.min_top5_agreement is not None:
            out += judge("int8", metrics, Gate(min_top5_agreement=self.min_top5_agreement))
        return out

    def to_dict(self) -> dict:
        return {"min_top1_agreement": self.min_agreement, "max_accuracy_drop_pt": self.max_drop,
                "max_float_layers": self.max_float_layers, "min_top5_agreement": self.min_top5_agreement}


def gate_inputs(clips, sampling, input_spec) -> tuple[list[np.ndarray], list]:
    """Per gate clip (a calibration.ClipSet), the graph input (views first) and its label (None: unlabelled;
    labels come from the clip list the videos were chosen from)."""
    from stexport.calibration.clips import batches

    labels_of: dict = {}
    if clips.videos and Path(clips.source).is_file():
        from stexport.runtime.video import read_clip_list

        labels_of = {p.resolve(): label for p, label in read_clip_list(clips.source)}
    feeds = [input_spec.feed(views) for views in batches(clips, sampling)]
    failed = {f for f, _ in clips.failed}
    videos = [v for v in clips.videos if str(v) not in failed]
    labels = [labels_of.get(v.resolve()) for v in videos] if videos else [None] * len(feeds)
    return feeds, labels


def _summary(m: dict) -> dict:
    out = {"top1_agreement": m["top1_agreement"], "top5_agreement": m["top5_agreement"],
           "mean_abs_logit_diff": m["mean_abs"]}
    if m["accuracy"] is not None:
        out["top1_accuracy_drop_pt"] = m["accuracy"]["reference_top1"] - m["accuracy"]["backend_top1"]
    return out


def _ms_per_clip(session, feeds: list) -> float:
    """Milliseconds per clip (all its views in one call, as `infer`), the best of two passes."""
    best = math.inf
    for _ in range(2):
        t = time.perf_counter()
        graph_logits(session, feeds)
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / len(feeds)


def make_fallback(gate: FallbackGate, reference_graph: Path, clips, sampling, input_spec,
                  progress: bool = False):
    """The `fallback` hook of calibration.quantize_bundle_model: (graph ready for Q/DQ, ranges, quantized layer
    names, float type) → (names to keep in float, the manifest's `float_fallback` record). reference_graph: the
    FP32 ONNX file (read when the hook runs, before it is rewritten). Raises StexportError, one line, when the
    gate does not hold with the allowed float layers, or --max-drop has no labels to measure."""

    def fallback(proto: onnx.ModelProto, amax: dict, names: list[str], float_precision: str):
        from stexport.calibration.qdq import insert_qdq

        feeds, labels = gate_inputs(clips, sampling, input_spec)
        if gate.max_drop is not None and not all(lb is not None for lb in labels):
            raise StexportError(f"--max-drop {gate.max_drop:g}: {clips.source} has clips without labels; pass a "
                                "'<video> <label>' list, or use --min-agreement")
        fp32 = graph_session(onnx.load(str(reference_graph)))
        ref = graph_logits(fp32, feeds)

        def measured(floats):
            q = onnx.ModelProto()
            q.CopyFrom(proto)
            q = insert_qdq(q, amax, [n for n in names if n not in set(floats)], float_precision=float_precision)
            session = graph_session(q, float_precision)
            return q, session, logit_metrics(ref, graph_logits(session, feeds), labels, "int8")[0]

        q0, s0, m0 = measured(())
        limit = gate.limit(len(names))
        chosen, m, s, ranked, gate_layers = [], m0, s0, [], 0
        if not all(c["passed"] for c in gate.checks(m0)):
            ranked = rank_layers(q0, feeds, ref, labels, float_precision, progress=progress)["layers"]
            for k in range(1, limit + 1):
                _, s, m = measured([r["layer"] for r in ranked[:k]])
                log.info("float fallback: %d layer(s) in %s: top-1 agreement %.1f%%, mean |dlogit| %.4g", k,
                         float_precision, 100 * m["top1_agreement"], m["mean_abs"])
                if all(c["passed"] for c in gate.checks(m)):
                    chosen = ranked[:k]
                    break
            else:
                failed = next(c for c in gate.checks(m) if not c["passed"])
                before = next(c for c in gate.checks(m0) if c["check"] == failed["check"])

                def shown(c):
                    return f"{c['value']:.1%}" if "agreement" in c["check"] else f"{c['value']:.2f}"

                raise StexportError(
                    f"{gate.flags()}: not met with {limit} of {len(names)} GEMMs in {float_precision} "
                    f"(--max-float-layers {limit} reached): {failed['check']} {shown(before)} in plain INT8, "
                    f"{shown(failed)} with them, limit {failed['limit']}"
                    + ("; the float layers gained nothing: the gate may not be reachable on these gate clips (too "
                       "few, or INT8's error is spread over every layer)" if failed["value"] == before["value"]
                       else "")
                    + f"; allow more float layers, relax the gate, or build --precision {float_precision}")
            median = float(np.median([r["mean_abs_alone"] for r in ranked]))
            # ranked by mean_abs_alone, so these are the next ones in the ranking
            outliers = [r for r in ranked[len(chosen):limit] if r["mean_abs_alone"] > OUTLIER_FACTOR * median]
            gate_layers = len(chosen)
            if outliers:
                chosen += outliers
                _, s, m = measured([r["layer"] for r in chosen])
                log.info("float fallback: %d more layer(s) over %g x the median error alone: top-1 agreement "
                         "%.1f%%", len(outliers), OUTLIER_FACTOR, 100 * m["top1_agreement"])
        if len(chosen) > len(names) // 2:
            log.warning("float fallback: %d of %d GEMMs are in %s: this bundle is mostly float; --precision %s "
                        "may serve as well", len(chosen), len(names), float_precision, float_precision)
        record = {
            "gate": gate.to_dict(), "float_layers_limit": limit, "float_type": float_precision,
            "clips": len(feeds), "views": int(sum(len(f) for f in feeds)), "labelled": labels[0] is not None,
            "reference": "the FP32 graph on ONNX Runtime (CPU)", "ranking": RANKING,
            "float_layers": [{"layer": r["layer"], "mean_abs_logit_diff_removed": r["mean_abs_removed"],
                              "top1_agreement_alone_in_float": r["top1_agreement"],
                              "mean_abs_logit_diff_alone_in_int8": r["mean_abs_alone"],
                              "why": "gate" if i < gate_layers else "outlier"} for i, r in enumerate(chosen)],
            "before": _summary(m0), "after": _summary(m),
            "ms_per_clip": {"runtime": "onnxruntime CPU", "int8": _ms_per_clip(s0, feeds),
                            "fallback": _ms_per_clip(s, feeds), "fp32": _ms_per_clip(fp32, feeds)},
        }
        return [r["layer"] for r in chosen], record

    return fallback
