"""Synthetic motion clips for the stexport demo, written as real encoded videos.

Each clip is one shape (circle, square, triangle or star) over a smooth, low-contrast background with sensor
noise. Its class is what happens over time, never what one frame shows: every class but `static` comes in a
time-reversed pair (left / right, grow / shrink, fade in / out, red→blue / blue→red), so a model that averages
frames without looking at their order cannot tell the pair apart. Shape, colour, size, speed, start position,
angle, background and video length are random.

Everything is seeded: clip i of a split is drawn from numpy's generator seeded with (seed, split, i) alone, so
the first k clips of a split are the same whatever the split's size, and the same seed gives the same frames,
videos and lists on any machine.

    python examples/motion/generate.py                       # train / val / test under examples/motion/
    python examples/motion/generate.py --splits val --out /tmp/motion --count 54

Writes <out>/<split>/<i>_<class>.mp4 (MPEG-4 part 2, 8 fps, 96×96, 12–20 frames), <out>/<split>.txt in the
official list format ("<video> <label>", paths relative to the list file) and <out>/labels.txt. The lists
for the default seed and counts are committed beside this file; the videos are not (a few seconds to make).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = ("static", "move_left", "move_right", "grow", "shrink", "fade_in", "fade_out", "red_to_blue",
           "blue_to_red")
SHAPES = ("circle", "square", "triangle", "star")
SPLITS = {"train": 0, "val": 1, "test": 2}
COUNTS = {"train": 180, "val": 270, "test": 270}  # multiples of the class count: balanced lists
SEED = 20261124
SIZE = 96
FPS = 8.0
LENGTHS = (12, 20)  # frames per video, inclusive
FOURCC = "mp4v"
VERSION = 1  # bump when rendering changes: the shipped lists and checkpoint belong to one version

RED = np.array([40.0, 40.0, 220.0])  # BGR, as OpenCV draws
BLUE = np.array([220.0, 60.0, 30.0])


@dataclass
class Track:
    """Per-frame attributes of the object (arrays of length n) and what stays fixed."""

    shape: int
    angle: float  # radians
    x: np.ndarray  # centre, pixels
    y: np.ndarray
    radius: np.ndarray
    alpha: np.ndarray  # opacity 0..1
    color: np.ndarray  # (n, 3) BGR 0..255

    def attributes(self, i: int, size: int) -> np.ndarray:
        """Frame i's regression targets for image pretraining, all roughly in [0, 1]."""
        return np.array([self.x[i] / size, self.y[i] / size, self.radius[i] / (size / 4), self.alpha[i],
                         *(self.color[i] / 255.0)], np.float32)


NUM_ATTRIBUTES = 7


def _ramp(rng, n: int, a: float, b: float) -> np.ndarray:
    """a → b over n frames, linear with a slightly random easing (speed varies within the clip too)."""
    t = np.linspace(0.0, 1.0, n)
    g = rng.uniform(0.8, 1.25)
    return a + (b - a) * t ** g


def _color(rng) -> np.ndarray:
    """A saturated random colour (BGR) that stands out from grey-ish backgrounds."""
    hue = rng.uniform(0, 180)
    hsv = np.array([[[hue, rng.uniform(150, 255), rng.uniform(170, 255)]]], np.uint8)
    import cv2

    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)


def sample_track(rng, label: int, n: int, size: int = SIZE) -> Track:
    name = CLASSES[label]
    s = size / 96.0
    shape = int(rng.integers(len(SHAPES)))
    angle = rng.uniform(0, 2 * np.pi)
    r = rng.uniform(11, 17) * s
    radius = np.full(n, r)
    alpha = np.full(n, rng.uniform(0.75, 1.0))
    color = np.tile(_color(rng), (n, 1))
    margin = r + 2 * s
    x = np.full(n, rng.uniform(margin, size - margin))
    y = np.full(n, rng.uniform(margin, size - margin))

    if name in ("move_left", "move_right"):
        d = rng.uniform(30, 58) * s
        x0 = rng.uniform(margin, size - margin - d)
        path = _ramp(rng, n, x0, x0 + d)
        x = path[::-1].copy() if name == "move_left" else path
    elif name in ("grow", "shrink"):
        r0, r1 = rng.uniform(7, 11) * s, rng.uniform(19, 26) * s
        radius = _ramp(rng, n, r0, r1)
        radius = radius[::-1].copy() if name == "shrink" else radius
        margin = r1 + 2 * s
        x = np.full(n, rng.uniform(margin, size - margin))
        y = np.full(n, rng.uniform(margin, size - margin))
    elif name in ("fade_in", "fade_out"):
        a = _ramp(rng, n, rng.uniform(0.0, 0.1), rng.uniform(0.9, 1.0))
        alpha = a[::-1].copy() if name == "fade_out" else a
    elif name in ("red_to_blue", "blue_to_red"):
        a, b = RED + rng.uniform(-25, 25, 3), BLUE + rng.uniform(-25, 25, 3)
        t = _ramp(rng, n, 0.0, 1.0)[:, None]
        color = np.clip(a + (b - a) * t, 0, 255)
        color = color[::-1].copy() if name == "blue_to_red" else color
    return Track(shape=shape, angle=angle, x=x, y=y, radius=radius, alpha=alpha, color=color)


