"""OpenVINO with a model compiled per batch size (the default) against one dynamic-batch model, paired.

    .venv/bin/python benchmarks/openvino_static.py BUNDLE [--precision bf16|f32] [--batch 4] [--pairs 20]

Both backends live in one process and their calls alternate (the order flips every pair), so a shared
machine's drift hits both alike; the figure to quote is the median of the per-pair time ratios.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ov_args import parse, parser

from stexport.runtime import bench
from stexport.runtime.backends.openvino import OpenVINOBackend
from stexport.bundle.store import Bundle


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=20)
    args = parse(ap)

    bundle = Bundle.load(args.bundle)
    runs = {"dynamic": OpenVINOBackend(bundle, compute=args.precision, cache=False, static=False),
            "static": OpenVINOBackend(bundle, compute=args.precision, cache=False)}
    x = bench.clips_for(bundle, args.batch)
    out = {k: be.run(x) for k, be in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.pairs):
        for k in (("dynamic", "static") if i % 2 == 0 else ("static", "dynamic")):
            t = time.perf_counter()
            runs[k].run(x)
            times[k].append(time.perf_counter() - t)
    d, s = np.array(times["dynamic"]), np.array(times["static"])
    r = s / d
    ms = 1e3 / args.batch
    print(f"{bundle.path.name}, {args.precision}, batch {args.batch}, {args.pairs} pairs")
    print(f"ms/clip  dynamic: median {np.median(d) * ms:.1f}, best {d.min() * ms:.1f};  "
          f"static: median {np.median(s) * ms:.1f}, best {s.min() * ms:.1f}")
    print(f"static/dynamic time per pair: median {np.median(r):.3f} (quartiles {np.percentile(r, 25):.3f}–"
          f"{np.percentile(r, 75):.3f}); max |Δlogit| {np.abs(out['static'] - out['dynamic']).max():.3g}")


if __name__ == "__main__":
    main()
