"""The TensorRT backend: the bundle's engine for this GPU, fed through pinned buffers on one CUDA stream.

Opening checks compatibility first (TensorRT version, GPU, ONNX hash; see record.py): an engine built
elsewhere is rebuilt here with a message or, when that is impossible, opening fails with the exact reason (and
`auto` falls back to the next backend). Running uses the tensor-name I/O API: set_input_shape,
set_tensor_address, execute_async_v3. uint8 clips go to the GPU as uint8; buffers are sized once for the
profile's largest batch and reused, and bigger batches run in chunks.

Task packs (swappable FP32/FP16 bundles): the engine is built with the per-task tensors refittable
(refit.py), holds one task at a time, and run(clips, task=X) refits it when X is not the task it holds; runs
and refits are serialised by a lock. The bundle's own tensors are read from its ONNX the first time the engine
switches away from them, to switch back.

Multi-task bundles (stexport.bundle.multitask): the task is data, not weights. The engine has a second input,
the task index of each clip (int64 [B], its batch range the clips'; record.profile_shapes), fed beside the
clips on every call, so one call mixes tasks and nothing is refitted (INT8 included).
"""

from __future__ import annotations

import importlib.util
import logging
import threading

import numpy as np
from stexport.trt_engines.cache import onnx_identity, records
from stexport.trt_engines.engine import ensure_engine  # the runtime's one way into the build side
from stexport.trt_engines.trt import import_tensorrt, last_error, logger_for
from stexport.trt_engines import cuda as cuda_mod
from stexport.trt_engines.cuda import open_device
from stexport.trt_engines.record import (Host, batch_shapes, choose, input_shape, max_batch, pick_profile,
                                         record_profiles, request, task_input)
from stexport.trt_engines.refit import host_weights, needs_switch, no_tasks_reason, refit_engine, refit_names

from stexport.runtime.backends.base import Backend, Option, register
from stexport.errors import StexportError
from stexport.bundle.manifest import InputRecord, Manifest

