"""Ctrl-C stays an interruption wherever it lands.

Libraries catch a KeyboardInterrupt raised deep in their code and re-raise it as their own error (the torch
ONNX exporter does), and stexport turns library errors into one-line messages. `install()` (the CLI calls it)
records every SIGINT, so the code that converts errors can tell an interruption from a failure (`reraise`),
and the CLI can end any command with "stexport: interrupted" and exit code 130.
"""

from __future__ import annotations

import signal
import threading

_seen = threading.Event()


def _handler(signum, frame):
    _seen.set()
    raise KeyboardInterrupt


def install() -> None:
    """Record SIGINT (and still raise KeyboardInterrupt). Main thread only; a no-op elsewhere."""
    _seen.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)


def interrupted() -> bool:
    """Whether a SIGINT arrived since `install()`."""
    return _seen.is_set()


def caused_by_interrupt(e: BaseException | None) -> bool:
    """A KeyboardInterrupt, or an exception raised while handling or because of one."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def reraise(e: BaseException) -> None:
    """Call first in an `except Exception` that turns errors into messages: raises KeyboardInterrupt when `e`
    is an interruption in disguise (a SIGINT arrived, or `e` was raised because of one)."""
    if _seen.is_set() or caused_by_interrupt(e):
        raise KeyboardInterrupt from None


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived (for code that a library may have let run on after one)."""
    if _seen.is_set():
        raise KeyboardInterrupt
