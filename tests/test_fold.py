"""The folded deploy model equals the reference (FP32 ≤ 1e-4) and is made of export-friendly operations."""

from __future__ import annotations

import pytest
import torch
from conftest import trained_like

from stexport.build.backbone import random_backbone
from stexport.build.deltas import Deltas, infer_spec
from stexport.build.fold import fold
from stexport.build.reference import build_reference, normalize
from stexport.build.synthetic import random_deltas

TINY = "stexport-tiny-vit"


def reference(name, seed=0, **delta_kw):
    bb = trained_like(random_backbone(name, seed=seed))
    sd = random_deltas(bb.config, seed=seed, **delta_kw)
    return build_reference(bb, Deltas(infer_spec(sd), sd))


def frames(ref, batch=2, T=8, seed=0):
    s = ref.cfg.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, T, s, s, 3), dtype=torch.uint8, generator=g)


LAYOUTS = {
    "pre_mlp": dict(width=32),
    "pre_attn+pre_mlp": dict(width=32, pre_attn=True, pre_mlp=True),
    "pre_attn, kernel 3x3x3": dict(width=16, pre_attn=True, pre_mlp=False, kernel=(3, 3, 3)),
    "kernel 5x1x1, some blocks": dict(width=24, kernel=(5, 1, 1), blocks=[1]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", [TINY, "stexport-tiny-vit-gelu"])
def test_folded_equals_reference_uint8_and_float(name, layout):
    ref = reference(name, **LAYOUTS[layout])
    u = frames(ref)
    with torch.no_grad():
        want = ref(normalize(u))
        got = fold(ref)(u)
        got_float = fold(ref, "float")(normalize(u).permute(0, 2, 1, 3, 4))
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert (got_float - want).abs().max().item() <= 1e-4


def test_any_frame_count_and_batch():
    ref = reference(TINY, width=32, pre_attn=True)
    deploy = fold(ref)
    for T, B in ((1, 1), (3, 2), (16, 1)):
        u = frames(ref, batch=B, T=T, seed=T)
        with torch.no_grad():
            assert (deploy(u) - ref(normalize(u))).abs().max().item() <= 1e-4


def test_class_token_untouched_by_adapters():
    """The adapter's update on the class token is exactly zero, as in the reference (which slices it off)."""
    ref = reference(TINY, width=32)
    adapter = fold(ref).blocks[0].pre_mlp
    x = torch.randn(2 * 8 * 17, 64)
    out = adapter(x, 8).reshape(16, 17, 64)
    assert torch.equal(out[:, 0], x.reshape(16, 17, 64)[:, 0])


def test_normalisation_and_scale_folded_into_weights():
    ref = reference(TINY, width=32)
    deploy = fold(ref)
    names = dict(deploy.named_parameters())
    assert "embed.weight" in names and "embed_bias" in names
    assert not any("mean" in n or "std" in n for n in names)
    # 1/√d sits in the query projection: weights equal the reference's q rows scaled by dh^-0.5
    dh = ref.cfg.width // ref.cfg.heads
    w_ref = ref.transformer.resblocks[0].attn.in_proj_weight[: ref.cfg.width]
    assert torch.allclose(deploy.blocks[0].attn.q.weight, w_ref * dh ** -0.5)
    assert not any(isinstance(m, torch.nn.Dropout) for m in deploy.modules())


def test_fp16_compute_keeps_norms_softmax_mean_and_head_in_fp32():
    ref = reference(TINY, width=32)
    deploy = fold(ref, compute_dtype=torch.float16)
    assert deploy.blocks[0].fc.weight.dtype == torch.float16
    assert deploy.ln_pre.weight.dtype == torch.float32 and deploy.head.weight.dtype == torch.float32
    u = frames(ref)
    with torch.no_grad():
        got, want = deploy(u), ref(normalize(u))
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() < 0.05


def test_no_data_dependent_control_flow():
    """torch.export (strict tracing) with a symbolic batch: one graph serves every batch size."""
    ref = reference(TINY, width=32, pre_attn=True)
    deploy = fold(ref)
    u = frames(ref, batch=2)
    ep = torch.export.export(deploy, (u,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
                             strict=True)
    u5 = frames(ref, batch=5, seed=3)
    with torch.no_grad():
        assert torch.allclose(ep.module()(u5), deploy(u5), atol=1e-6)


def test_rejects_unknown_input_format():
    with pytest.raises(ValueError, match="input_format"):
        fold(reference(TINY, width=32), "bgr")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(width=384), dict(width=384, pre_attn=True, pre_mlp=True)],
                         ids=["12x384 pre_mlp", "24x384 pre_attn+pre_mlp"])
def test_folded_equals_reference_vit_b16(layout):
    torch.set_num_threads(2)
    ref = reference("ViT-B-16", **layout)
    u = frames(ref, batch=1)
    with torch.inference_mode():
        diff = (fold(ref)(u) - ref(normalize(u))).abs().max().item()
    assert diff <= 1e-4
