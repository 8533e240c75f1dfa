"""Install profiles and scale-out overhead, measured once (a benchmark, not a test).

    python benchmarks/scale_out.py BUNDLE VIDEO_DIR [--base-venv DIR] [--workers 1]

- `--base-venv DIR`: a virtual environment with the base install only (`python -m venv DIR &&
  DIR/bin/pip install .`); its size (du) and this one's, `stexport infer --help` wall time and the wall time to
  the first result of `stexport infer VIDEO --json` in each (median of 3).
- Ray overhead: `infer --output` over VIDEO_DIR in this process (--batch 32) and with `--ray` (a local cluster,
  started by the command: its start-up is included and also reported apart), seconds per video and the ratio,
  and whether both files hold the same scores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def du(path: Path) -> str:
    return subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True).stdout.split()[0]


def wall(cmd: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scores(path: Path) -> list:
    return [(r["path"], r.get("top"), r.get("error")) for r in map(json.loads, path.read_text().splitlines())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("videos")
    ap.add_argument("--base-venv", type=Path)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    here = Path(sys.executable).parent
    envs = {"full (this one)": here}
    if a.base_venv:
        envs["base"] = a.base_venv / "bin"
    one = sorted(p for p in Path(a.videos).iterdir() if p.suffix == ".mp4")[0]
    for name, bindir in envs.items():
        exe = str(bindir / "stexport")
        print(f"{name}: venv {du(bindir.parent)}; infer --help {wall([exe, 'infer', '--help']):.2f} s; first "
              f"result {wall([exe, 'infer', str(one), '-m', a.bundle, '--json']):.2f} s")
    exe = str(here / "stexport")
    with tempfile.TemporaryDirectory() as tmp:
        n = sum(1 for p in Path(a.videos).iterdir() if p.is_file())
        local, ray = Path(tmp, "local.jsonl"), Path(tmp, "ray.jsonl")
        t = wall([exe, "infer", a.videos, "-m", a.bundle, "--batch", "32", "--output", str(local)], 1)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import ray; ray.init(_node_ip_address='127.0.0.1', "
                        "include_dashboard=False); ray.shutdown()"], capture_output=True)
        start = time.perf_counter() - t0
        r = wall([exe, "infer", a.videos, "-m", a.bundle, "--output", str(ray), "--ray", "--workers",
                  str(a.workers)], 1)
        print(f"{n} videos: local {t / n * 1000:.1f} ms/video ({t:.1f} s); ray {r / n * 1000:.1f} ms/video "
              f"({r:.1f} s, of which ~{start:.1f} s starting a local Ray); ratio {r / t:.2f} "
              f"(without Ray's start-up {(r - start) / t:.2f}); same scores: {scores(local) == scores(ray)}")


if __name__ == "__main__":
    main()
