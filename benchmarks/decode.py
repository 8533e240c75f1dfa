"""Decoding cost against what is sampled (issue 32): seeking (stexport.runtime.seek) vs today's sequential decode
vs ffmpeg decoding the whole file, in one run (not a test: it prints figures and writes a Markdown table).

    .venv/bin/python benchmarks/decode.py --quick        # 720p H.264, 2 s keyframes, 10 s and 10 min
    .venv/bin/python benchmarks/decode.py                # lengths x keyframe intervals x codecs
    .venv/bin/python benchmarks/decode.py --out benchmarks/RESULTS-decode.md

Videos: a 10 s 720p `testsrc2` clip per codec (H.264, HEVC, VP9, MPEG-4 part 2) and keyframe interval
(0.5, 2, 10 s), encoded once; 60 s and 10 min videos are that clip repeated by stream copy (FFmpeg's concat
demuxer: no re-encoding, the same GOPs), so generating them costs nothing on a small machine. They are kept in
--cache (default /tmp/stexport-decode-bench). Samplings: `--rate 0` (8 frames spread over the whole video, one
view: 8 needed frames) and 3 temporal views at rate 16 (3 x 8 frames, 224 px). Methods, each with one decoder
thread (--threads): `seek` = stexport.runtime.video.decode (a file is sought where it can be, and the row says
if it fell back); `sequential` = the same call with seeking refused, i.e. the OpenCV decode of every frame that
stexport used before; `ffmpeg` = `ffmpeg -threads 1 -i FILE -f null -` (every frame decoded, nothing kept,
no conversion). Figures: median CPU seconds per video (this process and its children: on a shared, oversubscribed
machine wall time mostly measures the other work; wall seconds in brackets) over --repeat runs (1 for 10-minute
videos), and needed frames per CPU second (distinct frames the sampling needs / CPU seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from stexport.runtime import seek
from stexport.runtime.video import Sampling, decode, frame_indices

CODECS = {  # name: (ffmpeg encoder arguments, extension)
    "H.264": (["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p"], "mp4"),
    "HEVC": (["-c:v", "libx265", "-preset", "ultrafast", "-crf", "26", "-pix_fmt", "yuv420p"], "mp4"),
    "VP9": (["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "2M",
             "-pix_fmt", "yuv420p"], "webm"),
    "MPEG-4 part 2": (["-c:v", "mpeg4", "-q:v", "4"], "mp4"),
}
SAMPLINGS = {"--rate 0": Sampling(8, 224, 0, 1, 1), "3 views at rate 16": Sampling(8, 224, 16, 3, 1)}
FPS = 30


def write(path: Path, seconds: float, height: int, fps: int = 30) -> Path:
    """A generated video with moving content (OpenCV's writer: MPEG-4 part 2 .mp4, MJPEG .avi); used by
    benchmarks/infer.py and run_all.py."""
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


def ffmpeg(*args, cwd=None) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *map(str, args)], check=True, cwd=cwd)


def video_file(cache: Path, codec: str, keyint: float, seconds: int, height: int) -> Path:
    """The cached video; made on first use (a 10 s clip encoded once, longer ones concatenated from it)."""
    args, ext = CODECS[codec]
    tag = f"{codec.replace(' ', '').replace('.', '').lower()}_{height}p_k{keyint:g}"
    base = cache / f"{tag}_10s.{ext}"
    if not base.exists():
        g = max(1, round(keyint * FPS))
        gop = ["-g", str(g), "-keyint_min", str(g)]
        if codec == "H.264":
            gop += ["-x264-params", "scenecut=0"]
        elif codec == "HEVC":
            gop = ["-x265-params", f"keyint={g}:min-keyint={g}:scenecut=0:log-level=error"]
        tmp = base.with_suffix(".part." + ext)
        ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={height * 16 // 9}x{height}:rate={FPS}", "-t", 10,
               *args, *gop, tmp)
        tmp.rename(base)
    if seconds == 10:
        return base
    path = cache / f"{tag}_{seconds}s.{ext}"
    if not path.exists():
        lst = cache / f"{tag}_{seconds}s.txt"
        lst.write_text(f"file '{base.name}'\n" * (seconds // 10))
        tmp = path.with_suffix(".part." + ext)
        ffmpeg("-f", "concat", "-safe", "0", "-i", lst.name, "-c", "copy", tmp.name, cwd=cache)
        tmp.rename(path)
        lst.unlink()
    return path


@contextlib.contextmanager
def sequential_only():
    """Today's path: every file decoded sequentially by OpenCV (seeking refused)."""
    real = seek.probe

    def refuse(path, on_frame=None):
        raise seek.NotSeekable("benchmark: sequential")

    seek.probe = refuse
    try:
        yield
    finally:
        seek.probe = real


def cpu() -> float:
    """CPU seconds of this process and its finished children (ffmpeg): on a shared, oversubscribed machine
    wall time mostly measures the other work."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(median wall seconds, median CPU seconds, the last result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), cpu()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(cpu() - c)
    return statistics.median(walls), statistics.median(cpus), out


def bench(path: Path, repeat: int, threads: int, methods: set[str]) -> list[dict]:
    rows = []
    whole = None
    if "ffmpeg" in methods:
        *whole, _ = timed(lambda: ffmpeg("-threads", threads, "-i", path, "-map", "0:v:0", "-f", "null", "-"),
                          repeat)
    for label, s in SAMPLINGS.items():
        row = {"sampling": label}
        if "seek" in methods:
            *row["seek"], d = timed(lambda s=s: decode(path, s, threads=threads), repeat)
            row["fell back"] = any(n.startswith("decoded sequentially") for n in d.notes)
            n = d.frames
        if "sequential" in methods:
            with sequential_only():
                *row["sequential"], d = timed(lambda s=s: decode(path, s, threads=threads), repeat)
            n = d.frames
        row["needed"] = len({i for view in frame_indices(n, s) for i in view})
        row["frames"] = n
        row["ffmpeg"] = whole
        rows.append(row)
    return rows


def fmt(x: list[float] | None) -> str:
    """CPU seconds (wall seconds)."""
    return "–" if x is None else f"{x[1]:.3f} ({x[0]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="720p H.264, 2 s keyframes, 10 s and 10 min only")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--keyints", default="0.5,2,10", help="seconds between keyframes")
    ap.add_argument("--lengths", default="10,60,600", help="seconds")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median); 10-minute videos run once")
    ap.add_argument("--threads", type=int, default=1, help="decoder threads for every method")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/stexport-decode-bench"))
    ap.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    ap.add_argument("--no-sequential-over", type=int, default=10**9, metavar="SECONDS",
                    help="skip the slow sequential and ffmpeg rows for videos longer than this")
    args = ap.parse_args()
    codecs, keyints, lengths = args.codecs.split(","), [float(k) for k in args.keyints.split(",")], \
        [int(s) for s in args.lengths.split(",")]
    if args.quick:
        codecs, keyints, lengths = ["H.264"], [2.0], [10, 600]
    args.cache.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    head = ("| codec | keyframes | length | sampling | needed frames | seek CPU s (wall) | sequential CPU s (wall) | "
            "ffmpeg whole file CPU s (wall) | seek needed frames per CPU s | sequential needed frames per CPU s | "
            "seek speed-up (CPU) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    print(head)
    table = {}
    for codec in codecs:
        for k in keyints:
            for secs in lengths:
                path = video_file(args.cache, codec, k, secs, args.height)
                methods = {"seek"} | ({"sequential", "ffmpeg"} if secs <= args.no_sequential_over else set())
                for row in bench(path, args.repeat if secs < 600 else 1, args.threads, methods):
                    table[(codec, k, secs, row["sampling"])] = row
                    sp, sq, need = row.get("seek"), row.get("sequential"), row["needed"]
                    fell = " (fell back)" if row.get("fell back") else ""
                    per_s = "–" if sq is None else f"{need / sq[1]:.0f}"
                    gain = "–" if sq is None else f"{sq[1] / sp[1]:.1f}x"
                    line = (f"| {codec} | {k:g} s | {secs} s | {row['sampling']} | {need} of {row['frames']} | "
                            f"{fmt(sp)}{fell} | {fmt(sq)} | {fmt(row['ffmpeg'])} | {need / sp[1]:.0f} | {per_s} | "
                            f"{gain} |")
                    print(line, flush=True)
                    lines.append(line)
    run = " ".join(["benchmarks/decode.py", *sys.argv[1:]])
    notes = [(f"One run of `{run}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, "
              f"load average (1 min) {load:.1f} before, {os.getloadavg()[0]:.1f} after (a shared machine); "
              f"{args.threads} decoder thread(s); {args.height}p testsrc2 at {FPS} fps; medians of {args.repeat} "
              "runs (10-minute videos: 1).")]
    for codec in codecs:
        for k in keyints:
            a, b = table.get((codec, k, 10, "--rate 0")), table.get((codec, k, 600, "--rate 0"))
            if a and b:
                notes.append(f"{codec}, {k:g} s keyframes, `--rate 0`: 10 minutes take {b['seek'][1] / a['seek'][1]:.2f}x "
                             f"the CPU time of 10 s with seeking ({b['seek'][0] / a['seek'][0]:.2f}x the wall time"
                             + ("; issue 32 asks at most 2x)" if (codec, k) == ("H.264", 2.0) else ")")
                             + (f", {b['sequential'][1] / a['sequential'][1]:.1f}x sequentially" if a.get("sequential")
                                and b.get("sequential") else "") + ".")
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print("\n" + "\n".join(notes))
    if args.out:
        args.out.write_text("# Decoding: seeking vs sequential (benchmarks/decode.py)\n\n" + text)


if __name__ == "__main__":
    main()
