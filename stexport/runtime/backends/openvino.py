"""OpenVINO: the fastest CPU runtime for these models on x86-64 (INT8 Q/DQ runs as VNNI/AMX int8 GEMMs).

Reads the bundle's ONNX directly (FP32, FP16 or INT8 Q/DQ) and compiles it for the CPU with an explicit
inference precision: OpenVINO would otherwise run FP32 models in BF16 on CPUs that have it, silently. Each
batch size gets a model compiled for that fixed shape (see OpenVINOBackend). Compiled models are cached beside
the bundle so the second start skips compilation (hashing the reshaped graph still costs ~0.7 s on ViT-B/16).

Telemetry: `import openvino` imports its model converter, which initialises `openvino_telemetry` and queues a
usage event unless `~/intel/openvino_telemetry` says "0" (what `opt_in_out --opt_out` writes).
`import_openvino` imports OpenVINO with `openvino_telemetry` hidden, so OpenVINO falls back to its own no-op
stub: nothing is collected or sent and no client-id file is written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from stexport.runtime.backends.base import THREADS, Backend, Option, register
from stexport.errors import StexportError

log = logging.getLogger("stexport")

X86 = ("x86_64", "amd64", "x64")
_said: set = set()  # what was said once: warnings, and (bundle, reason) of auto's choice


def saturating_int8(bundle) -> str | None:
    """Why OpenVINO would change `bundle`'s answers on this CPU, or None: an INT8 bundle on an x86-64 CPU
    without VNNI, where its CPU plugin adds u8×s8 products in saturating 16-bit lanes
    (stexport.runtime.device.int8_sums_saturate; measured on this project's AVX2 machine: the demo INT8
    bundle's mean |Δlogit| against the PyTorch reference 0.145 with OpenVINO, 0.106 with onnxruntime)."""
    from stexport.runtime.device import int8_sums_saturate

    if bundle.manifest.precision != "int8" or not int8_sums_saturate():
        return None
    return "this CPU has no VNNI: OpenVINO adds INT8 products in saturating 16-bit sums (answers drift)"
PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}
HINTS = ("latency", "throughput")
KEEP = 3  # batch sizes that get a model of their own (each holds a copy of the weights); others share one


def import_openvino():
    """`import openvino` with its usage telemetry off (see the module docstring)."""
    if "openvino" in sys.modules:
        ov = sys.modules["openvino"]
        tm = sys.modules.get("openvino_telemetry")
        if tm is not None:  # imported elsewhere first: withdraw consent for this process
            try:
                tm.Telemetry().consent = False
            except Exception:
                pass
        return ov
    hidden = "openvino_telemetry" not in sys.modules
    if hidden:
        sys.modules["openvino_telemetry"] = None  # makes `import openvino_telemetry` raise ImportError
    try:
        import openvino as ov
    finally:
        if hidden:
            del sys.modules["openvino_telemetry"]
    return ov


def reason(e: Exception) -> str:
    """The informative line of an OpenVINO exception (its first lines only name C++ source files)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception from ")]
    return (useful or lines or [type(e).__name__])[0][:200]


def model_key(bundle) -> str:
    """Identity of the bundle's ONNX (and external data) from the manifest's sha256 records. OpenVINO checks
    a cached blob against the file's path, size and mtime in whole seconds only, which a rebuild with the same
    architecture can match; a folder per model content cannot go stale."""
    m = bundle.manifest
    recs = [m.files.get(m.artifacts.get(k, "")) for k in ("onnx", "onnx_data")]
    parts = [r.sha256 if r else "" for r in recs]
    if not parts[0]:
        st = bundle.file("onnx").stat()
        parts = [str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def default_cache_dir(bundle) -> Path:
    """`.<bundle>.openvino-cache/<model key>` next to the bundle (outside it, so the bundle's file hashes stay
    valid); under the stexport cache folder when the bundle's folder is read-only."""
    beside = bundle.path.parent / f".{bundle.path.name}.openvino-cache"
    if beside.is_dir() and os.access(beside, os.W_OK) or os.access(bundle.path.parent, os.W_OK):
        return beside / model_key(bundle)
    from stexport.bundle.store import default_home

    where = hashlib.sha256(str(bundle.path.resolve()).encode()).hexdigest()[:16]
    return default_home().parent / "openvino-cache" / f"{bundle.path.name}-{where}" / model_key(bundle)


