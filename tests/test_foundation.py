"""Checkpoint loading, spec inference, backbone loading and the reference model's forward."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stexport.build.backbone import load_backbone, random_backbone, read_state_dict
from stexport.build.deltas import AdapterSpec, check_fits, infer_spec, load_deltas, save_official
from stexport.errors import StexportError
from stexport.build.reference import build_reference
from stexport.build.synthetic import random_deltas

TINY = "stexport-tiny-vit"


def official_checkpoint(path, sd):
    """Write `sd` exactly as the official trainer does: real AdamW / LambdaLR / GradScaler state dicts."""
    params = [torch.nn.Parameter(v.clone()) for v in sd.values()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    save_official(path, sd, next_epoch=12, optimizer=opt.state_dict(), lr_sched=sched.state_dict(),
                  loss_scaler=scaler.state_dict())


# ---------------------------------------------------------------------------------------------------------
# An independent, plain-tensor implementation of the official forward (no nn.Module of stexport's), written
# from the paper (Sec. 3.2, Eq. 1: ST-Adapter(x) = x + fc2(DWConv3D(fc1(x))) on the patch tokens) and the
# official code (linziyi96/st-adapter, models_adapter.py: Adapter.forward skips the CLS token and pads the
# depth-wise Conv3d by kernel//2; ResidualAttentionBlock runs adapter_pre_attn, attention, adapter_pre_mlp, MLP;
# attention splits F.linear(x, in_proj_weight, in_proj_bias) into q, k, v by thirds of the channels;
# VisionTransformer.forward: conv1 patches, CLS + positional embedding, ln_pre, blocks, the CLS token averaged
# over time, ln_post, fc; QuickGELU is x * sigmoid(1.702 x)).

def plain_forward(sd: dict, x: torch.Tensor, heads: int, act: str, eps: float = 1e-5) -> torch.Tensor:
    def ln(t, p):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(t, p):
        return t @ sd[p + ".weight"].T + sd[p + ".bias"]

    def gelu(t):
        return t * torch.sigmoid(1.702 * t) if act == "quick_gelu" else 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    def adapter(t, p, T):
        BT, L, C = t.shape
        B, g = BT // T, math.isqrt(L - 1)
        y = lin(t[:, 1:], p + ".fc1")  # (BT, hw, w)
        w = sd[p + ".conv.weight"]  # (w, 1, kt, kh, kw)
        kt, kh, kw = w.shape[2:]
        y = y.reshape(B, T, g, g, -1)
        pad = F.pad(y, (0, 0, kw // 2, kw // 2, kh // 2, kh // 2, kt // 2, kt // 2))
        out = torch.zeros_like(y) + sd[p + ".conv.bias"]
        for a in range(kt):
            for b in range(kh):
                for c in range(kw):
                    out = out + pad[:, a:a + T, b:b + g, c:c + g, :] * w[:, 0, a, b, c]
        y = lin(out.reshape(BT, L - 1, -1), p + ".fc2")
        return torch.cat([t[:, :1], t[:, 1:] + y], 1)

    B, _, T, H, W = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, 3, H, W)
    conv = sd["conv1.weight"]
    P = conv.shape[-1]
    patches = frames.unfold(2, P, P).unfold(3, P, P)  # (BT, 3, g, g, P, P)
    tok = torch.einsum("ncijpq,dcpq->nijd", patches, conv).flatten(1, 2)
    t = torch.cat([sd["class_embedding"].expand(B * T, 1, -1), tok], 1) + sd["positional_embedding"]
    t = ln(t, "ln_pre")
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{i}"
        if p + ".adapter_pre_attn.fc1.weight" in sd:
            t = adapter(t, p + ".adapter_pre_attn", T)
        h = ln(t, p + ".ln_1")
        qkv = h @ sd[p + ".attn.in_proj_weight"].T + sd[p + ".attn.in_proj_bias"]
        q, k, v = qkv.chunk(3, -1)
        N, L, C = q.shape
        hd = C // heads
        q, k, v = (z.reshape(N, L, heads, hd).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        a = a.transpose(1, 2).reshape(N, L, C)
        t = t + lin(a, p + ".attn.out_proj")
        if p + ".adapter_pre_mlp.fc1.weight" in sd:
            t = adapter(t, p + ".adapter_pre_mlp", T)
        t = t + lin(gelu(lin(ln(t, p + ".ln_2"), p + ".mlp.c_fc")), p + ".mlp.c_proj")
        i += 1
    cls = t.reshape(B, T, -1, t.shape[-1])[:, :, 0].mean(1)
    return lin(ln(cls, "ln_post"), "fc")


# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return random_backbone(TINY)


@pytest.mark.parametrize("layout", ["k400", "ssv2"])
def test_official_layout_loads_and_infers_spec(tmp_path, tiny, layout):
    both = layout == "ssv2"
    sd = random_deltas(tiny.config, width=32, pre_attn=both, pre_mlp=True, num_classes=7)
    path = tmp_path / f"{layout}.pt"
    official_checkpoint(path, sd)
    d = load_deltas(path)
    assert d.spec == AdapterSpec(dim=64, width=32, kernel=(3, 1, 1),
                                 pre_attn=(0, 1) if both else (), pre_mlp=(0, 1), num_classes=7)
    assert d.spec.layout == ("4x32" if both else "2x32")
    assert d.spec.num_params() == sum(v.numel() for v in sd.values())
    assert all(torch.equal(d.state_dict[k], v) for k, v in sd.items())


def test_plain_state_dict_and_safetensors(tmp_path, tiny):
    from safetensors.torch import save_file

    sd = random_deltas(tiny.config, width=16, kernel=(3, 3, 3), num_classes=5, blocks=[1])
    torch.save(sd, tmp_path / "plain.pth")
    save_file(sd, str(tmp_path / "d.safetensors"))
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    specs = {load_deltas(tmp_path / f).spec for f in ("plain.pth", "d.safetensors", "ddp.pt")}
    assert specs == {AdapterSpec(64, 16, (3, 3, 3), (), (1,), 5)}


def test_reference_matches_plain_forward_tiny(tiny):
    for pre_attn in (False, True):
        sd = random_deltas(tiny.config, width=32, kernel=(3, 3, 3), pre_attn=pre_attn, num_classes=11, seed=3)
        spec = infer_spec(sd)
        from stexport.build.deltas import Deltas

        model = build_reference(tiny, Deltas(spec, sd))
        x = torch.randn(2, 3, 4, 32, 32)
        with torch.no_grad():
            ref = model(x)
        plain = plain_forward({**tiny.state_dict, **sd}, x, tiny.config.heads, tiny.config.act)
        assert ref.shape == (2, 11)
        assert (ref - plain).abs().max() < 1e-5


# the backbone tensors a reference could silently drop (keys as in the official state dict)
DROPPABLE = {
    "in_proj_bias": lambda k: k.endswith("attn.in_proj_bias"),
    "out_proj.bias": lambda k: k.endswith("attn.out_proj.bias"),
    "mlp biases": lambda k: ".mlp.c_" in k and k.endswith("bias"),
    "ln_pre affine": lambda k: k.startswith("ln_pre."),
    "ln_1/ln_2 affine": lambda k: ".ln_1." in k or ".ln_2." in k,
    "ln_post affine": lambda k: k.startswith("ln_post."),
}


@pytest.mark.parametrize("name", [TINY, "stexport-tiny-vit-gelu"])
def test_reference_matches_the_official_forward_with_non_trivial_weights(name):
    """The reference against plain_forward on a backbone whose biases and LayerNorm affines are random, with
    QuickGELU and with exact GELU. The check can fail: each tensor family a reference might drop (reset to
    its trivial value) moves the oracle's logits by far more than the tolerance, and so does the other
    activation."""
    from conftest import trained_like

    from stexport.build.deltas import Deltas

    bb = trained_like(random_backbone(name), scale=0.3)  # random_backbone's biases and affines are 0 and 1/0
    act = bb.config.act
    assert act == ("gelu" if name.endswith("gelu") else "quick_gelu")
    sd = random_deltas(bb.config, width=32, kernel=(3, 3, 3), pre_attn=True, num_classes=11, seed=3)
    model = build_reference(bb, Deltas(infer_spec(sd), sd))
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x).double()
    full = {k: v.double() for k, v in {**bb.state_dict, **sd}.items()}
    plain = plain_forward(full, x.double(), bb.config.heads, act)
    tol = 1e-5
    assert (ref - plain).abs().max().item() < tol
    for name, drops in DROPPABLE.items():
        dropped = {k: (torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)) if drops(k) else v
                   for k, v in full.items()}
        assert (plain_forward(dropped, x.double(), bb.config.heads, act) - plain).abs().max().item() > 100 * tol, name
    other = "gelu" if act == "quick_gelu" else "quick_gelu"
    assert (plain_forward(full, x.double(), bb.config.heads, other) - plain).abs().max().item() > 100 * tol


@pytest.mark.slow
@pytest.mark.parametrize("both", [False, True], ids=["k400-12x384", "ssv2-24x384"])
def test_reference_matches_plain_forward_vit_b16(tmp_path, both):
    bb = random_backbone("ViT-B-16-quickgelu")
    sd = random_deltas(bb.config, width=384, pre_attn=both, pre_mlp=True, num_classes=400 if not both else 174)
    official_checkpoint(tmp_path / "d.pt", sd)
    d = load_deltas(tmp_path / "d.pt")
    assert d.spec.layout == ("24x384" if both else "12x384")
    model = build_reference(bb, d)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 224, 224)
    with torch.no_grad():
        ref = model(x)
        # the independent forward runs in float64, so the difference is the reference's own FP32 error
        sd64 = {k: v.double() for k, v in {**bb.state_dict, **d.state_dict}.items()}
        plain = plain_forward(sd64, x.double(), 12, "quick_gelu")
    assert (ref.double() - plain).abs().max().item() <= 1e-5


def test_zero_adapters_reduce_to_image_model(tiny):
    """With fc2 zeroed the adapters are exact no-ops: the model is CLIP's frame-averaged CLS + head."""
    sd = random_deltas(tiny.config, width=8, num_classes=3)
    for k in sd:
        if "fc2" in k:
            sd[k].zero_()
    from stexport.build.deltas import Deltas

    model = build_reference(tiny, Deltas(infer_spec(sd), sd))
    x = torch.randn(1, 3, 2, 32, 32)
    stripped = {k: v for k, v in {**tiny.state_dict, **sd}.items() if "adapter" not in k}
    with torch.no_grad():
        assert torch.allclose(model(x), plain_forward(stripped, x, 4, "quick_gelu"), atol=1e-5)


