"""Decoding in a child process, so that one input can never stop or lose the others: the one isolated decoder.

OpenCV's FFmpeg capture can crash the process (a segfault on some names and damaged files) or block forever
(a FIFO, a stalled stream). `DecodeWorker` runs `stexport.runtime.video.decode` / `decode_windows` in a child Python
process and turns what goes wrong there into a `VideoError` for that input alone:

- the child dies (a crash, the OOM killer): "the decoder crashed (signal SIGSEGV) …"; a new child starts for
  the next input;
- the child reads no frame for `DecodeLimits.stall_s` seconds (`--decode-timeout`, the same meaning in every
  command): it is killed, "decoding stalled …";
- one input takes longer than `DecodeLimits.total_s` seconds in all (`--max-decode-s`; none by default, 30 s in
  `serve`): it is killed, "decoding took longer than …";
- the stream's header, read before any frame is decoded, says frames over `max_pixels` (default 36 megapixels:
  8K is 33) or more than `max_frames` frames (default 1,000,000: over 9 hours at 30 fps): "… over the decoder's
  limit" (a decode bomb: a 250 KB file of 16000x16000 frames cost 3.5 GB per request before);
- the child's address space is capped at `memory_mb` (default 4096 MB, RLIMIT_AS), a backstop for headers that
  lie: allocations past it fail as this input's error, never the machine's.

Every path that decodes uses it: `infer` (local: `Classifier`; `--ray`: the decode actors of
stexport.serving.ray_data), `verify`, the batch API (`DecoderPool`, one child per decoding thread), `serve` (a
`DecoderPool` per replica), calibration (`build --calib`) and `dump-clip`. A child that died while idle is
replaced before the next input (the child acknowledges each request before it decodes, so a death before the
acknowledgement is never blamed on the input).

Inputs are checked (`video.check_source`) before they are sent, so names the decoder cannot take and special
files never reach it. Protocol: pickled requests on the child's stdin; pickled replies on a pipe that replaced
its stdout (C libraries' stray prints go to its stderr, which is kept in a temporary file and quoted when the
child dies), each an 8-byte little-endian length and a pickle: ("ack",) once a request is read, ("tick",) while
frames are read, ("item", obj) per window, ("done", obj), ("error", kind, message).
"""

from __future__ import annotations

import fcntl
import os
import pickle
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from stexport.errors import StexportError
from stexport.fileutil import python_child
from stexport.runtime.video import Decoded, Sampling, VideoError, Window, check_seconds, check_source, display

DEFAULT_STALL_S = 60.0  # --decode-timeout: a decoder that reads no frame for this long is taken as hung
MAX_PIXELS = 36_000_000  # per frame, from the header: 8K UHD (7680x4320) and DCI 8K (8192x4320) fit
MAX_FRAMES = 1_000_000  # frames the header may claim: over 9 hours at 30 fps
MEMORY_MB = 4096  # the decoder child's address space (RLIMIT_AS); it decodes ~700 MB of it for 720p here
SERVE_MAX_DECODE_S = 30.0  # --max-decode-s of `serve`: a server bounds each request's decoding
TICK_S = 0.5  # the child reports progress at most this often
START_S = 120.0  # a new child must be ready (its imports done) within this long, whatever the input


@dataclass(frozen=True)
class DecodeLimits:
    """What one input may cost the decoder; frozen and picklable (Ray ships it to workers).

    stall_s: seconds the decoder may go without reading a frame (`--decode-timeout`; a stalled stream, a file
    the decoder blocks on). total_s: seconds one input may take to decode in all (`--max-decode-s`; None: no
    limit); in timeline mode it counts the time spent waiting for the decoder, not the time the caller spends
    between windows. max_pixels (per frame) and max_frames: limits on what the stream's header says, checked
    before any frame is decoded. memory_mb: the child's address space (RLIMIT_AS). None: no limit. Raises
    StexportError for a limit that is not positive.
    """

    stall_s: float = DEFAULT_STALL_S
    total_s: float | None = None
    max_pixels: int | None = MAX_PIXELS
    max_frames: int | None = MAX_FRAMES
    memory_mb: int | None = MEMORY_MB

    def __post_init__(self):
        if not self.stall_s > 0:
            raise StexportError(f"--decode-timeout {self.stall_s:g}: must be positive (seconds)")
        if self.total_s is not None and not self.total_s > 0:
            raise StexportError(f"--max-decode-s {self.total_s:g}: must be positive (seconds)")
        for flag, value in (("--max-pixels", self.max_pixels), ("--max-frames", self.max_frames),
                            ("--decode-memory-mb", self.memory_mb)):
            if value is not None and value < 1:
                raise StexportError(f"{flag} {value}: must be at least 1")


