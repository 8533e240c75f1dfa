"""Decode + preprocess throughput of stexport.runtime.video on this machine (not a test: it prints figures).

    .venv/bin/python benchmarks/decode.py [--seconds 10] [--height 720] [--repeat 5]

Writes a generated video (MPEG-4 part 2 .mp4 and MJPEG .avi, moving content) into a temp dir, then times
`decode(video, sampling)` for the Kinetics setup (224 px, 8 frames, rate 16, 3 temporal × 1 spatial views)
and the SSv2 setup (rate 0, 1 × 3). A clip is one view (8 × 224 × 224 × 3 uint8); a video gives 3. CPU time
is printed too: on a machine shared with other work it varies less than wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from stexport.runtime.video import Sampling, decode


def write(path: Path, seconds: float, height: int, fps: int = 30) -> Path:
    width = height * 16 // 9
    fourcc = "MJPG" if path.suffix == ".avi" else "mp4v"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8), (width, height))
    for i in range(int(seconds * fps)):
        f = np.roll(base, 4 * i, axis=1)
        cv2.circle(f, (100 + 5 * i % (width - 200), height // 2), height // 8, (0, 0, 255), -1)
        out.write(f)
    out.release()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    setups = {"k400 3x1 rate 16": Sampling(8, 224, 16, 3, 1), "ssv2 1x3 rate 0": Sampling(8, 224, 0, 1, 3)}
    print(f"cv2 {cv2.__version__}, {cv2.getNumThreads()} OpenCV threads")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("video.mp4", "video.avi"):
            path = write(Path(tmp) / name, args.seconds, args.height)
            cap = cv2.VideoCapture(str(path))
            n = 0
            t = time.perf_counter()
            while cap.grab():
                n += 1
            grab_fps = n / (time.perf_counter() - t)
            print(f"\n{name}: {n} frames of {args.height}p, {path.stat().st_size / 1e6:.1f} MB; "
                  f"FFmpeg decode alone {grab_fps:.0f} frames/s")
            for label, s in setups.items():
                decode(path, s)  # warm up
                times, cpu = [], []
                for _ in range(args.repeat):
                    t, c = time.perf_counter(), time.process_time()
                    d = decode(path, s)
                    times.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
                best, med, cpu_med = min(times), float(np.median(times)), float(np.median(cpu))
                print(f"  {label}: {med * 1e3:.0f} ms per video (best {best * 1e3:.0f}; CPU time "
                      f"{cpu_med * 1e3:.0f} ms), passes {d.passes}: {s.views / med:.1f} clips/s "
                      f"(best {s.views / best:.1f}), {1 / med:.2f} videos/s")


if __name__ == "__main__":
    main()
