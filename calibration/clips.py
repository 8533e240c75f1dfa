"""Calibration inputs: a seeded choice of videos from a list or directory, decoded as `infer` decodes them (in the
decoder's child process, stexport.runtime.decode_worker: a video that crashes or stalls it costs only itself)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stexport.errors import StexportError

log = logging.getLogger("stexport")


@dataclass
class ClipSet:
    """What calibration runs on: chosen videos (or in-memory clips) and a stable identity for the cache.

    limits: the decoder's (a stexport.runtime.decode_worker.DecodeLimits; None: its defaults). failed: the
    videos `batches` could not decode, each with its error (filled as it runs)."""

    source: str
    videos: list[Path]
    arrays: np.ndarray | None = None  # in-memory uint8 clips (N, T, S, S, 3), when given instead of files
    limits: object = None
    failed: list[tuple[str, str]] = field(default_factory=list)
    role: str = "calibration"  # what the clips are for, in messages: "calibration", "gate" (build --gate-clips)

    def key(self) -> str:
        h = hashlib.sha256()
        if self.arrays is not None:
            h.update(np.ascontiguousarray(self.arrays).tobytes())
        for v in self.videos:
            st = v.stat()
            h.update(json.dumps([str(v.resolve()), st.st_size, st.st_mtime_ns]).encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.videos) if self.arrays is None else len(self.arrays)


def choose(calib, count: int, seed: int = 0, limits=None, role: str = "calibration") -> ClipSet:
    """Up to `count` videos of a '<video> <label>' list or a directory, chosen with a seeded RNG (sorted order
    first, so the same files give the same choice anywhere). An array of uint8 clips is taken as it is.
    limits: the decoder's DecodeLimits for these videos (None: its defaults)."""
    if isinstance(calib, ClipSet):
        return calib
    if isinstance(calib, np.ndarray):
        if calib.dtype != np.uint8 or calib.ndim != 5 or calib.shape[-1] != 3:
            raise StexportError(f"calibration clips must be uint8 (N, T, S, S, 3), got {calib.dtype} "
                                f"{calib.shape}")
        return ClipSet(source=f"array {tuple(calib.shape)}", videos=[], arrays=calib)
    from stexport.runtime.video import read_clip_list

    if count < 1:
        raise StexportError(f"--calib-clips {count}: need at least one calibration clip")
    path = Path(calib)
    if path.is_file() and path.suffix.lower() not in (".txt", ".csv", ".list", ".lst", ""):
        from stexport.runtime.video import VIDEO_EXTS

        if path.suffix.lower() in VIDEO_EXTS:
            return ClipSet(source=str(path), videos=[path], limits=limits, role=role)
    entries = read_clip_list(path)
    videos = sorted({p for p, _ in entries})
    missing = [v for v in videos if not v.is_file()]
    if missing:
        raise StexportError(f"{path}: lists {len(missing)} video(s) that do not exist, e.g. {missing[0]}; "
                            "paths in a list are relative to the list file")
    if count < len(videos):
        videos = sorted(random.Random(seed).sample(videos, count))
    return ClipSet(source=str(path), videos=videos, limits=limits, role=role)


def batches(clips: ClipSet, sampling) -> Iterator[np.ndarray]:
    """uint8 (V, T, S, S, 3) per video (all its views), or per in-memory clip. A video that cannot be decoded
    (unreadable, crashes or stalls the decoder: see stexport.runtime.decode_worker) is skipped with a warning
    and listed in clips.failed; StexportError when none decodes."""
    if clips.arrays is not None:
        for a in clips.arrays:
            yield a[None]
        return
    from stexport.runtime.decode_worker import DecodeWorker
    from stexport.runtime.video import VideoError

    clips.failed.clear()
    with DecodeWorker(threads=None, limits=clips.limits) as decoder:
        for v in clips.videos:
            try:
                views = decoder.decode(str(v), sampling).clips
            except VideoError as e:
                clips.failed.append((str(v), str(e)))
                log.warning("%s: %s", clips.role, e)
                continue
            yield views
    if len(clips.failed) == len(clips.videos):
        raise StexportError(f"{clips.source}: none of the {len(clips.videos)} {clips.role} videos could be decoded "
                            f"(first error: {clips.failed[0][1]})")