# --- backbones --------------------------------------------------------------------------------------------


def _openai_style_state(name):
    bb = random_backbone(name, fp16_round=False)
    sd = {f"visual.{k}": v.half() for k, v in bb.state_dict.items()}
    sd["visual.proj"] = torch.zeros(64, 32, dtype=torch.half)
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    return bb, sd


def test_openai_state_dict_switches_to_quickgelu(tmp_path, caplog):
    bb, sd = _openai_style_state("stexport-tiny-vit-gelu")
    torch.save(sd, tmp_path / "openai.pt")
    with caplog.at_level("WARNING", logger="stexport"):
        loaded = load_backbone("stexport-tiny-vit-gelu", str(tmp_path / "openai.pt"))
    assert loaded.config.act == "quick_gelu"
    assert "QuickGELU" in caplog.text
    assert loaded.source["openai"] is True and len(loaded.source["sha256"]) == 64
    assert torch.equal(loaded.state_dict["conv1.weight"], bb.state_dict["conv1.weight"].half().float())
    assert "proj" not in loaded.state_dict


def test_open_clip_checkpoint_keeps_gelu(tmp_path):
    bb = random_backbone("stexport-tiny-vit-gelu")
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in bb.state_dict.items()}}, tmp_path / "oc.pt")
    loaded = load_backbone("stexport-tiny-vit-gelu", str(tmp_path / "oc.pt"))
    assert loaded.config.act == "gelu"
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in bb.state_dict.items())


