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

Power-of-two scales keep FP16-representable weights FP16-representable. Users with real weights need none of
this; it stands in for them.
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
                        norms: tuple[str, ...] = ("ln_1", "ln_2")) -> Backbone:
    """A copy of `backbone` whose LayerNorms `norms` (each block's ln_1 and/or ln_2) put out `channels`
    channels ×`scale` (a seeded choice per LayerNorm), their reader's input columns ÷`scale`: the same FP32
    function (see the module docstring). The original is not changed. Raises ValueError for bad arguments."""
    if scale <= 0 or not 0 < channels <= backbone.config.width:
        raise ValueError(f"scale must be > 0 and 0 < channels <= {backbone.config.width}")
    unknown = set(norms) - set(NORM_READERS)
    if unknown:
        raise ValueError(f"norms: {sorted(unknown)} not in {sorted(NORM_READERS)}")
    out = _copy(backbone, {"kind": "norm", "scale": scale, "channels": channels, "seed": seed,
                           "norms": list(norms)})
    g = torch.Generator().manual_seed(seed)
    sd = out.state_dict
    for i in range(backbone.config.layers):
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
