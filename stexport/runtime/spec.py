"""What to open, not an open classifier: `ClassifierSpec`, a frozen, picklable description of "bundle + backend +
options" for workers (Ray actors, processes). Ship the spec, call `.open()` once in the worker: a
`stexport.runtime.classify.Classifier` itself does not pickle (an OpenVINO Core, an ONNX Runtime session inside).
Importing this module is light (no numpy, no runtime): `.open()` loads the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
    task: a task pack's path (a TaskPack is stored as its path) to run on the swappable bundle, or a task name
    of a multi-task bundle (a BundleTask is stored as its name), instead of the bundle's own task: its classes, labels and (unless `sampling` is given) default sampling; every worker
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
    task: str | None = None  # a task pack's path or a multi-task bundle's task name

    def __post_init__(self):
        object.__setattr__(self, "bundle", str(getattr(self.bundle, "path", self.bundle)))
        if self.task is not None and not isinstance(self.task, str):
            from stexport.bundle.multitask import task_ref

            object.__setattr__(self, "task", task_ref(self.task) if hasattr(self.task, "record") else str(self.task))
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

    def replace(self, **changes) -> ClassifierSpec:
        return replace(self, **changes)




def spec_from(bundle: str | Path, **kw) -> ClassifierSpec:
    """ClassifierSpec(bundle, **kw) with backend options given as keywords too: spec_from(b, threads=2)."""
    fields = set(ClassifierSpec.__dataclass_fields__)
    own = {k: v for k, v in kw.items() if k in fields}
    extra = {k: v for k, v in kw.items() if k not in fields}
    if extra:
        own["options"] = {**dict(own.get("options") or {}), **extra}
    return ClassifierSpec(str(bundle), **own)
