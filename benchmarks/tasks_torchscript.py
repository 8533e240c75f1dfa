"""Task packs on TorchScript (issue 23): what a swappable model.ts costs against a plain one.

    python benchmarks/tasks_torchscript.py BASE FULL PACK [--threads 1] [--rounds 15]

BASE: a swappable bundle, FULL: a full bundle of the pack's task, PACK: that task's pack for BASE (model.ts is
exported into both bundles when missing). Reports ms/clip at batch 1 (median of interleaved rounds of 10
calls) of FULL's frozen module, of BASE's own task (`forward`: preserved task attributes) and of the pack
(`forward_task`: the pack's tensors as inputs), the max |Δlogit| of the pack vs FULL, and the time to load a
pack (read, check, tensors to the device) vs opening FULL and running one clip.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("full")
    ap.add_argument("pack")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    from stexport.runtime import backends
    from stexport.bundle.store import Bundle
    from stexport.build.torchscript import add_to_bundle

    base, full = Bundle.load(args.base), Bundle.load(args.full)
    for b in (base, full):
        if not b.has("torchscript"):
            add_to_bundle(b)
    opts = dict(device="cpu", threads=args.threads)
    x = np.random.default_rng(0).integers(0, 256, (1, base.frames, base.size, base.size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    plain = backends.create("torchscript", Bundle.load(args.full), **opts)
    plain.run(x)
    open_ms = (time.perf_counter() - t0) * 1e3
    swap = backends.create("torchscript", base, **opts)
    t0 = time.perf_counter()
    pack = swap.load_task(args.pack)
    load_ms = (time.perf_counter() - t0) * 1e3
    runs = {"full bundle (frozen)": lambda: plain.run(x), "base, its own task": lambda: swap.run(x),
            "base + pack": lambda: swap.run(x, task=pack)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        for _ in range(5):
            f()
    for _ in range(args.rounds):
        for k, f in runs.items():
            t0 = time.perf_counter()
            for _ in range(10):
                f()
            times[k].append((time.perf_counter() - t0) / 10 * 1e3)
    for k, v in times.items():
        print(f"{k}: {statistics.median(v):.3f} ms/clip (batch 1, {args.threads} thread(s))")
    print(f"pack vs full bundle: max |Δlogit| {np.abs(swap.run(x, task=pack) - plain.run(x)).max():.2g}")
    print(f"load a pack: {load_ms:.1f} ms; open the full bundle + 1 clip: {open_ms:.1f} ms")


if __name__ == "__main__":
    main()
