"""The PyTorch reference as a backend: what every exported artifact is compared with."""

from __future__ import annotations

import numpy as np
import torch

from stexport.backends.base import Backend
from stexport.reference import normalize


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle, device: str = "cpu", model=None, threads: int | None = None, **options):
        super().__init__(bundle, **options)
        from stexport.loaders import reference_for_bundle

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = (model or reference_for_bundle(bundle, options.get("pretrained"))).to(self.device)

    @torch.inference_mode()
    def run(self, clips: np.ndarray) -> np.ndarray:
        x = normalize(torch.from_numpy(self.check_input(clips))).to(self.device)
        return self.model(x).float().cpu().numpy()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "precision": "fp32 (reference)"}
