"""Top-1 accuracy and confusion matrix of demo checkpoints with the PyTorch reference, on generated videos.

    python examples/motion/generate.py --splits val,test
    python examples/motion/evaluate.py examples/motion/motion_adapter.pt runs/k1/motion_adapter.pt

Videos are decoded from the list files with stexport.runtime.video.decode_clips (the demo's sampling: 8 frames
evenly over the whole video, one 96 px view) and classified by stexport's reference model, loaded from the
backbone and the adapter checkpoint exactly as `stexport build` loads them.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import generate as gen
from train import BACKBONE, load_eval_set, predict

from stexport.build.backbone import load_backbone
from stexport.build.deltas import load_deltas
from stexport.build.reference import build_reference


def confusion(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    k = len(gen.CLASSES)
    return np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="+", type=Path, help="adapter checkpoints (official layout)")
    p.add_argument("--backbone", type=Path, default=HERE / "backbone.safetensors")
    p.add_argument("--lists", default=f"{HERE / 'val.txt'},{HERE / 'test.txt'}",
                   help="comma-separated '<video> <label>' lists")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object per checkpoint and list")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(BACKBONE, str(a.backbone))
    sets = {Path(lst): load_eval_set(Path(lst)) for lst in a.lists.split(",") if lst}
    for ckpt in a.adapters:
        deltas = load_deltas(ckpt)
        model = build_reference(bb, deltas)
        for lst, (clips, labels) in sets.items():
            pred = predict(model, clips)
            acc = float((pred == labels).mean())
            cm = confusion(pred, labels)
            if a.json:
                print(json.dumps({"adapter": str(ckpt), "list": str(lst), "videos": len(labels), "top1": acc,
                                  "kernel": list(deltas.spec.kernel), "confusion": cm.tolist()}))
                continue
            print(f"{ckpt} on {lst}: top-1 {100 * acc:.1f}% of {len(labels)} videos "
                  f"(kernel {deltas.spec.kernel})")
            width = max(len(c) for c in gen.CLASSES)
            print(" " * (width + 1) + " ".join(f"{i:>3}" for i in range(len(gen.CLASSES))))
            for i, row in enumerate(cm):
                print(f"{gen.CLASSES[i]:>{width}} " + " ".join(f"{v:>3}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
