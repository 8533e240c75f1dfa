"""Planted-outlier stand-ins (stexport.build.outliers) and outlier migration (calibration.smooth): the stand-ins
keep the FP32 function, the migration keeps the FP32 graph's values, and INT8 with migration holds on them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import smooth_clips, trained_like

from stexport.build.backbone import random_backbone
from stexport.build.deltas import Deltas, infer_spec
from stexport.build.outliers import plant_norm_outliers, plant_residual_offset
from stexport.build.reference import build_reference, normalize
from stexport.build.synthetic import random_deltas

KW = dict(width=32, pre_attn=True, pre_mlp=True)


@pytest.fixture(scope="module")
def tiny():
    bb = trained_like(random_backbone("stexport-tiny-vit"))
    return bb, random_deltas(bb.config, num_classes=10, **KW)


def logits(bb, sd, x):
    with torch.no_grad():
        return build_reference(bb, Deltas(infer_spec(sd), sd))(normalize(torch.from_numpy(x))).numpy()


@pytest.mark.parametrize("scale,channels", [(2.0, 1), (32.0, 6), (256.0, 16)])
def test_norm_outliers_keep_the_function_and_make_outliers(tiny, scale, channels):
    bb, sd = tiny
    x = smooth_clips(3, 32)
    planted = plant_norm_outliers(bb, scale, channels, seed=3)
    np.testing.assert_allclose(logits(planted, sd, x), logits(bb, sd, x), rtol=0, atol=1e-6)
    assert bb.state_dict["transformer.resblocks.0.ln_1.weight"] is not planted.state_dict[
        "transformer.resblocks.0.ln_1.weight"]  # the original is untouched
    for i in range(bb.config.layers):
        for ln in ("ln_1", "ln_2"):
            ratio = planted.state_dict[f"transformer.resblocks.{i}.{ln}.weight"] / \
                bb.state_dict[f"transformer.resblocks.{i}.{ln}.weight"]
            assert sorted(ratio.unique().tolist()) == ([1.0, scale] if channels < bb.config.width else [scale])
            assert int((ratio == scale).sum()) == channels
    assert planted.source["planted"] == [{"kind": "norm", "scale": scale, "channels": channels, "seed": 3,
                                          "norms": ["ln_1", "ln_2"]}]
    with pytest.raises(ValueError):
        plant_norm_outliers(bb, scale, bb.config.width + 1)


@pytest.mark.parametrize("offset", [16.0, 128.0])
def test_residual_offset_keeps_the_function(tiny, offset):
    bb, sd = tiny
    x = smooth_clips(3, 32)
    planted, psd = plant_residual_offset(bb, sd, offset)
    ref = logits(bb, sd, x)
    # LayerNorm subtracts the offset again: the rounding of |x| + offset in FP32 is all that differs
    np.testing.assert_allclose(logits(planted, psd, x), ref, rtol=0, atol=offset * 4e-7 * 8)
    assert not np.allclose(logits(planted, sd, x), ref, atol=1e-3)  # without the fc1 compensation it differs


def test_migration_keeps_the_fp32_graph_values(tiny, tmp_path):
    """sites → plan → apply on an FP32 export: LayerNorm and adapter sites found, the same logits."""
    import onnxruntime as ort
    from stexport.calibration import smooth
    from stexport.calibration.qdq import quant_targets

    from stexport.build.pipeline import build_bundle

    bb, sd = tiny
    b = build_bundle(sd, backbone=bb, precision="fp32", out=tmp_path / "b")
    proto = onnx.load(str(b.file("onnx")))
    names = [n.name for n in quant_targets(proto)]
    found = smooth.sites(proto, names)
    kinds = sorted((s.kind, tuple(s.readers)) for s in found)
    layers = bb.config.layers
    assert [k for k, _ in kinds].count("norm") == 2 * layers  # ln_1 → q, k, v and ln_2 → fc per block
    assert ("norm", ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v")) in kinds
    # every adapter's fc1 reads the residual stream (block 0's pre-attention one reads ln_pre's output)
    assert sorted(r for k, (r,) in ((k, rs) for k, rs in kinds if k == "stream")) == sorted(
        f"blocks.{i}.{p}.fc1" for i in range(layers) for p in ("pre_attn", "pre_mlp"))
    rng = np.random.default_rng(0)
    stats = {}
    for s in found:
        lo = -rng.uniform(0.1, 8.0, bb.config.width)
        stats[s.tensor] = (lo, lo + rng.uniform(0.1, 16.0, bb.config.width))
    steps = smooth.plan(proto, found, stats, alpha=0.5)
    assert all(np.all(np.log2(st["s"]) == np.round(np.log2(st["s"]))) for st in steps.values())
    moved = smooth.apply(onnx.load(str(b.file("onnx"))), steps)
    onnx.checker.check_model(moved)
    x = smooth_clips(2, 32)

    def run(p):
        sess = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]

    np.testing.assert_allclose(run(moved), run(proto), rtol=0, atol=2e-5)


def test_int8_migration_recovers_planted_outliers(tiny, tmp_path, monkeypatch):
    """On the tiny model: a residual-offset stand-in wrecks plain per-tensor INT8; with migration (the default)
    its INT8 error is within 1.5x of the plain model's without migration, and the manifest records it. An old
    manifest without the field still loads."""
    from stexport.build.pipeline import build_bundle
    from stexport.build.verify import compare
    from stexport.bundle.manifest import Manifest
    from stexport.runtime.backends import create

    monkeypatch.setenv("STEXPORT_CALIB_CACHE", str(tmp_path / "calibration"))
    bb, sd = tiny
    calib, x = smooth_clips(12, 32, seed=1), smooth_clips(24, 32, seed=2)
    ref = logits(bb, sd, x)
    planted, psd = plant_residual_offset(bb, sd, 64.0)
    error = {}
    for name, (b_, sd_) in {"plain": (bb, sd), "offset": (planted, psd)}.items():
        for migrate in ("off", "auto"):
            b = build_bundle(sd_, backbone=b_, precision="int8", calib=calib, out=tmp_path / f"{name}-{migrate}",
                             **({} if migrate == "auto" else {"int8_migrate": "off"}))
            with create("onnxruntime", b) as be:
                error[name, migrate] = compare(ref, be.run(x))
            mig = b.manifest.calibration.migration
            if migrate == "off":
                assert mig["alpha"] is None and mig["why"].startswith("off: --int8-migrate off")
            else:
                assert {c["alpha"] for c in mig["candidates"]} == {None, 0.25, 0.5, 0.75}
                assert mig["chosen_on_clips"] == 8
    base = error["plain", "off"]["mean_abs"]
    assert error["offset", "off"]["mean_abs"] > 3 * base  # the stand-in bites
    assert error["offset", "auto"]["mean_abs"] <= 1.5 * base, error
    assert error["plain", "auto"]["mean_abs"] <= 1.05 * base, error
    assert error["offset", "auto"]["top5_agreement"] >= error["plain", "off"]["top5_agreement"]
    fixed = build_bundle(sd, backbone=bb, precision="int8", calib=calib, out=tmp_path / "fixed", int8_migrate="0.5")
    mig = fixed.manifest.calibration.migration
    assert mig["alpha"] == 0.5 and mig["candidates"] == [] and mig["stream_sites"] == 2 * bb.config.layers
    with create("onnxruntime", fixed) as be:
        assert compare(ref, be.run(x))["mean_abs"] <= 1.5 * base
    from stexport.bundle.store import Bundle
    from stexport.trt_engines.onnx_support import check_tensorrt_ops

    for migrated in (fixed, Bundle.load(tmp_path / "offset-auto")):  # the folded scales and shifts: plain ops
        assert check_tensorrt_ops(onnx.load(str(migrated.file("onnx")))) == []
    old = b.manifest.model_dump(mode="json")
    old["calibration"].pop("migration")
    assert Manifest.model_validate(old).calibration.migration is None


def test_migrate_option_is_checked(tiny_adapter):
    from stexport.build.options import BuildOptions
    from stexport.errors import StexportError

    base = dict(adapter=tiny_adapter, backbone="stexport-tiny-vit", pretrained="none", precision="int8",
                calib=smooth_clips(2, 32))
    assert BuildOptions(**base).int8_migrate == "auto"
    assert BuildOptions(**base, int8_migrate="0.5").int8_migrate == "0.5"
    assert BuildOptions(**base, swappable=True).int8_migrate == "off"
    for bad in ("1.5", "smooth"):
        with pytest.raises(StexportError, match=f"--int8-migrate {bad}: use auto, off or an alpha"):
            BuildOptions(**base, int8_migrate=bad)
    for bad, meant in (("OFF", "off"), ("Auto", "auto"), ("of", "off")):  # a new user's spelling gets a hint
        said = f"^--int8-migrate {bad}: did you mean {meant}\\? use auto, off or an alpha between 0 and 1$"
        with pytest.raises(StexportError, match=said):
            BuildOptions(**base, int8_migrate=bad)
    with pytest.raises(StexportError, match="needs --precision int8"):
        BuildOptions(adapter=tiny_adapter, int8_migrate="off")
    with pytest.raises(StexportError, match="swappable"):
        BuildOptions(**base, swappable=True, int8_migrate="0.5")
