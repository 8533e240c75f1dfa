"""Decoding in a child process, so that one input can never stop or lose the others.

OpenCV's FFmpeg capture can crash the process (a segfault on some names and damaged files) or block forever
(a FIFO, a stalled stream). `DecodeWorker` runs `stexport.runtime.video.decode` / `decode_windows` in a child Python
process (`python -m stexport.runtime.decode_worker`) and turns what goes wrong there into a `VideoError` for that
input alone:

- the child dies (a crash, the OOM killer): "the decoder crashed (signal SIGSEGV) …"; a new child starts for
  the next input;
- the child makes no progress (no frame read, no result) for `stall_s` seconds: it is killed, "decoding
  stalled …".

Inputs are checked (`video.check_source`) before they are sent, so names the decoder cannot take and special
files never reach it. Protocol: pickled requests on the child's stdin; pickled replies on a pipe that replaced
its stdout (C libraries' stray prints go to its stderr, which is kept in a temporary file and quoted when the
child dies), each an 8-byte little-endian length and a pickle: ("tick",) while frames are read, ("item", obj)
per window, ("done", obj), ("error", kind, message).
"""

from __future__ import annotations

import fcntl
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from stexport.errors import StexportError
from stexport.fileutil import python_child
from stexport.runtime.video import Decoded, Sampling, VideoError, Window, check_source, display

DEFAULT_STALL_S = 60.0  # a decoder that reads no frame for this long is taken as hung
TICK_S = 0.5  # the child reports progress at most this often


