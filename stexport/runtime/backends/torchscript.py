"""TorchScript: the bundle's frozen `model.ts` run by libtorch from Python (the same file a C++ host loads).
CPU by default; CUDA when a GPU is visible to torch.

Task packs (a swappable FP32/FP16 bundle's module, see stexport.build.torchscript.SwappableModule): a task is the
pack's tensors as torch tensors on the device, in the order the module's record lists them, passed to
`forward_task` on each call for that task. One module serves every task and calls for different tasks may run
at once (nothing is swapped into the module, so there is no lock); a loaded task holds only its own tensors.
A multi-task bundle's module takes the task index of each clip as its second input (run_indexed)."""

from __future__ import annotations

import numpy as np

from stexport.runtime.backends.base import THREADS, Backend, Option, register
from stexport.errors import StexportError
from stexport.runtime.ts_runtime import embedded_input

DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str):
    """The torch device for `device` (auto: CUDA when torch sees a GPU); StexportError if unusable."""
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise StexportError(f"unknown device '{device}' for torchscript; choose one of: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StexportError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    return torch.device(device)


@register("torchscript", artifact="torchscript", tasks="a module exported from a swappable bundle")
class TorchScriptBackend(Backend):
    SWAPS_TASKS = False  # per instance: True when the module takes task packs (forward_task)
    MULTITASK = True  # a multi-task bundle's module is forward(x, task index)
    OPTIONS = (Option("device", str, "auto", "torch device: auto (CUDA when visible), cpu, cuda or cuda:N"), THREADS)

    def __init__(self, bundle, device: str = "auto", threads: int | None = None, **options):
        super().__init__(bundle, **options)
        from stexport.extras import require

        require("the torchscript backend", "torch")
        import torch

        from stexport.runtime.ts_runtime import load

        if threads:
            torch.set_num_threads(int(threads))
        self.device, self.threads = pick_device(device), threads
        path = bundle.file("torchscript")
        self.module, embedded = load(path, self.device)
        record = bundle.manifest.torchscript
        if record is None or not isinstance(embedded.get("torchscript"), dict):
            raise StexportError(f"{path}: has no stexport record (not exported by stexport); re-export it "
                                f"with `stexport export-torchscript {bundle.path} --force`")
        try:
            inp = embedded_input(embedded)
        except StexportError as e:
            raise StexportError(f"{path}: {e}; re-export it with `stexport export-torchscript {bundle.path} "
                                "--force`") from None
        if (inp.frames, inp.size) != (bundle.frames, bundle.size):
            raise StexportError(f"{path}: made for {inp.frames} frames of {inp.size} px, not the bundle's "
                                f"{bundle.frames} frames of {bundle.size} px; re-export it with "
                                f"`stexport export-torchscript {bundle.path} --force`")
        self.precision = record.precision
        self.task_names = (embedded["torchscript"].get("task_tensors") or None) if bundle.manifest.tasks else None
        if self.task_names and not hasattr(self.module, "forward_task"):
            raise StexportError(f"{path}: its record lists per-task tensors but the module has no forward_task; "
                                f"re-export it with `stexport export-torchscript {bundle.path} --force`")
        self.SWAPS_TASKS = bool(self.task_names)

    def load_task(self, task):
        """As Backend.load_task; a module that takes no packs says why and what to do."""
        if not self.SWAPS_TASKS and self.bundle.manifest.multitask is None:
            m = self.bundle.manifest
            why = ("the bundle is not swappable; rebuild it with `stexport build --swappable`" if m.tasks is None
                   else "an INT8 bundle's module holds float weights, not the pack's INT8 tensors; run INT8 packs "
                   "on onnxruntime or openvino" if m.precision == "int8"
                   else "its model.ts was exported before modules took task packs; re-export it with "
                   f"`stexport export-torchscript {self.bundle.path} --force`")
            raise StexportError(f"{self.bundle.path.name}: TorchScript runs no task packs here: {why}")
        return super().load_task(task)

    def prepare_task(self, pack):
        """The pack's tensors, in the module's order, as tensors of the module's types on its device.
        StexportError naming a tensor the module lacks, does not find, or holds in another shape."""
        import torch

        own = {n: getattr(self.module, f"task_{i}") for i, n in enumerate(self.task_names)}
        for name in pack.tensors:
            if name not in own:
                raise StexportError(f"{pack.path}: tensor '{name}' is not a per-task tensor of {self.bundle.path.name}"
                                    f"'s TorchScript module; make the pack against this bundle with `stexport pack`")
        out = []
        for name, mine in own.items():
            if name not in pack.tensors:
                raise StexportError(f"{pack.path}: no tensor '{name}', which the TorchScript module takes per "
                                    "task; make the pack against this bundle with `stexport pack`")
            a = pack.tensors[name]
            if tuple(a.shape) != tuple(mine.shape):
                raise StexportError(f"{pack.path}: tensor '{name}' has shape {list(a.shape)}, the module's "
                                    f"{list(mine.shape)}; make the pack against this bundle with `stexport pack`")
            out.append(torch.from_numpy(np.array(a, copy=True)).to(device=self.device, dtype=mine.dtype))
        return out

    def run_indexed(self, clips: np.ndarray, index: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(self.check_input(clips)).to(self.device)
            return self.module(x, torch.from_numpy(np.asarray(index, np.int64)).to(self.device)).float().cpu().numpy()

    def run(self, clips: np.ndarray, task=None) -> np.ndarray:
        import torch

        if self.bundle.manifest.multitask is not None:
            return self.run_multitask(clips, task)
        pack, tensors = self.task_state(task)
        with torch.inference_mode():
            x = torch.from_numpy(self.check_input(clips)).to(self.device)
            if tensors is None:
                return self.module(x).float().cpu().numpy()
            return self.trim(self.module.forward_task(x, tensors).float().cpu().numpy(), pack)

    def compute_precision(self) -> str:
        return self.precision

    def describe(self) -> dict:
        import torch

        return {**super().describe(), "device": str(self.device), "module_precision": self.precision,
                "threads": self.threads or torch.get_num_threads(), "task_tensors": len(self.task_names or ())}

    def close(self) -> None:
        self.module = None
