"""The deploy model: the reference ST-Adapter ViT folded into standard operators, ready for ONNX and TensorRT.

What folding does (each step exactly equivalent to the reference up to float rounding):
- uint8 (B, T, H, W, 3) RGB in: the cast, /255, CLIP mean/std and the patch-embedding conv become one MatMul
  on patchified pixels with folded weights and a bias; the positional embedding joins that bias.
- attention is MatMul → Softmax → MatMul with 1/√d folded into the query weights and bias.
- adapters with a (kt, 1, 1) kernel run their depth-wise temporal conv as kt shifted multiply-adds on the
  (B, T, tokens, width) layout, which needs no transposes; the class token is kept out by a 0/1 token mask.
  Spatial kernels use the reference Conv3d form.
- dropout is gone; the temporal mean is a ReduceMean over the frames' class tokens.

`compute_dtype=torch.float16` gives the strongly typed FP16 variant: weights and matmuls in FP16, LayerNorm,
Softmax, the temporal mean and the head in FP32 (explicit casts, so the exported graph says exactly that).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from stexport.build.reference import CLIP_MEAN, CLIP_STD, STAdapterViT

from stexport.build.names import INPUT_FORMATS  # noqa: E402 - one list for the CLI and the graph
SQRT2 = 1.4142135623730951


class Norm(nn.Module):
    """LayerNorm computed in FP32 whatever the stream's dtype."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight = nn.Parameter(ln.weight.detach().float().clone(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().float().clone(), requires_grad=False)
        self.eps = ln.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.weight.shape, self.weight, self.bias, self.eps).to(x.dtype)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin.requires_grad_(False)