def open_cache(folder: Path, variant: str) -> Path | None:
    """`folder/variant`, created, after dropping the siblings of `folder` (blobs of earlier builds of this
    bundle); None if impossible.

    One subfolder per compile configuration: OpenVINO's blob name for a model compiled from its path does not
    change with the inference precision, hint or threads, and a blob compiled for f32 loaded under a bf16 hint
    gives wrong logits (measured on an AMX CPU with OpenVINO 2026.4).
    """
    try:
        (folder / variant).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("OpenVINO model cache off: cannot create %s (%s)", folder / variant, e.strerror)
        return None
    for old in folder.parent.iterdir():
        if old != folder and old.is_dir() and only_blobs(old):
            shutil.rmtree(old, ignore_errors=True)
    return folder / variant


def only_blobs(folder: Path) -> bool:
    """Whether `folder` holds nothing but OpenVINO blobs, directly or in subfolders (so is a cache we made)."""
    return all(only_blobs(f) if f.is_dir() else f.suffix == ".blob" for f in folder.iterdir())


# auto: before ONNX Runtime: on x86-64 CPUs it runs the same ONNX faster (INT8 ~1.5x, FP32 ~1.1x in
# benchmarks/RESULTS.md); its usable() is False elsewhere. A task's tensors replace the graph's before OpenVINO
# reads it (prepare_task).
@register("openvino", artifact="onnx", auto=20, auto_note="OpenVINO on an x86-64 CPU (for INT8 bundles one with VNNI)",
          tasks=True)
