"""The motion demo (examples/motion): a deterministic clip generator, the shipped backbone + adapter, their
accuracy on generated videos decoded with OpenCV, and `stexport build` / `verify` on them."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stexport.build.backbone import load_backbone
from stexport.build.deltas import AdapterSpec, load_deltas
from stexport.build.reference import build_reference, normalize
from stexport.runtime.video import Sampling, decode, decode_clips, frame_indices, read_clip_list

DEMO = Path(__file__).resolve().parents[1] / "examples" / "motion"
sys.path.insert(0, str(DEMO))
import generate as gen

BACKBONE = "stexport-demo-vit"
SAMPLING = Sampling(frames=8, size=96, rate=0, temporal_views=1, spatial_views=1)
DEMO_VIEWS = {"rate": 0, "temporal_views": 1, "spatial_views": 1}
GATE = 0.90


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """27 test-split videos (3 per class) and 9 train-split ones, written by the generator."""
    d = tmp_path_factory.mktemp("motion")
    gen.generate(d, ["test"], count=27)
    gen.generate(d, ["train"], count=9)
    return d


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(BACKBONE, str(DEMO / "backbone.safetensors"))
    return build_reference(bb, load_deltas(DEMO / "motion_adapter.pt"))


def test_generator_is_deterministic(tmp_path):
    for split in ("train", "val"):
        a, la = gen.split_clip(gen.SEED, split, 4)
        b, lb = gen.split_clip(gen.SEED, split, 4)
        assert la == lb == 4 and a.dtype == np.uint8 and np.array_equal(a, b)
    other, _ = gen.split_clip(gen.SEED + 1, "val", 4)
    assert other.shape != a.shape or not np.array_equal(other, a)
    gen.generate(tmp_path / "x", ["val"], count=12)
    gen.generate(tmp_path / "y", ["val"], count=9)  # clip i does not depend on how many are made
    x, y = (tmp_path / "x" / "val.txt").read_text(), (tmp_path / "y" / "val.txt").read_text()
    assert x.startswith(y) and len(x.splitlines()) == 12
    for name in sorted(p.name for p in (tmp_path / "y" / "val").iterdir()):
        assert (tmp_path / "x" / "val" / name).read_bytes() == (tmp_path / "y" / "val" / name).read_bytes()
    assert (tmp_path / "x" / "labels.txt").read_text().split() == list(gen.CLASSES)


def test_committed_lists_are_the_generators():
    for split in gen.SPLITS:
        text = (DEMO / f"{split}.txt").read_text()
        assert text == "\n".join(gen.list_lines(split)) + "\n"
        counts = np.bincount([int(line.split()[1]) for line in text.splitlines()], minlength=len(gen.CLASSES))
        assert counts.min() == counts.max()  # balanced
    assert (DEMO / "labels.txt").read_text().split() == list(gen.CLASSES)


def test_videos_decode_to_the_rendered_frames(clips):
    entries = read_clip_list(clips / "test.txt")
    assert len(entries) == 27 and [lb for _, lb in entries[:9]] == list(range(9))
    for i, (path, label) in enumerate(entries[:9]):
        frames, want = gen.split_clip(gen.SEED, "test", i)
        assert want == label
        d = decode(str(path), SAMPLING)
        assert d.frames == d.header_frames == len(frames) and gen.LENGTHS[0] <= d.frames <= gen.LENGTHS[1]
        assert d.clips.shape == (1, 8, 96, 96, 3) and d.fps == gen.FPS
        # the codec is lossy but close: mean error of the sampled frames against the rendered ones (RGB)
        idx = frame_indices(d.frames, SAMPLING)[0]
        err = np.abs(d.clips[0].astype(int) - frames[idx][..., ::-1].astype(int)).mean()
        assert err < 6, err


def test_temporal_classes_are_time_reversed_pairs():
    """Each pair draws the same object and plays it in opposite directions: no single frame tells them apart."""
    for a, b in (("move_left", "move_right"), ("grow", "shrink"), ("fade_in", "fade_out"),
                 ("red_to_blue", "blue_to_red")):
        fa, ta = gen.render(np.random.default_rng(7), gen.CLASSES.index(a), n=16)
        fb, tb = gen.render(np.random.default_rng(7), gen.CLASSES.index(b), n=16)
        xa = np.stack([ta.attributes(i, gen.SIZE) for i in range(16)])
        xb = np.stack([tb.attributes(i, gen.SIZE) for i in range(16)])
        assert not np.allclose(xa, xb) and np.allclose(xa, xb[::-1]), (a, b)
        assert not np.array_equal(fa, fb)


def test_shipped_checkpoint_and_backbone():
    ckpt = torch.load(DEMO / "motion_adapter.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "lr_sched", "loss_scaler", "next_epoch"}
    deltas = load_deltas(DEMO / "motion_adapter.pt")
    assert deltas.spec == AdapterSpec(dim=192, width=96, kernel=(3, 1, 1), pre_attn=(0, 1, 2, 3),
                                      pre_mlp=(0, 1, 2, 3), num_classes=len(gen.CLASSES))
    assert deltas.spec.layout == "8x96"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(BACKBONE, str(DEMO / "backbone.safetensors"))
    assert bb.config.image_size == 96 and bb.config.width == 192 and bb.config.act == "quick_gelu"
    assert all(torch.equal(v, v.half().float()) for v in bb.state_dict.values())  # FP16 like CLIP's release
    size = sum((DEMO / f).stat().st_size for f in ("motion_adapter.pt", "backbone.safetensors"))
    assert size < 8e6, size


def test_shipped_model_reaches_the_gate(model, clips):
    entries = read_clip_list(clips / "test.txt")
    x = torch.from_numpy(np.concatenate([decode_clips(str(p), SAMPLING) for p, _ in entries]))
    with torch.no_grad():
        pred = model(normalize(x)).argmax(1).numpy()
    labels = np.array([lb for _, lb in entries])
    assert (pred == labels).mean() >= GATE, (pred, labels)
    # time matters: each reversed pair shares frames, so reversing every clip must swap its prediction
    with torch.no_grad():
        rev = model(normalize(x.flip(1))).argmax(1).numpy()
    swap = np.array([0, 2, 1, 4, 3, 6, 5, 8, 7])
    assert (rev == swap[labels]).mean() >= 0.8


@pytest.mark.parametrize("precision,gate", [("fp32", []), ("fp16", ["--max-drop", "0.5"]), ("int8", [])])
def test_demo_bundle_passes_verify(clips, precision, gate, tmp_path):
    from stexport.cli.app import app
    from typer.testing import CliRunner

    from stexport.build.pipeline import build_bundle

    b = build_bundle(DEMO / "motion_adapter.pt", backbone=BACKBONE, pretrained=str(DEMO / "backbone.safetensors"),
                     precision=precision, labels=DEMO / "labels.txt", sampling=DEMO_VIEWS, out=tmp_path / "b",
                     calib=clips / "train.txt" if precision == "int8" else None, calib_clips=9)
    assert b.manifest.sampling.model_dump() == DEMO_VIEWS and b.labels == list(gen.CLASSES)
    r = CliRunner().invoke(app, ["verify", str(b.path), "--clips", str(clips / "test.txt"), "--json",
                                 *gate])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    acc = report["metrics"]["accuracy"]
    assert report["videos"] == 27 and report["passed"]
    assert acc["reference_top1"] >= 100 * GATE
    if precision == "fp32":
        assert report["metrics"]["top1_agreement"] == 1.0
