"""An INT8 bundle on OpenVINO against this CPU's INT8 GEMM peak, measured interleaved in one process.

    .venv/bin/python benchmarks/roofline.py BUNDLE [--precision bf16|f32] [--batch 4] [--rounds 7]

Each round measures the square INT8 GEMM peak (and the float one for the mixed roofline), then the model at
--batch. The ratio is taken within a round, so the drift of a shared machine between a peak measured at the
start of a long run and a row measured minutes later does not enter it. Both sides use their fastest call
(the GEMM peak is a best-of too); the median of the per-round ratios is the figure to quote.
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
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3, help="model calls per round")
    args = parse(ap)

    bundle = Bundle.load(args.bundle)
    if bundle.precision != "int8":
        sys.exit(f"{args.bundle}: a {bundle.precision} bundle; the INT8 roofline needs an int8 one")
    flops = bench.model_flops(bundle.manifest)
    float_kind = "bf16" if args.precision == "bf16" else "fp32"
    be = OpenVINOBackend(bundle, compute=args.precision, cache=False)
    x = bench.clips_for(bundle, args.batch)
    be.run(x)
    print(f"{bundle.path.name}, {args.precision} float parts, batch {args.batch}, {args.rounds} rounds")
    print(f"{'round':>5} {'int8 peak':>10} {float_kind + ' peak':>10} {'model GOP/s':>11} {'ms/clip':>8} "
          f"{'% of int8 peak':>15} {'% of roofline':>14}")
    ratios, roofs, rates = [], [], []
    for r in range(args.rounds):
        q = bench.gemm_peak("int8")[0]
        f = bench.gemm_peak(float_kind)[0]
        best = float("inf")
        for _ in range(args.calls):
            t = time.perf_counter()
            be.run(x)
            best = min(best, time.perf_counter() - t)
        rate = flops["total"] * args.batch / best / 1e9
        roof_s = flops["quantizable"] / (q * 1e9) + (flops["total"] - flops["quantizable"]) / (f * 1e9)
        ratios.append(rate / q)
        roofs.append(roof_s / (best / args.batch))
        rates.append(rate)
        print(f"{r:5d} {q:10.0f} {f:10.0f} {rate:11.0f} {best * 1e3 / args.batch:8.1f} {100 * ratios[-1]:15.1f} "
              f"{100 * roofs[-1]:14.1f}")
    print(f"median: {np.median(rates):.0f} GOP/s, {100 * np.median(ratios):.1f}% of the INT8 GEMM peak, "
          f"{100 * np.median(roofs):.1f}% of the mixed roofline (range {100 * min(ratios):.1f}–"
          f"{100 * max(ratios):.1f}% of the peak)")


if __name__ == "__main__":
    main()
