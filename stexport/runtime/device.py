"""Device facts shared by runtimes, found without importing any of them."""

from __future__ import annotations

import functools
import os
import platform
import shutil
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo flags of CPUs with int8 dot products


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process (device nodes or nvidia-smi; CUDA_VISIBLE_DEVICES
    set to '' or -1 hides it). Imports nothing."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if Path("/dev/nvidia0").exists():
        return True
    return Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is not None


@functools.lru_cache(maxsize=1)
def int8_sums_saturate(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this is an x86-64 CPU without VNNI (SSE4.1 or AVX2 only, or AVX-512 without VNNI; its flags
    read from `cpuinfo`). There the INT8 GEMM kernels of ONNX Runtime (U8S8, unless session.x64quantprecision)
    and of OpenVINO's CPU plugin add pairs of u8×s8 products in saturating 16-bit lanes (VPMADDUBSW), so an
    INT8 model's answers change wherever activations and weights are both near the ends of their ranges (see
    stexport.runtime.backends.ort.session_options). False elsewhere (ARM, CPUs with VNNI or AMX) and where the
    flags cannot be read. Imports nothing."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not any(v in flags for v in VNNI_FLAGS)
