"""Video in, model clips out: OpenCV decoding with the official ST-Adapter evaluation sampling.

`decode_clips(source, sampling)` returns uint8 RGB clips (V, T, S, S, 3), V = spatial_views × temporal_views,
ordered as the official evaluation stacks them: spatial view outer, temporal view inner
(v = s * temporal_views + t). Per frame (linziyi96/st-adapter video_dataset/dataset.py, eval mode):

- resize the short side to S (bicubic; the long side becomes long * S // short), BGR → RGB;
- spatial views: 1 = the center S×S crop; 3 = crops at the start, middle and end of the long side;
- temporal views, over the n frames that actually decode:
  rate 0: T frames evenly covering the whole video (segment midpoints), one temporal view only;
  rate r > 0: windows of (T-1)*r+1 frames taking every r-th; one view is centred, several are spread evenly
  from the first frame to the last (start = round(slide / (views-1) * i)).
- Short videos repeat frames, never fail: with rate 0 the segment midpoints repeat indices when n < T; with a
  rate, a window longer than the video is padded with the last frame. One decodable frame is enough.

The official code interpolates normalised floats; here the resize happens on uint8 frames (rounded, clipped),
a difference of at most one grey level after rounding.

Files are decoded by seeking (`stexport.runtime.seek`, PyAV): a demux-only pass counts the frames and finds
each one's timestamp, then only the GOPs that hold needed frames are decoded, so the cost grows with the frames
sampled, not with the video's length; the frames equal, bit for bit, those of the sequential decode below. Where
a file cannot be sought exactly (no index, unreliable timestamps, a decoder that gives a different number of
frames than packets, …) it is decoded sequentially and the result's notes say why ("decoded sequentially: …").
One difference: damage in a part of the file the sampling does not need is not seen, where the sequential decode
ends the video at it.

Sequential decoding (OpenCV; URLs and files that cannot be sought): memory is bounded by the frames a clip needs,
never by the video's length: frames are decoded in order and
only the needed ones are converted, resized and kept. `CAP_PROP_FRAME_COUNT` is only a guess (real files
report frames that never decode): the first pass decodes the whole file once, counting the frames that
decode while keeping the frames the header's count would need and the frame before each (so a header that
claims one frame too many, the commonest lie, costs nothing more). If the count disagrees and frames are
missing, a second pass decodes up to the last missing one. A decoding error mid-stream ends the video at the
last good frame.

A URL whose container reports a frame count or duration (an http:// link to a file) is a file and is sampled
as one. Only sources that cannot be counted (camera indices, rtsp:// and other live streams) are live: a clip is
the next frames as they arrive, each temporal view the window after the previous one; rate 0 takes T frames
over the next LIVE_SECONDS seconds. `Decoded.live` says which sampling was used.

Timeline windows (`decode_windows`) are in seconds of the file's presentation timestamps (CAP_PROP_POS_MSEC),
never frame index / average fps, so variable-frame-rate files get true times: a first pass reads every
frame's timestamp, a second keeps the frames each window needs.

Only regular, readable files with UTF-8 names reach the decoder (`check_source`): directories, FIFOs,
devices, sockets, unreadable files and names OpenCV cannot take (it crashes on non-UTF-8 names and blocks
forever on a FIFO) are refused first, each with its own message.
"""

from __future__ import annotations

import bisect
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from stexport.errors import StexportError
from stexport.runtime import seek

# FFmpeg writes a line per damaged packet to stderr; stexport reports damage itself, one line per file.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

LIST_EXTS = (".txt", ".csv", ".list", ".lst")  # clip lists by name: refused where videos go, with a hint
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}
LIVE_SECONDS = 2.0
BAND = 1  # first pass also keeps the BAND frames before each index the header's count needs
# Codecs the FFmpeg inside opencv-python(-headless) has no software decoder for: the file opens, no frame decodes.
UNDECODABLE = {"av01": "AV1"}
# A callable the decoding functions call once per frame they read (`progress=`): the decode worker passes one
# that proves progress to its stall watchdog (stexport.runtime.decode_worker).
Progress = Callable[[], None]