class DecodeWorker:
    """A child process that decodes one input at a time. Thread-safe (one request at a time); close() ends it.

    threads: FFmpeg decoder threads in the child (None: OpenCV's default). stall_s: seconds without progress
    after which an input is given up and the child killed.
    """

    def __init__(self, threads: int | None = None, stall_s: float = DEFAULT_STALL_S):
        if stall_s <= 0:
            raise StexportError(f"--decode-timeout {stall_s:g}: must be positive (seconds)")
        self.threads = threads
        self.stall_s = float(stall_s)
        self._proc: subprocess.Popen | None = None
        self._err = None
        self._lock = threading.Lock()

    # --- the child process -------------------------------------------------------------------------------
    def _start(self) -> None:
        self._err = tempfile.TemporaryFile()
        # shared with the child: appending, so truncating it between inputs leaves no hole
        fcntl.fcntl(self._err.fileno(), fcntl.F_SETFL, fcntl.fcntl(self._err.fileno(), fcntl.F_GETFL) | os.O_APPEND)
        env = {**os.environ, "OPENCV_FFMPEG_LOGLEVEL": os.environ.get("OPENCV_FFMPEG_LOGLEVEL", "-8")}
        self._proc = subprocess.Popen(python_child("stexport.runtime.decode_worker", "_serve"), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._err, env=env, close_fds=True,
                                      bufsize=0)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        if self._err is not None:
            self._err.close()
            self._err = None

    def close(self) -> None:
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                try:
                    proc.stdin.close()  # EOF: the child exits
                    proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- requests ----------------------------------------------------------------------------------------
    def decode(self, source, sampling: Sampling) -> Decoded:
        """`stexport.runtime.video.decode` of `source` in the child; VideoError for this input if anything fails."""
        with self._lock:
            target = self._send(source, ("decode", None, sampling, self.threads))
            for kind, obj in self._replies(source, target):
                if kind == "done":
                    return obj
        raise AssertionError("unreachable")

    def windows(self, source, sampling: Sampling, window: float, stride: float) -> Iterator[Window]:
        """`stexport.runtime.video.decode_windows` in the child. Abandoning the iterator early kills the child (it is
        restarted for the next request)."""
        if window <= 0 or stride <= 0:
            raise StexportError("--window and --stride must be positive (seconds)")
        with self._lock:
            target = self._send(source, ("windows", (window, stride), sampling, self.threads))
            finished = False
            try:
                for kind, obj in self._replies(source, target):
                    if kind == "item":
                        yield obj
                    else:
                        finished = True
                        return
            finally:
                if not finished:
                    self._kill()

    def _send(self, source, request: tuple):
        target = check_source(source)  # refused inputs never reach the decoder
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
        self._err.seek(0)
        self._err.truncate()
        data = pickle.dumps((request[0], target, display(source), *request[1:]), protocol=pickle.HIGHEST_PROTOCOL)
        for attempt in (0, 1):
            try:
                view = memoryview(data)
                while view:
                    view = view[self._proc.stdin.write(view):]
                break
            except OSError:  # the idle child died: start another
                if attempt:
                    raise VideoError(f"{display(source)}: the decode worker cannot be started") from None
                self._kill()
                self._start()
        return target

    def _replies(self, source, target) -> Iterator[tuple[str, object]]:
        """("item", obj)… then ("done", obj); raises VideoError on an error, a crash or a stall."""
        name = display(source)
        while True:
            msg = self._recv(name)
            kind = msg[0]
            if kind == "tick":
                continue
            if kind == "error":
                _, what, message = msg
                if what == "input":
                    raise StexportError(message)
                raise VideoError(message)
            yield kind, msg[1]
            if kind == "done":
                return

    def _read(self, n: int, name: str) -> bytes:
        """Exactly n bytes from the child; VideoError if it dies or stays silent for stall_s."""
        fd = self._proc.stdout.fileno()
        buf = bytearray()
        while len(buf) < n:
            ready, _, _ = select.select([fd], [], [], self.stall_s)
            if not ready:
                self._kill()
                raise VideoError(f"{name}: decoding stalled: no frame for {self.stall_s:g} s (a stream that "
                                 "stopped sending, or a file the decoder blocks on); skipped. Raise "
                                 "--decode-timeout if the source is just slow")
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise self._crashed(name)
            buf += chunk
        return bytes(buf)

    def _recv(self, name: str):
        size = int.from_bytes(self._read(8, name), "little")
        try:
            return pickle.loads(self._read(size, name))
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            raise self._crashed(name) from None

    def _crashed(self, name: str) -> VideoError:
        proc = self._proc
        code = proc.wait() if proc is not None else None
        tail = ""
        if self._err is not None:
            self._err.seek(0)
            lines = [ln for ln in self._err.read()[-4000:].decode("utf-8", "replace").splitlines() if ln.strip()]
            tail = f"; its last words: {lines[-1].strip()[:200]}" if lines else ""
        self._kill()
        if code is not None and code < 0:
            try:
                why = f"signal {signal.Signals(-code).name}"
            except ValueError:
                why = f"signal {-code}"
        else:
            why = f"exit code {code}"
        return VideoError(f"{name}: the decoder crashed ({why}) on this input{tail}; the file is damaged or "
                          "in a form OpenCV/FFmpeg cannot handle: check it with `ffprobe FILE` and re-encode it "
                          "(ffmpeg -i FILE -c:v libx264 OUT.mp4)")


# --- the child --------------------------------------------------------------------------------------------

def _serve() -> None:
    from stexport.runtime import video

    # Replies go on a private copy of stdout; fd 1 itself goes to stderr, so no C library can corrupt them.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    last = [time.monotonic()]

    def send(msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        replies.write(len(data).to_bytes(8, "little") + data)
        replies.flush()

    def tick() -> None:
        now = time.monotonic()
        if now - last[0] >= TICK_S:
            last[0] = now
            send(("tick",))

    video.on_frame = tick
    while True:
        try:
            op, target, name, extra, sampling, threads = pickle.load(requests)
        except EOFError:
            return
        last[0] = time.monotonic()
        try:
            if op == "decode":
                d = video.decode(target, sampling, threads)
                d.source = name
                send(("done", d))
            else:
                window, stride = extra
                for w in video.decode_windows(target, sampling, window, stride, threads):
                    send(("item", w))
                send(("done", None))
        except video.VideoError as e:
            send(("error", "video", str(e).replace(str(target), name) if isinstance(target, str) else str(e)))
        except StexportError as e:
            send(("error", "input", str(e)))
        except Exception as e:  # noqa: BLE001 - any decoder failure is this input's error
            first = (str(e).strip().splitlines() or [""])[0][:200]
            send(("error", "video", f"{name}: cannot decode ({type(e).__name__}: {first})"))


if __name__ == "__main__":
    _serve()
