"""Loading TensorRT and its one logger: what the runtime (running engines) and the build side (building them)
both need. Nothing here builds or runs an engine; `tensorrt` is imported on first use only."""

from __future__ import annotations

import logging
import threading

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


_loggers: dict[int, object] = {}
cancel = threading.Event()  # Ctrl-C landed in a TensorRT callback: the running build cancels itself


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
                try:
                    if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                        self.errors.append(str(msg))
                        log.debug("TensorRT error: %s", msg)
                    elif severity == trt.ILogger.Severity.WARNING:
                        log.warning("TensorRT: %s", msg)  # e.g. slower kernels chosen: users should see it
                    else:
                        log.debug("TensorRT: %s", msg)
                except KeyboardInterrupt:  # raised into a callback, it would be swallowed: cancel instead
                    cancel.set()

        _loggers[id(trt)] = Logger()
    return _loggers[id(trt)]


def last_error(logger, mark: int) -> str:
    """The last error TensorRT logged since len(logger.errors) was `mark`."""
    return logger.errors[-1] if len(logger.errors) > mark else "no message from TensorRT"
