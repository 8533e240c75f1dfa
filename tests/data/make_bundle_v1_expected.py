"""Regenerate tests/data/bundle-v1-clips.npy and bundle-v1-logits.npy (the bundle itself stays as old stexport
wrote it; never rewrite it).

The expected logits do not come from the path under test (ONNX Runtime / OpenVINO on bundle-v1/model.onnx):
they are test_foundation.plain_forward — the plain-tensor transcription of the official ST-Adapter forward —
in float64, on the backbone the manifest records (stexport-tiny-vit, random weights, seed 0:
random_backbone("stexport-tiny-vit", seed=0)) and the bundle's deltas.safetensors read with safetensors
itself, on clips normalised here with CLIP's mean/std. The clips are picked from seeded random candidates so
that they predict different classes, each with a top-1 margin the FP32 runtimes cannot flip.

    .venv/bin/python tests/data/make_bundle_v1_expected.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from test_foundation import plain_forward  # noqa: E402

from stexport.build.backbone import random_backbone  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as the v1 manifest records
STD = (0.26862954, 0.26130258, 0.27577711)
CLIPS, MARGIN = 4, 0.05


def expected(clips_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, T, H, W, 3) → float64 logits (N, classes) of the official forward."""
    bb = random_backbone("stexport-tiny-vit", seed=0)
    sd = {k: v.double() for k, v in {**bb.state_dict, **load_file(HERE / "bundle-v1" / "deltas.safetensors")}.items()}
    x = torch.from_numpy(clips_u8).double().div(255).permute(0, 4, 1, 2, 3)  # (N, 3, T, H, W)
    x = (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1, 1)) / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        return plain_forward(sd, x, bb.config.heads, bb.config.act).numpy()


def main() -> None:
    # a random ViT hardly reacts to its input (its CLS token barely depends on the patches): most clips predict
    # class 4. Candidates: every constant colour on a 5-level grid, and pixel noise. Taken: the clip with the
    # widest top-1 margin of each class predicted, then noise clips up to CLIPS.
    levels = (0, 64, 128, 192, 255)
    flat = [np.full((8, 32, 32, 3), (r, g, b), np.uint8) for r in levels for g in levels for b in levels]
    noise = list(np.random.default_rng(0).integers(0, 256, (CLIPS, 8, 32, 32, 3), dtype=np.uint8))
    cand = np.stack(flat + noise)
    logits = expected(cand)
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin, pred = top2[:, 1] - top2[:, 0], logits.argmax(1)
    chosen = []
    for c in np.unique(pred[:len(flat)]):
        i = max(np.flatnonzero((pred == c) & (np.arange(len(cand)) < len(flat))), key=lambda i: margin[i])
        if margin[i] >= MARGIN:
            chosen.append(int(i))
    chosen += [len(flat) + i for i in range(CLIPS - len(chosen)) if margin[len(flat) + i] >= MARGIN]
    if len(set(pred[chosen])) < 2:
        raise SystemExit(f"the clips predict only class {pred[chosen]}")
    clips = np.ascontiguousarray(cand[chosen])
    want = expected(clips)
    np.save(HERE / "bundle-v1-clips.npy", clips)
    np.save(HERE / "bundle-v1-logits.npy", want.astype(np.float32))
    print(f"{len(chosen)} clips; classes {want.argmax(1).tolist()}; top-1 margins {np.round(margin[chosen], 3).tolist()}")

if __name__ == "__main__":
    main()