class VideoError(StexportError):
    """A video that cannot give a clip; the message names the file. `reason`: what went wrong, for counting
    (metrics): "invalid" (not a video, no frames, over a limit), "stall", "timeout" (the total limit) or
    "crash" (the decoder process died)."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Sampling:
    frames: int = 8
    size: int = 224
    rate: int = 16  # 0: frames evenly cover the whole video
    temporal_views: int = 3
    spatial_views: int = 1

    def __post_init__(self):
        if self.frames < 1 or self.size < 1 or self.rate < 0 or self.temporal_views < 1:
            raise StexportError(f"invalid sampling {self}: frames, size and views must be ≥ 1, rate ≥ 0")
        if self.spatial_views not in (1, 3):
            raise StexportError(f"{self.spatial_views} spatial views: use 1 (center crop) or 3 (crops "
                                "along the long side)")
        if self.rate == 0 and self.temporal_views != 1:
            raise StexportError(f"{self.temporal_views} temporal views with rate 0: frames already cover the "
                                "whole video, so there is one temporal view; pass --views 1xS or a --rate")

    @property
    def views(self) -> int:
        return self.temporal_views * self.spatial_views

    @property
    def span(self) -> int:
        """Frames one temporal view covers at a fixed rate."""
        return (self.frames - 1) * max(self.rate, 1) + 1

    def describe(self) -> str:
        how = "whole video" if self.rate == 0 else f"rate {self.rate}"
        return f"{self.frames}x{self.size}px, {how}, {self.temporal_views}x{self.spatial_views} views"

    def to_dict(self) -> dict:
        return {"frames": self.frames, "size": self.size, "rate": self.rate,
                "temporal_views": self.temporal_views, "spatial_views": self.spatial_views}

    @classmethod
    def from_manifest(cls, manifest, **overrides) -> "Sampling":
        """Sampling a bundle (its stexport.bundle.manifest.Manifest) was made for; `overrides` set to None are
        ignored."""
        s = manifest.sampling
        base = {"frames": manifest.input.frames, "size": manifest.input.size, "rate": s.rate,
                "temporal_views": s.temporal_views, "spatial_views": s.spatial_views}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: int(v) for k, v in base.items()})


def parse_views(text: str) -> tuple[int, int]:
    """'3x1' → (temporal, spatial)."""
    try:
        t, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise StexportError(f"--views '{text}': write TEMPORALxSPATIAL, e.g. 3x1 or 1x3") from None
    if t < 1 or s < 1:
        raise StexportError(f"--views '{text}': both counts must be at least 1, e.g. 3x1 or 1x3")
    return t, s


def frame_indices(n: int, sampling: Sampling) -> list[list[int]]:
    """Frame indices in [0, n) for each temporal view (the official eval's rule, including Python's round)."""
    T, r, views = sampling.frames, sampling.rate, sampling.temporal_views
    if n < 1:
        raise ValueError("a video needs at least one frame")
    if r == 0:
        seg = (n - 1) / T
        return [[(round(seg * i) + round(seg * (i + 1))) // 2 for i in range(T)]]
    slide = max(n, sampling.span) - sampling.span
    starts = [slide // 2] if views == 1 else [round(slide / (views - 1) * i) for i in range(views)]
    return [[min(st + j * r, n - 1) for j in range(T)] for st in starts]


def resize_short(frame: np.ndarray, size: int) -> np.ndarray:
    """BGR frame → RGB with its short side resized to `size` (bicubic), as the official eval."""
    import cv2

    h, w = frame.shape[:2]
    nh, nw = (size, w * size // h) if h < w else (h * size // w, size)
    if (nh, nw) != (h, w):
        frame = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def crops(frame: np.ndarray, size: int, views: int) -> list[np.ndarray]:
    """Spatial views of a resized frame: the center crop, or start / middle / end of the long side."""
    h, w = frame.shape[:2]
    if views == 1:
        y, x = (h - size) // 2, (w - size) // 2
        return [frame[y:y + size, x:x + size]]
    margin = max(h, w) - size
    if h > w:
        return [frame[st:st + size, :size] for st in (0, margin // 2, margin)]
    return [frame[:size, st:st + size] for st in (0, margin // 2, margin)]


def assemble(frames: dict[int, np.ndarray], indices: list[list[int]], sampling: Sampling) -> np.ndarray:
    """(V, T, S, S, 3) from resized frames; spatial view outer, temporal view inner."""
    S, sv = sampling.size, sampling.spatial_views
    out = np.empty((sv * len(indices), sampling.frames, S, S, 3), np.uint8)
    cache = {i: crops(frames[i], S, sv) for i in {i for view in indices for i in view}}
    for s in range(sv):
        for t, view in enumerate(indices):
            for j, i in enumerate(view):
                out[s * len(indices) + t, j] = cache[i][s]
    return out


def is_camera(source) -> bool:
    return isinstance(source, int) or (isinstance(source, str) and source.isdigit())


def is_url(source) -> bool:
    return isinstance(source, str) and "://" in source


def is_live(source) -> bool:
    """Camera indices and URLs: sources that may be live. A URL is sampled live only when its container
    cannot be counted (no frame count or duration); see `decode`."""
    return is_camera(source) or is_url(source)


def display(source) -> str:
    """`source` as printable text (and strict JSON): bytes of a name that are not UTF-8, which Python keeps
    as lone surrogates, are shown as \\xNN."""
    s = os.fsdecode(source) if isinstance(source, bytes) else str(source)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return os.fsencode(s).decode("utf-8", "backslashreplace")


def _name(source) -> str:
    return f"camera {source}" if is_camera(source) else display(source)


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_source(source):
    """What to hand the decoder for `source`, after refusing what must never reach it.

    Returns a camera index (int), a URL, or the absolute path of a regular, readable, non-empty file with a
    UTF-8 name (absolute, so FFmpeg never reads a name such as 'pipe:1' or 'concat:a|b' as a protocol).
    Raises VideoError naming the input, the cause and the fix for: names that are not UTF-8 or hold NUL
    (OpenCV crashes on the first), missing files, directories, FIFOs, devices and sockets (a FIFO blocks the
    decoder forever), empty and unreadable files.
    """
    if isinstance(source, int):
        return source
    s = os.fsdecode(source) if isinstance(source, bytes) else os.fspath(source)
    if s.isdigit():
        return int(s)
    name = display(s)
    if "\0" in s:
        raise VideoError(f"{name}: the name holds a NUL byte, which no file name can; check how it was built")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise VideoError(f"{name}: the file name is not valid UTF-8 (bytes shown as \\xNN), and OpenCV/FFmpeg "
                         "cannot open such names (OpenCV crashes on them); rename it to UTF-8, e.g. "
                         "`convmv -f latin1 -t utf-8 --notest FILE`") from None
    if is_url(s):
        return s
    try:
        st = os.stat(s)
    except FileNotFoundError:
        raise VideoError(f"{name}: no such file") from None
    except PermissionError:
        raise VideoError(f"{name}: permission denied on a folder of its path; make the folders searchable "
                         "(chmod a+x) or run as their owner") from None
    except OSError as e:
        raise VideoError(f"{name}: cannot be looked up ({e.strerror}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            has = any(f.suffix.lower() in VIDEO_EXTS and f.is_file() for f in Path(s).rglob("*"))
        except OSError:
            has = False
        if has:
            raise VideoError(f"{name}: is a directory, not a video; pass the videos in it (`stexport infer` "
                             "and --clips expand directories)")
        raise VideoError(f"{name}: is a directory, not a video, and holds no video files "
                         f"({', '.join(sorted(VIDEO_EXTS))}) below it")
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _KINDS if test(st.st_mode)), "not a regular file")
        raise VideoError(f"{name}: is {kind}, not a regular file; decoders read videos from regular files: "
                         "save the data to a file first")
    if st.st_size == 0:
        raise VideoError(f"{name}: empty file (0 bytes); it was not written completely, re-copy it")
    try:
        with open(s, "rb") as f:
            f.read(1)
    except PermissionError:
        raise VideoError(f"{name}: permission denied: the file cannot be read; `chmod a+r` it or run as its "
                         "owner") from None
    except OSError as e:
        raise VideoError(f"{name}: cannot be read ({e.strerror}); the disk or file system reports an error, "
                         "re-copy the file") from None
    return os.path.abspath(s)


def _quiet(cv2) -> None:
    """OpenCV warns on stderr for every file FFmpeg cannot open; stexport says it once, naming the file.

    cv2.utils.logging is missing from some builds (opencv-python 4.11.0.86); cv2.setLogLevel is older.
    """
    log = getattr(getattr(cv2, "utils", None), "logging", None)
    if log is not None:
        if log.getLogLevel() > log.LOG_LEVEL_ERROR:
            log.setLogLevel(log.LOG_LEVEL_ERROR)
    elif hasattr(cv2, "setLogLevel"):
        cv2.setLogLevel(2)  # LOG_LEVEL_ERROR


def _streams_note(path: str) -> str | None:
    """Why a file that FFmpeg's demuxer opens has nothing to decode (PyAV reads the container's streams):
    "has no video stream (…)", or None when that is not the reason."""
    try:
        import av

        with av.open(path) as c:
            if c.streams.video:
                return None
            kinds = sorted({s.type for s in c.streams})
    except Exception:  # noqa: BLE001 - not a container PyAV reads either: the generic message stands
        return None
    held = f"only {' and '.join(kinds)}" if kinds else "no streams at all"
    return f"has no video stream ({held}); pass a file with video"


def open_capture(source, threads: int | None = None, max_pixels: int | None = None,
                 max_frames: int | None = None):
    """cv2.VideoCapture for a file, URL or camera index; VideoError if it cannot be opened as a video.

    Inputs go through `check_source` first. threads: FFmpeg decoder threads (None: OpenCV's default, one per
    core). One thread decodes with about a quarter less CPU time, the better choice when decoding runs
    beside inference. max_pixels, max_frames: limits checked against the stream's header (width × height,
    the frame count it claims) before any frame is decoded; VideoError naming the limit when it is over one
    (a decode bomb: a tiny file of huge frames, or of more frames than anyone should decode).
    """
    import cv2

    target = check_source(source)
    _quiet(cv2)
    params = [cv2.CAP_PROP_N_THREADS, int(threads)] if threads else []
    name = _name(source)
    if isinstance(target, int):
        cap = cv2.VideoCapture(target)  # camera backends reject FFmpeg's thread parameter
        if not cap.isOpened():
            raise VideoError(f"{name}: cannot open the camera")
        return cap
    if max_pixels and isinstance(target, str) and not is_url(target):
        refuse_oversized(target, name, max_pixels)
    cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        if is_url(target):
            raise VideoError(f"{name}: cannot open the stream (unreachable, refused, or not a video)")
        why = _streams_note(target) or "not a video OpenCV/FFmpeg can read (unknown format, truncated or corrupt)"
        raise VideoError(f"{name}: {why}")
    if _fourcc(cap) in ("ansi", "text"):  # FFmpeg's tty demuxer renders any text file as a "video"
        cap.release()
        raise VideoError(f"{name}: a text file, not a video")
    if max_pixels or max_frames:
        try:
            check_header(cap, name, max_pixels, max_frames)
        except VideoError:
            cap.release()
            raise
    return cap


def pixels(n: int) -> str:
    """A pixel count as people read it: '6,912 pixels', '2.07 megapixels', '256 megapixels'."""
    return f"{n:,} pixel{'s' * (n != 1)}" if n < 1_000_000 else f"{n / 1e6:.3g} megapixels"


def check_header(cap, name: str, max_pixels: int | None, max_frames: int | None) -> None:
    """VideoError when the open capture's header says frames of more than `max_pixels` pixels, or more than
    `max_frames` frames (None: no limit)."""
    import cv2

    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    if max_pixels and w * h > max_pixels:
        raise _oversized(name, w, h, max_pixels)
    n = _header(cap)
    if max_frames and n is not None and n > max_frames:
        raise VideoError(f"{name}: its header gives {n:,} frames (its frame count, or its duration times its frame "
                         f"rate where the container has no count, e.g. MKV), over the decoder's limit of "
                         f"{max_frames:,} (--max-frames); pass a larger --max-frames if you accept that work, or cut "
                         "it into parts (ffmpeg -i FILE -c copy -f segment OUT%03d.mp4)")


def _oversized(name: str, w: int, h: int, max_pixels: int) -> VideoError:
    return VideoError(f"{name}: its frames are {w}x{h} ({pixels(w * h)}), over the decoder's limit of "
                      f"{pixels(max_pixels)} (--max-pixels): a decode bomb, or a video to "
                      "downscale first (ffmpeg -i FILE -vf scale=-2:2160 OUT.mp4)")


def refuse_oversized(path: str, name: str, max_pixels: int) -> None:
    """VideoError when a stream of the file at `path` has frames of more than `max_pixels` pixels, found
    without decoding one: opening a container makes FFmpeg decode a first frame to learn its format
    (avformat_find_stream_info), which for a 16000x16000 PNG costs seconds and gigabytes before any header
    check can run. Opened with the decoders' own `max_pixels` option (AVCodecContext), FFmpeg refuses to
    decode such a frame and logs its size, which is read here. Files PyAV cannot open pass: OpenCV's open
    gives their error."""
    import av
    import av.logging

    # PyAV logs nothing by default, and drops a message that repeats the last one: the size is in an ERROR line
    level, skip = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture() as logs:
            av.open(path, stream_options=[{"max_pixels": str(max_pixels)}] * 64).close()
    except (av.FFmpegError, OSError, ValueError):
        return
    finally:
        av.logging.set_level(level)
        av.logging.set_skip_repeated(skip)
    for _, _, message in logs:
        m = re.search(r"Picture size (\d+)x(\d+) exceeds", message or "")
        if m:
            raise _oversized(name, int(m[1]), int(m[2]), max_pixels)


def _fourcc(cap) -> str:
    import cv2

    code = int(cap.get(cv2.CAP_PROP_FOURCC))
    return code.to_bytes(4, "little").rstrip(b"\0").decode("latin-1") if 0 < code < 1 << 32 else ""


def _no_frames(name: str, fourcc: str, header: int | None) -> VideoError:
    """The error for a video that opens but gives no frame: an undecodable codec, or no frame data."""
    codec = UNDECODABLE.get(fourcc.lower())
    if codec:
        return VideoError(f"{name}: no decodable video frames: its video is {codec} ('{fourcc}'), which the "
                          f"FFmpeg inside this OpenCV build cannot decode; re-encode it (ffmpeg -i FILE -c:v "
                          f"libx264 -pix_fmt yuv420p OUT.mp4) or use an OpenCV built with an {codec} decoder")
    claims = f", the header claims {header} frames" if header else ""
    return VideoError(f"{name}: no decodable video frames (codec '{fourcc or '?'}'{claims}): the video data is "
                      "missing or damaged, or this OpenCV build cannot decode the codec; check it with "
                      "`ffprobe FILE` and re-encode it (ffmpeg -i FILE -c:v libx264 OUT.mp4)")


def _read(cap, wanted: set[int], size: int, stop: int | None = None,
          progress: Progress | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Decode in order: the frames `wanted` (resized), and how many decoded before the end or `stop`."""
    got, i = {}, 0
    while stop is None or i < stop:
        if not cap.grab():
            break
        if progress is not None:
            progress()
        if i in wanted:
            ok, frame = cap.retrieve()
            if not ok or frame is None:
                break
            got[i] = resize_short(frame, size)
        i += 1
    return got, i


