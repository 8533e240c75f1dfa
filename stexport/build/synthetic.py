"""Seeded random ST-Adapter deltas in the official layout: for tests, benchmarks and smoke runs."""

from __future__ import annotations

import torch

from stexport.build.backbone import ViTConfig



def random_deltas(cfg: ViTConfig, width: int = 384, kernel=(3, 1, 1), num_classes: int = 400,
                  pre_attn: bool = False, pre_mlp: bool = True, blocks: list[int] | None = None,
                  seed: int = 0, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Deltas with non-zero conv weights (so the temporal path is exercised; training starts them at zero)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    kt, kh, kw = kernel
    for i in blocks if blocks is not None else range(cfg.layers):
        for pos, on in (("pre_attn", pre_attn), ("pre_mlp", pre_mlp)):
            if not on:
                continue
            p = f"transformer.resblocks.{i}.adapter_{pos}."
            sd[p + "fc1.weight"] = torch.randn(width, cfg.width, generator=g) * cfg.width ** -0.5
            sd[p + "fc1.bias"] = torch.randn(width, generator=g) * scale
            sd[p + "conv.weight"] = torch.randn(width, 1, kt, kh, kw, generator=g) * (kt * kh * kw) ** -0.5
            sd[p + "conv.bias"] = torch.randn(width, generator=g) * scale
            sd[p + "fc2.weight"] = torch.randn(cfg.width, width, generator=g) * width ** -0.5 * 0.5
            sd[p + "fc2.bias"] = torch.randn(cfg.width, generator=g) * scale
    sd["fc.weight"] = torch.randn(num_classes, cfg.width, generator=g) * 0.1
    sd["fc.bias"] = torch.randn(num_classes, generator=g) * scale
    return sd
