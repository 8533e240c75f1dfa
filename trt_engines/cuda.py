"""Device memory, pinned host memory and one stream: through cuda-python (default) or pycuda.

cuda-python is NVIDIA's `cuda-bindings` wheel; its runtime module moved from `cuda.cudart` (before 12.6) to
`cuda.bindings.runtime`, and both layouts are accepted. pycuda ships no wheels and needs a CUDA toolkit to
build; it is used when asked for (or when cuda-python is missing) and then works on the device's primary
context, the one the CUDA runtime and TensorRT use.
"""

from __future__ import annotations

import ctypes
import re
from importlib import metadata
from pathlib import Path

import numpy as np

from stexport.errors import StexportError

KINDS = ("cuda-python", "pycuda")

# The oldest Linux driver of each CUDA major (NVIDIA's CUDA compatibility tables): a CUDA 13 build of TensorRT
# or cuda-python cannot run on a 570 driver, which supports CUDA 12 only.
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}
# Wheels whose name says the CUDA major they are built for; cuda-python's major is its version's major.
CUDA_WHEELS = ("tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-libs", "tensorrt-cu13-libs",
               "tensorrt-cu12-bindings", "tensorrt-cu13-bindings")
CUDA_PYTHON = ("cuda-python", "cuda-bindings")


def driver_cuda_version() -> int | None:
    """The CUDA version the installed NVIDIA driver supports (e.g. 12040 for 12.4), from libcuda's
    cuDriverGetVersion (no CUDA context is made); None without a driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    return v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0 else None


def driver_version(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The NVIDIA kernel driver's version ("550.54.15"), or None."""
    try:
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def wheel_cuda_majors() -> dict[str, int]:
    """{distribution: CUDA major it is built for} for the installed TensorRT and cuda-python wheels."""
    out = {}
    for name in (*CUDA_WHEELS, *CUDA_PYTHON):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        m = re.search(r"-cu(\d+)", name)
        major = int(m.group(1)) if m else int(re.match(r"\d+", version).group(0)) if re.match(r"\d+", version) else 0
        if major:
            out[f"{name} {version}"] = major
    return out


def cuda_mismatch(driver_cuda: int | None, wheels: dict[str, int], driver: str | None = None) -> str | None:
    """Why the installed wheels cannot run on this driver (one line naming both and the fix), or None.

    driver_cuda: driver_cuda_version() (12040 = CUDA 12.4); wheels: wheel_cuda_majors()."""
    if not driver_cuda:
        return None
    have = driver_cuda // 1000
    newer = {w: m for w, m in wheels.items() if m > have}
    if not newer:
        return None
    wheel, want = max(newer.items(), key=lambda kv: kv[1])
    shown = f"{have}.{driver_cuda % 1000 // 10}"
    extra = f"stexport[tensorrt-cu{have}]" if have in MIN_DRIVER else "a TensorRT build for this CUDA"
    return (f"{wheel} is built for CUDA {want}, but this host's NVIDIA driver{' ' + driver if driver else ''} "
            f"supports CUDA {shown} at most: pip install '{extra}' (TensorRT and cuda-python for CUDA {have}), "
            f"or update the driver to {MIN_DRIVER.get(want, 'a newer one')} or newer")


def host_mismatch() -> str | None:
    """cuda_mismatch for this host (None where there is no driver or nothing mismatches)."""
    return cuda_mismatch(driver_cuda_version(), wheel_cuda_majors(), driver_version())