def _fps(cap) -> float | None:
    import cv2

    fps = cap.get(cv2.CAP_PROP_FPS)
    return float(fps) if fps and fps > 0 and np.isfinite(fps) else None


@dataclass
class Decoded:
    """Clips of one video and what decoding them found."""
    source: str
    clips: np.ndarray  # (V, T, S, S, 3) uint8 RGB
    frames: int  # frames that decoded (live: frames read)
    header_frames: int | None  # what the container claims
    fps: float | None
    passes: int = 1
    notes: list[str] = field(default_factory=list)
    live: bool = False  # sampled as a live source (the next frames as they arrived), not as a whole file

    @property
    def sampled(self) -> str:
        """How the clips were taken, for output: 'whole file' or 'live: …'."""
        if not self.live:
            return "whole file"
        secs = f", {self.frames / self.fps:.1f} s" if self.fps else ""
        return f"live stream: the first {self.frames} frames as they arrived{secs}"


def _header(cap) -> int | None:
    """The frame count the container claims: a guess, often wrong. None when it cannot be counted."""
    import cv2

    n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    return int(n) if n and n > 0 and np.isfinite(n) else None


def _opens_live(source, cap) -> bool:
    """Cameras, and URLs whose container reports no frame count or duration, are live."""
    return is_camera(source) or (is_url(source) and _header(cap) is None)


