"""TorchScript: the bundle's frozen `model.ts` run by libtorch from Python (the same file a C++ host loads).
CPU by default; CUDA when a GPU is visible to torch."""

from __future__ import annotations

import numpy as np
import torch

from stexport.backends.base import Backend
from stexport.errors import StexportError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str) -> torch.device:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise StexportError(f"unknown device '{device}' for torchscript; choose one of: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StexportError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    return torch.device(device)


class TorchScriptBackend(Backend):
    name = "torchscript"

    def __init__(self, bundle, device: str = "auto", threads: int | None = None, **options):
        super().__init__(bundle, **options)
        from stexport.torchscript import load

        if threads:
            torch.set_num_threads(int(threads))
        self.device, self.threads = pick_device(device), threads
        path = bundle.file("torchscript")
        self.module, embedded = load(path, self.device)
        record = embedded.get("torchscript")
        if not record:
            raise StexportError(f"{path}: has no stexport record (not exported by stexport); re-export it "
                                f"with `stexport export-torchscript {bundle.path} --force`")
        shape = record.get("input", {}).get("shape", [])
        if shape[1:4] != [bundle.frames, bundle.size, bundle.size]:
            raise StexportError(f"{path}: made for clips of shape {shape}, not the bundle's {bundle.frames} "
                                f"frames of {bundle.size} px; re-export it with "
                                f"`stexport export-torchscript {bundle.path} --force`")
        self.precision = record.get("precision", "fp32")

    @classmethod
    def usable(cls, bundle) -> bool:
        return bundle.has("torchscript")

    @torch.inference_mode()
    def run(self, clips: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(self.check_input(clips)).to(self.device)
        return self.module(x).float().cpu().numpy()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "threads": self.threads or torch.get_num_threads()}

    def close(self) -> None:
        self.module = None