class OpenVINOBackend(Backend):
    """A multi-task bundle runs as one model with its task input fed per call (MULTITASK).

    options: compute ('f32' | 'bf16' | 'f16'; default f32: OpenVINO's inference precision), hint
    ('latency' | 'throughput'), threads, device ('auto' = 'CPU', or an OpenVINO device name), cache (False: no
    compiled-model cache), cache_dir (a folder instead of the default), static (default True: compile the model
    for each of the first KEEP batch sizes it runs, any other size runs on one dynamic-batch model; False: that
    model only).

    Static shapes let the CPU plugin fuse what it keeps as separate layers under a dynamic batch: every
    activation quantization into its producer, and the adds, multiplies and reorders between the GEMMs into
    elementwise subgraphs (about 8% faster on ViT-B/16 INT8; benchmarks/openvino_static.py). The throughput hint
    splits a batch over streams, so it keeps one dynamic-batch model."""

    OPTIONS = (
        Option("device", str, "auto", "OpenVINO device: auto (= CPU) or a device name"),
        THREADS,
        Option("compute", str, "f32", "inference precision of the float parts: f32, bf16 (AMX/AVX512-BF16 "
               "CPUs) or f16 (AVX512-FP16 CPUs); never chosen silently", tuple(PRECISIONS)),
        Option("hint", str, "latency", "latency: one request, a model per batch size; throughput: streams",
               HINTS),
        Option("cache", bool, True, "keep compiled models beside the bundle"),
        Option("cache_dir", str, None, "folder for the compiled-model cache instead of the default"),
        Option("static", bool, True, "compile a fixed-shape model per batch size (~8% faster on INT8)"),
    )
    ALIASES = {"precision": "compute"}
    MULTITASK = True

    def __init__(self, bundle, device: str = "auto", threads: int | None = None, compute: str | None = None,
                 hint: str = "latency", cache: bool = True, cache_dir: str | Path | None = None,
                 static: bool = True, _core=None, _path: Path | None = None, **options):
        super().__init__(bundle, **options)
        why = saturating_int8(bundle) if _core is None else None
        if why and why not in _said:
            _said.add(why)
            log.warning("openvino on %s: %s; -b onnxruntime runs them exact", bundle.path.name, why)
        ov = import_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        # a task's backend (prepare_task): the parent's Core, and the bundle's graph with the pack's tensors
        self.core = _core or ov.Core()
        self._task_path = _path
        self._init_options = dict(device=device, threads=threads, compute=compute, hint=hint, cache=cache,
                                  cache_dir=cache_dir, static=static)
        if _path is not None:
            cache = False  # the task's graph is a scratch file: OpenVINO keys blobs by path and mtime
        self.device = "CPU" if device in ("auto", "cpu", None) else str(device).upper()
        if self.device not in self.core.available_devices:
            raise StexportError(f"--device {device}: OpenVINO here offers only "
                               f"{', '.join(self.core.available_devices)}; use --device cpu")
        want = PRECISIONS.get(str(compute or "f32").lower())
        if want is None:
            raise StexportError(f"OpenVINO compute precision '{compute}': choose f32 or bf16 "
                                "(f16 on CPUs with AVX512-FP16)")
        caps = self.core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")
        cap = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}[want]
        if cap not in caps:
            raise StexportError(f"OpenVINO compute precision {want}: this {self.device} cannot compute in "
                                f"{cap} (it offers {', '.join(c for c in caps if c in ('FP32', 'BF16', 'FP16'))}); "
                                "use --option compute=f32")
        if hint not in HINTS:
            raise StexportError(f"OpenVINO hint '{hint}': choose one of {', '.join(HINTS)}")
        config = {
            hints.inference_precision: getattr(ov.Type, want),
            hints.performance_mode: (hints.PerformanceMode.LATENCY if hint == "latency"
                                     else hints.PerformanceMode.THROUGHPUT),
            hints.execution_mode: hints.ExecutionMode.PERFORMANCE,
        }
        if threads:
            config[props.inference_num_threads] = int(threads)
        self.cache_dir = None
        if cache:
            folder = Path(cache_dir) / model_key(bundle) if cache_dir else default_cache_dir(bundle)
            self.cache_dir = open_cache(folder, f"{want}-{hint}-{int(threads or 0)}t")
            if self.cache_dir:
                config[props.cache_dir] = str(self.cache_dir)
        self.config, self.path = config, _path or bundle.file("onnx")
        self.static = bool(static) and hint == "latency"
        self.models: dict[int | None, tuple] = {}  # batch (None: any) -> (compiled model, infer request)
        if self.static:
            self.model = self._attempt(self._read)
            self.streams = 1
            graph_in = self.model.inputs[0]
        else:
            self.model = None
            compiled, _ = self.compiled_for(None)
            self.streams = int(compiled.get_property(props.optimal_number_of_infer_requests))
            graph_in = compiled.inputs[0]
        self.check_graph(self.path, graph_in.get_any_name(), [str(d) for d in graph_in.get_partial_shape()[1:]])
        self.stream_requests: list | None = None
        self.hint, self.threads, self.want = hint, threads, want

    def _attempt(self, step):
        try:
            return step()
        except Exception as e:
            raise StexportError(f"{self.path}: OpenVINO cannot compile it ({reason(e)}); "
                                "rebuild the bundle with `stexport build --force`") from e

    def _read(self):
        return self.core.read_model(str(self.path))

    def prepare_task(self, pack):
        """A backend of this one's options on the bundle's graph with the pack's tensors for its constants
        (a scratch ONNX this backend owns): its models are compiled on first use, per batch size as this
        one's, and kept while this backend lives."""
        import tempfile

        if getattr(self, "_task_dir", None) is None:
            import weakref

            self._task_dir = Path(tempfile.mkdtemp(prefix="stexport-openvino-tasks-"))
            # also when the backend is dropped without close(), and at interpreter exit
            weakref.finalize(self, shutil.rmtree, self._task_dir, ignore_errors=True)
        from stexport.bundle.taskpack import task_graph

        path = task_graph(self.path, pack, self._task_dir / f"{pack.key[:32]}.onnx")
        return OpenVINOBackend(self.bundle, _core=self.core, _path=path, **self._init_options)

    def compiled_for(self, batch: int | None) -> tuple:
        """(compiled model, infer request) for `batch` clips per call, compiled on first use; batch None: the
        dynamic-batch model."""
        fixed_sizes = [k for k in self.models if k is not None]
        key = batch if self.static and (batch in fixed_sizes or len(fixed_sizes) < KEEP) else None
        if key in self.models:
            return self.models[key]
        if key is None:
            # from the path, not a read Model: a cache hit then skips reading and hashing the graph
            compiled = self._attempt(lambda: self.core.compile_model(str(self.path), self.device, self.config))
        else:
            def fixed():
                # every input's batch axis (a multi-task graph's task index too)
                self.model.reshape({i.get_any_name(): [key, *i.get_partial_shape()[1:]] for i in self.model.inputs})
                return self.core.compile_model(self.model, self.device, self.config)

            compiled = self._attempt(fixed)
        self.models[key] = (compiled, compiled.create_infer_request())
        return self.models[key]

    @classmethod
    def usable(cls, bundle) -> bool:
        """x86-64 with OpenVINO installed and an ONNX model in the bundle, except an INT8 bundle on a CPU
        without VNNI where onnxruntime is installed (saturating_int8: `auto` takes the exact runtime; -v says
        why); imports nothing."""
        try:
            if not (platform.machine().lower() in X86 and bundle.has("onnx")
                    and importlib.util.find_spec("openvino") is not None):
                return False
            why = saturating_int8(bundle)
            if why and importlib.util.find_spec("onnxruntime") is not None:
                if (str(bundle.path), why) not in _said:
                    _said.add((str(bundle.path), why))
                    log.info("auto: not using OpenVINO for %s: %s; onnxruntime runs them exact",
                             bundle.path.name, why)
                return False
            return True
        except Exception:
            return False

    def run(self, clips: np.ndarray, task=None) -> np.ndarray:
        if self.bundle.manifest.multitask is not None:
            return self.run_multitask(clips, task)
        pack, child = self.task_state(task)
        return self.trim((child or self)._infer(clips), pack)

    def run_indexed(self, clips: np.ndarray, index: np.ndarray) -> np.ndarray:
        return self._infer(clips, index)

    def _infer(self, clips: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        """The graph's output for `clips` (every head row of a swappable or multi-task graph); `index`: a
        multi-task graph's task input."""
        x = self.input.feed(clips)
        inputs = (x,) if index is None else (x, np.ascontiguousarray(index, dtype=np.int64))
        if self.streams > 1 and len(x) > 1:
            return self._run_streams(inputs)
        _, request = self.compiled_for(len(x))
        return np.array(request.infer(dict(enumerate(inputs)))[0], dtype=np.float32)

    def _run_streams(self, inputs: tuple) -> np.ndarray:
        """Throughput hint: OpenVINO splits the cores into streams, each running its own request; one request
        alone would use only its stream's cores, so split the batch over all of them.

        Plain requests, not an AsyncInferQueue: a Python callback lets OpenVINO's stream threads take the GIL,
        and closing the backend (which joins those threads while holding it) then deadlocked about one time in
        twenty."""
        if self.stream_requests is None:
            compiled, first = self.compiled_for(None)
            self.stream_requests = [first, *(compiled.create_infer_request() for _ in range(self.streams - 1))]
        n = min(self.streams, len(inputs[0]))
        parts = list(zip(*(np.array_split(a, n) for a in inputs)))  # per request: its rows of every input
        for request, part in zip(self.stream_requests, parts):
            request.start_async(dict(enumerate(part)))
        out = []
        for request, _ in zip(self.stream_requests, parts):
            request.wait()
            out.append(np.array(request.get_output_tensor(0).data, dtype=np.float32))
        return np.concatenate(out)

    def any_compiled(self):
        """A model compiled so far (they share their layer precisions), or None before the first run."""
        return next(iter(self.models.values()))[0] if self.models else None

    def layer_precisions(self) -> tuple[dict[str, int], dict[str, int]]:
        """How many GEMM layers (FullyConnected, MatMul, Convolution) and how many fused subgraphs (attention
        blocks, elementwise chains) run in each precision, read from the compiled model itself."""
        gemm: Counter = Counter()
        fused: Counter = Counter()
        compiled = self.any_compiled() or self.compiled_for(1)[0]
        for op in compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            kind = rt["layerType"].astype(str)
            if kind in ("FullyConnected", "MatMul", "Convolution"):
                gemm[rt["runtimePrecision"].astype(str)] += 1
            elif kind == "Subgraph":
                fused[rt["runtimePrecision"].astype(str)] += 1
        return dict(sorted(gemm.items())), dict(sorted(fused.items()))

    def compute_precision(self) -> str:
        """fp32, bf16 or fp16: the inference precision the models are compiled with."""
        return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}[self.want]

    def describe(self) -> dict:
        """Layer precisions are read from a compiled model: None before the first run (the models are compiled
        per batch size on first use, and describing must not compile one that may never run)."""
        import openvino.properties as props
        import openvino.properties.hint as hints

        ov = import_openvino()
        c = self.any_compiled()
        gemm, fused = self.layer_precisions() if c else (None, None)
        return {**super().describe(), "device": self.device,
                "device_name": self.core.get_property(self.device, props.device.full_name),
                "openvino": ov.get_version().split("-")[0],
                "inference_precision": (c.get_property(hints.inference_precision) if c
                                        else self.config[hints.inference_precision]).to_string(),
                "gemm_precisions": gemm, "subgraph_precisions": fused,
                "hint": self.hint, "streams": self.streams,
                "batch_sizes": [*sorted(k for k in self.models if k is not None),
                                *(["any"] if None in self.models else [])],
                "threads": (int(c.get_property(props.inference_num_threads)) if c else self.threads) or "default",
                "cache_dir": str(self.cache_dir) if self.cache_dir else None}

    def close(self) -> None:
        for child in self._tasks.values():
            child.close()
        self._tasks.clear()
        if getattr(self, "_task_dir", None) is not None:
            shutil.rmtree(self._task_dir, ignore_errors=True)
            self._task_dir = None
        self.stream_requests = self.model = None
        self.models.clear()
