"""Classify a corpus on Ray (`stexport infer --ray`): the same classification as `Classifier.classify_batch`,
as a Ray Data pipeline.

    sources ─► decode (an actor pool: each actor drives one decoder child process, one FFmpeg thread) ─►
    inference (an actor pool: one backend loaded per actor from a ClassifierSpec, views of several videos per
    call) ─► (input index, result dict)

Decoding is the one isolated decoder (stexport.runtime.decode_worker) with the spec's limits: a video that
crashes or stalls it, or decodes longer than `max_decode_s`, is that video's failure; the run goes on.

Results come back in input order (Ray Data's preserve_order, and a reorder buffer on top), one dict per
source in `infer --json`'s schema, failures included. Needs `pip install 'stexport[ray]'`.

Every node that runs a task reads the videos by their paths, and every inference actor opens the bundle (and
the spec's task pack, if any) by its path: use a shared file system, or `ship_bundle=True` to send the
bundle's files and the pack through Ray's object store (an actor that cannot see a path writes them to a
temporary directory and opens that).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from stexport.runtime.batch import Decoding, decode_source, run_decoded
from stexport.runtime.spec import ClassifierSpec
from stexport.runtime.decode_worker import DecodeLimits, DecodeWorker, limits_of
from stexport.errors import StexportError
from stexport.extras import require

log = logging.getLogger("stexport")


def connect(address: str | None, verbose: bool = False) -> bool:
    """Connect to Ray: address None starts a local cluster on 127.0.0.1 (this machine's CPUs), 'auto' joins
    the running cluster this machine belongs to, HOST:PORT (or ray://HOST:PORT) joins that one. Returns
    whether this call started Ray (then the caller shuts it down). An already initialised Ray is reused."""
    require("--ray", "ray")
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}
    try:
        if address is None:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except ConnectionError as e:
        raise StexportError(f"--ray {address or ''}: cannot connect to a Ray cluster ({_first_line(e)}); start "
                            "one with `ray start --head`, or pass --ray alone for a local one") from None
    return True


def classify(spec: ClassifierSpec, sources: Sequence[tuple[int, str]], workers: int = 1,
             cpus_per_worker: float = 1.0, ship_bundle: bool = False) -> Iterator[tuple[int, dict]]:
    """(index, result dict) for each (index, source) of `sources`, in that order, on the connected Ray.

    workers: inference actors (each loads the backend once). cpus_per_worker: Ray CPUs each actor reserves
    (give the backend as many threads, e.g. spec options {"threads": N}). Raises StexportError when the
    bundle or backend cannot be opened on a worker (one line, the worker's reason)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.print_on_execution_start = False
    if not log.isEnabledFor(logging.INFO):  # -v shows Ray Data's own progress and notes
        ctx.enable_progress_bars = False
        for name in ("ray.data", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if not sources:
        return
    if spec.sampling is None:  # the task's default sampling (a pack's, else the bundle's)
        from stexport.bundle.store import Bundle
        from stexport.runtime.classify import default_sampling
        from stexport.bundle.taskpack import TaskPack

        spec = spec.replace(sampling=default_sampling(Bundle.load(spec.bundle),
                                                      TaskPack.load(spec.task) if spec.task else None))
    cpus = ray.cluster_resources().get("CPU", 0)
    if workers * cpus_per_worker > cpus - 1:
        raise StexportError(f"--workers {workers} × --worker-cpus {cpus_per_worker:g} leaves none of this "
                            f"cluster's {cpus:g} CPUs for decoding; pass fewer --workers or a smaller "
                            "--worker-cpus")
    shipped = ray.put(_bundle_files(spec.bundle)) if ship_bundle else None
    shipped_task = ray.put(Path(spec.task).read_bytes()) if ship_bundle and spec.task else None
    sampling = spec.sampling
    per_call = max(1, spec.batch_size // sampling.views)
    rows = [{"i": i, "source": s} for i, s in sources]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 1000))
    # A decode task's memory (its clips twice over, plus the decoder's own) is declared for the scheduler; it
    # also keeps decoding in its own tasks instead of fused into the inference actors.
    clip_bytes = sampling.views * sampling.frames * sampling.size ** 2 * 3
    decoders = max(1, int(cpus - workers * cpus_per_worker))
    limits = limits_of(spec.decode_timeout, spec.max_decode_s, max_pixels=spec.max_pixels,
                       max_frames=spec.max_frames, memory_mb=spec.decode_memory_mb)
    ds = ds.map(_DecodeRows, fn_constructor_kwargs={"sampling": sampling, "limits": limits}, num_cpus=1,
                memory=2 * clip_bytes + (64 << 20), compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders))
    ds = ds.map_batches(_infer_class(spec, shipped, shipped_task), batch_size=per_call,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
                        num_cpus=cpus_per_worker)
    order = {i: k for k, (i, _) in enumerate(sources)}
    waiting: dict[int, dict] = {}
    nxt = 0
    try:
        for row in ds.iter_rows():
            waiting[order[int(row["i"])]] = json.loads(row["line"])
            while nxt in waiting:
                yield sources[nxt][0], waiting.pop(nxt)
                nxt += 1
    except Exception as e:  # noqa: BLE001 - a worker's StexportError becomes one line, not a Ray traceback
        cause = _stexport_cause(e)
        if cause is not None:
            raise StexportError(cause) from None
        raise


class _DecodeRows:
    """A Ray Data decode actor: one decoder child process (replaced when it dies), one row in, one row out."""

    def __init__(self, sampling, limits: DecodeLimits | None = None):
        self.sampling = sampling
        self.decoder = DecodeWorker(threads=1, limits=limits)

    def __call__(self, row: dict) -> dict:
        return _decode_row(row, self.sampling, self.decoder)

    def __del__(self):
        self.decoder.close()


def _decode_row(row: dict, sampling, decoder=None) -> dict:
    """A decoded row; `decoder`: a DecodeWorker (None: a child process for this row alone)."""
    d: Decoding = decode_source(row["source"], sampling, threads=1, decoder=decoder)
    if d.failure is not None:
        clips = np.zeros((sampling.views, sampling.frames, sampling.size, sampling.size, 3), np.uint8)
        return {"i": row["i"], "source": d.source, "clips": clips, "frames": 0, "notes": "[]",
                "decode_s": d.decode_s, "error": d.failure.error}
    return {"i": row["i"], "source": d.source, "clips": d.decoded.clips, "frames": d.decoded.frames,
            "notes": json.dumps(d.notes), "decode_s": d.decode_s, "error": ""}


class _Infer:
    """A Ray Data actor: one open Classifier, batches of decoded rows in, one JSON line per row out."""

    def __init__(self, spec: ClassifierSpec, shipped=None, shipped_task=None):
        if shipped is not None and not Path(spec.bundle).is_dir():
            import ray

            spec = spec.replace(bundle=str(_unpack(ray.get(shipped), Path(spec.bundle).name)))
        if shipped_task is not None and spec.task and not Path(spec.task).is_file():
            import ray

            name = Path(spec.task).name
            spec = spec.replace(task=str(_unpack({name: ray.get(shipped_task)}, "task") / name))
        self.clf = spec.open()  # loads the bundle, the backend and the task pack, once per actor

    def __call__(self, batch: dict) -> dict:
        from stexport.runtime.classify import Failure
        from stexport.runtime.video import Decoded

        items = []
        for k in range(len(batch["i"])):
            source, error = str(batch["source"][k]), str(batch["error"][k])
            if error:
                items.append(Decoding(source, failure=Failure(source, error, self.clf.task_name()),
                                      decode_s=float(batch["decode_s"][k])))
                continue
            notes = json.loads(str(batch["notes"][k]))
            d = Decoded(source, np.ascontiguousarray(batch["clips"][k]), int(batch["frames"][k]), None, None,
                        notes=notes)
            items.append(Decoding(source, decoded=d, decode_s=float(batch["decode_s"][k]), notes=notes))
        lines = [json.dumps(r.to_dict(), allow_nan=False) for r in run_decoded(self.clf, items)]
        return {"i": batch["i"], "line": np.array(lines, dtype=object)}


def _infer_class(spec: ClassifierSpec, shipped, shipped_task=None):
    """_Infer bound to `spec` (shipped with the class, not as constructor arguments in the object store, which
    makes Ray warn about restarting the actors). shipped / shipped_task: object refs of the bundle's files
    and of the task pack's bytes (ship_bundle)."""

    class Infer(_Infer):
        def __init__(self):
            super().__init__(spec, shipped, shipped_task)

    return Infer


def _bundle_files(bundle: str) -> dict[str, bytes]:
    """Every file of the bundle the runtimes read (the manifest and the files it records)."""
    from stexport.bundle.store import Bundle
    from stexport.bundle.manifest import MANIFEST

    b = Bundle.load(bundle)
    names = [MANIFEST, *b.manifest.files]
    return {name: (b.path / name).read_bytes() for name in names}


def _unpack(files: dict[str, bytes], name: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="stexport-bundle-")) / name
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _stexport_cause(e: BaseException) -> str | None:
    """The message of a StexportError a Ray worker raised, found through Ray's wrappers."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, StexportError):
            return str(x)
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    text = str(e)
    marker = "StexportError: "
    if marker in text:
        return text.split(marker, 1)[1].strip().splitlines()[0]
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