def cudart():
    """The cuda-python runtime module, from either import layout."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python < 12.6
    return runtime


class CudaPython:
    kind = "cuda-python"

    def __init__(self, device: int = 0):
        self.rt = cudart()
        self.device = device
        self._device_mem: list[int] = []
        self._host_mem: list[int] = []
        self._streams: list = []
        try:
            count = self._call("cudaGetDeviceCount")
        except StexportError as e:
            raise StexportError(f"no usable CUDA GPU here ({str(e).removeprefix('CUDA ')})") from e
        if not 0 <= device < count:
            raise StexportError(f"no CUDA device {device} (this host has {count})")
        self._call("cudaSetDevice", device)

    def _call(self, fn: str, *args):
        err, *out = getattr(self.rt, fn)(*args)
        if err != self.rt.cudaError_t.cudaSuccess:
            _, msg = self.rt.cudaGetErrorString(err)
            raise StexportError(f"CUDA {fn} failed: {getattr(err, 'name', err)} "
                                f"({msg.decode(errors='replace') if isinstance(msg, bytes) else msg})")
        return out[0] if len(out) == 1 else tuple(out)

    def info(self) -> tuple[str, str]:
        """GPU name and compute capability ("9.0")."""
        prop = self._call("cudaGetDeviceProperties", self.device)
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"

    def stream(self) -> int:
        s = self._call("cudaStreamCreate")
        self._streams.append(s)
        return int(s)

    def malloc(self, nbytes: int) -> int:
        ptr = int(self._call("cudaMalloc", nbytes))
        self._device_mem.append(ptr)
        return ptr

    def pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array (transfers from it run asynchronously at full speed)."""
        ptr = int(self._call("cudaMallocHost", nbytes))
        self._host_mem.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))

    def h2d(self, dst: int, src: np.ndarray, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes, kind, stream)

    def d2h(self, dst: np.ndarray, src: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes, kind, stream)

    def sync(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", stream)

    def close(self) -> None:
        for ptr in self._device_mem:
            self.rt.cudaFree(ptr)
        for ptr in self._host_mem:
            self.rt.cudaFreeHost(ptr)
        for s in self._streams:
            self.rt.cudaStreamDestroy(s)
        self._device_mem, self._host_mem, self._streams = [], [], []


class PyCuda:
    kind = "pycuda"

    def __init__(self, device: int = 0):
        import pycuda.driver as drv

        self.drv = drv
        self._keep: list = []
        self.ctx = None
        try:
            drv.init()
            count = drv.Device.count()
            if not 0 <= device < count:
                raise StexportError(f"no CUDA device {device} (this host has {count})")
            self.dev = drv.Device(device)
            self.ctx = self.dev.retain_primary_context()
            try:
                self.ctx.push()
            except drv.Error:
                self.ctx.detach()
                self.ctx = None
                raise
        except drv.Error as e:
            raise StexportError(f"CUDA (pycuda) failed: {e}") from e

    def info(self) -> tuple[str, str]:
        major, minor = self.dev.compute_capability()
        return self.dev.name(), f"{major}.{minor}"

    def stream(self) -> int:
        s = self.drv.Stream()
        self._keep.append(s)
        return s.handle

    def _stream(self, handle: int):
        return next(s for s in self._keep if isinstance(s, self.drv.Stream) and s.handle == handle)

    def malloc(self, nbytes: int) -> int:
        mem = self.drv.mem_alloc(nbytes)
        self._keep.append(mem)
        return int(mem)

    def pinned(self, nbytes: int) -> np.ndarray:
        arr = self.drv.pagelocked_empty(nbytes, np.uint8)
        self._keep.append(arr)
        return arr

    def h2d(self, dst: int, src: np.ndarray, stream: int) -> None:
        self.drv.memcpy_htod_async(dst, src, self._stream(stream))

    def d2h(self, dst: np.ndarray, src: int, stream: int) -> None:
        self.drv.memcpy_dtoh_async(dst, src, self._stream(stream))

    def sync(self, stream: int) -> None:
        self._stream(stream).synchronize()

    def close(self) -> None:
        for obj in reversed(self._keep):
            if hasattr(obj, "free"):
                obj.free()
        self._keep = []
        if getattr(self, "ctx", None) is not None:
            # pop it off this thread, then release the retain (retain_primary_context holds a reference
            # until detach(): without it every open leaks one and the primary context is never freed)
            ctx, self.ctx = self.ctx, None
            try:
                ctx.pop()
            finally:
                ctx.detach()


def open_device(kind: str | None = None, device: int = 0):
    """cuda-python by default; pycuda when asked for, or when cuda-python is not installed."""
    if kind not in (None, *KINDS):
        raise StexportError(f"unknown CUDA binding '{kind}'; choose one of: {', '.join(KINDS)}")
    order = [kind] if kind else list(KINDS)
    missing = []
    for k in order:
        try:
            cls = CudaPython if k == "cuda-python" else PyCuda
            if k == "cuda-python":
                cudart()
            else:
                import pycuda.driver  # noqa: F401
        except ImportError as e:
            missing.append(f"{k} ({e})")
            continue
        return cls(device)
    raise StexportError(f"no CUDA Python binding importable: {'; '.join(missing)}; "
                        "install stexport[tensorrt] (cuda-python) or stexport[pycuda]")
