"""Logging for every stexport process (the CLI, bench's measuring child, workers): stexport's own records on
stderr ("stexport: …", INFO with verbose), other libraries' records (the model hub's download retries, the ONNX
optimizer's notes) only when verbose, and then named."""

from __future__ import annotations

import logging
import sys
import warnings


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners swap it between commands)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Formatter(logging.Formatter):
    """"stexport: MESSAGE", with "warning: " or "error: " before warnings and errors: the prefix the CLI's own
    warning lines and Python warnings (formatwarning below) carry, so a warning reads the same from every
    command."""

    def format(self, record: logging.LogRecord) -> str:
        level = "error: " if record.levelno >= logging.ERROR else "warning: " if record.levelno >= logging.WARNING else ""
        return f"stexport: {level}{record.getMessage()}"


_HANDLERS: list[tuple[logging.Logger, logging.Handler]] = []
QUIET_LIBRARIES = ("huggingface_hub", "urllib3", "httpx", "filelock", "onnxscript", "torch.onnx", "openvino")


def setup_logging(verbose: bool = False) -> None:
    """Route stexport's logger to stderr (INFO with verbose, else WARNING) and keep other libraries' logging
    out of stderr unless verbose (then their warnings, prefixed with the library's name)."""
    for logger, handler in _HANDLERS:
        logger.removeHandler(handler)
    _HANDLERS.clear()
    own = logging.getLogger("stexport")
    h = _StderrHandler()
    h.setFormatter(_Formatter())
    own.addHandler(h)
    own.setLevel(logging.INFO if verbose else logging.WARNING)
    _HANDLERS.append((own, h))
    root = logging.getLogger()
    other = _StderrHandler()
    other.addFilter(lambda r: not r.name.startswith("stexport"))  # those went out above
    other.setFormatter(logging.Formatter("stexport: %(name)s: %(message)s"))
    other.setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)
    root.addHandler(other)  # also stops Python's last-resort handler printing other libraries' warnings
    _HANDLERS.append((root, other))
    for name in QUIET_LIBRARIES:
        lib = logging.getLogger(name)
        lib.setLevel(logging.WARNING if verbose else logging.CRITICAL)
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):  # the hub's own handler prints retries raw; ours names them
        hub.removeHandler(handler)
    hub.propagate = True
    warnings.formatwarning = lambda msg, cat, *a, **k: f"stexport: warning: {msg}\n"
