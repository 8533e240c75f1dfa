"""What a request to `stexport serve` carries and how it is refused: the error shape every route answers
with (RequestError: HTTP status + one line), server-side path confinement, and a decoded video waiting for a
batch (Clips). Shared by the classic routes (app.py) and the Open Inference Protocol (oip.py, oip_routes.py)."""

from __future__ import annotations

import asyncio
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
    if not isinstance(path, str) or not path:
        raise RequestError(400, "'path' must be a non-empty string")
    if "\0" in path:
        raise RequestError(400, "'path' holds a NUL character (\\u0000), which no file name can hold")
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


RATE_GRACE_S = 2.0  # seconds a body may take before its average rate is checked (TCP slow start, a busy client)


class UploadBudget:
    """The request-body bytes one replica holds at once (`limit`): what bounds its memory when many callers
    upload together, or trickle bodies in. `take` raises RequestError 503 (retry later) past the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise RequestError(503, f"this server holds {self.held} bytes of uploads already (limit {self.limit}); "
                                    "retry in a few seconds")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


async def read_body(request, limit: int, min_rate: float, budget: UploadBudget) -> bytes:
    """The body of a Starlette `request`, read chunk by chunk. RequestError 413 once it passes `limit` bytes
    (declared in Content-Length or streamed); 408 when it arrives slower than `min_rate` bytes/s on average
    (checked from RATE_GRACE_S seconds on; a caller that sends nothing is cut off when it falls behind, without
    waiting for its next byte), so slow senders cannot hold the replica's request slots; 503 when the replica's
    `budget` is spent. The bytes taken from `budget` are recorded on `request.state.held` for the caller to
    give back once the request is answered (OIPRoutes.__call__)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "bad Content-Length")
        if int(declared) > limit:
            raise RequestError(413, f"upload of {int(declared)} bytes is over this server's limit of {limit} bytes")
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream = request.stream().__aiter__()
    while True:
        # the moment this body falls below min_rate unless more arrives
        due = start + max(RATE_GRACE_S, size / min_rate) if min_rate > 0 else None
        try:
            wait = None if due is None else max(due - loop.time(), 0.001)
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestError(408, f"the request body came slower than this server's minimum of {min_rate / 1e3:g} "
                                    f"kB/s ({size} bytes in {loop.time() - start:.1f} s); send it faster") from None
        if not chunk:
            continue
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"upload is over this server's limit of {limit} bytes")
        budget.take(len(chunk))
        request.state.held = getattr(request.state, "held", 0) + len(chunk)
        chunks.append(chunk)
    return b"".join(chunks)


def unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook refusing a key given twice (RequestError 400), in time linear in the keys."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise RequestError(400, f'the JSON body repeats "{twice}"; give each key once')
    return out


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
