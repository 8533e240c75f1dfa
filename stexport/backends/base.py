"""The one interface every runtime implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from stexport.bundle import Bundle


def feed(clips: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 (B, T, H, W, 3) clips → what the graph takes, per the manifest's "input" record `spec`: unchanged
    for uint8 graphs, else float (B, T, 3, H, W) normalised host-side with the recorded mean/std."""
    if spec.get("dtype", "uint8") == "uint8":
        return np.ascontiguousarray(clips)
    mean = np.asarray(spec["mean"], np.float32).reshape(1, 1, 3, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, 1, 3, 1, 1)
    return np.ascontiguousarray((clips.transpose(0, 1, 4, 2, 3).astype(np.float32) / 255.0 - mean) / std)


class Backend(ABC):
    """Runs a bundle: uint8 RGB clips (B, T, H, W, 3) in, float32 logits (B, classes) out."""

    name: str = "?"

    def __init__(self, bundle: Bundle, **options):
        self.bundle = bundle
        self.options = options

    @classmethod
    def usable(cls, bundle: Bundle) -> bool:
        """Cheap check (no model load) whether this runtime can run `bundle` on this machine; used by 'auto'."""
        return True

    @abstractmethod
    def run(self, clips: np.ndarray) -> np.ndarray:
        """clips: uint8 array (B, T, H, W, 3) in the bundle's size and frame count."""

    def describe(self) -> dict:
        """What actually runs: runtime, device/provider, precision."""
        return {"backend": self.name, "precision": self.bundle.precision}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_input(self, clips: np.ndarray) -> np.ndarray:
        from stexport.errors import StexportError

        b = self.bundle
        want = (b.frames, b.size, b.size, 3)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != want:
            raise StexportError(f"clips must have shape (B, {', '.join(map(str, want))}), got {tuple(clips.shape)}")
        if clips.dtype != np.uint8:
            raise StexportError(f"clips must be uint8, got {clips.dtype}")
        return np.ascontiguousarray(clips)
