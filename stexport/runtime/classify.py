"""Bundle + backend + labels → video classification, as the official evaluation scores it.

Each video's views (spatial × temporal) run as one batch; each view's logits go through a softmax and the
probabilities are averaged over views (linziyi96/st-adapter main.py `evaluate`), then the top k are named.
Videos are decoded in a child process (stexport.runtime.decode_worker), driven by a background thread that decodes the
next videos while the backend runs the current one: decoding overlaps inference instead of adding to it, and
a decoder that crashes or hangs on one input costs that input only. Logits that are not finite (NaN, ±Inf) are
that input's error, never a ranking.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stexport.runtime import backends
from stexport.bundle.store import Bundle
from stexport.errors import StexportError
from stexport.bundle.labels import resolve_labels
from stexport.runtime.decode_worker import DEFAULT_STALL_S, MAX_FRAMES, MAX_PIXELS, MEMORY_MB, DecoderPool, limits_of
from stexport.runtime.video import Sampling, VideoError, display

DECODE_THREADS = 1  # beside inference, single-threaded FFmpeg decoding costs the least CPU


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
    sampled: str = "whole file"  # or "live stream: the first N frames …" (see video.Decoded.sampled)
    task: str | None = None  # the task pack's name, when a pack ran it (its labels name `top`)

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
    """The model returned NaN or ±Inf logits for an input; the message names the likely cause."""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """Classify videos with a bundle. `backend`: a registry name or 'auto'; `labels`: a names file or None;
    `batch_size` (views per backend call) and `decode_threads` (videos decoded at once) are classify_batch's;
    other keywords are backend options. Build one from a picklable stexport.ClassifierSpec in workers."""

    def __init__(self, bundle: Bundle | str | Path, backend: str = "auto", labels: str | None = None,
                 sampling: Sampling | None = None, top_k: int = 5, batch_size: int = 32,
                 decode_threads: int = 1, decode_timeout: float = DEFAULT_STALL_S, max_decode_s: float | None = None,
                 task=None, max_pixels: int | None = MAX_PIXELS, max_frames: int | None = MAX_FRAMES,
                 decode_memory_mb: int | None = MEMORY_MB, **backend_options):
        """decode_timeout: seconds a video's decoder may go without reading a frame before that video is
        given up (its decoder process is killed and restarted for the next); max_decode_s: seconds one video
        may take to decode in all (None: no limit); max_pixels, max_frames: what a video's header may claim
        (per frame; frames) before it is decoded; decode_memory_mb: each decoder process's address space
        (None: no limit); see stexport.runtime.decode_worker.DecodeLimits. task: a task pack (TaskPack or
        path) for a swappable bundle: its classes, labels and sampling replace the bundle's; `set_task`
        switches later, and `classify(..., task=)` picks one per call."""
        self.decode_limits = limits_of(decode_timeout, max_decode_s, max_pixels=max_pixels, max_frames=max_frames,
                                       memory_mb=decode_memory_mb)
        # decode_threads > 1: one decoder process per decoding thread (decoders())
        self._decoders = DecoderPool(1, DECODE_THREADS, self.decode_limits)
        self.decoder = self._decoders.workers[0]
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        m = self.bundle.manifest
        self.num_classes = m.output.classes
        self.user_sampling = sampling  # None: each task's own defaults (the bundle's, a pack's)
        pack = None
        if task is not None:
            from stexport.bundle.taskpack import as_pack

            pack = as_pack(task)
            pack.check_fits(self.bundle)
            self.num_classes = pack.classes
        self.sampling = default_sampling(self.bundle, pack, sampling)
        if (self.sampling.frames, self.sampling.size) != (self.bundle.frames, self.bundle.size):
            b, s = self.bundle, self.sampling
            raise StexportError(f"{b.path}: built for {b.frames} frames of {b.size} px, not {s.frames} of "
                                f"{s.size}; rebuild it with --frames")
        if top_k < 1:
            raise StexportError(f"--top-k {top_k}: must be at least 1")
        self.top_k = min(top_k, self.num_classes)
        if batch_size < 1 or decode_threads < 1:
            raise StexportError(f"batch_size {batch_size}, decode_threads {decode_threads}: must be at least 1")
        self.batch_size, self.decode_threads = int(batch_size), int(decode_threads)
        # a labels file the manifest records must be there (bundle.file says so); generic names only for a
        # bundle built without one
        own = str(self.bundle.file("labels")) if "labels" in m.artifacts else None
        self.user_labels = labels
        self.labels, self.labels_source = resolve_labels(labels or own, m.output.classes)
        if not labels and own:  # the bundle's labels.txt: say where build took the names from
            self.labels_source = m.output.labels_source
        self.own_labels = (self.labels, self.labels_source, m.output.classes)
        if pack is not None:
            if labels:
                self.labels, self.labels_source = resolve_labels(labels, pack.classes)
            else:
                self.labels, self.labels_source = pack.labels, f"task pack {pack.name} ({pack.record.labels_source})"
        self.backend = backends.create(backend, self.bundle, **backend_options)
        self.task = self.backend.set_task(pack) if pack is not None else None

    def describe(self) -> dict:
        return {**self.backend.describe(), "sampling": self.sampling.to_dict(), "labels": self.labels_source}

    def set_task(self, task) -> None:
        """Switch the task (a TaskPack, a pack path, or None: the bundle's own) for the calls that follow: one
        backend call, no reload. Its labels replace the current ones unless labels were given, and its default
        sampling the current one unless this Classifier was made with a sampling (so the results equal those
        of a Classifier made with the task)."""
        pack = self.backend.set_task(task)
        self.task = pack
        self.sampling = default_sampling(self.bundle, pack, self.user_sampling)
        if pack is None:
            self.labels, self.labels_source, self.num_classes = self.own_labels
        else:
            self.num_classes = pack.classes
            if self.user_labels:
                self.labels, self.labels_source = resolve_labels(self.user_labels, pack.classes)
            else:
                self.labels, self.labels_source = pack.labels, f"task pack {pack.name}"
        self.top_k = max(1, min(self.top_k, self.num_classes))

    def _labels_for(self, task) -> list[str]:
        return self.labels if task is None else task.labels

    def load_task(self, task):
        """`task` (a TaskPack or a pack's path) checked against the bundle and prepared on the backend once
        (cached by the file's sha256); returns the TaskPack, for classify(..., task=) and classify_batch.
        StexportError (one line) for a pack that does not fit or a backend that cannot swap tasks."""
        return self.backend.load_task(task)

    def sampling_for(self, task=None):
        """The sampling a video for `task` (a loaded TaskPack; None: the current task) is decoded with: the
        one this Classifier was made with if given, else the task's own default."""
        if task is None or self.user_sampling is not None:
            return self.sampling
        return default_sampling(self.bundle, task)

    def task_name(self, task=None) -> str | None:
        """The name results carry: `task`'s, else the current pack's; None on the bundle's own task."""
        pack = task if task is not None else self.task
        return pack.name if pack is not None else None

    def probabilities(self, clips: np.ndarray, task=None) -> np.ndarray:
        """Softmax of each view's logits, averaged over views: (classes,). task: a TaskPack for this call
        (None: the current task). NonFiniteOutput if any logit is NaN or ±Inf."""
        logits = self.backend.run(clips, task=task) if task is not None else self.backend.run(clips)
        want = task.classes if task is not None else self.num_classes
        if logits.shape != (len(clips), want):
            raise StexportError(f"backend {self.backend.name} returned logits of shape {logits.shape}, "
                                f"expected ({len(clips)}, {want})")
        bad = ~np.isfinite(logits)
        if bad.any():
            raise NonFiniteOutput(self._non_finite(bad))
        return softmax(logits).mean(axis=0)

    def _non_finite(self, bad: np.ndarray) -> str:
        views = int(bad.any(axis=1).sum())
        precision = self.bundle.precision
        if precision == "fp16":
            cause = ("likely an FP16 overflow: an activation beyond FP16's ±65,504 (backbones trained in BF16 "
                     "have such channels); rebuild with --precision fp32 (or int8)")
        else:
            cause = (f"the {precision} model computes NaN/Inf on this input: check the bundle with `stexport "
                     "verify` and rebuild it from finite weights")
        return (f"the model returned non-finite logits (NaN/Inf) for {views} of {len(bad)} views on backend "
                f"{self.backend.name}: {cause}")

    def top(self, probs: np.ndarray, labels: list[str] | None = None) -> list[tuple[int, str, float]]:
        labels = labels or self.labels
        best = np.argsort(-probs, kind="stable")[: min(self.top_k, len(probs))]
        return [(int(i), labels[i], float(probs[i])) for i in best]

    def _result(self, source: str, clips: np.ndarray, frames: int, decode_s: float, notes,
                start: float | None = None, end: float | None = None, sampled: str = "whole file",
                task=None) -> Result:
        t = time.perf_counter()
        probs = self.probabilities(clips, task)
        return Result(display(source), self.top(probs, self._labels_for(task)), len(clips), frames, decode_s,
                      time.perf_counter() - t, list(notes), start, end, self.backend.name, sampled,
                      self.task_name(task))

    def _checked(self, source: str, fn):
        """fn(), with the input's name put before a NonFiniteOutput's message."""
        try:
            return fn()
        except NonFiniteOutput as e:
            raise NonFiniteOutput(f"{display(source)}: {e}") from None

    def classify(self, source, task=None) -> Result:
        """One video, decoded (in the decode worker) and run; raises VideoError for a bad video and
        NonFiniteOutput for NaN/Inf logits. task: a task pack (TaskPack or path) for this call only, named
        with its own labels and sampled with its own defaults (unless this Classifier was made with a
        sampling): the result equals that of Classifier(bundle, task=pack). Calls for different tasks may
        interleave (servers taking a task per request)."""
        if task is not None:
            task = self.backend.load_task(task)
        t = time.perf_counter()
        d = self.decoder.decode(source, self.sampling_for(task))
        return self._checked(d.source, lambda: self._result(d.source, d.clips, d.frames, time.perf_counter() - t,
                                                            d.notes, sampled=d.sampled, task=task))

    def classify_many(self, sources: Iterable, prefetch: int = 2) -> Iterator[Result | Failure]:
        """Results in input order; a video that cannot be decoded, or whose logits are not finite, gives a
        Failure and the rest go on."""

        def work(source):
            t = time.perf_counter()
            d = self.decoder.decode(source, self.sampling)
            return d, time.perf_counter() - t

        for source, item in _prefetched(((s, lambda s=s: work(s)) for s in sources), prefetch):
            if isinstance(item, Exception):
                yield Failure(display(source), _message(source, item), self.task_name())
                continue
            d, decode_s = item
            try:
                out = self._checked(d.source, lambda: self._result(d.source, d.clips, d.frames, decode_s,
                                                                   d.notes, sampled=d.sampled))
            except NonFiniteOutput as e:
                out = Failure(display(source), str(e), self.task_name())
            yield out

    def classify_batch(self, sources: Iterable, task=None) -> Iterator[Result | Failure]:
        """Many videos: a Result or Failure per source in input order, never raising for one bad input; views
        of several videos per backend call (up to batch_size), decode_threads decoding ahead. Same numbers as
        classify(). task: a task pack (TaskPack or path) for every source (None: the current task); a source
        given as a (source, task) pair runs with its own task. A backend call never mixes tasks. See
        stexport.runtime.batch."""
        from stexport.runtime.batch import classify_batch

        return classify_batch(self, sources, task=task)

    def timeline(self, source, window: float, stride: float, prefetch: int = 2) -> Iterator[Result]:
        """Top classes for windows of `window` seconds every `stride` seconds of the video's presentation
        timestamps (VideoError for a bad video, NonFiniteOutput for NaN/Inf logits)."""
        windows = self.decoder.windows(source, self.sampling, window, stride)

        def items():
            try:
                while True:
                    t = time.perf_counter()
                    w = next(windows, None)
                    if w is None:
                        return
                    yield w, time.perf_counter() - t
            finally:
                windows.close()  # a timeline left early stops its decoder too

        tasks = ((source, lambda it=it: it) for it in items())
        for _, item in _prefetched(tasks, prefetch):
            if isinstance(item, StexportError):
                raise item
            if isinstance(item, Exception):
                raise VideoError(_message(source, item)) from item
            w, decode_s = item
            yield self._checked(source, lambda: self._result(str(source), w.clips, w.frames, decode_s, w.notes,
                                                             w.start, w.end))

    def decoders(self) -> DecoderPool:
        """The pool of decode_threads decoder processes (each started on first use); its first worker is the
        one classify() and timeline() use."""
        return self._decoders.grow(self.decode_threads)

    def close(self) -> None:
        self._decoders.close()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def default_sampling(bundle: Bundle, pack=None, sampling: Sampling | None = None) -> Sampling:
    """`sampling` if given, else `pack`'s default sampling (a TaskPack: its rate and views at the bundle's
    frames and size), else the bundle's."""
    if sampling is not None:
        return sampling
    m = bundle.manifest
    if pack is not None:
        return Sampling(frames=m.input.frames, size=m.input.size, **pack.record.sampling.model_dump())
    return Sampling.from_manifest(m)


def _message(source, e: Exception) -> str:
    if isinstance(e, StexportError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{display(source)}: cannot decode ({type(e).__name__}: {first})"


_DONE = object()


def _prefetched(tasks: Iterator, depth: int) -> Iterator[tuple[object, object]]:
    """Run `tasks` ((key, fn) pairs) in a background thread, `depth` ahead; yield (key, fn() or its error)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def producer():
        try:
            for key, fn in tasks:
                try:
                    out = fn()
                except Exception as e:  # noqa: BLE001 - handed to the consumer, which reports it per video
                    out = e
                if not put((key, out)):
                    return
        except Exception as e:  # noqa: BLE001 - a failing task generator ends the stream with its error
            put((None, e))
        finally:
            close = getattr(tasks, "close", None)
            if close is not None:
                close()  # in this thread, which ran it: releases what the tasks hold (a decoder)
        put(_DONE)

    thread = threading.Thread(target=producer, name="stexport-decode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