def decode(source, sampling: Sampling, threads: int | None = None, progress: Progress | None = None,
           max_pixels: int | None = None, max_frames: int | None = None) -> Decoded:
    """Decode one video (file, URL or camera index) into clips; see the module docstring for the rules.

    threads: FFmpeg decoder threads, max_pixels and max_frames header limits (see open_capture). progress:
    called once per frame read. Raises
    VideoError when no clip can be made. This decodes in the calling process; stexport's commands decode
    through stexport.runtime.decode_worker (a child process, where a crash or a stall costs one input).
    """
    name = _name(source)
    cap = open_capture(source, threads, max_pixels, max_frames)
    if _opens_live(source, cap):
        return _decode_live(cap, name, sampling, progress)
    why = None
    if not is_url(source):  # a file: exact frames by seeking (stexport.runtime.seek) where the file allows it
        try:
            decoded = _decode_seeking(check_source(source), name, sampling, threads, _header(cap), _fps(cap),
                                      progress)
            cap.release()
            return decoded
        except seek.NotSeekable as e:
            why = f"decoded sequentially: {e}"
        except BaseException:
            cap.release()
            raise
    try:
        header, fps, fourcc = _header(cap), _fps(cap), _fourcc(cap)
        wanted = set()
        if header:
            for i in (i for view in frame_indices(header, sampling) for i in view):
                wanted.update(range(i - BAND, i + 1))
        frames, n = _read(cap, wanted, sampling.size, progress=progress)
    finally:
        cap.release()
    passes = 1
    while True:
        if n == 0:
            raise _no_frames(name, fourcc, header)
        indices = frame_indices(n, sampling)
        needed = {i for view in indices for i in view}
        frames = {i: f for i, f in frames.items() if i in needed}
        missing = needed - frames.keys()
        if not missing:
            break
        if passes >= 3:
            raise VideoError(f"{name}: frames decode differently on every read; re-encode the file")
        cap = open_capture(source, threads)
        try:
            got, reached = _read(cap, missing, sampling.size, stop=max(missing) + 1, progress=progress)
        finally:
            cap.release()
        passes += 1
        frames.update(got)
        if reached < max(missing) + 1:  # this read failed earlier than the first: the video ends there
            n = reached
    notes = [why] if why else []
    notes += _count_notes(n, header, sampling)
    return Decoded(name, assemble(frames, indices, sampling), n, header, fps, passes, notes)