def limits_of(decode_timeout: float | None = None, max_decode_s: float | None = None, **header) -> DecodeLimits:
    """DecodeLimits from the CLI's `--decode-timeout` (None: DEFAULT_STALL_S) and `--max-decode-s`; `header`:
    its other fields (max_pixels, max_frames, memory_mb) where they differ from the defaults."""
    return DecodeLimits(DEFAULT_STALL_S if decode_timeout is None else float(decode_timeout),
                        None if max_decode_s is None else float(max_decode_s), **header)


class DecodeWorker:
    """A child process that decodes one input at a time. Thread-safe (one request at a time); close() ends it.

    threads: FFmpeg decoder threads in the child (None: OpenCV's default). limits: a DecodeLimits, or a number
    (its stall_s) for callers of the older signature.
    """

    def __init__(self, threads: int | None = None, limits: DecodeLimits | float | None = None):
        if limits is None:
            limits = DecodeLimits()
        elif not isinstance(limits, DecodeLimits):
            limits = DecodeLimits(float(limits))
        self.threads = threads
        self.limits = limits
        self._proc: subprocess.Popen | None = None
        self._err = None
        self._lock = threading.Lock()
        self._left: float | None = None  # seconds of total_s the current request has left

    @property
    def stall_s(self) -> float:
        return self.limits.stall_s

    # --- the child process -------------------------------------------------------------------------------
    def _start(self) -> None:
        self._err = tempfile.TemporaryFile()
        # shared with the child: appending, so truncating it between inputs leaves no hole
        fcntl.fcntl(self._err.fileno(), fcntl.F_SETFL, fcntl.fcntl(self._err.fileno(), fcntl.F_GETFL) | os.O_APPEND)
        # two malloc arenas: glibc reserves 64 MB of address space per thread's arena, which RLIMIT_AS counts
        env = {**os.environ, "OPENCV_FFMPEG_LOGLEVEL": os.environ.get("OPENCV_FFMPEG_LOGLEVEL", "-8"),
               "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
               "OPENBLAS_NUM_THREADS": "1"}  # numpy's BLAS buffers per core: the child runs no BLAS
        memory = str(self.limits.memory_mb or "")
        self._proc = subprocess.Popen(python_child("stexport.runtime.decode_worker", "_serve", memory),
                                      stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._err, env=env, close_fds=True,
                                      bufsize=0)

    def start(self) -> None:
        """Start the child now (it starts on the first request otherwise), e.g. before a server takes requests."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()

    @property
    def pid(self) -> int | None:
        """The child's process id (None before it starts)."""
        proc = self._proc
        return proc.pid if proc is not None else None

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
            self._request(source, ("decode", None, sampling, self.threads, self._header()))
            for kind, obj in self._replies(source):
                if kind == "done":
                    return obj
        raise AssertionError("unreachable")

    def windows(self, source, sampling: Sampling, window: float, stride: float) -> Iterator[Window]:
        """`stexport.runtime.video.decode_windows` in the child. Abandoning the iterator early kills the child (it is
        restarted for the next request)."""
        check_seconds(window, stride)
        with self._lock:
            self._request(source, ("windows", (window, stride), sampling, self.threads, self._header()))
            finished = False
            try:
                for kind, obj in self._replies(source):
                    if kind == "item":
                        yield obj
                    else:
                        finished = True
                        return
            finally:
                if not finished:
                    self._kill()

    def _header(self) -> dict:
        return {"max_pixels": self.limits.max_pixels, "max_frames": self.limits.max_frames}

    def _request(self, source, request: tuple) -> None:
        """Send `request` for `source` and wait for the child's acknowledgement. A child that died while idle
        (or dies before it has read the request) is replaced and the request sent again, once."""
        target = check_source(source)  # refused inputs never reach the decoder
        name = display(source)
        data = pickle.dumps((request[0], target, name, *request[1:]), protocol=pickle.HIGHEST_PROTOCOL)
        self._left = self.limits.total_s
        for attempt in (0, 1):
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            self._err.seek(0)
            self._err.truncate()
            try:
                view = memoryview(data)
                while view:
                    view = view[self._proc.stdin.write(view):]
                if self._recv(name, START_S, counted=False) == ("ack",):
                    return
            except (OSError, VideoError):  # the child was gone before it took the request
                pass
            self._kill()
        raise VideoError(f"{name}: the decode worker cannot be started (it exits before taking an input); "
                         "run `python -c 'import cv2'` to see why")

    def _replies(self, source) -> Iterator[tuple[str, object]]:
        """("item", obj)… then ("done", obj); raises VideoError on an error, a crash, a stall or the total limit."""
        name = display(source)
        while True:
            msg = self._recv(name, self.limits.stall_s)
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

    def _read(self, n: int, name: str, wait_s: float, counted: bool) -> bytes:
        """Exactly n bytes from the child; VideoError if it dies, stays silent for wait_s, or (counted) the
        request's total_s runs out while waiting."""
        fd = self._proc.stdout.fileno()
        buf = bytearray()
        while len(buf) < n:
            by_total = counted and self._left is not None and self._left < wait_s
            t = time.monotonic()
            ready = []
            if not by_total or self._left > 0:
                ready, _, _ = select.select([fd], [], [], self._left if by_total else wait_s)
            if counted and self._left is not None:
                self._left -= time.monotonic() - t
            if not ready:
                self._kill()
                if by_total:
                    raise VideoError(f"{name}: decoding took longer than {self.limits.total_s:g} s in all; "
                                     "skipped. Raise --max-decode-s if such files are expected", "timeout")
                if not counted:
                    raise VideoError(f"{name}: the decode worker did not start within {wait_s:g} s")
                raise VideoError(f"{name}: decoding stalled: no frame for {wait_s:g} s (a stream that "
                                 "stopped sending, or a file the decoder blocks on); skipped. Raise "
                                 "--decode-timeout if the source is just slow", "stall")
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise self._crashed(name)
            buf += chunk
        return bytes(buf)

    def _recv(self, name: str, wait_s: float, counted: bool = True):
        size = int.from_bytes(self._read(8, name, wait_s, counted), "little")
        try:
            return pickle.loads(self._read(size, name, wait_s, counted))
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
                          "(ffmpeg -i FILE -c:v libx264 OUT.mp4)", "crash")


