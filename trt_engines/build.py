"""ONNX → strongly typed TensorRT network → serialized engine. The only module that builds with TensorRT.

Precision comes from the ONNX graph alone: FP16 tensors and INT8 Q/DQ nodes are typed in the file (checked on
ONNX Runtime first). TensorRT 11 has no precision builder flags or calibrators; on TensorRT 10 the network is
created strongly typed, so none is set on either. The ONNX is parsed from its path, so external data resolves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from stexport import interrupt
from stexport.errors import StexportError
from stexport.trt_engines.record import profile_shapes
from stexport.trt_engines.trt import MIN_MAJOR, cancel, last_error, logger_for, version_major

log = logging.getLogger("stexport")

def strongly_typed_flags(major: int, strongly_typed_bit: int | None) -> int:
    """Network creation flags. TensorRT 10 needs the STRONGLY_TYPED flag; 11 is always strongly typed (it
    still accepts the flag and ignores it), so a TensorRT without the flag is fine only from 11 on."""
    if strongly_typed_bit is None:
        if major >= 11:
            return 0
        raise StexportError(f"TensorRT {major}.x has no strongly typed networks; "
                            f"use TensorRT {MIN_MAJOR} or newer")
    return 1 << strongly_typed_bit


def workspace_bytes(workspace_gb: float | None) -> int | None:
    return None if workspace_gb is None else int(workspace_gb * (1 << 30))


def make_progress(trt, bar: tqdm | None):
    """A progress monitor: feeds TensorRT's build phases into a tqdm bar (top-level phase steps, when `bar`)
    and cancels the build on Ctrl-C. A KeyboardInterrupt raised inside a callback would be swallowed by the
    bindings (the build then fails with no message), so the callback records it and returns False, which
    cancels the build; build_plan raises KeyboardInterrupt afterwards."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.top = None
            self.cancelled = False

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                if parent_phase is None and bar is not None:
                    self.top = phase_name
                    bar.reset(total=max(int(num_steps), 1))
                    bar.set_description(f"TensorRT: {phase_name}")
            except KeyboardInterrupt:
                self.cancelled = True

        def step_complete(self, phase_name, step):
            try:
                if phase_name == self.top and bar is not None:
                    bar.n = int(step) + 1
                    bar.refresh()
                if interrupt.interrupted() or cancel.is_set():
                    self.cancelled = True
            except KeyboardInterrupt:
                self.cancelled = True
            return not self.cancelled  # False cancels the build

        def phase_finish(self, phase_name):
            pass

    return Progress()


def set_timing_cache(config, stored: bytes | None) -> str:
    """Give the builder the stored timing cache, or a fresh one when TensorRT cannot read it (a corrupt or
    foreign file: create_timing_cache returns None, or set_timing_cache refuses it). Returns what was used:
    "stored", "fresh" or "none" (TensorRT could not even make an empty one; the build runs without)."""
    if stored:
        cache = config.create_timing_cache(stored)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return "stored"
        log.warning("TensorRT cannot use the stored timing cache (corrupt, or from another TensorRT/GPU); "
                    "starting a fresh one")
    cache = config.create_timing_cache(b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return "fresh"
    log.warning("TensorRT could not create a timing cache; building without one")
    return "none"


def build_plan(trt, onnx_path: Path, profiles: list[dict], workspace_gb: float | None, opt_level: int,
               timing_cache: bytes | None, progress: bool = False,
               refit: list[str] | None = None) -> tuple[memoryview, bytes | None]:
    """Build a serialized engine from `onnx_path` with `profiles` (optimisation profiles in index order, each
    setting every network input: record.profile_shapes);
    return it and the updated timing cache (None when the build ran without one). `refit`: ONNX initializers
    to make refittable (a swappable bundle's per-task tensors; see refit.py). Raises StexportError with
    TensorRT's reason, KeyboardInterrupt when Ctrl-C cancelled the build."""
    logger = logger_for(trt)
    mark = len(logger.errors)
    cancel.clear()
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    bit = None if strongly_typed is None else int(strongly_typed)
    flags = strongly_typed_flags(version_major(trt.__version__), bit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        errors = errors or logger.errors[mark:] or ["no message"]
        raise StexportError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it: {errors[0]}"
                            + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""))
    want = list(profile_shapes(profiles[0]))
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(inputs) != sorted(want):
        raise StexportError(f"{onnx_path}: expected the inputs {want}, the network has {inputs}; "
                            "the bundle's manifest and its ONNX disagree (rebuild the bundle)")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes(workspace_gb))
    config.builder_optimization_level = opt_level
    if refit:
        from stexport.trt_engines.refit import mark_refittable

        mark_refittable(trt, network, config, refit)
    for p in profiles:
        shapes = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(p).items():
            shapes.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(shapes)
    cached = set_timing_cache(config, timing_cache)

    bar = tqdm(desc="TensorRT build", unit="step", disable=not progress, leave=False)
    monitor = make_progress(trt, bar if progress else None)  # referenced here for as long as the build runs
    config.progress_monitor = monitor
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        bar.close()
    if monitor.cancelled or cancel.is_set() or interrupt.interrupted():
        cancel.clear()
        raise KeyboardInterrupt
    if plan is None:
        reason = last_error(logger, mark)
        raise StexportError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name}: "
                            f"{reason}")
    timing = bytes(memoryview(config.get_timing_cache().serialize())) if cached != "none" else None
    return memoryview(plan), timing
