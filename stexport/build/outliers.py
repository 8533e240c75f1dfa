"""Planted activation outliers: exact equivalent transforms that give a backbone CLIP-like outlier channels.

Real CLIP ViTs carry a few activation channels tens of times larger than the rest, after LayerNorm and in the
residual stream (FQ-ViT, Lin et al. 2022, Fig. 1; SmoothQuant, Xiao et al. 2023, §3). Their weights cannot be
downloaded here, so the tests and `benchmarks/int8_outliers.py` make stand-ins from any backbone with transforms
that leave the FP32 function unchanged (up to float rounding) and change only the activations INT8 sees:

- `plant_norm_outliers`: a LayerNorm's weight and bias of `channels` channels ×`scale`, the input columns of the
  Linear that reads it ÷`scale` (ln_1 → attention in-projection, ln_2 → MLP c_fc). LayerNorm outputs then have
  `channels` channels `scale` times larger; the GEMM's products are the same numbers.
- `plant_residual_offset`: the residual stream shifted by `offset` in every channel (ln_pre's bias + offset).
  Every LayerNorm reading the stream subtracts its per-token mean, so it ignores the shift exactly; the only
  other readers, the adapters' fc1, get `offset · Σ_k W[:, k]` taken off their bias. The adapters' INT8 input
  then spends its range on the shift, as real CLIP's residual outliers make it do. (A per-channel *scale* of the
  residual stream cannot be exact: LayerNorm's mean and variance see it.)

- `plant_fp16_overflow`: the first with a scale so large (2^17) that the LayerNorm's output leaves FP16's range
  (65,504): a stand-in for the backbones FP16 cannot hold (stexport.build.fp16_check keeps such nodes in FP32).

Power-of-two scales keep FP16-representable weights FP16-representable (down to FP16's subnormals). Users with
real weights need none of this; it stands in for them.
"""

from __future__ import annotations

import copy
import re

import torch

from stexport.build.backbone import Backbone

NORM_READERS = {"ln_1": "attn.in_proj_weight", "ln_2": "mlp.c_fc.weight"}
_ADAPTER_FC1 = re.compile(r"^transformer\.resblocks\.\d+\.adapter_pre_(attn|mlp)\.fc1\.weight$")


def _copy(backbone: Backbone, planted: dict) -> Backbone:
    out = copy.copy(backbone)
    out.state_dict = dict(backbone.state_dict)
    out.source = {**backbone.source, "planted": [*backbone.source.get("planted", []), planted]}
    return out


def plant_norm_outliers(backbone: Backbone, scale: float = 32.0, channels: int = 6, seed: int = 0,
                        norms: tuple[str, ...] = ("ln_1", "ln_2"), blocks: tuple[int, ...] | None = None
                        ) -> Backbone:
    """A copy of `backbone` whose LayerNorms `norms` (ln_1 and/or ln_2 of each of `blocks`, default all) put
    out `channels` channels ×`scale` (a seeded choice per LayerNorm), their reader's input columns ÷`scale`: the
    same FP32 function (see the module docstring). The original is not changed. Raises ValueError for bad
    arguments."""
    if scale <= 0 or not 0 < channels <= backbone.config.width:
        raise ValueError(f"scale must be > 0 and 0 < channels <= {backbone.config.width}")
    unknown = set(norms) - set(NORM_READERS)
    if unknown:
        raise ValueError(f"norms: {sorted(unknown)} not in {sorted(NORM_READERS)}")
    blocks = range(backbone.config.layers) if blocks is None else blocks
    if any(not 0 <= i < backbone.config.layers for i in blocks):
        raise ValueError(f"blocks: {list(blocks)} not all in 0..{backbone.config.layers - 1}")
    planted = {"kind": "norm", "scale": scale, "channels": channels, "seed": seed, "norms": list(norms)}
    if len(blocks) != backbone.config.layers:
        planted["blocks"] = list(blocks)
    out = _copy(backbone, planted)
    g = torch.Generator().manual_seed(seed)
    sd = out.state_dict
    for i in blocks:
        for norm in norms:
            p = f"transformer.resblocks.{i}."
            idx = torch.randperm(backbone.config.width, generator=g)[:channels]
            for k in ("weight", "bias"):
                t = sd[f"{p}{norm}.{k}"].clone()
                t[idx] *= scale
                sd[f"{p}{norm}.{k}"] = t
            w = sd[p + NORM_READERS[norm]].clone()
            w[:, idx] /= scale
            sd[p + NORM_READERS[norm]] = w
    return out


FP16_OVERFLOW_SCALE = 2.0 ** 17  # LayerNorm outputs of magnitude > 0.5 then leave FP16's range (65,504)


def plant_fp16_overflow(backbone: Backbone, scale: float = FP16_OVERFLOW_SCALE, channels: int = 2,
                        block: int = 0, seed: int = 0) -> Backbone:
    """An FP16-overflow stand-in: `plant_norm_outliers` on one LayerNorm (block `block`'s ln_2) with a scale
    that takes its output beyond FP16's range while the FP32 function stays the same, as in backbones trained
    in BF16 whose activations FP16 cannot hold. The MLP's input columns ÷`scale` are FP16 subnormals in an
    FP16 graph (stored with ~3 significant bits), the price of keeping the function exact."""
    return plant_norm_outliers(backbone, scale, channels, seed, norms=("ln_2",), blocks=(block,))


def plant_residual_offset(backbone: Backbone, deltas: dict[str, torch.Tensor], offset: float = 64.0
                          ) -> tuple[Backbone, dict[str, torch.Tensor]]:
    """Copies of `backbone` and `deltas` (an official-layout state dict) whose residual stream is shifted by
    `offset` in every channel, with the adapters' fc1 biases compensating: the same FP32 function (see the
    module docstring). The originals are not changed."""
    out = _copy(backbone, {"kind": "residual_offset", "offset": offset})
    out.state_dict["ln_pre.bias"] = backbone.state_dict["ln_pre.bias"] + offset
    d = dict(deltas)
    for k, w in deltas.items():
        if _ADAPTER_FC1.match(k):
            b = k[: -len("weight")] + "bias"
            d[b] = (deltas[b].double() - offset * w.double().sum(dim=1)).float()
    return out, d
