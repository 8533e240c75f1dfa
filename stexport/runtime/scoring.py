"""A video's logits → its probabilities, as the official evaluation scores them; and what a video becomes.

The one scoring function of stexport (`Classifier.classify`, `classify_batch`, `infer --batch`, `serve` and
`verify` all call `score_videos`): each view's logits go through a softmax and the probabilities are averaged
over the video's views — linziyi96/st-adapter main.py `evaluate()`:
`scores = logits.softmax(dim=-1); scores = scores.view(B, V, -1).mean(dim=1)`. Logits that are not finite
(NaN, ±Inf) make no probabilities: that video's answer is `non_finite_message`, never a ranking.

`Result` and `Failure` are what one video becomes (a ranking, or one line saying why not). Pure numpy: no
backend, no decoder, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stexport.errors import StexportError
from stexport.runtime.video import display


@dataclass
class Result:
    source: str
    top: list[tuple[int, str, float]]  # (class index, label, probability), best first
    views: int
    frames: int  # frames that decoded
    decode_s: float
    infer_s: float
    notes: list[str] = field(default_factory=list)
    start: float | None = None  # timeline windows only (seconds)
    end: float | None = None
    backend: str = ""
    sampled: str = "whole file"  # "window" (timeline mode), or "live stream: the first N frames …" (video.Decoded.sampled)
    task: str | None = None  # the task pack's name, when a pack ran it (its labels name `top`)
    weights: str | None = None  # "random": the bundle's backbone had random weights, its scores mean nothing

    def to_dict(self) -> dict:
        d = {"path": self.source}
        if self.task is not None:
            d["task"] = self.task
        if self.start is not None:
            d.update(start=round(self.start, 3), end=round(self.end, 3))
        d["top"] = [{"label": name, "score": round(p, 6), "index": i} for i, name, p in self.top]
        d.update(views=self.views, frames=self.frames, sampled=self.sampled, backend=self.backend,
                 timing={"decode_s": round(self.decode_s, 4), "infer_s": round(self.infer_s, 4)})
        if self.notes:
            d["notes"] = self.notes
        if self.weights:
            d["weights"] = self.weights
        return d


@dataclass
class Failure:
    source: str
    error: str
    task: str | None = None  # the task pack it was to run with, if any

    def to_dict(self) -> dict:
        d = {"path": self.source}
        if self.task is not None:
            d["task"] = self.task
        d["error"] = self.error
        return d


class NonFiniteOutput(StexportError):
    """The model returned NaN or ±Inf logits for an input; the message (`non_finite_message`) names the
    likely cause and the fix."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 (max-subtracted: no overflow for large logits). logits: any
    float array (..., classes); returns float64 of the same shape."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def check_logits(logits: np.ndarray, views: int, classes: int, backend: str) -> None:
    """StexportError unless `logits` is (views, classes): a backend that returns another shape is broken (the
    bundle or the runtime, not the input)."""
    if logits.shape != (views, classes):
        raise StexportError(f"backend {backend} returned logits of shape {logits.shape}, "
                            f"expected ({views}, {classes})")


def score_videos(logits: np.ndarray, views: Sequence[int], backend: str,
                 precision: str) -> list[np.ndarray | NonFiniteOutput]:
    """Per video, the mean over its views of the softmax of each view's logits.

    logits: float (sum(views), classes), video i's rows being the views[i] rows after those of the videos
    before it (one backend call may hold several videos' views). Returns per video float64 (classes,), or,
    where any of its logits is NaN or ±Inf, a NonFiniteOutput (not raised) whose message names the likely
    cause for a bundle of `precision` on `backend` and the fix (`non_finite_message`)."""
    out: list = []
    at = 0
    for v in views:
        rows = logits[at:at + v]
        at += v
        if np.isfinite(rows).all():
            out.append(softmax(rows).mean(axis=0))
        else:
            out.append(NonFiniteOutput(non_finite_message(rows, backend, precision)))
    return out


def non_finite_message(logits: np.ndarray, backend: str, precision: str) -> str:
    """The one message for a video whose logits (its (views, classes) rows) hold NaN or ±Inf: how many views,
    on which backend, the likely cause for the bundle's `precision` ("fp32", "fp16", "int8") and the fix.
    Callers put the video's name before it."""
    views = int((~np.isfinite(logits)).any(axis=1).sum())
    if precision == "fp16":
        cause = ("likely an FP16 overflow: an activation beyond FP16's ±65,504 (backbones trained in BF16 "
                 "have such channels); rebuild with --precision fp32 (or int8)")
    else:
        cause = (f"the {precision} model computes NaN/Inf on this input: check the bundle with `stexport "
                 "verify` and rebuild it from finite weights")
    return (f"the model returned non-finite logits (NaN/Inf) for {views} of {len(logits)} views on backend "
            f"{backend}: {cause}")


def error_message(source, e: Exception) -> str:
    """The one line a Failure says for `e`, raised while reading `source`: a StexportError's own message (it
    names the input), else "<source>: cannot decode (<type>: <first line of e>)"."""
    if isinstance(e, StexportError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{display(source)}: cannot decode ({type(e).__name__}: {first})"
