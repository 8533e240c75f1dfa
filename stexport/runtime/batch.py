"""Many videos through one classifier: views of several videos in each backend call, decoding ahead in
decoder processes (stexport.runtime.decode_worker.DecoderPool), one per decoding thread. The one view-packing path
(`run_decoded`, over `task_probs`) and the one prefetcher (`ordered_map`) of stexport: `Classifier.classify`
and `classify_batch`, `infer --batch` and `--ray`, `serve` and `verify` go through them.

The numbers are the official evaluation's, exactly as `Classifier.classify` gives them: each view's logits go
through a softmax and the probabilities are averaged over that video's views. Only the packing differs: the
views of consecutive videos are concatenated into one backend call of up to `batch_size` views (a video's views
are never split; a video with more views than `batch_size` runs in a call of its own), so small models and
short videos keep the backend busy.

    spec = ClassifierSpec("bundles/k400-int8", backend="openvino", batch_size=32, decode_threads=2)
    with spec.open() as clf:                       # a stexport.Classifier
        for item in clf.classify_batch(paths):     # Result or Failure per source, in input order
            print(item.to_dict())

`ClassifierSpec` (stexport.runtime.spec) is a frozen, picklable description of "bundle + backend + options"
for workers (Ray actors, processes): ship the spec, call `.open()` once in the worker. A `Classifier` itself
does not pickle (an OpenVINO Core, an ONNX Runtime session inside).

Task packs (stexport.bundle.taskpack) on a swappable bundle: `ClassifierSpec(..., task="ssv2.stpack")` opens a
Classifier running that task (its labels, classes and default sampling; every result names it), and
`classify_batch(sources, task=...)` runs one batch with a task, or each source given as a `(source, task)`
pair with its own. Each pack is loaded and prepared once per Classifier; videos of different tasks are
decoded with their task's sampling and never share a backend call. On a multi-task bundle
(stexport.bundle.multitask) a task is a name, and videos of different tasks do share backend calls
(`mixed_probs`: the graph takes a task index per clip).

The stages are public so a pipeline can run them apart (stexport/serving/ray_data.py does): `decode_source` (any
thread or process; never raises for a bad video) and `run_decoded` (where the backend lives).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stexport.errors import StexportError
from stexport.runtime.scoring import (
    Failure,
    NonFiniteOutput,
    Result,
    check_logits,
    error_message,
    score_videos,
)


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
    from stexport.runtime.decode_worker import decode_isolated

    t = time.perf_counter()
    try:
        d = decoder.decode(source, sampling) if decoder is not None else decode_isolated(source, sampling, threads)
    except Exception as e:  # noqa: BLE001 - one bad input is that input's failure
        return Decoding(str(source), failure=Failure(str(source), error_message(source, e)),
                        decode_s=time.perf_counter() - t)
    return Decoding(d.source, decoded=d, decode_s=time.perf_counter() - t, notes=list(d.notes))


def run_decoded(clf, items: Sequence[Decoding], max_views: int | None = None) -> list:
    """Results (stexport.runtime.scoring.Result) or Failures for `items`, in their order. Views of decoded
    items of the same task share backend calls of up to `max_views` views (default clf.batch_size; in input
    order within a task; tasks are never mixed in one call, except on a multi-task bundle, where every task
shares them in input order; a video's views are never split). Per video:
    `task_probs` (softmax of each view's logits in float64, mean over its views), top k, named with its task's
    labels. A video whose logits are not finite is a Failure (stexport.runtime.scoring.non_finite_message); a
    backend that returns the wrong shape raises StexportError (the bundle or runtime is broken, not the input).
    An item's `decoded` needs .source, .clips (uint8 (V, T, H, W, 3)), .frames and .notes."""
    limit = max_views or clf.batch_size
    out: list = [None] * len(items)
    groups: dict[object, list[int]] = {}  # task key -> items, in input order
    mixed = clf.bundle.manifest.multitask is not None  # one graph for every task: one group
    for i, item in enumerate(items):
        if item.failure is not None:
            out[i] = item.failure
            continue
        groups.setdefault(item.task.key if item.task is not None and not mixed else None, []).append(i)

    def flush(group: list[int]) -> None:
        clips = [items[i].decoded.clips for i in group]
        if mixed:
            probs, spent = mixed_probs(clf, clips, [items[i].task for i in group])
        else:
            probs, spent = task_probs(clf, clips, items[group[0]].task)
        views = sum(len(c) for c in clips)
        for i, p in zip(group, probs):
            task = items[i].task
            labels, name = clf.labels_for(task), clf.task_name(task)
            d = items[i].decoded
            if isinstance(p, NonFiniteOutput):
                out[i] = Failure(d.source, f"{d.source}: {p}", name)
                continue
            out[i] = Result(d.source, clf.top(p, labels), len(d.clips), d.frames, items[i].decode_s,
                            spent * len(d.clips) / views, list(d.notes), backend=clf.backend.name, task=name,
                            weights=clf.weights)

    for group in groups.values():
        call: list[int] = []
        views = 0
        for i in group:
            v = len(items[i].decoded.clips)
            if call and views + v > limit:
                flush(call)
                call, views = [], 0
            call.append(i)
            views += v
        if call:
            flush(call)
    return out


def mixed_probs(clf, clips: Sequence[np.ndarray], tasks: Sequence) -> tuple[list, float]:
    """task_probs for a multi-task bundle (stexport.bundle.multitask), each video with its own task (a
    BundleTask; None: the current task), all of them in one backend call (Backend.run_tasks): per video the
    mean over its views of the softmax of its task's logits (its first `classes`), or a NonFiniteOutput; and
    the seconds the call took."""
    counts = [len(c) for c in clips]
    batch = clips[0] if len(clips) == 1 else np.concatenate(clips)
    t = time.perf_counter()
    logits = clf.backend.run_tasks(batch, [task for task, n in zip(tasks, counts) for _ in range(n)])
    spent = time.perf_counter() - t
    clf.backend_calls += 1
    check_logits(logits, len(batch), clf.bundle.manifest.multitask.head_rows, clf.backend.name)
    out, at = [], 0
    for task, n in zip(tasks, counts):
        classes = task.classes if task is not None else clf.num_classes
        out += score_videos(logits[at:at + n, :classes], [n], clf.backend.name, clf.bundle.precision)
        at += n
    return out, spent


def task_probs(clf, clips: Sequence[np.ndarray], task=None) -> tuple[list, float]:
    """One backend call of `clf` over every view of `clips` (uint8 (V_i, T, H, W, 3) per video) with `task` (a
    loaded TaskPack; None: the current task), scored by stexport.runtime.scoring.score_videos: per video, the
    mean over its views of the softmax of its logits (float64 (classes,)), or a NonFiniteOutput (not raised)
    where a logit is not finite; and the seconds the call took. StexportError when the backend returns logits
    of another shape (the bundle or runtime is broken)."""
    batch = clips[0] if len(clips) == 1 else np.concatenate(clips)
    t = time.perf_counter()
    logits = clf.backend.run(batch, task=task) if task is not None else clf.backend.run(batch)
    spent = time.perf_counter() - t
    clf.backend_calls += 1
    check_logits(logits, len(batch), task.classes if task is not None else clf.num_classes, clf.backend.name)
    return score_videos(logits, [len(c) for c in clips], clf.backend.name, clf.bundle.precision), spent


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
                yield source, None, Failure(str(source), str(e), getattr(own, "name", None))

    def decode(job) -> Decoding:
        source, pack, failed = job
        if failed is not None:
            return Decoding(str(source), failure=failed, task=pack)
        d = decode_source(source, clf.sampling_for(pack), decoder=pool)
        d.task = pack
        if d.failure is not None:
            d.failure.task = clf.task_name(pack)
        return d

    for _, item in ordered_map(decode, jobs(), clf.decode_threads, depth):
        if isinstance(item, Exception):
            raise item  # decode() gives a bad input its Failure: anything else is a bug, not the input's
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


def ordered_map(fn, inputs: Iterable, threads: int = 1, depth: int = 2,
                finish=None) -> Iterator[tuple[Any, Any]]:
    """(x, fn(x)) for each x of `inputs`, fn run on `threads` daemon threads (a hung fn cannot keep the process
    alive), at most `depth` inputs ahead of the consumer, yielded in input order. An Exception fn raises is
    yielded in place of its value (the caller makes it that input's failure); a BaseException (e.g.
    KeyboardInterrupt) is raised in the consumer. `inputs` is iterated in the consuming thread.

    The one prefetcher of stexport: decoding runs here while the backend runs the videos before. When the
    consumer stops early, inputs not started are dropped, and `finish` (if given) runs in each worker thread
    after its last fn: with threads=1, the thread that ran every fn (e.g. to close a generator fn advanced)."""
    tasks: queue.Queue = queue.Queue()
    done: dict[int, Any] = {}
    cond = threading.Condition()
    stop = threading.Event()

    def worker():
        try:
            while (task := tasks.get()) is not None:
                if stop.is_set():
                    continue
                i, x = task
                try:
                    y = fn(x)
                except Exception as e:  # noqa: BLE001 - handed to the consumer: that input's failure
                    y = e
                except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                    y = _Raised(e)
                with cond:
                    done[i] = (x, y)
                    cond.notify_all()
        finally:
            if finish is not None:
                finish()

    workers = [threading.Thread(target=worker, name="stexport-decode" + (f"-{k}" if threads > 1 else ""),
                                daemon=True) for k in range(max(1, threads))]
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
                x, y = done.pop(nxt)
            nxt += 1
            if isinstance(y, _Raised):
                raise y.error
            yield x, y
    finally:
        stop.set()
        for _ in workers:
            tasks.put(None)


_END = object()


@dataclass
class _Raised:
    error: BaseException


def __getattr__(name: str):  # `from stexport.batch import ClassifierSpec` from before the wings (one release)
    from stexport._moved import moved_name

    return moved_name(__name__, name)
