"""Bundle + backend + labels → video classification, as the official evaluation scores it.

Each video's views (spatial × temporal) run as one batch, scored by stexport.runtime.scoring.score_videos
(softmax of each view's logits averaged over views, linziyi96/st-adapter main.py `evaluate`), then the top k
are named. Videos are decoded in a child process (stexport.runtime.decode_worker), driven by a background
thread (stexport.runtime.batch.ordered_map) that decodes the next videos while the backend runs the current
one: decoding overlaps inference instead of adding to it, and a decoder that crashes or hangs on one input
costs that input only. Logits that are not finite (NaN, ±Inf) are that input's error, never a ranking.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from stexport.runtime import backends
from stexport.bundle.store import Bundle
from stexport.errors import StexportError
from stexport.bundle.labels import resolve_labels
from stexport.bundle.multitask import default_task, loaded_task, task_label
from stexport.runtime import batch
from stexport.runtime.batch import ordered_map
from stexport.runtime.decode_worker import DEFAULT_STALL_S, MAX_FRAMES, MAX_PIXELS, MEMORY_MB, DecoderPool, limits_of
from stexport.runtime.scoring import Failure, NonFiniteOutput, Result, error_message, softmax  # noqa: F401 - API
from stexport.runtime.video import Sampling, VideoError, display

DECODE_THREADS = 1  # beside inference, single-threaded FFmpeg decoding costs the least CPU


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
        path) for a swappable bundle, or a task name of a multi-task bundle (default there: its first task,
        named in results): its classes, labels and sampling replace the bundle's; `set_task`
        switches later, and `classify(..., task=)` picks one per call."""
        self.decode_limits = limits_of(decode_timeout, max_decode_s, max_pixels=max_pixels, max_frames=max_frames,
                                       memory_mb=decode_memory_mb)
        # decode_threads > 1: one decoder process per decoding thread (decoders())
        self._decoders = DecoderPool(1, DECODE_THREADS, self.decode_limits)
        self.decoder = self._decoders.workers[0]
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        m = self.bundle.manifest
        self.num_classes = m.output.classes
        self.weights = "random" if m.model.backbone.weights.random else None  # marks every Result
        self.user_sampling = sampling  # None: each task's own defaults (the bundle's, a pack's)
        pack = None
        task = default_task(self.bundle, task)
        if task is not None:
            pack = loaded_task(self.bundle, task)
            self.num_classes = pack.classes
        self.sampling = default_sampling(self.bundle, pack, sampling)
        if (self.sampling.frames, self.sampling.size) != (self.bundle.frames, self.bundle.size):
            b, s = self.bundle, self.sampling
            raise StexportError(f"{b.path}: built for {b.frames} frames of {b.size} px, not {s.frames} of "
                                f"{s.size}; rebuild it with --frames")
        if top_k < 1:
            raise StexportError(f"--top-k {top_k}: must be at least 1")
        self.top_k = min(top_k, self.num_classes)
        self.backend_calls = 0  # backend calls made through stexport.runtime.batch (task_probs, mixed_probs)
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
                self.labels, self.labels_source = pack.labels, f"{task_label(pack)} ({pack.record.labels_source})"
        self.backend = backends.create(backend, self.bundle, **backend_options)
        self.task = self.backend.set_task(pack) if pack is not None else None

    def describe(self) -> dict:
        return {**self.backend.describe(), "sampling": self.sampling.to_dict(), "labels": self.labels_source}

    def set_task(self, task) -> None:
        """Switch the task (a TaskPack, a pack path, a multi-task bundle's task name, or None: the bundle's
        own, on a multi-task bundle its first task) for the calls that follow: one backend call, no reload.
        Its labels replace the current ones unless labels were given, and its default sampling the current one
        unless this Classifier was made with a sampling (so the results equal those of a Classifier made with
        the task)."""
        pack = self.backend.set_task(default_task(self.bundle, task))
        self.task = pack
        self.sampling = default_sampling(self.bundle, pack, self.user_sampling)
        if pack is None:
            self.labels, self.labels_source, self.num_classes = self.own_labels
        else:
            self.num_classes = pack.classes
            if self.user_labels:
                self.labels, self.labels_source = resolve_labels(self.user_labels, pack.classes)
            else:
                self.labels, self.labels_source = pack.labels, task_label(pack)
        self.top_k = max(1, min(self.top_k, self.num_classes))

    def labels_for(self, task=None) -> list[str]:
        """The class names results of `task` (a loaded TaskPack; None: the current task) are named with."""
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
        """Softmax of each view's logits, averaged over views (stexport.runtime.scoring.score_videos): float64
        (classes,). clips: uint8 (V, T, H, W, 3). task: a TaskPack for this call (None: the current task).
        NonFiniteOutput if any logit is NaN or ±Inf; StexportError for logits of the wrong shape."""
        (probs,), _ = batch.task_probs(self, [clips], task)
        if isinstance(probs, NonFiniteOutput):
            raise probs
        return probs

    def top(self, probs: np.ndarray, labels: list[str] | None = None) -> list[tuple[int, str, float]]:
        labels = labels or self.labels
        best = np.argsort(-probs, kind="stable")[: min(self.top_k, len(probs))]
        return [(int(i), labels[i], float(probs[i])) for i in best]

    def _result(self, source: str, clips: np.ndarray, frames: int, decode_s: float, notes,
                start: float | None = None, end: float | None = None, sampled: str = "whole file",
                task=None) -> Result:
        t = time.perf_counter()
        probs = self.probabilities(clips, task)
        return Result(display(source), self.top(probs, self.labels_for(task)), len(clips), frames, decode_s,
                      time.perf_counter() - t, list(notes), start, end, self.backend.name, sampled,
                      self.task_name(task), self.weights)

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

        for source, item in ordered_map(work, sources, 1, prefetch + 1):  # `prefetch` waiting, one decoding
            if isinstance(item, Exception):
                yield Failure(display(source), error_message(source, item), self.task_name())
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
        given as a (source, task) pair runs with its own task. A backend call never mixes tasks, except on a
        multi-task bundle (tasks by name), where videos of every task share backend calls. See
        stexport.runtime.batch."""
        return batch.classify_batch(self, sources, task=task)

    def timeline(self, source, window: float, stride: float, prefetch: int = 2) -> Iterator[Result]:
        """Top classes for windows of `window` seconds every `stride` seconds of the video's presentation
        timestamps (VideoError for a bad video, NonFiniteOutput for NaN/Inf logits)."""
        windows = self.decoder.windows(source, self.sampling, window, stride)

        def read(_):
            t = time.perf_counter()
            w = next(windows, None)
            return w, time.perf_counter() - t

        # one thread advances the windows and closes them (a timeline left early stops its decoder too)
        for _, item in ordered_map(read, itertools.repeat(None), 1, prefetch + 1, finish=windows.close):
            if isinstance(item, StexportError):
                raise item
            if isinstance(item, Exception):
                raise VideoError(error_message(source, item)) from item
            w, decode_s = item
            if w is None:
                return
            yield self._checked(source, lambda: self._result(str(source), w.clips, w.frames, decode_s, w.notes,
                                                             w.start, w.end, sampled="window"))

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
