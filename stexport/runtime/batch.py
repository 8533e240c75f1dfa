"""Many videos through one classifier: views of several videos in each backend call, decoding ahead in
decoder processes (stexport.runtime.decode_worker.DecoderPool), one per decoding thread.

The numbers are the official evaluation's, exactly as `Classifier.classify` gives them: each view's logits go
through a softmax and the probabilities are averaged over that video's views. Only the packing differs: the
views of consecutive videos are concatenated into one backend call of up to `batch_size` views (a video's views
are never split; a video with more views than `batch_size` runs in a call of its own), so small models and
short videos keep the backend busy.

    spec = ClassifierSpec("bundles/k400-int8", backend="openvino", batch_size=32, decode_threads=2)
    with spec.open() as clf:                       # a stexport.Classifier
        for item in clf.classify_batch(paths):     # Result or Failure per source, in input order
            print(item.to_dict())

`ClassifierSpec` is a frozen, picklable description of "bundle + backend + options" for workers (Ray actors,
processes): ship the spec, call `.open()` once in the worker. A `Classifier` itself does not pickle (an OpenVINO
Core, an ONNX Runtime session inside).

Task packs (stexport.bundle.taskpack) on a swappable bundle: `ClassifierSpec(..., task="ssv2.stpack")` opens a
Classifier running that task (its labels, classes and default sampling; every result names it), and
`classify_batch(sources, task=...)` runs one batch with a task, or each source given as a `(source, task)`
pair with its own. Each pack is loaded and prepared once per Classifier; videos of different tasks are
decoded with their task's sampling and never share a backend call.

The stages are public so a pipeline can run them apart (stexport/serving/ray_data.py does): `decode_source` (any
thread or process; never raises for a bad video) and `run_decoded` (where the backend lives).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stexport.errors import StexportError

DEFAULT_BATCH = 32  # views per backend call


@dataclass(frozen=True)
class ClassifierSpec:
    """What to open, not an open classifier: picklable, hashable, cheap to ship to a worker.

    bundle: bundle directory (a path every worker can read). backend: 'auto' or a backend name.
    options: backend options (`--option` KEY=VALUE), e.g. {"threads": 2, "compute": "bf16"}; stored as a
    sorted tuple of pairs. labels: class-names file overriding the bundle's. sampling: a stexport.runtime.video.Sampling
    (None: the bundle's). top_k: classes per result. batch_size: views per backend call (≥ 1).
    decode_threads: videos decoded at the same time, each by one FFmpeg thread in a decoder process (≥ 1).
    decode_timeout: seconds a video's decoder may read no frame before that video is given up; max_decode_s:
    seconds one video may take to decode in all (None: no limit); max_pixels, max_frames: what a video's header
    may claim before it is decoded; decode_memory_mb: each decoder process's address space (None: no limit).
    See stexport.runtime.decode_worker.DecodeLimits (the defaults are its).
    task: a task pack's path (a TaskPack is stored as its path) to run on the swappable bundle instead of the
    bundle's own task: its classes, labels and (unless `sampling` is given) default sampling; every worker
    reads it by this path and loads it once.

    Raises StexportError for a batch_size, decode_threads or top_k below 1; `open()` raises what
    `Classifier` raises (a missing or changed bundle, an unknown backend or option, a pack that does not fit
    the bundle or a backend that cannot swap tasks).
    """

    bundle: str
    backend: str = "auto"
    options: tuple[tuple[str, Any], ...] = ()
    labels: str | None = None
    sampling: Any = None  # stexport.runtime.video.Sampling (frozen, picklable)
    top_k: int = 5
    batch_size: int = DEFAULT_BATCH
    decode_threads: int = 1
    decode_timeout: float = 60.0  # seconds a decoder may read no frame before its video is given up
    max_decode_s: float | None = None  # seconds one video may take to decode in all
    max_pixels: int | None = 36_000_000  # = decode_worker.MAX_PIXELS (this module imports no decoder)
    max_frames: int | None = 1_000_000  # = decode_worker.MAX_FRAMES
    decode_memory_mb: int | None = 4096  # = decode_worker.MEMORY_MB
    task: str | None = None  # a task pack's path

    def __post_init__(self):
        object.__setattr__(self, "bundle", str(getattr(self.bundle, "path", self.bundle)))
        if self.task is not None:
            object.__setattr__(self, "task", str(getattr(self.task, "path", self.task)))
        opts = self.options.items() if isinstance(self.options, Mapping) else self.options
        object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in opts)))
        if self.labels is not None:
            object.__setattr__(self, "labels", str(self.labels))
        for name in ("batch_size", "decode_threads", "top_k"):
            if int(getattr(self, name)) < 1:
                raise StexportError(f"{name}={getattr(self, name)}: must be at least 1")

    def open(self):
        """A ready stexport.runtime.classify.Classifier (loads the bundle and the backend: seconds, not free)."""
        from stexport.runtime.classify import Classifier

        return Classifier(self.bundle, backend=self.backend, labels=self.labels, sampling=self.sampling,
                          top_k=self.top_k, batch_size=self.batch_size, decode_threads=self.decode_threads,
                          decode_timeout=self.decode_timeout, max_decode_s=self.max_decode_s, task=self.task,
                          max_pixels=self.max_pixels, max_frames=self.max_frames,
                          decode_memory_mb=self.decode_memory_mb,
                          **dict(self.options))

    def replace(self, **changes) -> "ClassifierSpec":
        return replace(self, **changes)


@dataclass
class Decoding:
    """One source after decoding: `decoded` (a stexport.runtime.video.Decoded) or `failure` (a Failure), the seconds
    decoding took, and the task pack to run it with (a loaded TaskPack; None: the classifier's current task)."""
    source: str
    decoded: Any = None
    failure: Any = None
    decode_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    task: Any = None


def decode_source(source, sampling, threads: int | None = 1, decoder=None) -> Decoding:
    """Decode one source as `infer` does, in a child process (a crash or stall costs this source only); a bad
    one (missing, not a video, no frames, any decoder error) gives a Decoding holding a Failure, never an
    exception (KeyboardInterrupt still propagates). decoder: a stexport.runtime.decode_worker.DecodeWorker or
    DecoderPool to decode in; None starts a child for this source alone (`threads` FFmpeg threads, default
    limits)."""
    from stexport.runtime.classify import Failure, _message
    from stexport.runtime.decode_worker import decode_isolated

    t = time.perf_counter()
    try:
        d = decoder.decode(source, sampling) if decoder is not None else decode_isolated(source, sampling, threads)
    except Exception as e:  # noqa: BLE001 - one bad input is that input's failure
        return Decoding(str(source), failure=Failure(str(source), _message(source, e)),
                        decode_s=time.perf_counter() - t)
    return Decoding(d.source, decoded=d, decode_s=time.perf_counter() - t, notes=list(d.notes))


def run_decoded(clf, items: Sequence[Decoding]) -> list:
    """Results (stexport.runtime.classify.Result) or Failures for `items`, in their order. Views of decoded items of the
    same task share backend calls of up to clf.batch_size views (in input order within a task; tasks are never
    mixed in one call). Per video: softmax of each view's logits (float64), mean over its views, top k, named
    with its task's labels. A video whose logits are not finite is a Failure; a backend that returns the wrong
    shape raises StexportError (the bundle or runtime is broken, not the input)."""
    from stexport.runtime.classify import Result

    out: list = [None] * len(items)
    groups: dict[object, list[int]] = {}  # task key -> items, in input order
    for i, item in enumerate(items):
        if item.failure is not None:
            out[i] = item.failure
            continue
        groups.setdefault(item.task.key if item.task is not None else None, []).append(i)

    def flush(group: list[int]) -> None:
        task = items[group[0]].task
        probs, spent = task_probs(clf, [items[i].decoded.clips for i in group], task)
        views = sum(len(items[i].decoded.clips) for i in group)
        labels, name = clf._labels_for(task), clf.task_name(task)
        for i, p in zip(group, probs):
            d = items[i].decoded
            if p is None:
                out[i] = _failure(d.source, non_finite(d.source, clf.backend.name), name)
                continue
            out[i] = Result(d.source, clf.top(p, labels), len(d.clips), d.frames, items[i].decode_s,
                            spent * len(d.clips) / views, list(d.notes), backend=clf.backend.name, task=name)

    for group in groups.values():
        call: list[int] = []
        views = 0
        for i in group:
            v = len(items[i].decoded.clips)
            if call and views + v > clf.batch_size:
                flush(call)
                call, views = [], 0
            call.append(i)
            views += v
        if call:
            flush(call)
    return out


def task_probs(clf, clips: Sequence[np.ndarray], task=None) -> tuple[list, float]:
    """One backend call of `clf` over every view of `clips` (uint8 (V_i, T, H, W, 3) per video) with `task` (a
    loaded TaskPack; None: the current task): per video, the mean over its views of the softmax of its
    logits (float64 (classes,)), or None where a logit is not finite; and the seconds the call took.
    StexportError when the backend returns logits of another shape (the bundle or runtime is broken)."""
    from stexport.runtime.classify import softmax

    batch = clips[0] if len(clips) == 1 else np.concatenate(clips)
    t = time.perf_counter()
    logits = clf.backend.run(batch, task=task) if task is not None else clf.backend.run(batch)
    spent = time.perf_counter() - t
    want = task.classes if task is not None else clf.num_classes
    if logits.shape != (len(batch), want):
        raise StexportError(f"backend {clf.backend.name} returned logits of shape {logits.shape}, "
                            f"expected ({len(batch)}, {want})")
    out, at = [], 0
    for c in clips:
        rows = logits[at:at + len(c)]
        at += len(c)
        out.append(softmax(rows).mean(axis=0) if np.isfinite(rows).all() else None)
    return out, spent


def non_finite(source: str, backend: str) -> str:
    return (f"{source}: the model gave non-finite logits (NaN/Inf) for this video on {backend}; check the "
            "bundle with `stexport verify`")


def _failure(source: str, error: str, task: str | None = None):
    from stexport.runtime.classify import Failure

    return Failure(source, error, task)


def classify_batch(clf, sources: Iterable, lookahead: int | None = None, task=None) -> Iterator:
    """Result or Failure per source, in input order, never raising for one bad input (see run_decoded).

    task: a task pack (TaskPack or path) for every source, None for the classifier's current task; loaded
    here (StexportError, one line, for a pack that does not fit). A source given as a (source, task) pair
    runs with its own task instead (None: the current one; a pack that cannot be loaded is that source's
    Failure). Each source is decoded with its task's sampling (clf.sampling_for) and named with its labels.

    clf.decode_threads threads decode ahead of the backend (daemon threads: a hung decoder cannot keep the
    process alive); at most `lookahead` decoded videos wait in memory (default: one batch's worth plus
    decode_threads). Results come out a batch at a time: with batch_size views per call, a result waits for
    the videos packed with it.
    """
    views = max(1, clf.sampling.views)
    depth = lookahead or (-(-clf.batch_size // views) + clf.decode_threads)
    common = clf.load_task(task) if task is not None else None
    pending: list[Decoding] = []
    count = 0
    pool = clf.decoders()  # a decoder process per decoding thread

    def jobs() -> Iterator[tuple]:
        """(source, TaskPack or None, error) per source; packs are loaded here, in the consuming thread."""
        for item in sources:
            if not isinstance(item, tuple):
                yield item, common, None
                continue
            if len(item) != 2:
                raise StexportError(f"{item!r}: a source with a task is a (source, task) pair")
            source, own = item
            try:
                yield source, (clf.load_task(own) if own is not None else None), None
            except StexportError as e:
                yield source, None, _failure(str(source), str(e), getattr(own, "name", None))

    def decode(job) -> Decoding:
        source, pack, failed = job
        if failed is not None:
            return Decoding(str(source), failure=failed, task=pack)
        d = decode_source(source, clf.sampling_for(pack), decoder=pool)
        d.task = pack
        if d.failure is not None:
            d.failure.task = clf.task_name(pack)
        return d

    for item in _ordered_map(decode, jobs(), clf.decode_threads, depth):
        if item.failure is None:
            v = len(item.decoded.clips)
            if count and count + v > clf.batch_size:
                yield from run_decoded(clf, pending)
                pending, count = [], 0
            count += v
        pending.append(item)
        if count >= clf.batch_size:
            yield from run_decoded(clf, pending)
            pending, count = [], 0
    if pending:
        yield from run_decoded(clf, pending)


def _ordered_map(fn, inputs: Iterable, threads: int, depth: int) -> Iterator:
    """fn(x) for each x of `inputs` on `threads` daemon threads, at most `depth` ahead, yielded in input order.
    fn must not raise (decode_source does not)."""
    tasks: queue.Queue = queue.Queue()
    done: dict[int, Any] = {}
    cond = threading.Condition()

    def worker():
        while True:
            task = tasks.get()
            if task is None:
                return
            i, x = task
            try:
                y = fn(x)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                y = _Raised(e)
            with cond:
                done[i] = y
                cond.notify_all()

    workers = [threading.Thread(target=worker, name=f"stexport-decode-{k}", daemon=True)
               for k in range(max(1, threads))]
    for w in workers:
        w.start()
    it = iter(inputs)
    submitted = nxt = 0
    try:
        while True:
            while submitted - nxt < max(1, depth):
                x = next(it, _END)
                if x is _END:
                    break
                tasks.put((submitted, x))
                submitted += 1
            if nxt == submitted:
                return
            with cond:
                while nxt not in done:
                    cond.wait(0.1)
                y = done.pop(nxt)
            nxt += 1
            if isinstance(y, _Raised):
                raise y.error
            yield y
    finally:
        for _ in workers:
            tasks.put(None)


_END = object()


@dataclass
class _Raised:
    error: BaseException


def spec_from(bundle: str | Path, **kw) -> ClassifierSpec:
    """ClassifierSpec(bundle, **kw) with backend options given as keywords too: spec_from(b, threads=2)."""
    fields = set(ClassifierSpec.__dataclass_fields__)
    own = {k: v for k, v in kw.items() if k in fields}
    extra = {k: v for k, v in kw.items() if k not in fields}
    if extra:
        own["options"] = {**dict(own.get("options") or {}), **extra}
    return ClassifierSpec(str(bundle), **own)
