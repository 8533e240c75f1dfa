"""TorchScript: the bundle's frozen `model.ts` run by libtorch from Python (the same file a C++ host loads).
CPU by default; CUDA when a GPU is visible to torch."""

from __future__ import annotations

import numpy as np

from stexport.backends.base import THREADS, Backend, Option
from stexport.errors import StexportError
from stexport.ts_runtime import embedded_input

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


class TorchScriptBackend(Backend):
    name = "torchscript"
    OPTIONS = (Option("device", str, "auto", "torch device: auto (CUDA when visible), cpu, cuda or cuda:N"), THREADS)

    def __init__(self, bundle, device: str = "auto", threads: int | None = None, **options):
        super().__init__(bundle, **options)
        from stexport.extras import require

        require("the torchscript backend", "torch")
        import torch

        from stexport.ts_runtime import load

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

    @classmethod
    def usable(cls, bundle) -> bool:
        return bundle.has("torchscript")

    def run(self, clips: np.ndarray, task=None) -> np.ndarray:
        import torch

        self.task_state(task)  # model.ts is frozen: a task pack is refused (load_task) with what to use

        with torch.inference_mode():
            x = torch.from_numpy(self.check_input(clips)).to(self.device)
            return self.module(x).float().cpu().numpy()

    def compute_precision(self) -> str:
        return self.precision

    def describe(self) -> dict:
        import torch

        return {**super().describe(), "device": str(self.device), "module_precision": self.precision,
                "threads": self.threads or torch.get_num_threads()}

    def close(self) -> None:
        self.module = None