class DecoderPool:
    """`size` DecodeWorkers shared by threads: each call takes a free worker (waiting for one), so up to `size`
    inputs decode at once. A worker whose child crashed or was killed starts a new one for its next input: the
    pool never breaks. Thread-safe; close() ends every child."""

    def __init__(self, size: int = 1, threads: int | None = 1, limits: DecodeLimits | None = None):
        if size < 1:
            raise StexportError(f"{size} decoding processes: need at least 1")
        self.limits = limits or DecodeLimits()
        self.workers = [DecodeWorker(threads, self.limits) for _ in range(int(size))]
        self._free: queue.Queue = queue.Queue()
        for w in self.workers:
            self._free.put(w)

    def __len__(self) -> int:
        return len(self.workers)

    def grow(self, size: int) -> DecoderPool:
        """At least `size` workers (new ones start on first use)."""
        while len(self.workers) < size:
            w = DecodeWorker(self.workers[0].threads, self.limits)
            self.workers.append(w)
            self._free.put(w)
        return self

    def start(self) -> None:
        """Start every child now (a server does, so its first requests do not wait for imports)."""
        for w in self.workers:
            w.start()

    def pids(self) -> list[int]:
        return [p for p in (w.pid for w in self.workers) if p is not None]

    def decode(self, source, sampling: Sampling) -> Decoded:
        """DecodeWorker.decode on a free worker (VideoError for this input if anything fails)."""
        worker = self._free.get()
        try:
            return worker.decode(source, sampling)
        finally:
            self._free.put(worker)

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode_isolated(source, sampling: Sampling, threads: int | None = None,
                    limits: DecodeLimits | None = None) -> Decoded:
    """One input decoded in a child process of its own (started and ended here): for one-off callers
    (`dump-clip`). VideoError for this input if anything fails."""
    with DecodeWorker(threads, limits) as worker:
        return worker.decode(source, sampling)


# --- the child --------------------------------------------------------------------------------------------

def _serve(memory_mb: str = "") -> None:
    if memory_mb:
        import resource

        cap = int(memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
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

    while True:
        try:
            op, target, name, extra, sampling, threads, header = pickle.load(requests)
        except EOFError:
            return
        send(("ack",))
        last[0] = time.monotonic()
        try:
            if op == "decode":
                d = video.decode(target, sampling, threads, progress=tick, **header)
                d.source = name
                send(("done", d))
            else:
                window, stride = extra
                for w in video.decode_windows(target, sampling, window, stride, threads, progress=tick, **header):
                    send(("item", w))
                send(("done", None))
        except video.VideoError as e:
            send(("error", "video", str(e).replace(str(target), name) if isinstance(target, str) else str(e)))
        except StexportError as e:
            send(("error", "input", str(e)))
        except MemoryError:
            send(("error", "video", (f"{name}: decoding it needs more memory than the decoder's limit of "
                                     f"{memory_mb} MB (--decode-memory-mb); a decode bomb, or a video to "
                                     "downscale first")))
        except Exception as e:  # noqa: BLE001 - any decoder failure is this input's error
            first = (str(e).strip().splitlines() or [""])[0][:200]
            send(("error", "video", f"{name}: cannot decode ({type(e).__name__}: {first})"))


if __name__ == "__main__":
    _serve()