def test_openai_jit_archive(tmp_path):
    """OpenAI ships TorchScript archives; they load without unpickling Python and select QuickGELU."""
    bb, sd = _openai_style_state("stexport-tiny-vit-gelu")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Module()
            for k, v in sd.items():
                if k.startswith("visual."):
                    parts = k.split(".")[1:]
                    mod = self.visual
                    for p in parts[:-1]:
                        if not hasattr(mod, p):
                            mod.add_module(p, torch.nn.Module())
                        mod = getattr(mod, p)
                    mod.register_buffer(parts[-1], v)
            self.register_buffer("input_resolution", torch.tensor(32))

        def forward(self, x):
            return x + self.input_resolution

    torch.jit.script(Holder()).save(str(tmp_path / "ViT-tiny.pt"))
    loaded = load_backbone("stexport-tiny-vit-gelu", str(tmp_path / "ViT-tiny.pt"))
    assert loaded.config.act == "quick_gelu"
    assert torch.equal(loaded.state_dict["positional_embedding"], sd["visual.positional_embedding"].float())


def test_quickgelu_tags_and_names():
    from open_clip.pretrained import get_pretrained_cfg

    assert get_pretrained_cfg("ViT-B-16", "openai").get("quick_gelu") is True
    assert random_backbone("ViT-B-16-quickgelu", fp16_round=False).config.act == "quick_gelu"


