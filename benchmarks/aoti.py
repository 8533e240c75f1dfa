"""AOTInductor (model.pt2) vs TorchScript (model.ts) vs the folded model in eager PyTorch vs ONNX Runtime, on CPU
(not a test).

    .venv/bin/python benchmarks/aoti.py [--iters 20] [--work /tmp/stexport-aoti]

Model: the trained demo (examples/motion: stexport-demo-vit, 4 blocks, width 192, 96 px, 8 frames), FP32. The
bundle gets model.ts and model.pt2 (compile time reported); each runtime runs the same random uint8 clips:
ms/clip at batch 1 (median of --iters calls) and clips/s at batch 4 (median call), after warm-up, rows
interleaved per round so machine load hits all alike. Fidelity: max |Δlogit| against the PyTorch reference.
ViT-B/16 rows: benchmarks/run_all.py (row kind "aoti").
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "motion"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/stexport-aoti"))
    args = ap.parse_args()

    import torch
    from torch._inductor import aoti_load_package

    from stexport.build import aoti, torchscript
    from stexport.runtime.backends import create
    from stexport.build.pipeline import build_bundle
    from stexport.build.fold import fold
    from stexport.build.loaders import reference_for_bundle

    torch.set_num_threads(args.threads)
    b = build_bundle(DEMO / "motion_adapter.pt", backbone="stexport-demo-vit",
                     pretrained=str(DEMO / "backbone.safetensors"), precision="fp32", frames=8,
                     out=args.work / "demo-fp32", force=True)
    t = time.perf_counter()
    torchscript.add_to_bundle(b)
    ts_s = time.perf_counter() - t
    aoti.add_to_bundle(b)
    rec = b.manifest.aoti
    folded = fold(reference_for_bundle(b))
    compiled = aoti_load_package(str(b.file("aoti")))
    ts = create("torchscript", b, threads=args.threads)
    ort = create("onnxruntime", b, threads=args.threads)
    ref = create("torch", b)

    def torch_run(model):
        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()
        return run

    runners = {"PyTorch eager (folded model)": torch_run(folded), "TorchScript (model.ts)": ts.run,
               "AOTInductor (model.pt2)": torch_run(compiled), "ONNX Runtime": ort.run}
    rng = np.random.default_rng(0)
    x1 = rng.integers(0, 256, (1, 8, b.size, b.size, 3), dtype=np.uint8)
    x4 = rng.integers(0, 256, (4, 8, b.size, b.size, 3), dtype=np.uint8)
    want = ref.run(x4)
    times: dict[str, dict[int, list[float]]] = {k: {1: [], 4: []} for k in runners}
    for run in runners.values():  # warm-up
        run(x1), run(x4)
    for _ in range(args.iters):
        for name, run in runners.items():
            for x in (x1, x4):
                t = time.perf_counter()
                run(x)
                times[name][len(x)].append(time.perf_counter() - t)
    print(f"demo model fp32, {args.threads} threads, torch {torch.__version__}; model.ts exported in {ts_s:.0f} s, "
          f"model.pt2 compiled in {rec.compile_seconds:.0f} s ({b.file('aoti').stat().st_size / 1e6:.1f} MB)\n")
    print("| runtime | ms/clip b1 | clips/s b4 | max abs dlogit vs reference |")
    print("|---|---|---|---|")
    for name, run in runners.items():
        d = float(np.abs(run(x4) - want).max())
        print(f"| {name} | {statistics.median(times[name][1]) * 1e3:.1f} | "
              f"{4 / statistics.median(times[name][4]):.1f} | {d:.2g} |")
    for be in (ts, ort, ref):
        be.close()


if __name__ == "__main__":
    main()