def _header_note(n: int, header: int | None) -> list[str]:
    """The note for a header that promises more frames than the file holds (a truncated file)."""
    return [f"header says {header} frames, {n} decode; sampled from those"] if header and n < header else []


def _count_notes(n: int, header: int | None, sampling: Sampling) -> list[str]:
    notes = _header_note(n, header)
    if n < sampling.frames:
        notes.append(f"only {n} frame{'s' * (n != 1)}, fewer than the {sampling.frames} a clip needs; "
                     "frames repeat")
    return notes


def _decode_seeking(path: str, name: str, sampling: Sampling, threads: int | None, header: int | None,
                    fps: float | None, progress: Progress | None = None) -> Decoded:
    """`decode` of a file by seeking to the frames its sampling needs; raises seek.NotSeekable where the file
    cannot be sought exactly (the caller then decodes it sequentially)."""
    pr = seek.probe(path, progress)
    indices = frame_indices(pr.frames, sampling)
    frames = seek.read_frames(path, {i for view in indices for i in view},
                              lambda bgr: resize_short(bgr, sampling.size), pr, threads, progress)
    return Decoded(name, assemble(frames, indices, sampling), pr.frames, header, fps, 1,
                   _count_notes(pr.frames, header, sampling))


def decode_clips(source, sampling: Sampling) -> np.ndarray:
    """uint8 RGB clips (V, T, S, S, 3) of one video; V = spatial_views × temporal_views, spatial outer."""
    return decode(source, sampling).clips


def _decode_live(cap, name: str, sampling: Sampling, progress: Progress | None = None) -> Decoded:
    """Clips from the next frames of an open live capture (released here)."""
    try:
        fps = _fps(cap)
        rate = sampling.rate or max(1, round((fps or 30.0) * LIVE_SECONDS / sampling.frames))
        span = (sampling.frames - 1) * rate + 1
        wanted = {t * span + j * rate for t in range(sampling.temporal_views) for j in range(sampling.frames)}
        frames, i = _read(cap, wanted, sampling.size, stop=span * sampling.temporal_views, progress=progress)
    finally:
        cap.release()
    if not frames:
        raise VideoError(f"{name}: no frames arrived")
    last = max(frames)
    indices = [[min(t * span + j * rate, last) for j in range(sampling.frames)]
               for t in range(sampling.temporal_views)]
    clips = assemble(frames, indices, sampling)
    ended = i < span * sampling.temporal_views
    notes = [f"stream ended after {i} frames; last frame repeated"] if ended else []
    return Decoded(name, clips, i, None, fps, 1, notes, live=True)


@dataclass
class Window:
    start: float  # seconds from the first frame's presentation time
    end: float
    clips: np.ndarray
    frames: int  # frames the window spans
    notes: list[str] = field(default_factory=list)


EPS = 1e-4  # seconds: timestamps come as float milliseconds


def check_seconds(window: float, stride: float) -> None:
    """Raise StexportError unless both are finite, positive seconds (the CLI's --window/--stride check)."""
    for flag, seconds in (("--window", window), ("--stride", stride)):
        if seconds is None or not 0 < seconds < float("inf"):
            raise StexportError(f"{flag} {seconds:g}: must be a positive, finite number of seconds, e.g. {flag} 4")