def test_backbone_errors(tmp_path):
    with pytest.raises(StexportError, match="unknown backbone 'ViT-Q-99'"):
        load_backbone("ViT-Q-99", "none")
    with pytest.raises(StexportError, match="ResNet"):
        load_backbone("RN50", "none")
    with pytest.raises(StexportError, match="timm"):
        load_backbone("convnext_base", "none")
    with pytest.raises(StexportError, match="neither a file nor an open_clip tag"):
        load_backbone(TINY, "laion9000")
    bb = random_backbone(TINY)
    torch.save({f"visual.{k}": v for k, v in bb.state_dict.items()}, tmp_path / "tiny.pt")
    with pytest.raises(StexportError, match="has shape .* pick the matching --backbone"):
        load_backbone("stexport-demo-vit", str(tmp_path / "tiny.pt"))
    for name, junk in [("junk.pt", b"not a checkpoint"), ("notes.txt", b"hi\n"), ("empty.bin", b"")]:
        (tmp_path / name).write_bytes(junk)
        with pytest.raises(StexportError) as e:
            read_state_dict(tmp_path / name)
        msg = str(e.value)  # one line naming the file and what --pretrained takes
        assert msg.startswith(f"{tmp_path / name}: not a readable weights file (") and "\n" not in msg, msg
        assert "--pretrained takes a torch.save checkpoint (.pt/.pth/.bin)" in msg and "'none'" in msg, msg


# --- delta errors -----------------------------------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/stexport-pwned",))


