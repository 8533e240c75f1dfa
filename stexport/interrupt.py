"""Ctrl-C stays an interruption wherever it lands, and never lands where Python would swallow it.

Libraries catch a KeyboardInterrupt raised deep in their code and re-raise it as their own error (the torch
ONNX exporter does), and stexport turns library errors into one-line messages. `install()` (the CLI calls it)
records every SIGINT, so the code that converts errors can tell an interruption from a failure (`reraise`),
and the CLI can end any command with "stexport: interrupted" and exit code 130 (`check` after the command
returns catches an interruption a library swallowed).

Python runs a signal handler in whatever frame the main thread is executing. When that is a finalizer (a
`__del__` or a weakref callback run by the garbage collector: open_clip's tokenizer leaves `regex` objects
whose `__del__` runs at a random later allocation), an exception raised there is printed as "Exception ignored
in ... Traceback" and dropped, and the command runs on. The handler therefore never raises inside a
finalizer or while the interpreter shuts down: it records the SIGINT and asks for it again a moment later
(`_thread.interrupt_main`), until it arrives in an ordinary frame.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading

_seen = threading.Event()
_raised = threading.Event()  # a KeyboardInterrupt for the recorded SIGINT has been raised: no redelivery
_RETRY_S = 0.01  # how soon a SIGINT that landed in a finalizer is delivered again

# code objects whose frames Python runs as finalizers: an exception raised in them is printed and dropped
_FINALIZER_NAMES = frozenset({"remove", "_cb", "__call__", "_exitfunc"})  # in weakref.py


def _in_finalizer(frame) -> bool:
    """Whether `frame` or a caller of it is a finalizer (`__del__`, a weakref.finalize / WeakValueDictionary
    callback) — there a raised KeyboardInterrupt would be printed as 'Exception ignored' and lost."""
    import weakref

    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__":
            return True
        if code.co_name in _FINALIZER_NAMES and code.co_filename == weakref.__file__:
            return True
        frame = frame.f_back
    return False


def _redeliver() -> None:
    if not _raised.is_set():
        _thread.interrupt_main(signal.SIGINT)


def _raise():
    _raised.set()
    raise KeyboardInterrupt


def _handler(signum, frame):
    _seen.set()
    if sys.is_finalizing():
        return  # the interpreter is exiting: nothing left to interrupt
    if _in_finalizer(frame):
        t = threading.Timer(_RETRY_S, _redeliver)
        t.daemon = True
        t.start()
        return
    _raise()


def install() -> None:
    """Record SIGINT and raise KeyboardInterrupt in the first ordinary frame (never in a finalizer).
    Main thread only; a no-op elsewhere."""
    _seen.clear()
    _raised.clear()
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
        _raised.set()
        raise KeyboardInterrupt from None


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived (for code that a library may have let run on after one)."""
    if _seen.is_set():
        _raise()


def finish() -> None:
    """The command is over: later SIGINTs (and a pending redelivery) are ignored while the process exits."""
    if threading.current_thread() is threading.main_thread():
        _raised.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