log = logging.getLogger("stexport")


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) chunks of at most `size` covering range(n)."""
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def engine_input(clips: np.ndarray, inp: InputRecord, dtype: np.dtype) -> np.ndarray:
    """What the engine's input tensor takes: uint8 clips unchanged (normalisation is in the graph), or for
    float-input bundles normalised (B, T, 3, H, W) computed on the host."""
    if inp.dtype == "uint8" and dtype != np.uint8:
        raise StexportError(f"the engine takes {dtype} input but the bundle says uint8; "
                            "rebuild the engine with `stexport engine BUNDLE --force`")
    return inp.feed(clips).astype(dtype, copy=False)


def io_names(inputs: list[str], outputs: list[str], manifest: Manifest) -> tuple[str, str]:
    """(clips input, logits output) of an engine whose I/O tensors are `inputs` → `outputs`; StexportError
    unless they are the bundle's (a multi-task bundle's task input included: task_input)."""
    want_in, want_out = manifest.input.name, manifest.output.name
    index = task_input(manifest)
    want = sorted([want_in] + ([index] if index else []))
    if sorted(inputs) != want or outputs != [want_out]:
        raise StexportError(f"the engine's tensors {inputs} → {outputs} are not the bundle's "
                            f"{want} → {want_out}; rebuild it with `stexport engine BUNDLE --force`")
    return want_in, want_out


_said: set[tuple[str, str]] = set()


def passed_over(bundle, why: str) -> None:
    """Log why `auto` did not pick TensorRT, once per bundle and reason: a warning where a GPU is visible (the
    user may expect it), else info (`stexport -v` shows it; a CPU host has nothing to fix)."""
    try:
        from stexport.runtime.device import gpu_visible

        gpu = gpu_visible()
    except Exception:  # noqa: BLE001
        gpu = False
    key = (str(bundle.path), why)
    if key in _said:
        return
    _said.add(key)
    (log.warning if gpu else log.info)("auto: not using TensorRT for %s: %s", bundle.path.name, why)


@register("tensorrt", artifact="onnx", auto=30, auto_note="a TensorRT engine for this GPU",
          tasks="FP32/FP16 bases with a refittable engine")
class TensorRTBackend(Backend):
    MULTITASK = True  # a multi-task bundle's engine takes the task index as its second input
    OPTIONS = (
        Option("batch", int, None, "largest batch the engine takes when one is built here (default: the "
               "bundle's saved setting, else 32)"),
        Option("build", bool, True, "build an engine for this GPU when the bundle has none that fits"),
        Option("cuda", str, None, "CUDA binding: cuda-python (default) or pycuda", ("cuda-python", "pycuda")),
        Option("gpu", int, 0, "CUDA device index"),
    )

    def __init__(self, bundle, batch: int | None = None, build: bool = True, cuda: str | None = None,
                 gpu: int = 0, progress: bool = False, **options):
        super().__init__(bundle, **options)
        why = cuda_mod.host_mismatch()  # before importing a TensorRT that cannot load on this driver
        if why:
            raise StexportError(f"TensorRT cannot run here: {why}")
        trt = import_tensorrt()
        self.trt = trt
        self.cuda = open_device(cuda, gpu)
        self.context = self.engine = self.runtime = self.dev_in = self.dev_index = None
        self.lock = threading.Lock()  # one task in the engine at a time: runs and refits take turns
        self.holding = None  # the task the engine holds: a pack's key, None for the bundle's own
        self._own: dict | None = None  # the bundle's own per-task tensors, read when first switching away
        try:
            self._open(trt, batch, build, progress)
        except BaseException:
            self.close()
            raise

    @classmethod
    def unusable_reason(cls, bundle) -> str | None:
        """Why `auto` cannot pick TensorRT for `bundle` here (cheap: no TensorRT import, no CUDA context), or
        None: TensorRT installed, a GPU visible, a driver for the wheels' CUDA, and an engine or a request."""
        from stexport.runtime.device import gpu_visible

        if not gpu_visible():
            return "no NVIDIA GPU is visible (TensorRT runs on NVIDIA GPUs only)"
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed (pip install 'stexport[tensorrt]')"
        why = cuda_mod.host_mismatch()
        if why:
            return why
        if not bundle.has("onnx"):
            return "the bundle has no ONNX model"
        if not (records(bundle) or request(bundle.manifest)):
            return f"the bundle has no TensorRT engine yet (build one: stexport engine {bundle.path})"
        return None

    @classmethod
    def usable(cls, bundle) -> bool:
        """Whether `auto` may pick TensorRT; when not and a GPU is visible, says why once (warning)."""
        try:
            why = cls.unusable_reason(bundle)
        except Exception as e:  # noqa: BLE001 - `auto` must never fail here
            why = f"{type(e).__name__}: {e}"
        if why:
            passed_over(bundle, why)
        return why is None

    def _select(self, trt, batch: int | None, build: bool, progress: bool) -> dict:
        b = self.bundle
        rec, why = choose(records(b), self.host, onnx_identity(b), batch, refit_names(b.manifest))
        if rec is not None:
            if why:
                log.info(why)
            return rec
        if not build:
            raise StexportError(f"{b.path}: no TensorRT engine for {self.host}: {why}; "
                                f"build one with `stexport engine {b.path}`")
        log.warning(f"{b.path.name}: building a TensorRT engine for {self.host} ({why}); "
                    "this happens once and takes a few minutes")
        try:
            return ensure_engine(b, trt, self.host, batch=batch, progress=progress)[0]
        except StexportError as e:
            raise StexportError(f"{b.path.name}: {why}, and rebuilding it here failed: {e}") from e

    def _open(self, trt, batch, build, progress) -> None:
        b = self.bundle
        self.host = Host(trt.__version__, *self.cuda.info())
        self.record = self._select(trt, batch, build, progress)
        self.refit = self.record.get("refit") or None
        self.SWAPS_TASKS = bool(self.refit)  # task packs need an engine built refittable (refit.py)
        path = b.path / self.record["file"]
        logger = logger_for(trt)
        mark = len(logger.errors)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise StexportError(f"{path}: TensorRT {trt.__version__} cannot load this engine "
                                f"({last_error(logger, mark)}); "
                                f"rebuild it with `stexport engine {b.path} --force`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise StexportError(f"{path}: TensorRT could not create an execution context "
                                "(out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.in_name, self.out_name = io_names([n for n in names if is_input[n]],
                                               [n for n in names if not is_input[n]], b.manifest)
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.in_name)))
        self.index_name = task_input(b.manifest)
        if self.index_name is not None:  # TensorRT 10 takes INT64 inputs; an engine may have been made with INT32
            self.index_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.index_name)))
            if self.index_dtype.kind != "i":
                raise StexportError(f"{path}: the engine's task input '{self.index_name}' is {self.index_dtype}, "
                                    f"not an integer; rebuild it with `stexport engine {b.path} --force`")
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.out_name)))
        self.max_batch = max_batch(self.record)
        self.profiles = record_profiles(self.record)
        count = getattr(self.engine, "num_optimization_profiles", len(self.profiles))
        if count != len(self.profiles):
            raise StexportError(f"{path}: the engine has {count} optimisation profiles, its record "
                                f"{len(self.profiles)}; rebuild it with `stexport engine {b.path} --force`")
        self.active = 0  # a new execution context starts on profile 0
        self.sample = input_shape(b.manifest.input)
        self.stream = self.cuda.stream()
        out_max = self._set_batch(self.max_batch)
        in_bytes = self.max_batch * int(np.prod(self.sample)) * self.in_dtype.itemsize
        out_bytes = int(np.prod(out_max)) * self.out_dtype.itemsize
        self.host_in, self.dev_in = self.cuda.pinned(in_bytes), self.cuda.malloc(in_bytes)
        self.host_out, self.dev_out = self.cuda.pinned(out_bytes), self.cuda.malloc(out_bytes)
        if self.index_name is not None:
            index_bytes = self.max_batch * self.index_dtype.itemsize
            self.host_index, self.dev_index = self.cuda.pinned(index_bytes), self.cuda.malloc(index_bytes)
        self._bind()

    def _bind(self) -> None:
        bound = [(self.in_name, self.dev_in), (self.out_name, self.dev_out)]
        if self.index_name is not None:
            bound.append((self.index_name, self.dev_index))
        for name, ptr in bound:
            if not self.context.set_tensor_address(name, ptr):
                raise StexportError(f"TensorRT refused the device address for tensor '{name}'")

    def _set_batch(self, n: int) -> tuple[int, ...]:
        """Switch to the profile made for a batch of n (the one tuned nearest n), set the input shape; return
        the output shape it gives."""
        want = pick_profile(self.profiles, n)
        if want != self.active:
            if not self.context.set_optimization_profile_async(want, self.stream):
                raise StexportError(f"TensorRT refused to switch to optimisation profile {want} (batch {n})")
            self.active = want
            if getattr(self, "dev_in", None) is not None:
                self._bind()
        p = self.profiles[want]
        for name, shape in batch_shapes(p, n).items():
            if not self.context.set_input_shape(name, shape):
                raise StexportError(f"TensorRT refused input shape {shape} for '{name}' (engine profile {want}: "
                                    f"batch {p['min'][0]} to {p['max'][0]})")
        return tuple(self.context.get_tensor_shape(self.out_name))

    def _run_chunk(self, x: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        """One chunk of at most max_batch clips (`index`: their task indices on a multi-task engine)."""
        host_in = self.host_in[:x.nbytes].view(x.dtype).reshape(x.shape)
        np.copyto(host_in, x)
        self.cuda.h2d(self.dev_in, host_in, self.stream)
        if self.index_name is not None:
            idx = np.asarray(index, self.index_dtype)
            host_index = self.host_index[:idx.nbytes].view(idx.dtype)
            np.copyto(host_index, idx)
            self.cuda.h2d(self.dev_index, host_index, self.stream)
        shape = self._set_batch(len(x))
        if not self.context.execute_async_v3(self.stream):
            raise StexportError("TensorRT execution failed (execute_async_v3 returned False); "
                                "run with -v for TensorRT's messages")
        nbytes = int(np.prod(shape)) * self.out_dtype.itemsize
        host_out = self.host_out[:nbytes].view(self.out_dtype).reshape(shape)
        self.cuda.d2h(host_out, self.dev_out, self.stream)
        self.cuda.sync(self.stream)
        return host_out.astype(np.float32)  # a copy: the pinned buffer is reused by the next chunk

    # -- task packs: refit the engine's per-task tensors ------------------------------------------------------

    def load_task(self, task):
        """As Backend.load_task; on an engine that cannot refit (a plain or INT8 bundle, see refit.py) the
        refusal says why and what to use instead. On a multi-task bundle: the task of that bundle (nothing is
        refitted)."""
        if not self.SWAPS_TASKS and self.bundle.manifest.multitask is None:
            raise StexportError(f"{self.bundle.path.name}: TensorRT runs no task packs here: "
                                f"{no_tasks_reason(self.bundle.manifest)}")
        return super().load_task(task)

    def _wanted(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name → (shape, dtype) of the tensors the engine refits, as the bundle's tasks record has them."""
        tensors = {t.name: (tuple(t.shape), t.dtype) for t in self.bundle.manifest.tasks.tensors}
        return {n: tensors[n] for n in self.refit}

    def prepare_task(self, pack):
        """The pack's tensors as host arrays of the engine's types (refitted when the task is first run)."""
        return host_weights(pack.tensors, self._wanted(), str(pack.path))

    def own_weights(self) -> dict:
        """The bundle's own per-task tensors, read from its ONNX once (to switch the engine back to them)."""
        if self._own is None:
            import onnx
            from onnx import numpy_helper

            path = self.bundle.file("onnx")
            names = set(self.refit)
            own = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
                   if t.name in names}
            self._own = host_weights(own, self._wanted(), str(path))
        return self._own

    def _hold(self, pack, weights) -> None:
        """Refit the engine with `pack`'s tensors (`weights`; pack None: the bundle's own) unless it holds
        them already."""
        key = pack.key if pack is not None else None
        if not needs_switch(self.holding, key):
            return
        weights = weights if pack is not None else self.own_weights()
        self.holding = "?"  # a failed refit may leave a mix of two tasks: never take it for either
        label = f"{self.bundle.path.name} ({pack.name if pack is not None else 'its own task'})"
        refit_engine(self.trt, self.engine, logger_for(self.trt), weights, label)
        self.holding = key

    def run_indexed(self, clips: np.ndarray, index: np.ndarray) -> np.ndarray:
        """A multi-task engine on uint8 clips (B, T, H, W, 3) with task indices int64 (B,): float32
        (B, head_rows) logits in one call per chunk of max_batch clips, tasks mixed freely."""
        if self.index_name is None:
            raise StexportError(f"{self.bundle.path}: not a multi-task bundle (build one with `stexport multitask`)")
        x = engine_input(clips, self.input, self.in_dtype)
        index = np.asarray(index).reshape(-1)
        with self.lock:
            outs = [self._run_chunk(x[lo:hi], index[lo:hi]) for lo, hi in spans(len(x), self.max_batch)]
            if not outs:
                return np.zeros((0, *self._set_batch(1)[1:]), np.float32)
        return np.concatenate(outs)

    def run(self, clips: np.ndarray, task=None) -> np.ndarray:
        if self.bundle.manifest.multitask is not None:
            return self.run_multitask(clips, task)
        pack, weights = self.task_state(task)
        x = engine_input(clips, self.input, self.in_dtype)
        with self.lock:
            if self.SWAPS_TASKS:
                self._hold(pack, weights)  # every chunk syncs its stream: no work is pending on the engine
            outs = [self._run_chunk(x[lo:hi]) for lo, hi in spans(len(x), self.max_batch)]
            if not outs:
                return np.zeros((0, *self._set_batch(1)[1:]), np.float32)
        return self.trim(np.concatenate(outs), pack)

    def describe(self) -> dict:
        r = self.record
        return {**super().describe(), "device": f"{self.host.gpu} (compute {self.host.capability})",
                "tensorrt": self.host.tensorrt, "engine": r["file"],
                "profile_batch": [r["profile"]["min"][0], r["profile"]["max"][0]],
                "profiles": [[p["min"][0], p["opt"][0], p["max"][0]] for p in self.profiles],
                "cuda": self.cuda.kind, "refittable": len(self.refit or ())}

    def close(self) -> None:
        # Release in dependency order: context before engine before runtime, then the CUDA memory.
        self.context = self.engine = self.runtime = None
        if getattr(self, "cuda", None) is not None:
            self.cuda.close()