def background(rng, size: int = SIZE) -> np.ndarray:
    """A smooth low-contrast colour field (3×3 random cells upscaled), float32 BGR."""
    import cv2

    base = rng.uniform(60, 190) + rng.uniform(-12, 12, 3)
    cells = np.clip(base + rng.uniform(-18, 18, (3, 3, 3)), 0, 255).astype(np.float32)
    return cv2.resize(cells, (size, size), interpolation=cv2.INTER_CUBIC)


def _polygon(shape: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray | None:
    if SHAPES[shape] == "circle":
        return None
    if SHAPES[shape] == "star":
        k = np.arange(10)
        rr = np.where(k % 2 == 0, r, r * 0.45)
        th = angle + k * np.pi / 5
    else:
        m = {"square": 4, "triangle": 3}[SHAPES[shape]]
        rr = np.full(m, r * (1.0 if m == 4 else 1.15))
        th = angle + np.arange(m) * 2 * np.pi / m
    return np.stack([cx + rr * np.cos(th), cy + rr * np.sin(th)], 1)


SHIFT = 4  # sub-pixel bits for OpenCV's drawing


def mask(track: Track, i: int, size: int) -> np.ndarray:
    """Frame i's object coverage (size, size) float32 in [0, 1], anti-aliased at sub-pixel precision."""
    import cv2

    m = np.zeros((size, size), np.uint8)
    cx, cy, r = track.x[i], track.y[i], track.radius[i]
    poly = _polygon(track.shape, cx, cy, r, track.angle)
    one = 1 << SHIFT
    if poly is None:
        cv2.circle(m, (int(cx * one), int(cy * one)), int(r * one), 255, -1, cv2.LINE_AA, SHIFT)
    else:
        cv2.fillPoly(m, [np.round(poly * one).astype(np.int32)], 255, cv2.LINE_AA, SHIFT)
    return m.astype(np.float32) / 255.0


def render(rng, label: int, n: int | None = None, size: int = SIZE) -> tuple[np.ndarray, Track]:
    """One clip of class `label`: uint8 BGR frames (n, size, size, 3) and the object's track."""
    if n is None:
        n = int(rng.integers(LENGTHS[0], LENGTHS[1] + 1))
    track = sample_track(rng, label, n, size)
    bg = background(rng, size)
    a = np.stack([mask(track, i, size) for i in range(n)])[..., None] * track.alpha.astype(np.float32)[:, None, None, None]
    color = track.color.astype(np.float32)[:, None, None, :]
    frames = bg * (1 - a) + color * a + rng.integers(-8, 9, (n, size, size, 3), dtype=np.int16)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8), track


def clip_rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], i])


def split_clip(seed: int, split: str, i: int, size: int = SIZE) -> tuple[np.ndarray, int]:
    """Clip i of a split: labels cycle through the classes, the rest is drawn from the clip's own seed."""
    label = i % len(CLASSES)
    frames, _ = render(clip_rng(seed, split, i), label, size=size)
    return frames, label


def write_video(path: Path, frames: np.ndarray, fps: float = FPS, fourcc: str = FOURCC) -> None:
    """Encode BGR frames with cv2.VideoWriter (written to a temporary name, then renamed)."""
    import cv2

    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    h, w = frames.shape[1:3]
    out = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    if not out.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write {tmp} with {fourcc}")
    for f in frames:
        out.write(f)
    out.release()
    os.replace(tmp, path)


def list_lines(split: str, count: int | None = None) -> list[str]:
    """The list file's lines: '<split>/<i>_<class>.mp4 <label>' (labels cycle, so lists are balanced)."""
    n = COUNTS[split] if count is None else count
    return [f"{split}/{i:05d}_{CLASSES[i % len(CLASSES)]}.mp4 {i % len(CLASSES)}" for i in range(n)]


def generate(out: Path, splits=("train", "val", "test"), count: int | None = None, seed: int = SEED,
             size: int = SIZE) -> dict[str, Path]:
    """Write the videos and list files of `splits` under `out`; returns {split: list file}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    lists = {}
    for split in splits:
        (out / split).mkdir(exist_ok=True)
        lines = list_lines(split, count)
        for i, line in enumerate(lines):
            frames, label = split_clip(seed, split, i, size)
            name, want = line.rsplit(" ", 1)
            assert int(want) == label
            write_video(out / name, frames)
        lists[split] = out / f"{split}.txt"
        tmp = lists[split].with_name(f".{split}.txt.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, lists[split])
    return lists


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent, help="output directory")
    p.add_argument("--splits", default="train,val,test", help="comma-separated: train, val, test")
    p.add_argument("--count", type=int, default=None, help="clips per split (default: train 180, val/test 270)")
    p.add_argument("--seed", type=int, default=SEED)
    a = p.parse_args(argv)
    splits = [s for s in a.splits.split(",") if s]
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        p.error(f"unknown split {bad[0]!r}: choose from {', '.join(SPLITS)}")
    for split, path in generate(a.out, splits, a.count, a.seed).items():
        print(f"{split}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
