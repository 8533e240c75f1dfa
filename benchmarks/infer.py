"""End-to-end `infer` throughput as a fraction of model-only throughput (not a test: it prints figures).

    .venv/bin/python benchmarks/infer.py [--backbone ViT-B-16] [--precision fp32] [--videos 4] [--repeat 2]

Builds a bundle from a random backbone and random 12x384 deltas (400 classes, 8 × 224) into a temp dir,
writes `--videos` generated 720p clips of `--seconds`, then times, in videos per second:
  model only  backend.run on each video's already-decoded views (batch = views);
  end to end  Classifier.classify_many over the files (decode in a background thread, overlapping inference);
  serial      decode, then run, one video after the other (what the overlap saves).
The modes alternate `--repeat` times and the best round of each counts, so load from other work on the machine
biases none of them. CPU seconds per video are printed too: on a shared machine they are the steadier figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from stexport.build.backbone import random_backbone
from stexport.build.pipeline import build_bundle
from stexport.runtime.classify import Classifier
from stexport.build.synthetic import random_deltas
from stexport.runtime.video import decode

from decode import write  # benchmarks/decode.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-B-16")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "videos").mkdir()
        paths = [write(tmp / "videos" / f"v{i}.mp4", args.seconds, args.height) for i in range(args.videos)]
        bb = random_backbone(args.backbone)
        t = time.perf_counter()
        bundle = build_bundle(random_deltas(bb.config, width=384, num_classes=400), backbone=bb,
                              precision=args.precision, frames=8, out=tmp / "bundle",
                              calib=tmp / "videos" if args.precision == "int8" else None, calib_clips=4)
        print(f"built {args.backbone} {args.precision} bundle in {time.perf_counter() - t:.0f} s")
        options = {"threads": args.threads} if args.threads else {}
        with Classifier(bundle, backend=args.backend, **options) as clf:
            print(f"backend: {clf.describe()}")
            clips = [decode(p, clf.sampling).clips for p in paths]
            clf.backend.run(clips[0])  # warm up

            def model_only():
                for c in clips:
                    clf.probabilities(c)

            def end_to_end():
                return list(clf.classify_many(paths))

            def serial():
                for p in paths:
                    clf.classify(p)

            best, cpu = {}, {}
            for _ in range(args.repeat):
                for name, fn in (("model", model_only), ("e2e", end_to_end), ("serial", serial)):
                    t, c = time.perf_counter(), time.process_time()
                    out = fn()
                    best[name] = max(best.get(name, 0.0), len(paths) / (time.perf_counter() - t))
                    cpu[name] = min(cpu.get(name, float("inf")), (time.process_time() - c) / len(paths))
                    if name == "e2e":
                        decode_s = sum(r.decode_s for r in out) / len(out)
            model, e2e, serial_rate = best["model"], best["e2e"], best["serial"]

        v = clf.sampling.views
        print(f"{args.videos} videos of {args.seconds:g} s {args.height}p, {clf.sampling.describe()}")
        print(f"  model only   {model:.3f} videos/s ({model * v:.2f} clips/s)")
        print(f"  end to end   {e2e:.3f} videos/s = {100 * e2e / model:.1f}% of model only "
              f"(decode {decode_s:.2f} s per video, in the background)")
        print(f"  serial       {serial_rate:.3f} videos/s = {100 * serial_rate / model:.1f}% of model only")
        print(f"  CPU seconds per video: model only {cpu['model']:.2f}, end to end {cpu['e2e']:.2f} "
              f"({100 * cpu['model'] / cpu['e2e']:.1f}%: the end-to-end fraction where the model alone keeps "
              f"every core busy)")


if __name__ == "__main__":
    main()