def _times(cap, fps: float | None, name: str, progress: Progress | None = None) -> tuple[list[float], list[str]]:
    """Pass 1: every decodable frame's presentation time in seconds from the first (CAP_PROP_POS_MSEC)."""
    import cv2

    raw = []
    while cap.grab():
        if progress is not None:
            progress()
        raw.append(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
    if not raw:
        return raw, []
    t0 = raw[0]
    times = [t - t0 for t in raw]
    if all(np.isfinite(times)) and all(b > a for a, b in zip(times, times[1:])):
        return times, []
    if fps is None:
        raise VideoError(f"{name}: the file has neither usable timestamps nor a frame rate, so seconds cannot "
                         "be mapped to frames; re-encode it (ffmpeg -i FILE -c:v libx264 OUT.mp4)")
    return [i / fps for i in range(len(raw))], [f"no usable timestamps; times assume a constant {fps:g} fps"]


def _plan(times: list[float], fps: float | None, window: float, stride: float, name: str = "video"):
    """(start, end, first frame, frame count, note) per window: frames whose display overlaps [start, start+window),
    except a frame on screen since before a gap longer than the window (it belongs to the time before the gap).

    Windows start every `stride` seconds; when the next one would start inside the video but run past its end,
    a window aligned to the end of the video takes its place (its note says so), so the file's tail is
    classified; gaps the user chose (a stride longer than the window) stay gaps. Windows in which no frame starts
    (a gap in a variable-frame-rate file, a long last frame) are skipped, never filled with the frame on screen:
    the next window's note (else the last's) counts them and says where, and the plan is built by jumping to the
    next frame, so its work follows the frames, not the duration. A video shorter than one window gives one
    window over all of it. Raises VideoError when
    `window` or `stride` is shorter than the frame spacing (windows would hold no frame of their own)."""
    n = len(times)
    last = times[-1] - times[-2] if n > 1 else (1.0 / fps if fps else 0.0)  # the last frame's display time
    duration = times[-1] + last
    spacing = float(np.median(np.diff(times))) if n > 1 else last
    for flag, seconds in (("--window", window), ("--stride", stride)):
        if n > 1 and seconds < spacing - EPS:
            raise VideoError(f"{name}: {flag} {seconds:g} is shorter than the time between frames "
                             f"({spacing:.3g} s); use {flag} {spacing:.3g} or more")
    plan, m, gap, ended = [], 0, None, False
    while m * stride + window <= duration + EPS:
        a = m * stride
        j = bisect.bisect_left(times, a - EPS)  # the first frame that starts at or after a
        if m and (j == n or times[j] >= a + window - EPS):  # no frame of its own: time the file does not hold
            start, skipped = (gap[0], gap[2]) if gap else (a, 0)
            if j == n:  # the rest of the windows: the last frame's display time
                left = int(np.floor((duration - window) / stride + EPS)) - m + 1
                gap, ended = (start, duration, skipped + left), True
                break
            # jump to the first window that holds frame j: the work follows the frames, not the duration
            nxt = max(m + 1, int(np.floor((times[j] - window) / stride + EPS)) + 1)
            gap, m = (start, times[j], skipped + nxt - m), nxt
            continue
        note = None
        if gap:
            note, gap = _gap_note(*gap, times), None
        plan.append(_span(times, a, window, note))
        m += 1
    if not plan:  # shorter than one window: one window over all of it
        return [(0.0, duration, 0, n, None)]
    # frames left unclassified where the next window would start inside the video and run past its end (not a
    # timestamp rounding's sliver, not a gap the user's stride chose)
    covered = max(plan[-1][1], m * stride)
    tail = not ended and m * stride < duration - EPS and times[-1] >= covered - EPS
    if tail:
        a, overlap = duration - window, plan[-1][1] - (duration - window)
        plan.append(_span(times, a, window,
                          f"the last window ({_secs(a)}-{_secs(duration)} s) is aligned to the end of the video so "
                          f"that its last {duration - covered:.3g} s are classified too"
                          + (f", overlapping the one before by {overlap:.3g} s" if overlap > EPS else "")))
    if gap:  # skipped windows no later window follows (or only the end-aligned one): the last window says so
        a, b, lo, count, note = plan[-1]
        notes = [_gap_note(*gap, times), note] if tail else [note, _gap_note(*gap, times)]
        plan[-1] = (a, b, lo, count, "; ".join(filter(None, notes)))
    return plan


def _gap_note(start: float, end: float, count: int, times: list[float]) -> str:
    """The note for `count` windows from `start` to `end` s skipped because no frame starts in them."""
    shown = times[max(0, bisect.bisect_right(times, start + EPS) - 1)]
    return (f"{count} window{'s' * (count != 1)} from {_secs(start)} to {_secs(end)} s skipped: no frame starts "
            f"in {'them' if count != 1 else 'it'} (the frame shown from {_secs(shown)} s is the video's only "
            "picture there)")


def _secs(t: float) -> str:
    """Seconds for notes: '9.967', '6000000', '0.5' (milliseconds at most; no exponent)."""
    return f"{t:.3f}".rstrip("0").rstrip(".")


def _span(times: list[float], a: float, window: float, note: str | None = None):
    lo = max(0, bisect.bisect_right(times, a + EPS) - 1)  # the frame on screen at `a`
    if times[lo] < a - EPS and lo + 1 < len(times) and times[lo + 1] - times[lo] > window + EPS:
        lo += 1  # ... unless it stays on screen longer than a window (a gap): the window starts with its own frame
    hi = bisect.bisect_left(times, a + window - EPS)  # frames that start before the window ends
    return a, a + window, lo, max(hi - lo, 1), note


def decode_windows(source, sampling: Sampling, window: float, stride: float,
                   threads: int | None = None, progress: Progress | None = None, max_pixels: int | None = None,
                   max_frames: int | None = None) -> Iterator[Window]:
    """Clips for windows of `window` seconds every `stride` seconds.

    Seconds are the file's presentation timestamps; a window holds the frames shown during it (from the frame
    on screen at its start), sampled like a whole video of that many frames. Windows that would run past the
    end give way to one window aligned to the end (see `_plan`); a video shorter than one window gives one
    window over all of it. Raises VideoError for windows shorter than the frame spacing. Files are read twice
    (timestamps, then the needed frames), so memory holds only the frames the open windows need: by seeking
    (timestamps from a demux-only pass, then only the GOPs that hold needed frames; see `decode`) where the
    file allows it, else sequentially with OpenCV, the first window's notes saying why. Live sources (see
    `decode`) run until the stream ends.
    """
    check_seconds(window, stride)
    name = _name(source)
    cap = open_capture(source, threads, max_pixels, max_frames)
    if _opens_live(source, cap):
        yield from _live_windows(cap, name, sampling, window, stride, progress)
        return
    why = None
    try:
        fps, fourcc, header = _fps(cap), _fourcc(cap), _header(cap)
        if not is_url(source):
            path = check_source(source)
            try:
                pr = seek.probe(path, progress)
            except seek.NotSeekable as e:
                why = f"decoded sequentially: {e}"
        if why is None and not is_url(source):
            cap.release()
            windows = _seek_windows(path, pr, sampling, window, stride, fps, threads, progress, header)
            try:
                first = next(windows, None)
            except seek.NotSeekable as e:
                why = f"decoded sequentially: {e}"
                cap = open_capture(source, threads)
            else:
                if first is not None:
                    yield first
                    try:
                        yield from windows
                    except seek.NotSeekable as e:
                        raise VideoError(f"{name}: {e} after the first windows; re-encode the file (ffmpeg -i FILE "
                                         "-c:v libx264 OUT.mp4)") from None
                return
        times, notes = _times(cap, fps, name, progress)
    finally:
        cap.release()
    if not times:
        raise _no_frames(name, fourcc, header)
    notes = ([why] if why else []) + notes + _header_note(len(times), header)
    plan, needs, ends = _window_plan(times, fps, sampling, window, stride, name)
    cap = open_capture(source, threads)
    frames: dict[int, np.ndarray] = {}
    j = i = 0
    try:
        while j < len(plan):
            while j < len(plan) and ends[j] < i:
                a, b, count, idx, more = plan[j]
                yield Window(a, b, assemble(frames, idx, sampling), count, (notes if j == 0 else []) + more)
                j += 1
                frames = {f: v for f, v in frames.items() if needs[f] >= j}
            if j >= len(plan):
                break
            if not cap.grab():
                raise VideoError(f"{name}: the second read ended at frame {i} of {len(times)}; frames decode "
                                 "differently on every read: re-encode the file")
            if progress is not None:
                progress()
            if i in needs:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise VideoError(f"{name}: frame {i} decoded once and not again; re-encode the file")
                frames[i] = resize_short(frame, sampling.size)
            i += 1
    finally:
        cap.release()


def _window_plan(times: list[float], fps: float | None, sampling: Sampling, window: float, stride: float,
                 name: str = "video"):
    """(plan, needs, ends): per window (start, end, frame count, frame indices per view, notes); the last
    window that needs each frame; each window's last frame."""
    plan = []
    for a, b, lo, count, note in _plan(times, fps, window, stride, name):
        plan.append((round(a, 6), round(b, 6), count, [[lo + x for x in view] for view in frame_indices(count, sampling)],
                     ([note] if note else []) + _count_notes(count, None, sampling)))
    needs: dict[int, int] = {}  # frame -> last window that needs it
    for j, (*_, idx, _) in enumerate(plan):
        for view in idx:
            for f in view:
                needs[f] = j
    ends = [max(max(v) for v in idx) for *_, idx, _ in plan]
    return plan, needs, ends


def _seek_windows(path: str, pr: seek.Probe, sampling: Sampling, window: float, stride: float,
                  fps: float | None, threads: int | None, progress: Progress | None = None,
                  header: int | None = None) -> Iterator[Window]:
    """decode_windows' second pass by seeking: each window as soon as its last frame has decoded (the first
    one noting a header that promised more frames than the file holds)."""
    times = pr.times()
    plan, needs, ends = _window_plan(times, fps, sampling, window, stride, display(path))
    if plan:
        plan[0] = (*plan[0][:4], _header_note(len(times), header) + plan[0][4])
    frames: dict[int, np.ndarray] = {}
    j = 0
    for i, frame in seek.iter_frames(path, set(needs), lambda bgr: resize_short(bgr, sampling.size), pr, threads,
                                     progress):
        frames[i] = frame
        while j < len(plan) and ends[j] <= i:
            a, b, count, idx, more = plan[j]
            yield Window(a, b, assemble(frames, idx, sampling), count, more)
            j += 1
            frames = {f: v for f, v in frames.items() if needs[f] >= j}


def _live_windows(cap, name: str, sampling: Sampling, window: float, stride: float,
                  progress: Progress | None = None) -> Iterator[Window]:
    """Windows of a live source, in frames at its nominal rate; times from the frames' timestamps."""
    import cv2

    fps = _fps(cap)
    if fps is None:
        cap.release()
        raise VideoError(f"{name}: the stream has no frame rate, so seconds cannot be mapped to frames")
    w, k = max(1, int(window * fps + 0.5)), max(1, int(stride * fps + 0.5))
    inner = frame_indices(w, sampling)
    offsets = {i for view in inner for i in view}
    lo = min(offsets)
    frames: dict[int, np.ndarray] = {}
    stamps: dict[int, float] = {}
    t0 = None
    j = i = 0  # next window to emit, next frame to read
    try:
        while True:
            if not cap.grab():
                break
            if progress is not None:
                progress()
            t = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            t0 = t if t0 is None else t0
            stamps[i] = t - t0 if np.isfinite(t) and t >= t0 else i / fps
            # windows that contain frame i and need it: start a = m*k with a <= i < a + w
            first = max(0, -(-(i - w + 1) // k))
            if any(i - m * k in offsets for m in range(first, i // k + 1)):
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                frames[i] = resize_short(frame, sampling.size)
            while j * k + w - 1 <= i:  # emitted once its last frame has decoded
                a = j * k
                clips = assemble(frames, [[a + x for x in v] for v in inner], sampling)
                start = stamps[a]
                yield Window(round(start, 6), round(stamps[a + w - 1] + 1.0 / fps, 6), clips, w)
                j += 1
                keep = j * k + lo
                frames = {f: v for f, v in frames.items() if f >= keep}
                stamps = {f: v for f, v in stamps.items() if f >= j * k}
            i += 1
    finally:
        cap.release()
    if j == 0:
        if i == 0:
            raise VideoError(f"{name}: no frames arrived")
        raise VideoError(f"{name}: the stream ended after {i} frames, before one {window:g} s window")


def read_clip_list(path_or_dir, problems: list[tuple[str, str]] | None = None) -> list[tuple[Path, int | None]]:
    """Videos and optional labels from the official list format, a directory, or one video file.

    A list file has one "<video> <label>" per line (the label is a class index, 0 to classes-1, and may be left
    out; video paths are relative to the list file's directory); as people also write them, a path may be
    quoted ("my clip.mp4" 3), a comma may separate the label (a.mp4,3), a `file://` URL names a local file, and
    a frame count may come before the label (mmaction's "<video> <frames> <label>"). It must be text: UTF-8 (a
    byte-order mark is allowed) or UTF-16 with its byte-order mark; blank lines, lines starting with '#' and
    comments after whitespace (" # ...") are skipped. A directory gives all video files below it, sorted,
    without labels, hidden ones (".name", e.g. macOS's "._x.mp4" resource forks) left out. A video file (by its
    extension) is a list of itself.
    Raises StexportError naming the file, the line and the fix, also for a URL (lists hold local files) and for
    a label that is a class name. problems: when a list is given, a line refused for itself is added to it
    as (the list's name, that one-line message) and skipped, and the other lines are still returned.
    """
    p = Path(path_or_dir)
    name = display(p)
    if not p.exists():
        raise StexportError(f"{name}: no such file or directory")
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not found:
            raise StexportError(f"{name}: no video files ({', '.join(sorted(VIDEO_EXTS))}) in this directory")
        return [(f, None) for f in found]
    if p.suffix.lower() in VIDEO_EXTS:
        return [(p, None)]
    try:
        data = p.read_bytes()
    except OSError as e:
        raise StexportError(f"{name}: cannot read the clip list ({e.strerror}); check its permissions") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 with its BOM (Windows Notepad's "Unicode")
        try:
            data = data.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            raise StexportError(f"{name}: not valid UTF-16 text although it starts with a UTF-16 byte-order mark; "
                                "save the list as UTF-8") from None
    if b"\0" in data[:4096]:
        raise StexportError(f"{name}: binary data, not a clip list; pass a '<video> <label>' text list, a "
                            f"directory, or video files ({', '.join(sorted(VIDEO_EXTS))})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise StexportError(f"{name}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); save the "
                            "list as UTF-8, e.g. `iconv -f latin1 -t utf-8 LIST > LIST.utf8`") from None
    out: list[tuple[Path, int | None]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"\s#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(_list_entry(p, line, f"{name}: line {number}"))
        except StexportError as e:
            if problems is None:
                raise
            problems.append((name, str(e)))
    if not out and not problems:
        raise StexportError(f"{name}: empty list; write one '<video> <label>' per line")
    return out


def _list_entry(p: Path, line: str, where: str) -> tuple[Path, int | None]:
    """(video, label) of one clip-list line (see read_clip_list); StexportError naming `where` and the fix."""
    if line.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        line = unquote(urlsplit(line.split()[0]).path) + line[len(line.split()[0]):]
    elif is_url(line.split()[0]):
        raise StexportError(f"{where} is a URL ({line.split()[0]}); clip lists hold local files: download it "
                            "first (stexport infer takes a URL itself)")
    if line[0] in "\"'" and line.find(line[0], 1) > 0:  # a quoted path, then the label
        end = line.find(line[0], 1)
        path, rest = line[1:end], line[end + 1:].strip(" \t,")
        parts = [path, rest] if rest else [path]
    elif not (p.parent / line).exists() and "," in line and (p.parent / line.rsplit(",", 1)[0].strip()).is_file():
        parts = [part.strip() for part in line.rsplit(",", 1)]  # CSV: video,label
    else:
        parts = line.rsplit(maxsplit=1)
        words = line.split()
        if (len(words) >= 3 and words[-1].lstrip("-").isdigit() and words[-2].isdigit()
                and not (p.parent / parts[0]).exists() and (p.parent / " ".join(words[:-2])).is_file()):
            parts = [" ".join(words[:-2]), words[-1]]  # mmaction: video frames label
    label = None
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        line, label = parts[0], int(parts[1])
        if label < 0:
            raise StexportError(f"{where}: label {label} is negative; labels are class numbers from 0")
    elif len(parts) == 2 and not (p.parent / line).exists() and (p.parent / parts[0]).is_file():
        raise StexportError(f"{where}: label '{parts[1]}' is not a class index; labels are class numbers (0 for "
                            f"the first line of the bundle's labels.txt), e.g. '{parts[0]} 0'")
    else:
        line = parts[0] if len(parts) == 1 else line
    return p.parent / line, label


def is_clip_list(path) -> bool:
    """Whether `path` is a clip list by name (LIST_EXTS) and content (a line that names a video file), so a
    list passed where videos go can be told from a text file passed by mistake. A list file that read_clip_list
    refuses (a URL line) counts as a list, so that its own error is the one shown."""
    p = Path(path)
    if p.suffix.lower() not in LIST_EXTS or not p.is_file():
        return False
    try:
        return any(v.suffix.lower() in VIDEO_EXTS for v, _ in read_clip_list(p))
    except StexportError:
        return True


def read_clip_lists(inputs, problems: list[tuple[str, str]] | None = None) -> list[tuple[Path, int | None]]:
    """`read_clip_list` of each input (lists, directories, videos), in order (problems: as there)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise StexportError("no clips given; pass a '<video> <label>' list, a directory or video files")
    return [entry for item in items for entry in read_clip_list(item, problems)]


def sampling_overrides(views: str | None = None, rate: int | None = None) -> dict:
    """--views TxS and --rate as Sampling fields ({rate, temporal_views, spatial_views}, the ones given);
    StexportError for malformed views."""
    change = {} if rate is None else {"rate": rate}
    if views:
        change["temporal_views"], change["spatial_views"] = parse_views(views)
    return change


def with_views(sampling: Sampling, views: str | None = None, rate: int | None = None) -> Sampling:
    """`sampling` with --views TxS and --rate applied (together, so 0 → 16 with 1x3 → 3x1 is valid)."""
    return replace(sampling, **sampling_overrides(views, rate))
