"""Peak RSS of `stexport build`: FP32 against INT8 with N calibration clips (issue 28: calibration memory).

Each build runs in its own process under `/usr/bin/time -v` (its "Maximum resident set size"), one after the
other, on random ViT-B/16 weights (`--pretrained none`) and a random adapter (width 8, 4 classes) that fits it;
the calibration videos are generated (one 64x48 MPEG-4 file per clip). Example (what README's table ran):

    python benchmarks/calib_memory.py --clips 8 64 --frames 8 --views 1x1 --out /tmp/calib_mem.json

Writes a JSON list of {precision, clips, max_rss_mb, seconds} and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _videos(folder: Path, n: int) -> Path:
    import cv2

    lines = []
    for i in range(n):
        path = folder / f"v{i:03d}.mp4"
        out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (64, 48))
        rng = np.random.default_rng(i)
        for _ in range(24):
            out.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        out.release()
        lines.append(f"{path.name} {i % 4}")
    listing = folder / "calib.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def _adapter(folder: Path, backbone: str) -> Path:
    from stexport.build.backbone import shape_config
    from stexport.build.deltas import save_official
    from stexport.build.synthetic import random_deltas

    path = folder / "adapter.pt"
    save_official(path, random_deltas(shape_config(backbone), width=8, num_classes=4))
    return path


def peak_rss(args: list[str], env: dict) -> tuple[float, float]:
    """(max RSS in MB, seconds) of one command, from GNU time's report."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True, env=env, check=False)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"build failed ({p.returncode}):\n{p.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return kb / 1024, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-B-16")
    ap.add_argument("--clips", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--views", default="1x1")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--migrate", default="auto")
    ap.add_argument("--no-fp32", action="store_true", help="skip the FP32 row")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing = _videos(tmp, max(a.clips))
        adapter = _adapter(tmp, a.backbone)
        env = {**os.environ, "STEXPORT_CALIB_CACHE": str(tmp / "cache"), "STEXPORT_HOME": str(tmp / "home")}
        base = [sys.executable, "-m", "stexport.cli.app", "build", "--adapter", str(adapter), "--backbone",
                a.backbone, "--pretrained", "none", "--frames", str(a.frames), "--views", a.views, "--force"]
        runs = ([] if a.no_fp32 else [("fp32", 0)]) + [("int8", n) for n in a.clips]
        for precision, n in runs:
            extra = ["--calib", str(listing), "--calib-clips", str(n), "--calib-method", a.method,
                     "--int8-migrate", a.migrate] if precision == "int8" else []
            rss, took = peak_rss([*base, "--precision", precision, "--out", str(tmp / f"b-{precision}-{n}"),
                                  *extra], env)
            rows.append({"precision": precision, "clips": n, "max_rss_mb": round(rss), "seconds": round(took, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{a.backbone}, {a.frames} frames, views {a.views}, --calib-method {a.method}, "
          f"--int8-migrate {a.migrate}\n")
    print("| build | calibration clips | peak RSS (MB) | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['clips'] or '-'} | {r['max_rss_mb']:,} | {r['seconds']} |")


if __name__ == "__main__":
    main()