class TemporalShift(nn.Module):
    """Depth-wise conv over time, kernel (kt, 1, 1), on (B, T, L, C): kt shifted, per-channel scaled adds.

    Taps and bias are (L, C) with the class token's row zero, so the class token's output is exactly 0.
    """

    def __init__(self, conv: nn.Conv3d, tokens: int):
        super().__init__()
        kt = conv.kernel_size[0]
        self.pad = kt // 2
        keep = torch.ones(tokens, 1)
        keep[0] = 0
        taps = conv.weight.detach()[:, 0, :, 0, 0].t()  # (kt, C): tap k multiplies frame t + k - pad
        # one (L, C) tensor per tap, not a (kt, L, C) one indexed in forward: in a swappable graph the taps are
        # graph inputs, which an index would turn into a Gather at every run
        self.taps = nn.ParameterList(nn.Parameter(t[None, :] * keep, requires_grad=False) for t in taps)
        self.bias = nn.Parameter(conv.bias.detach()[None, :] * keep, requires_grad=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        T = y.shape[1]
        p = F.pad(y, (0, 0, 0, 0, self.pad, self.pad)) if self.pad else y
        out = y * self.taps[self.pad] + self.bias
        for k, tap in enumerate(self.taps):
            if k != self.pad:
                out = out + p[:, k:k + T] * tap
        return out


class FoldedAdapter(nn.Module):
    """x + fc2(tconv(fc1(x))) on token rows (B·T·L, D), leaving the class token as it is.

    With a (kt, 1, 1) kernel the class token rides along: its conv output is 0 (TemporalShift) and fc2's bias
    is an (L, D) tensor with a zero class-token row, so its update is exactly 0 without slicing or masking.
    """

    def __init__(self, adapter, tokens: int, grid: int):
        super().__init__()
        self.tokens = tokens
        self.fc1 = _linear(adapter.fc1.weight, adapter.fc1.bias)
        kernel = adapter.conv.kernel_size
        self.grid = grid
        self.shift = kernel[1] == 1 and kernel[2] == 1
        if self.shift:
            self.tconv = TemporalShift(adapter.conv, tokens)
            self.fc2 = _linear(adapter.fc2.weight, None)
            keep = torch.ones(tokens, 1)
            keep[0] = 0
            self.fc2_bias = nn.Parameter(adapter.fc2.bias.detach()[None, :] * keep, requires_grad=False)
        else:
            self.tconv = copy.deepcopy(adapter.conv).requires_grad_(False)
            self.fc2 = _linear(adapter.fc2.weight, adapter.fc2.bias)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        L, D, W = self.tokens, x.shape[-1], self.fc1.out_features
        if self.shift:
            # fc2 reads the conv's (B, T, L, W) output as it is: with no Reshape between them, OpenVINO fuses
            # fc2's activation quantization into the conv's multiply-adds
            y = self.tconv(self.fc1(x).reshape(-1, T, L, W))
            return x + (self.fc2(y) + self.fc2_bias).reshape(-1, D)
        g = self.grid
        x = x.reshape(-1, L, D)
        y = self.fc1(x[:, 1:, :]).reshape(-1, T, g, g, W).permute(0, 4, 1, 2, 3)
        y = self.tconv(y).permute(0, 2, 3, 4, 1).reshape(-1, L - 1, W)
        return torch.cat([x[:, :1, :], x[:, 1:, :] + self.fc2(y)], dim=1).reshape(-1, D)


class MatMul(nn.Module):
    """torch.matmul as a module, so the exported node carries a name (attn.scores / attn.mix)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class FoldedAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention, heads: int):
        super().__init__()
        D = mha.embed_dim
        self.heads, self.head_dim = heads, D // heads
        w = mha.in_proj_weight.detach().clone()
        b = mha.in_proj_bias.detach().clone()
        scale = self.head_dim ** -0.5
        w[:D] *= scale
        b[:D] *= scale
        wq, wk, wv = w[:D], w[D:2 * D], w[2 * D:]
        bq, bv = b[:D], b[2 * D:]
        # Biases that change nothing but the rounding go: k's adds q·b_k to every score of a query row, which
        # softmax ignores; v's passes through (softmax rows sum to 1) to the output projection's bias.
        wo, bo = mha.out_proj.weight.detach(), mha.out_proj.bias.detach()
        # three GEMMs rather than one: each result reshapes straight into its head layout (no Split)
        self.q, self.k, self.v = _linear(wq, bq), _linear(wk, None), _linear(wv, None)
        self.out = _linear(wo, bo + wo.double().mv(bv.double()).float())
        self.scores, self.mix = MatMul(), MatMul()

    def forward(self, x: torch.Tensor, L: int) -> torch.Tensor:
        D = x.shape[-1]
        H, dh = self.heads, self.head_dim
        q = self.q(x).reshape(-1, L, H, dh).transpose(1, 2)  # (B·T, H, L, dh)
        kt = self.k(x).reshape(-1, L, H, dh).permute(0, 2, 3, 1)  # (B·T, H, dh, L)
        v = self.v(x).reshape(-1, L, H, dh).transpose(1, 2)
        scores = self.scores(q, kt)
        attn = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        out = self.mix(attn, v).transpose(1, 2).reshape(-1, D)
        return self.out(out)


class FoldedBlock(nn.Module):
    def __init__(self, block, tokens: int, grid: int, act: str):
        super().__init__()
        pre_attn, pre_mlp = block.adapter_pre_attn, block.adapter_pre_mlp
        self.pre_attn = FoldedAdapter(pre_attn, tokens, grid) if pre_attn is not None else None
        self.pre_mlp = FoldedAdapter(pre_mlp, tokens, grid) if pre_mlp is not None else None
        self.ln_1, self.ln_2 = Norm(block.ln_1), Norm(block.ln_2)
        self.attn = FoldedAttention(block.attn, block.heads)
        self.fc = _linear(block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        self.proj = _linear(block.mlp.c_proj.weight, block.mlp.c_proj.bias)
        self.quick = act == "quick_gelu"
        self.tokens = tokens

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        # exact GELU spelled the way ONNX Runtime's Gelu fusion recognises it
        h = h * torch.sigmoid(1.702 * h) if self.quick else (h * 0.5) * (1.0 + torch.erf(h / SQRT2))
        return self.proj(h)

    def forward(self, x: torch.Tensor, T: int, *task: torch.Tensor) -> torch.Tensor:
        """`task`: what the adapters take besides (x, T): a multi-task graph's per-clip task index."""
        L, D = self.tokens, x.shape[-1]
        if self.pre_attn is not None:
            x = self.pre_attn(x, T, *task)
        # LayerNorms see (B·T, L, D), not the 2-D stream: OpenVINO fuses the next GEMM's activation quantization
        # into a LayerNorm over the last of three axes, not over the channel axis of a 2-D tensor
        x = x + self.attn(self.ln_1(x.reshape(-1, L, D)), L)
        if self.pre_mlp is not None:
            x = self.pre_mlp(x, T, *task)
        return x + self.mlp(self.ln_2(x.reshape(-1, L, D))).reshape(-1, D)


class DeployViT(nn.Module):
    """Folded ST-Adapter ViT: uint8 (B, T, H, W, 3) RGB or normalised float (B, T, 3, H, W) → logits."""

    def __init__(self, ref: STAdapterViT, input_format: str = "uint8",
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        cfg = ref.cfg
        self.input_format, self.dtype = input_format, compute_dtype
        self.patch, self.grid, self.image_size = cfg.patch_size, cfg.grid, cfg.image_size
        D = cfg.width
        w = ref.conv1.weight.detach().double()  # (D, 3, p, p)
        pos = ref.positional_embedding.detach().double()
        bias = torch.zeros(D, dtype=torch.float64)
        if input_format == "uint8":
            mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
            bias = -(w * (mean / std)).sum(dim=(1, 2, 3))
            w = w / (255.0 * std)
            w = w.permute(0, 2, 3, 1)  # pixels arrive channels-last: patch vectors are (p, p, 3)
        self.embed = _linear(w.reshape(D, -1).float(), None)
        self.embed_bias = nn.Parameter((pos[1:] + bias).float(), requires_grad=False)  # (N, D)
        self.cls_pos = nn.Parameter((ref.class_embedding.detach().double() + pos[0]).float().view(1, 1, D),
                                    requires_grad=False)
        self.ln_pre, self.ln_post = Norm(ref.ln_pre), Norm(ref.ln_post)
        tokens = self.grid ** 2 + 1
        blocks = ref.transformer.resblocks
        self.blocks = nn.ModuleList(FoldedBlock(b, tokens, self.grid, cfg.act) for b in blocks)
        self.head = _linear(ref.fc.weight, ref.fc.bias)
        if compute_dtype != torch.float32:
            for name, mod in self.named_modules():
                if name.startswith(("ln_", "head")) or isinstance(mod, Norm):
                    continue
                for pname, param in list(mod.named_parameters(recurse=False)):
                    param.data = param.data.to(compute_dtype)
                for bname, buf in list(mod.named_buffers(recurse=False)):
                    setattr(mod, bname, buf.to(compute_dtype))
        self.eval()

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Input → (B·T, N, patch vector) with the layout change done by one Transpose."""
        g, p = self.grid, self.patch
        if self.input_format == "uint8":  # (B, T, H, W, 3)
            x = x.reshape(-1, g, p, g, p, 3).permute(0, 1, 3, 2, 4, 5)
        else:  # (B, T, 3, H, W)
            x = x.reshape(-1, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, g * g, 3 * p * p)

    def task_parameters(self) -> list[str]:
        """Names of the per-task parameters, in module order: every adapter's (fc1, temporal conv taps and bias,
        fc2) and the head's. Everything else is the backbone's, shared by every task."""
        return [n for n, _ in self.named_parameters() if n.startswith("head.") or ".pre_attn." in n
                or ".pre_mlp." in n]

    def pad_head(self, rows: int) -> None:
        """Give the head `rows` output rows (zero beyond the task's classes), so tasks with fewer classes fit
        the same graph; the runtimes keep the first `classes` logits."""
        w, b = self.head.weight.detach(), self.head.bias.detach()
        if rows < w.shape[0]:
            raise ValueError(f"head has {w.shape[0]} rows, cannot pad it to {rows}")
        self.head = _linear(torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])]),
                            torch.cat([b, b.new_zeros(rows - b.shape[0])]))

    def forward(self, x: torch.Tensor, task: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x → logits; `task` replaces per-task parameters for this call (a swappable export passes them as
        graph inputs this way, so no exporter pass can fold them into the backbone's constants)."""
        if task:
            return torch.func.functional_call(self, task, (x,), strict=False)
        return self.head(self.pooled(x))

    def pooled(self, x: torch.Tensor, *task: torch.Tensor) -> torch.Tensor:
        """x → the head's input: float32 (B, D), ln_post of the frames' mean class token. `task` goes to every
        block's adapters (a multi-task graph's per-clip task index, stexport.build.multitask)."""
        T = x.shape[1]
        x = self.patches(x.to(self.dtype))
        x = self.embed(x) + self.embed_bias
        x = torch.cat([self.cls_pos.expand(x.shape[0], -1, -1), x], dim=1)
        L, D = x.shape[1], x.shape[2]
        x = self.ln_pre(x.reshape(-1, D))  # the token stream stays 2-D (B·T·L, D): linears are plain GEMMs
        for block in self.blocks:
            x = block(x, T, *task)
        cls = x.reshape(-1, L, D)[:, 0, :].float().reshape(-1, T, D)
        return self.ln_post(cls.mean(dim=1))


def fold(reference: STAdapterViT, input_format: str = "uint8",
         compute_dtype: torch.dtype = torch.float32) -> DeployViT:
    """The deploy model for `reference` (see the module docstring); same logits up to float rounding."""
    return DeployViT(reference, input_format, compute_dtype)
