"""The PyTorch reference as a backend: what every exported artifact is compared with (needs stexport[export])."""

from __future__ import annotations

import numpy as np

from stexport.runtime.backends.base import THREADS, Backend, Option, register


@register("torch", artifact="deltas", tasks=True)  # the reference: never picked by `auto`
class TorchBackend(Backend):
    """A task pack runs as the reference rebuilt with the pack's delta state dict (one model per task)."""

    OPTIONS = (
        Option("device", str, "cpu", "torch device: cpu or cuda"),
        THREADS,
        Option("pretrained", str, None, "backbone weights for the reference, if the file the bundle was built "
               "from has moved"),
    )

    def __init__(self, bundle, device: str = "cpu", model=None, threads: int | None = None,
                 pretrained: str | None = None, **options):
        """model: an already-built reference (tests, verify); else it is rebuilt from the bundle's deltas and
        backbone record (`pretrained` overrides where the backbone weights are)."""
        super().__init__(bundle, **options)
        from stexport.extras import require

        require("torch backend", "torch", "open_clip")
        import torch

        from stexport.build.loaders import reference_for_bundle

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.pretrained = pretrained
        self.model = (model or reference_for_bundle(bundle, pretrained)).to(self.device)

    def prepare_task(self, pack):
        from stexport.build.loaders import task_reference

        return task_reference(self.bundle, pack, self.pretrained).to(self.device)

    def run(self, clips: np.ndarray, task=None) -> np.ndarray:
        import torch

        from stexport.build.reference import normalize

        _, model = self.task_state(task)
        with torch.inference_mode():
            x = normalize(torch.from_numpy(self.check_input(clips))).to(self.device)
            return (model or self.model)(x).float().cpu().numpy()

    def compute_precision(self) -> str:
        return "fp32"

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "reference": True}
