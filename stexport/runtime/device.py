"""Device facts shared by runtimes, found without importing any of them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process (device nodes or nvidia-smi; CUDA_VISIBLE_DEVICES
    set to '' or -1 hides it). Imports nothing."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if Path("/dev/nvidia0").exists():
        return True
    return Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is not None