def test_code_carrying_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "x": Evil()}, path)
    if os.path.exists("/tmp/stexport-pwned"):
        os.remove("/tmp/stexport-pwned")
    with pytest.raises(StexportError, match="refused: the file would run code"):
        load_deltas(path)
    assert not os.path.exists("/tmp/stexport-pwned")


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.pop("fc.bias"), "no classification head"),
    (lambda sd: sd.update({"transformer.resblocks.0.adapter_pre_mlp.extra.weight": torch.zeros(1)}),
     "unexpected key 'transformer.resblocks.0.adapter_pre_mlp.extra.weight'"),
    (lambda sd: sd.pop("transformer.resblocks.1.adapter_pre_mlp.fc2.bias"),
     "missing key 'transformer.resblocks.1.adapter_pre_mlp.fc2.bias'"),
    (lambda sd: sd.update({"transformer.resblocks.1.adapter_pre_mlp.fc1.weight": torch.zeros(8, 65)}),
     r"'transformer.resblocks.1.adapter_pre_mlp.fc1.weight' has shape \(8, 65\), expected \(8, 64\)"),
    (lambda sd: sd.update({"transformer.resblocks.0.adapter_pre_mlp.conv.weight": torch.zeros(8, 1, 2, 1, 1),
                           "transformer.resblocks.1.adapter_pre_mlp.conv.weight": torch.zeros(8, 1, 2, 1, 1)}),
     "even size"),
    (lambda sd: [sd.pop(k) for k in list(sd) if "adapter" in k], "no adapter tensors"),
    (lambda sd: sd.update({"fc.bias": torch.zeros(4)}), "'fc.bias' has shape"),
])
def test_delta_mismatch_errors(tmp_path, tiny, mutate, message):
    sd = random_deltas(tiny.config, width=8, num_classes=3)
    mutate(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(StexportError, match=message):
        load_deltas(tmp_path / "bad.pt")


def test_fit_errors(tiny):
    demo = random_backbone("stexport-demo-vit").config
    spec = infer_spec(random_deltas(tiny.config, width=8, num_classes=3))
    with pytest.raises(StexportError, match=r"width-64 ViT, but b has width 192"):
        check_fits(spec, demo, "b")
    deep = infer_spec(random_deltas(demo, width=8, num_classes=3))  # adapters on blocks 0..3
    with pytest.raises(StexportError, match="adapter on block 3 but t has only 2 blocks"):
        check_fits(AdapterSpec(64, 8, (3, 1, 1), (), deep.pre_mlp, 3), tiny.config, "t")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(StexportError, match="not a torch checkpoint"):
        load_deltas(tmp_path / "a.txt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(StexportError, match="expected an ST-Adapter checkpoint"):
        load_deltas(tmp_path / "list.pt")
    with pytest.raises(StexportError, match="is a directory"):
        load_deltas(tmp_path)


# --- CLI --------------------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "stexport.cli.app", *args], capture_output=True, text=True)


def test_inspect_cli(tmp_path, tiny):
    import json

    official_checkpoint(tmp_path / "k.pt", random_deltas(tiny.config, width=32, num_classes=7))
    r = run_cli("inspect", "--adapter", str(tmp_path / "k.pt"), "--backbone", TINY, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["spec"]["layout"] == "2x32" and rep["fits"] is True
    assert rep["delta_params"] == 2 * (64 * 32 + 32 + 3 * 32 + 32 + 32 * 64 + 64) + 7 * 64 + 7
    assert rep["backbone_params"] == tiny.num_params()

    r = run_cli("inspect", "--adapter", str(tmp_path / "k.pt"), "--backbone", "stexport-demo-vit")
    assert r.returncode == 1 and "NO: adapter width mismatch" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--adapter", "/nonexistent/k400.pt"], "/nonexistent/k400.pt: no such file"),
    (["--adapter", "{evil}"], "refused: the file would run code"),
    (["--adapter", "{ok}", "--backbone", "ViT-Nope"], "unknown backbone 'ViT-Nope'"),
])
def test_cli_bad_input_is_one_line(tmp_path, tiny, args, message):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    torch.save(random_deltas(tiny.config, width=8, num_classes=3), tmp_path / "ok.pt")
    args = [a.format(evil=tmp_path / "evil.pt", ok=tmp_path / "ok.pt") for a in args]
    r = run_cli("inspect", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "inspect" in r.stdout
    r = run_cli("inspect", "--help")
    assert "Examples" in r.stdout



# --- issue 18: numbers that are not numbers, errors that name the cause, the activation chosen and why -----

@pytest.mark.parametrize("bad, message", [
    (float("nan"), "holds 1 NaN and 0 ±Inf values; the adapter weights are damaged"),
    (float("inf"), "holds 0 NaN and 1 ±Inf values; the adapter weights are damaged"),
])
@pytest.mark.parametrize("key", ["fc.weight", "transformer.resblocks.1.adapter_pre_mlp.conv.weight"])
def test_non_finite_adapter_weights_are_refused(tmp_path, tiny, bad, message, key):
    sd = random_deltas(tiny.config, width=8, num_classes=3)
    sd[key].view(-1)[1] = bad
    save_official(tmp_path / "nan.pt", sd)
    with pytest.raises(StexportError) as e:
        load_deltas(tmp_path / "nan.pt")
    assert f"nan.pt: tensor '{key}' {tuple(sd[key].shape)} {message}" in str(e.value)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(StexportError, match=f"tensor '{key}'"):
        load_deltas(tmp_path / "nan.safetensors")


def test_integer_adapter_weights_are_refused(tmp_path, tiny):
    sd = random_deltas(tiny.config, width=8, num_classes=3)
    sd["fc.bias"] = torch.zeros(3, dtype=torch.int64)
    torch.save(sd, tmp_path / "int.pt")
    with pytest.raises(StexportError, match="int.pt: tensor 'fc.bias' has dtype int64; adapter weights are "
                                            "floating point"):
        load_deltas(tmp_path / "int.pt")


def test_non_finite_or_integer_backbone_weights_are_refused(tmp_path):
    bb = random_backbone(TINY)
    sd = {f"visual.{k}": v.clone() for k, v in bb.state_dict.items()}
    sd["visual.transformer.resblocks.0.mlp.c_fc.weight"][3, 5] = float("nan")
    torch.save(sd, tmp_path / "nan_backbone.pt")
    with pytest.raises(StexportError, match=r"nan_backbone.pt: tensor 'transformer.resblocks.0.mlp.c_fc.weight' "
                                            r"\(256, 64\) holds 1 NaN and 0 ±Inf values; the backbone weights"):
        load_backbone(TINY, str(tmp_path / "nan_backbone.pt"))
    sd = {f"visual.{k}": v.clone() for k, v in bb.state_dict.items()}
    sd["visual.ln_post.weight"] = torch.ones(64, dtype=torch.int32)
    torch.save(sd, tmp_path / "int_backbone.pt")
    with pytest.raises(StexportError, match="tensor 'ln_post.weight' has dtype int32; backbone weights"):
        load_backbone(TINY, str(tmp_path / "int_backbone.pt"))


def test_state_dict_wrapper_is_unwrapped(tmp_path, tiny):
    """{"state_dict": …} (what Lightning and many trainers save), also with DataParallel's module. prefix."""
    sd = random_deltas(tiny.config, width=8, num_classes=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pt")
    d = load_deltas(tmp_path / "wrapped.pt")
    assert d.spec.num_classes == 3 and all(torch.equal(d.state_dict[k], v) for k, v in sd.items())
    assert not d.official_layout
    torch.save({"weights": sd, "epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(StexportError, match=r"other.pt: entry 'weights' \(dict\) is not a tensor; expected the "
                                            r"official checkpoint"):
        load_deltas(tmp_path / "other.pt")


def test_damaged_checkpoints_name_their_cause(tmp_path, tiny):
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "random.pt").write_bytes(bytes(torch.randint(0, 256, (4096,), generator=rng).tolist()))
    with pytest.raises(StexportError, match="random.pt: not a torch checkpoint: it is neither a zip archive "
                                            "nor a pickle"):
        load_deltas(tmp_path / "random.pt")
    (tmp_path / "random_pickle.pt").write_bytes(b"\x80" + bytes(range(256)) * 4)
    with pytest.raises(StexportError, match="random_pickle.pt: not a readable torch checkpoint, truncated or "
                                            "corrupt"):
        load_deltas(tmp_path / "random_pickle.pt")
    save_official(tmp_path / "ok.pt", random_deltas(tiny.config, width=8, num_classes=3))
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(StexportError, match="half.pt: not a readable torch checkpoint, truncated or corrupt"):
        load_deltas(tmp_path / "half.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(StexportError, match="empty.pt: empty file"):
        load_deltas(tmp_path / "empty.pt")


def test_unreadable_checkpoint_says_permission_denied(tmp_path, tiny):
    from test_video import without_root_powers

    save_official(tmp_path / "locked.pt", random_deltas(tiny.config, width=8, num_classes=3))
    (tmp_path / "locked.pt").chmod(0)
    r = subprocess.run(without_root_powers(sys.executable, "-m", "stexport.cli.app", "inspect", "--adapter",
                                           str(tmp_path / "locked.pt"), "--backbone", TINY),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'locked.pt'}: permission denied: the checkpoint cannot be read; `chmod a+r` it" in r.stderr


@pytest.fixture
def clip_arch(tmp_path):
    """A tiny architecture registered as open_clip registers OpenAI's: NAME (exact GELU) and NAME-quickgelu."""
    import json

    import open_clip

    cfg = json.loads((Path(__file__).parents[1] / "stexport/model_configs/stexport-tiny-vit-gelu.json").read_text())
    d = tmp_path / "configs"
    d.mkdir()
    (d / "t18-ViT.json").write_text(json.dumps({**cfg, "quick_gelu": False}))
    (d / "t18-ViT-quickgelu.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    open_clip.add_model_config(d)
    return "t18-ViT"


def test_resaved_openai_weights_with_an_official_adapter_warn_about_quickgelu(tmp_path, tiny, clip_arch, caplog):
    """OpenAI CLIP re-saved through open_clip is a plain open_clip state dict: nothing says QuickGELU. An adapter
    in the official layout (whose code always runs OpenAI CLIP with QuickGELU) then gets a warning naming the
    -quickgelu model, and the build summary, manifest and inspect say which activation was chosen and why."""
    import json

    import open_clip
    from typer.testing import CliRunner

    from stexport.cli.app import app

    full = open_clip.create_model(clip_arch).state_dict()  # what open_clip's save of a CLIP model holds
    torch.save(full, tmp_path / "openclip_resaved.pt")
    official_checkpoint(tmp_path / "k.pt", random_deltas(tiny.config, width=8, num_classes=3))
    torch.save(random_deltas(tiny.config, width=8, num_classes=3), tmp_path / "plain.pt")
    runner = CliRunner()
    with caplog.at_level("WARNING", logger="stexport"):
        r = runner.invoke(app, ["build", "--adapter", str(tmp_path / "k.pt"), "--backbone", clip_arch,
                                "--pretrained", str(tmp_path / "openclip_resaved.pt"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert f"pass --backbone {clip_arch}-quickgelu" in caplog.text
    reason = (f"model config {clip_arch} uses exact GELU; nothing in openclip_resaved.pt marks it as OpenAI's "
              "weights (a re-saved open_clip state dict does not): if it is OpenAI CLIP, use the -quickgelu name")
    assert f"  activation: gelu ({reason})" in r.stdout
    rec = json.loads((tmp_path / "b" / "stexport.json").read_text())["model"]["backbone"]
    assert rec["config"]["act"] == "gelu" and rec["activation_reason"] == reason

    caplog.clear()
    with caplog.at_level("WARNING", logger="stexport"):
        r = runner.invoke(app, ["build", "--adapter", str(tmp_path / "k.pt"), "--backbone",
                                f"{clip_arch}-quickgelu", "--pretrained", str(tmp_path / "openclip_resaved.pt"),
                                "--out", str(tmp_path / "q")])
    assert r.exit_code == 0 and "-quickgelu" not in caplog.text
    assert f"  activation: quick_gelu (model config {clip_arch}-quickgelu sets quick_gelu)" in r.stdout

    r = runner.invoke(app, ["inspect", "--adapter", str(tmp_path / "k.pt"), "--backbone", clip_arch, "--json"])
    rep = json.loads(r.stdout)
    assert rep["activation"] == "gelu" and rep["official_layout"] is True
    assert rep["activation_reason"].startswith(f"model config {clip_arch} uses exact GELU")
    assert f"pass --backbone {clip_arch}-quickgelu" in rep["warning"]
    r = runner.invoke(app, ["inspect", "--adapter", str(tmp_path / "plain.pt"), "--backbone", clip_arch])
    assert "activation     gelu (model config" in r.stdout and "-quickgelu" not in r.output  # not official
