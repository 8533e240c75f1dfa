"""The PyTorch reference model: the official ST-Adapter forward, rebuilt from a backbone and deltas.

Everything stexport exports is checked against this module. Its parameter names are those of the official
code (linziyi96/st-adapter, models_adapter.py), so official state dicts load into it unchanged.
Input: (B, 3, T, H, W) float, already normalised with CLIP mean/std.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stexport.build.backbone import Backbone
from stexport.build.deltas import Deltas, check_fits
from stexport.bundle.manifest import CLIP_MEAN, CLIP_STD, AdapterSpec, ViTConfig


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Adapter(nn.Module):
    """fc1 → depth-wise Conv3d over (T, h, w) → fc2, added to the patch tokens; the class token passes."""

    def __init__(self, dim: int, width: int, kernel: tuple[int, int, int]):
        super().__init__()
        self.fc1 = nn.Linear(dim, width)
        self.conv = nn.Conv3d(width, width, kernel_size=kernel, padding=tuple(k // 2 for k in kernel), groups=width)
        self.fc2 = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        BT, L, C = x.shape
        B = BT // T
        h = w = math.isqrt(L - 1)
        y = self.fc1(x[:, 1:, :])
        y = y.view(B, T, h, w, -1).permute(0, 4, 1, 2, 3)
        y = self.conv(y)
        y = y.permute(0, 2, 3, 4, 1).reshape(BT, L - 1, -1)
        y = self.fc2(y)
        return torch.cat([x[:, :1, :], x[:, 1:, :] + y], dim=1)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, spec: AdapterSpec | None, index: int):
        super().__init__()
        self.heads = cfg.heads
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads)
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(cfg.width, cfg.mlp_width))
        self.mlp.add_module("gelu", QuickGELU() if cfg.act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(cfg.mlp_width, cfg.width))
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        make = (lambda: Adapter(cfg.width, spec.width, spec.kernel)) if spec else None
        self.adapter_pre_attn = make() if spec and index in spec.pre_attn else None
        self.adapter_pre_mlp = make() if spec and index in spec.pre_mlp else None

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H = self.heads
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        qkv = qkv.view(B, L, H * 3, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([H, H, H], dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.attn.out_proj(out.permute(0, 2, 1, 3).flatten(-2))

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        if self.adapter_pre_attn is not None:
            x = self.adapter_pre_attn(x, T)
        x = x + self.attention(self.ln_1(x))
        if self.adapter_pre_mlp is not None:
            x = self.adapter_pre_mlp(x, T)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ViTConfig, spec: AdapterSpec | None):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(cfg, spec, i) for i in range(cfg.layers)])

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, T)
        return x


class STAdapterViT(nn.Module):
    """The official ST-Adapter video ViT (eval mode: dropout is the identity)."""

    def __init__(self, cfg: ViTConfig, spec: AdapterSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.grid ** 2 + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.transformer = Transformer(cfg, spec)
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(w, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.size(0), x.size(2)
        x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
        x = self.conv1(x).flatten(-2).permute(0, 2, 1)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x, T)
        x = x.view(B, T, x.size(1), x.size(2))[:, :, 0, :].mean(dim=1)
        x = self.ln_post(x)
        return self.fc(self.dropout(x))


def build_reference(backbone: Backbone, deltas: Deltas) -> STAdapterViT:
    """Backbone + deltas → the reference model in eval mode, FP32, frozen."""
    check_fits(deltas.spec, backbone.config, backbone.name)
    model = STAdapterViT(backbone.config, deltas.spec)
    state = {**backbone.state_dict, **deltas.state_dict}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        from stexport.errors import StexportError

        key = (missing or unexpected)[0]
        raise StexportError(f"reference model: {'missing' if missing else 'unexpected'} weight '{key}'")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def normalize(frames_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) RGB → normalised float (B, 3, T, H, W), the reference model's input."""
    x = frames_uint8.float().div(255.0).permute(0, 4, 1, 2, 3)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1)
    return (x - mean) / std
