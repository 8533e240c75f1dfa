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

Memory is bounded by the frames a clip needs, never by the video's length: frames are decoded in order and
only the needed ones are converted, resized and kept. `CAP_PROP_FRAME_COUNT` is only a guess (real files
report frames that never decode): the first pass decodes the whole file once, counting the frames that
decode while keeping the frames the header's count would need and the frame before each (so a header that
claims one frame too many, the commonest lie, costs nothing more). If the count disagrees and frames are
missing, a second pass decodes up to the last missing one. A decoding error mid-stream ends the video at the
last good frame.

Live sources (camera indices, stream URLs such as rtsp://) cannot be counted: a clip is the next frames as
they arrive, each temporal view the window after the previous one; rate 0 takes T frames over the next
LIVE_SECONDS seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from stexport.errors import StexportError

# FFmpeg writes a line per damaged packet to stderr; stexport reports damage itself, one line per file.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}
LIVE_SECONDS = 2.0
BAND = 1  # first pass also keeps the BAND frames before each index the header's count needs


class VideoError(StexportError):
    """A video that cannot give a clip; the message names the file."""


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
        """Sampling a bundle (its stexport.manifest.Manifest) was made for; `overrides` set to None are
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


def is_live(source) -> bool:
    return isinstance(source, int) or (isinstance(source, str) and (source.isdigit() or "://" in source))


def _name(source) -> str:
    return f"camera {source}" if isinstance(source, int) or str(source).isdigit() else str(source)


def _quiet(cv2) -> None:
    """OpenCV warns on stderr for every file FFmpeg cannot open; stexport says it once, naming the file."""
    log = cv2.utils.logging
    if log.getLogLevel() > log.LOG_LEVEL_ERROR:
        log.setLogLevel(log.LOG_LEVEL_ERROR)


def open_capture(source, threads: int | None = None):
    """cv2.VideoCapture for a file, URL or camera index; VideoError if it cannot be opened as a video.

    threads: FFmpeg decoder threads (None: OpenCV's default, one per core). One thread decodes with about a
    quarter less CPU time, the better choice when decoding runs beside inference.
    """
    import cv2

    _quiet(cv2)
    params = [cv2.CAP_PROP_N_THREADS, int(threads)] if threads else []
    if is_live(source):
        if str(source).isdigit():
            cap = cv2.VideoCapture(int(source))  # camera backends reject FFmpeg's thread parameter
        else:
            cap = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            raise VideoError(f"{_name(source)}: cannot open the stream or camera")
        return cap
    path = Path(source)
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if path.is_dir():
        raise VideoError(f"{path}: is a directory, not a video")
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        raise VideoError(f"{path}: not a video OpenCV/FFmpeg can read (unknown format, truncated or corrupt)")
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").rstrip(b"\0").decode("latin-1")
    if fourcc in ("ansi", "text"):  # FFmpeg's tty demuxer renders any text file as a "video"
        cap.release()
        raise VideoError(f"{path}: a text file, not a video")
    return cap


def _read(cap, wanted: set[int], size: int, stop: int | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Decode in order: the frames `wanted` (resized), and how many decoded before the end or `stop`."""
    got, i = {}, 0
    while stop is None or i < stop:
        if not cap.grab():
            break
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


def _header(cap) -> int | None:
    """The frame count the container claims: a guess, often wrong."""
    import cv2

    n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    return int(n) if n and n > 0 else None


def decode(source, sampling: Sampling, threads: int | None = None) -> Decoded:
    """Decode one video (file, URL or camera index) into clips; see the module docstring for the rules.

    threads: FFmpeg decoder threads (see open_capture). Raises VideoError when no clip can be made.
    """
    if is_live(source):
        return _decode_live(source, sampling, threads)
    name = str(source)
    cap = open_capture(source, threads)
    try:
        header, fps = _header(cap), _fps(cap)
        wanted = set()
        if header:
            for i in (i for view in frame_indices(header, sampling) for i in view):
                wanted.update(range(i - BAND, i + 1))
        frames, n = _read(cap, wanted, sampling.size)
    finally:
        cap.release()
    passes = 1
    while True:
        if n == 0:
            raise VideoError(f"{name}: no decodable video frames")
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
            got, reached = _read(cap, missing, sampling.size, stop=max(missing) + 1)
        finally:
            cap.release()
        passes += 1
        frames.update(got)
        if reached < max(missing) + 1:  # this read failed earlier than the first: the video ends there
            n = reached
    notes = []
    if header and n < header:
        notes.append(f"header says {header} frames, {n} decode; sampled from those")
    if n < sampling.frames:
        notes.append(f"only {n} frame{'s' * (n != 1)}, fewer than the {sampling.frames} a clip needs; "
                     "frames repeat")
    return Decoded(name, assemble(frames, indices, sampling), n, header, fps, passes, notes)


def decode_clips(source, sampling: Sampling) -> np.ndarray:
    """uint8 RGB clips (V, T, S, S, 3) of one video; V = spatial_views × temporal_views, spatial outer."""
    return decode(source, sampling).clips


def _decode_live(source, sampling: Sampling, threads: int | None = None) -> Decoded:
    cap = open_capture(source, threads)
    try:
        fps = _fps(cap)
        rate = sampling.rate or max(1, round((fps or 30.0) * LIVE_SECONDS / sampling.frames))
        span = (sampling.frames - 1) * rate + 1
        wanted = {t * span + j * rate for t in range(sampling.temporal_views) for j in range(sampling.frames)}
        frames, i = _read(cap, wanted, sampling.size, stop=span * sampling.temporal_views)
    finally:
        cap.release()
    if not frames:
        raise VideoError(f"{_name(source)}: no frames arrived")
    last = max(frames)
    indices = [[min(t * span + j * rate, last) for j in range(sampling.frames)]
               for t in range(sampling.temporal_views)]
    clips = assemble(frames, indices, sampling)
    ended = i < span * sampling.temporal_views
    notes = [f"stream ended after {i} frames; last frame repeated"] if ended else []
    return Decoded(_name(source), clips, i, None, fps, 1, notes)


@dataclass
class Window:
    start: float  # seconds
    end: float
    clips: np.ndarray
    frames: int  # frames the window spans


def decode_windows(source, sampling: Sampling, window: float, stride: float,
                   threads: int | None = None) -> Iterator[Window]:
    """Clips for windows of `window` seconds every `stride` seconds, in one decoding pass.

    Each window is sampled like a whole video of its length. Windows that would run past the end are dropped;
    a video shorter than one window gives one window over all of it. Live sources run until the stream ends.
    """
    if window <= 0 or stride <= 0:
        raise StexportError("--window and --stride must be positive (seconds)")
    name = _name(source)
    cap = open_capture(source, threads)
    fps = _fps(cap)
    if fps is None:
        cap.release()
        raise VideoError(f"{name}: the container has no frame rate, so seconds cannot be mapped to frames")
    w, k = max(1, int(window * fps + 0.5)), max(1, int(stride * fps + 0.5))
    inner = frame_indices(w, sampling)
    offsets = {i for view in inner for i in view}
    lo = min(offsets)
    frames: dict[int, np.ndarray] = {}
    j = i = 0  # next window to emit, next frame to read
    try:
        while True:
            if not cap.grab():
                break
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
                yield Window(a / fps, (a + w) / fps, clips, w)
                j += 1
                keep = j * k + lo
                frames = {f: v for f, v in frames.items() if f >= keep}
            i += 1
    finally:
        cap.release()
    if j == 0 and i > 0:
        if is_live(source):
            raise VideoError(f"{name}: the stream ended after {i} frames, before one {window:g} s window")
        d = decode(source, sampling, threads)
        yield Window(0.0, d.frames / fps, d.clips, d.frames)
    elif i == 0:
        raise VideoError(f"{name}: no decodable video frames")


def read_clip_list(path_or_dir) -> list[tuple[Path, int | None]]:
    """Videos and optional labels from the official list format or a directory.

    A list file has one "<video> <label>" per line (the label is an integer and may be left out; video paths
    are relative to the list file's directory). A directory gives all video files below it, sorted, without
    labels.
    """
    p = Path(path_or_dir)
    if not p.exists():
        raise StexportError(f"{p}: no such file or directory")
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTS)
        if not found:
            raise StexportError(f"{p}: no video files ({', '.join(sorted(VIDEO_EXTS))}) in this directory")
        return [(f, None) for f in found]
    out: list[tuple[Path, int | None]] = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        label = None
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            line, label = parts[0], int(parts[1])
        out.append((p.parent / line, label))
    if not out:
        raise StexportError(f"{p}: empty list; write one '<video> <label>' per line")
    return out


def with_views(sampling: Sampling, views: str | None = None, rate: int | None = None) -> Sampling:
    """`sampling` with --views TxS and --rate applied (together, so 0 → 16 with 1x3 → 3x1 is valid)."""
    change = {} if rate is None else {"rate": rate}
    if views:
        change["temporal_views"], change["spatial_views"] = parse_views(views)
    return replace(sampling, **change)
