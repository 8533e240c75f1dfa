"""Bundle + backend + labels → video classification, as the official evaluation scores it.

Each video's views (spatial × temporal) run as one batch; each view's logits go through a softmax and the
probabilities are averaged over views (linziyi96/st-adapter main.py `evaluate`), then the top k are named.
A background thread decodes the next videos while the backend runs the current one, so decoding overlaps
inference instead of adding to it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stexport import backends
from stexport.bundle import Bundle
from stexport.errors import StexportError
from stexport.labels import resolve_labels
from stexport.video import Sampling, VideoError, decode, decode_windows

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

    def to_dict(self) -> dict:
        d = {"path": self.source}
        if self.start is not None:
            d.update(start=round(self.start, 3), end=round(self.end, 3))
        d["top"] = [{"label": name, "score": round(p, 6), "index": i} for i, name, p in self.top]
        d.update(views=self.views, frames=self.frames, backend=self.backend,
                 timing={"decode_s": round(self.decode_s, 4), "infer_s": round(self.infer_s, 4)})
        if self.notes:
            d["notes"] = self.notes
        return d


@dataclass
class Failure:
    source: str
    error: str

    def to_dict(self) -> dict:
        return {"path": self.source, "error": self.error}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """Classify videos with a bundle. `backend`: a registry name or 'auto'; `labels`: a names file or None."""

    def __init__(self, bundle: Bundle | str | Path, backend: str = "auto", labels: str | None = None,
                 sampling: Sampling | None = None, top_k: int = 5, task=None, **backend_options):
        """task: a task pack (TaskPack or path) for a swappable bundle: its classes, labels and sampling
        replace the bundle's; `set_task` switches later, and `classify(..., task=)` picks one per call."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        m = self.bundle.manifest
        self.num_classes = m.output.classes
        pack = None
        if task is not None:
            from stexport.taskpack import as_pack

            pack = as_pack(task)
            pack.check_fits(self.bundle)
            self.num_classes = pack.classes
            if sampling is None:
                from stexport.video import Sampling as S

                sampling = S(frames=m.input.frames, size=m.input.size, **pack.record.sampling.model_dump())
        self.sampling = sampling or Sampling.from_manifest(m)
        if (self.sampling.frames, self.sampling.size) != (self.bundle.frames, self.bundle.size):
            b, s = self.bundle, self.sampling
            raise StexportError(f"{b.path}: built for {b.frames} frames of {b.size} px, not {s.frames} of "
                                f"{s.size}; rebuild it with --frames")
        if top_k < 1:
            raise StexportError(f"--top-k {top_k}: must be at least 1")
        self.top_k = min(top_k, self.num_classes)
        own = str(self.bundle.file("labels")) if self.bundle.has("labels") else None
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
        backend call, no reload. Its labels replace the current ones unless labels were given; the sampling
        stays what this Classifier was made with."""
        pack = self.backend.set_task(task)
        self.task = pack
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
        if task is None:
            return self.labels
        return task.labels

    def probabilities(self, clips: np.ndarray, task=None) -> np.ndarray:
        """Softmax of each view's logits, averaged over views: (classes,). task: a TaskPack for this call
        (None: the current task)."""
        logits = self.backend.run(clips, task=task) if task is not None else self.backend.run(clips)
        want = task.classes if task is not None else self.num_classes
        if logits.shape != (len(clips), want):
            raise StexportError(f"backend {self.backend.name} returned logits of shape {logits.shape}, "
                                f"expected ({len(clips)}, {want})")
        return softmax(logits).mean(axis=0)

    def top(self, probs: np.ndarray, labels: list[str] | None = None) -> list[tuple[int, str, float]]:
        labels = labels or self.labels
        best = np.argsort(-probs, kind="stable")[: self.top_k]
        return [(int(i), labels[i], float(probs[i])) for i in best]

    def _result(self, source: str, clips: np.ndarray, frames: int, decode_s: float, notes,
                start: float | None = None, end: float | None = None, task=None) -> Result:
        t = time.perf_counter()
        probs = self.probabilities(clips, task)
        return Result(source, self.top(probs, self._labels_for(task)), len(clips), frames, decode_s,
                      time.perf_counter() - t, list(notes), start, end, self.backend.name)

    def classify(self, source, task=None) -> Result:
        """One video, decoded and run in this thread; raises VideoError for a bad video. task: a task pack
        (TaskPack or path) for this call only, named with its own labels (for servers taking a task per
        request; calls for different tasks may interleave)."""
        if task is not None:
            task = self.backend.load_task(task)
        t = time.perf_counter()
        d = decode(source, self.sampling)
        return self._result(d.source, d.clips, d.frames, time.perf_counter() - t, d.notes, task=task)

    def classify_many(self, sources: Iterable, prefetch: int = 2) -> Iterator[Result | Failure]:
        """Results in input order; a video that cannot be decoded gives a Failure and the rest go on."""

        def work(source):
            t = time.perf_counter()
            d = decode(source, self.sampling, DECODE_THREADS)
            return d, time.perf_counter() - t

        for source, item in _prefetched(((s, lambda s=s: work(s)) for s in sources), prefetch):
            if isinstance(item, Exception):
                yield Failure(str(source), _message(source, item))
            else:
                d, decode_s = item
                yield self._result(d.source, d.clips, d.frames, decode_s, d.notes)

    def timeline(self, source, window: float, stride: float, prefetch: int = 2) -> Iterator[Result]:
        """Top classes for windows of `window` seconds every `stride` seconds (VideoError for a bad video)."""
        windows = decode_windows(source, self.sampling, window, stride, DECODE_THREADS)

        def items():
            while True:
                t = time.perf_counter()
                w = next(windows, None)
                if w is None:
                    return
                yield w, time.perf_counter() - t

        tasks = ((source, lambda it=it: it) for it in items())
        for _, item in _prefetched(tasks, prefetch):
            if isinstance(item, StexportError):
                raise item
            if isinstance(item, Exception):
                raise VideoError(_message(source, item)) from item
            w, decode_s = item
            yield self._result(str(source), w.clips, w.frames, decode_s, [], w.start, w.end)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _message(source, e: Exception) -> str:
    if isinstance(e, StexportError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{source}: cannot decode ({type(e).__name__}: {first})"


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
        put(_DONE)

    thread = threading.Thread(target=producer, name="stexport-decode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
