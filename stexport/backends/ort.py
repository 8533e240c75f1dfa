"""ONNX Runtime: the embedded default runtime. CPU provider by default; CUDA / TensorRT providers when the
installed onnxruntime has them and a GPU is visible."""

from __future__ import annotations

import logging

import numpy as np

from stexport import interrupt
from stexport.backends.base import THREADS, Backend, Option
from stexport.device import gpu_visible
from stexport.errors import StexportError

log = logging.getLogger("stexport")

LEVELS = ("disable", "basic", "extended", "all")
DEVICES = ("auto", "cpu", "cuda", "tensorrt")


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


class OrtBackend(Backend):
    """Task packs on a swappable bundle run through ONNX Runtime's adapter mechanism: each pack's tensors are
    written once as an ORT adapter file and activated per run call (RunOptions.add_active_adapter), overriding
    the graph's overridable initializers for that call only, so calls for different tasks interleave on one
    session (also from several threads). On INT8 bundles the backbone GEMMs' activation scales stay the base
    task's here (ORT fuses Q/DQ into integer GEMMs only around constant scales); OpenVINO takes the pack's."""

    name = "onnxruntime"
    SWAPS_TASKS = True
    OPTIONS = (
        Option("device", str, "auto", "execution provider: auto (CUDA/TensorRT providers when a GPU is visible), "
               "cpu, cuda or tensorrt", DEVICES),
        THREADS,
        Option("opt_level", str, "all", "graph optimisation level (FP16 graphs on CPU use extended)", LEVELS),
    )

    def __init__(self, bundle, device: str = "auto", threads: int | None = None, opt_level: str | None = None,
                 **options):
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
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.level, self.threads = level, threads
        path = bundle.file("onnx")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # noqa: BLE001
            interrupt.reraise(e)
            raise StexportError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]}); "
                                "rebuild the bundle with `stexport build --force`") from e
        graph_in = self.session.get_inputs()[0]
        self.check_graph(path, graph_in.name, list(graph_in.shape[1:]))

    @classmethod
    def usable(cls, bundle) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return bundle.has("onnx")

    def prepare_task(self, pack):
        """An ORT LoraAdapter holding the pack's tensors (memory-mapped from a file in a folder this backend
        owns and removes on close)."""
        import os
        import tempfile

        import onnxruntime as ort

        if getattr(self, "_adapter_dir", None) is None:
            self._adapter_dir = tempfile.mkdtemp(prefix="stexport-ort-adapters-")
        path = os.path.join(self._adapter_dir, f"{pack.key[:32]}.onnx_adapter")
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

    def run(self, clips: np.ndarray, task=None) -> np.ndarray:
        x = self.input.feed(clips)
        pack, adapter = self.task_state(task)
        options = None
        if adapter is not None:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_active_adapter(adapter)
        out = self.session.run(None, {self.input.name: x}, options)[0]
        return self.trim(out.astype(np.float32, copy=False), pack)

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.session.get_providers(), "optimization": self.level,
                "threads": self.threads or "default"}

    def close(self) -> None:
        self.session = None
        self._tasks.clear()
        folder = getattr(self, "_adapter_dir", None)
        if folder:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            self._adapter_dir = None
