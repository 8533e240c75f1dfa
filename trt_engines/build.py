"""ONNX → strongly typed TensorRT network → serialized engine. The only module that builds with TensorRT.

Precision comes from the ONNX graph alone: FP16 tensors and INT8 Q/DQ nodes are typed in the file (checked on
ONNX Runtime first). TensorRT 11 has no precision builder flags or calibrators; on TensorRT 10 the network is
created strongly typed, so none is set on either. The ONNX is parsed from its path, so external data resolves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from stexport.errors import StexportError

log = logging.getLogger("stexport")

MIN_MAJOR = 10
INSTALL_HINT = "install it on a GPU host with pip install 'stexport[tensorrt]'"


def import_tensorrt():
    """The tensorrt module, or one clear StexportError saying why not."""
    try:
        import tensorrt as trt
    except Exception as e:
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise StexportError(f"TensorRT is not available here ({type(e).__name__}: {first}); "
                            f"{INSTALL_HINT}") from e
    if version_major(trt.__version__) < MIN_MAJOR:
        raise StexportError(f"TensorRT {trt.__version__} is too old: stexport builds strongly typed engines, "
                            f"which need TensorRT {MIN_MAJOR} or newer; {INSTALL_HINT}")
    return trt


def version_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


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


_loggers: dict[int, object] = {}


def logger_for(trt):
    """One logger per tensorrt module for every builder and runtime: TensorRT keeps a single global logger (it
    warns when given another) and holds a raw pointer to it, so it must live as long as the process."""
    if id(trt) not in _loggers:

        class Logger(trt.ILogger):
            """Keeps errors (for one-line failure messages) and sends the rest to logging."""

            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(str(msg))
                    log.debug("TensorRT error: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    log.info("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        _loggers[id(trt)] = Logger()
    return _loggers[id(trt)]


def last_error(logger, mark: int) -> str:
    """The last error TensorRT logged since len(logger.errors) was `mark`."""
    return logger.errors[-1] if len(logger.errors) > mark else "no message from TensorRT"


def make_progress(trt, bar: tqdm):
    """Feed TensorRT's build phases into a tqdm bar (top-level phase steps)."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.top = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.top = phase_name
                bar.reset(total=max(int(num_steps), 1))
                bar.set_description(f"TensorRT: {phase_name}")

        def step_complete(self, phase_name, step):
            if phase_name == self.top:
                bar.n = int(step) + 1
                bar.refresh()
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Progress()


def build_plan(trt, onnx_path: Path, profile: dict, workspace_gb: float | None, opt_level: int,
               timing_cache: bytes | None, progress: bool = False) -> tuple[memoryview, bytes]:
    """Build a serialized engine from `onnx_path`; return it and the updated timing cache."""
    logger = logger_for(trt)
    mark = len(logger.errors)
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
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [profile["input"]]:
        raise StexportError(f"{onnx_path}: expected one input '{profile['input']}', the network has {inputs}")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes(workspace_gb))
    config.builder_optimization_level = opt_level
    shapes = builder.create_optimization_profile()
    shapes.set_shape(profile["input"], profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(shapes)
    tcache = config.create_timing_cache(timing_cache or b"")
    if not config.set_timing_cache(tcache, ignore_mismatch=False):
        log.info("TensorRT refused the stored timing cache; starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    bar = tqdm(desc="TensorRT build", unit="step", disable=not progress, leave=False)
    monitor = make_progress(trt, bar) if progress else None  # referenced here for as long as the build runs
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        bar.close()
    if plan is None:
        reason = last_error(logger, mark)
        raise StexportError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name}: "
                            f"{reason}")
    timing = bytes(memoryview(config.get_timing_cache().serialize()))
    return memoryview(plan), timing
