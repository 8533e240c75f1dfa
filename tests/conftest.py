"""Shared test fixtures."""

from __future__ import annotations

import numpy as np
import pytest


def write_video(path, frames: int = 40, width: int = 160, height: int = 120, fps: float = 25.0,
                fourcc: str | None = None) -> "Path":  # noqa: F821
    """A generated video whose frame i is distinguishable: a moving bar and a colour that encode i."""
    import cv2

    fourcc = fourcc or {".avi": "MJPG", ".mkv": "MJPG"}.get(str(path)[-4:], "mp4v")
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    assert out.isOpened(), f"cv2.VideoWriter cannot write {path} with {fourcc}"
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(frames):
        f = np.empty((height, width, 3), np.uint8)
        f[..., 0] = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
        f[..., 1] = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
        f[..., 2] = (i * 37) % 256
        x = (i * 7) % max(width - 8, 1)
        f[:, x:x + 8] = 255
        out.write(f)
    out.release()
    return path


@pytest.fixture
def make_video(tmp_path):
    """make_video(name, frames=40, width=160, height=120, fps=25, fourcc=None) -> Path in tmp_path."""

    def make(name: str = "clip.mp4", **kw):
        return write_video(tmp_path / name, **kw)

    return make
