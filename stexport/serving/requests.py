"""What a request to `stexport serve` carries and how it is refused: the error shape every route answers
with (RequestError: HTTP status + one line), server-side path confinement, and a decoded video waiting for a
batch (Clips). Shared by the classic routes (app.py) and the Open Inference Protocol (oip.py, oip_routes.py)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class RequestError(Exception):
    """A bad request: HTTP `status` (4xx) and a one-line message for the JSON error body; `reason`: a decoding
    failure's VideoError.reason (None for other errors)."""

    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def confine(path: str, roots: tuple[str, ...]) -> str:
    """The realpath of `path` if it names a regular file inside one of `roots` (realpaths), else RequestError:
    403 when paths are off, the path holds '..' or resolves outside every root (symlinks included), 404 when
    there is no such file, 400 when it is not a regular file or not a usable string."""
    if not roots:
        raise RequestError(403, "reading server-side paths is off on this server; upload the video instead")
    if not isinstance(path, str) or not path or "\0" in path:
        raise RequestError(400, "'path' must be a non-empty string")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, "'path' is not valid UTF-8") from None
    if ".." in Path(path).parts:
        raise RequestError(403, f"{path}: '..' is not allowed in paths")
    real = os.path.realpath(path)
    inside = [r for r in roots if os.path.commonpath([real, r]) == r]
    if not inside:
        raise RequestError(403, f"{path}: outside the directories this server may read")
    if not os.path.exists(real):
        raise RequestError(404, f"{path}: no such file")
    if not os.path.isfile(real):
        raise RequestError(400, f"{path}: not a regular file")
    return real


def json_type(value) -> str:
    """What a JSON value is, for error messages: 'an array', 'a number', …"""
    kinds = ((bool, "true/false"), (str, "a string"), (int, "a number"), (float, "a number"), (list, "an array"),
             (dict, "an object"))
    return next((name for t, name in kinds if isinstance(value, t)), "null")


@dataclass
class Clips:
    """One video's decoded views, ready to classify."""

    source: str
    clips: np.ndarray  # (V, T, S, S, 3) uint8
    frames: int
    decode_s: float
    notes: list[str]
    task: str | None = None  # a loaded task's name (None: the default task)
    ready_at: float = field(default_factory=time.perf_counter)  # decoded; from here it queues for a batch
