"""ONNX Runtime: the embedded default runtime. CPU provider by default; CUDA / TensorRT providers when the
installed onnxruntime has them and a GPU is visible."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stexport import interrupt
from stexport.runtime.backends.base import THREADS, Backend, Option, register
from stexport.runtime.device import gpu_visible
from stexport.errors import StexportError

log = logging.getLogger("stexport")

LEVELS = ("disable", "basic", "extended", "all")
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
TASK_MODES = ("auto", "adapters", "sessions")
INT8_GEMMS = ("exact", "fast")
_LEVEL_NAMES = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}


def session_options(level: str = "all", threads: int | None = None, int8_gemms: str = "exact"):
    """The onnxruntime.SessionOptions of every ONNX Runtime session stexport makes (the onnxruntime backend,
    verify's and the INT8 float fallback's graph sessions, calibration, the FP16 check), so that what build
    measures is what the runtime runs. level: one of LEVELS; threads: intra-op threads (None: ORT's default).

    int8_gemms: 'exact' sets ONNX Runtime's `session.x64quantprecision`
    (onnxruntime_session_options_config_keys.h, kOrtSessionOptionsAvx2PrecisionMode). On x86-64 CPUs without
    VNNI (AVX2; AVX-512 without VNNI) ORT's U8S8 integer GEMM adds pairs of u8×s8 products in saturating
    16-bit lanes (VPMADDUBSW); with activations and weights near the ends of their ranges the sums clip and
    INT8 answers change (on this project's AVX2 EPYC the demo INT8 bundle's mean |Δlogit| against the PyTorch
    reference is 0.146 with U8S8, 0.106 with U8U8; docs/guides/runtimes.md). 'exact' runs those GEMMs as U8U8,
    slower on such CPUs only; 'fast' keeps U8S8. CPUs with VNNI or AMX, ARM CPUs and GPU providers are
    unaffected either way. StexportError for another int8_gemms."""
    import onnxruntime as ort

    if int8_gemms not in INT8_GEMMS:
        raise StexportError(f"onnxruntime option int8_gemms={int8_gemms}: choose one of "
                            f"{', '.join(INT8_GEMMS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVEL_NAMES[level])
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if int8_gemms == "exact":
        so.add_session_config_entry("session.x64quantprecision", "1")
    return so


def providers_for(device: str, available: list[str]) -> list[str]:
    """Execution providers to ask for, best first; CPU is always the last resort."""
    if device not in DEVICES:
        raise StexportError(f"unknown device '{device}' for onnxruntime; choose one of: {', '.join(DEVICES)}")
    want = {"auto": ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if gpu_visible() else [],
            "cpu": [], "cuda": ["CUDAExecutionProvider"],
            "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}[device]
    missing = [p for p in want if p not in available]
    if device in ("cuda", "tensorrt") and (missing == want or not gpu_visible()):
        raise StexportError(f"--device {device}: onnxruntime here offers only {', '.join(available)}"
                            f"{'' if gpu_visible() else ' and no GPU is visible'}; "
                            "install onnxruntime-gpu on a CUDA machine, or use --device cpu")
    return [p for p in want if p in available] + ["CPUExecutionProvider"]


@register("onnxruntime", artifact="onnx", auto=10, auto_note="ONNX Runtime", tasks=True)
class OrtBackend(Backend):
    MULTITASK = True  # a multi-task bundle runs as a plain session with its task input fed per call

    """Task packs on a swappable bundle, two ways (option `tasks`):

    - adapters: ONNX Runtime's adapter mechanism. Each pack's tensors are written once as an ORT adapter file
      and activated per run call (RunOptions.add_active_adapter), overriding the graph's overridable
      initializers for that call only, so calls for different tasks interleave on one session (also from
      several threads), at one backbone's memory for all tasks. Exact for FP32/FP16. On INT8 bundles only the
      adapters' tensors and scales are overridable, so the backbone GEMMs keep the base task's activation
      scales, and ORT cannot fuse the adapters' Q/DQ around non-constant scales (slower than a plain bundle).
    - sessions: a session per task, made from the bundle's graph with all of the pack's tensors (for INT8 also
      its backbone activation scales) as constants: a full export's logits and speed, a backbone's memory per
      task; calls for different tasks still interleave (each on its task's session).

    auto (the default): adapters for FP32/FP16 bundles, sessions for INT8 ones."""

    OPTIONS = (
        Option("device", str, "auto", "execution provider: auto (CUDA/TensorRT providers when a GPU is visible), "
               "cpu, cuda or tensorrt", DEVICES),
        THREADS,
        Option("opt_level", str, "all", "graph optimisation level (FP16 graphs on CPU use extended)", LEVELS),
        Option("tasks", str, "auto", "how task packs run on a swappable bundle: adapters (one session, a task "
               "per run call; INT8 keeps the base's backbone activation scales), sessions (a session per task, "
               "exact; a backbone's memory each), auto (adapters for FP32/FP16, sessions for INT8)", TASK_MODES),
        Option("int8_gemms", str, "exact", "INT8 GEMMs on x86 CPUs without VNNI (AVX2, AVX-512 without "
               "VNNI): exact (U8U8) or fast (U8S8: 16-bit sums saturate and can change answers); other CPUs "
               "and GPUs are unaffected", INT8_GEMMS),
    )

    def __init__(self, bundle, device: str = "auto", threads: int | None = None, opt_level: str | None = None,
                 tasks: str = "auto", int8_gemms: str = "exact", **options):
        super().__init__(bundle, **options)
        import onnxruntime as ort

        self.providers = providers_for(device, ort.get_available_providers())
        level = opt_level or "all"
        if level not in LEVELS:
            raise StexportError(f"unknown optimisation level '{level}'; choose one of: {', '.join(LEVELS)}")
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        if level == "all" and on_cpu and bundle.manifest.float_precision == "fp16":
            # ORT 1.32's CPU provider segfaults on FP16 ViT graphs at ORT_ENABLE_ALL.
            if opt_level == "all":
                log.warning("ORT's CPU provider cannot run FP16 graphs (or INT8 ones with FP16 float parts) at "
                            "level 'all'; using 'extended'")
            level = "extended"
        so = session_options(level, threads, int8_gemms)
        self.so, self.level, self.threads, self.int8_gemms = so, level, threads, int8_gemms
        if tasks not in TASK_MODES:
            raise StexportError(f"unknown tasks mode '{tasks}'; choose one of: {', '.join(TASK_MODES)}")
        m = bundle.manifest
        if tasks != "auto" and m.tasks is None:  # it would change nothing: say so rather than ignore it
            kind = ("a multi-task bundle (every task in one graph)" if m.multitask is not None
                    else "a plain bundle (its own task only)")
            raise StexportError(f"onnxruntime option tasks={tasks}: {bundle.path.name} is {kind}, not a swappable "
                                "one; the option picks how task packs run: drop it")
        if tasks == "auto":
            tasks = "sessions" if m.precision == "int8" else "adapters"
        self.task_mode = tasks if m.tasks is not None else None
        self._scratch = None
        path = bundle.file("onnx")
        if self.task_mode == "sessions":
            try:  # the bundle's own task as constants too: Q/DQ fused as in a plain bundle
                self.session = self._constant_session(None, shown=path)
            except BaseException:
                self.close()
                raise
        else:
            self.session = self._session(path)
        graph_in = self.session.get_inputs()[0]
        self.check_graph(path, graph_in.name, list(graph_in.shape[1:]))

    def _session(self, model, shown=None):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(model), self.so, providers=self.providers)
        except Exception as e:
            interrupt.reraise(e)
            raise StexportError(f"{shown or model}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]}); "
                                "rebuild the bundle with `stexport build --force`") from e

    def _scratch_dir(self) -> str:
        """A folder this backend owns (task graphs, adapter files) and removes on close."""
        import tempfile

        if self._scratch is None:
            import shutil
            import weakref

            self._scratch = tempfile.mkdtemp(prefix="stexport-ort-tasks-")
            # also when the backend is dropped without close(), and at interpreter exit
            weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)
        return self._scratch

    def _constant_session(self, pack, shown):
        """A session of the bundle's graph with the pack's tensors (pack None: the bundle's own) replacing its
        initializers and no overridable ones."""
        import os

        from stexport.bundle.taskpack import task_graph

        out = Path(os.path.join(self._scratch_dir(), f"{pack.key[:32] if pack else 'own'}.onnx"))
        session = self._session(task_graph(self.bundle.file("onnx"), pack, out, constant=True), shown=shown)
        if not Path(f"{out}.data").exists():
            out.unlink()  # parsed into the session; a graph with external weights may be read from its file
        return session

    @classmethod
    def usable(cls, bundle) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return bundle.has("onnx")

    def prepare_task(self, pack):
        """sessions: an InferenceSession of the bundle's graph with all of the pack's tensors as constants.
        adapters: an ORT LoraAdapter holding the pack's overridable tensors (memory-mapped from a file in this
        backend's scratch folder)."""
        import os

        import onnxruntime as ort

        if self.task_mode == "sessions":
            return self._constant_session(pack, shown=pack.path)
        path = os.path.join(self._scratch_dir(), f"{pack.key[:32]}.onnx_adapter")
        # an OrtValue made from numpy reads the array's memory without owning it: keep the arrays alive
        over = {t.name for t in pack.record.tensors if t.overridable}  # the graph's overridable initializers
        arrays = {n: np.array(a, order="C") for n, a in pack.tensors.items() if n in over}  # copies; 0-d stays
        fmt = ort.AdapterFormat()
        fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()})
        fmt.export_adapter(path)
        del fmt, arrays
        adapter = ort.LoraAdapter()
        adapter.Load(path)
        return adapter

    def run_indexed(self, clips: np.ndarray, index: np.ndarray) -> np.ndarray:
        feed = {self.input.name: self.input.feed(clips), self.bundle.manifest.multitask.input: index}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)

    def run(self, clips: np.ndarray, task=None) -> np.ndarray:
        if self.bundle.manifest.multitask is not None:
            return self.run_multitask(clips, task)
        x = self.input.feed(clips)
        pack, state = self.task_state(task)
        session, options = self.session, None
        if state is not None and self.task_mode == "sessions":
            session = state
        elif state is not None:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_active_adapter(state)
        out = session.run(None, {self.input.name: x}, options)[0]
        return self.trim(out.astype(np.float32, copy=False), pack)

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.session.get_providers(), "optimization": self.level,
                "threads": self.threads or "default", **({"tasks": self.task_mode} if self.task_mode else {}),
                **({"int8_gemms": self.int8_gemms} if self.bundle.precision == "int8" else {})}

    def close(self) -> None:
        self.session = None
        self._tasks.clear()
        if self._scratch:
            import shutil

            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
