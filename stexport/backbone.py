"""The frozen CLIP image ViT, resolved and loaded through open_clip.

`load_backbone(name, pretrained)` returns a `Backbone`: the vision tower's config and its state dict in the
names the official ST-Adapter code uses (conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N.{ln_1,attn,ln_2,mlp}, ln_post). CLIP's `proj` is dropped: ST-Adapter does not use it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from stexport.errors import StexportError

log = logging.getLogger("stexport")

CONFIG_DIR = Path(__file__).parent / "model_configs"
# Keys OpenAI's released CLIP files carry besides the weights; open_clip checkpoints never do.
OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class ViTConfig:
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    mlp_width: int
    act: str  # "quick_gelu" or "gelu"
    ln_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    name: str
    config: ViTConfig
    state_dict: dict[str, torch.Tensor]
    # {"pretrained": ..., "sha256": ..., "openai": bool, "activation": "quick_gelu"|"gelu", "activation_reason": ...}
    source: dict = field(default_factory=dict)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


_registered = False


def register_configs() -> None:
    """Make stexport's own small ViT configs (demo and test models) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def model_config(name: str) -> dict:
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")][:12]
        raise StexportError(
            f"unknown backbone '{name}': use an open_clip model name such as {', '.join(vits)} …"
        )
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision or "hf_model_name" in vision:
        raise StexportError(f"backbone '{name}' is a timm/HF tower; ST-Adapter needs an open_clip CLIP ViT")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise StexportError(f"backbone '{name}' is a ResNet; ST-Adapter needs a ViT backbone (e.g. ViT-B-16)")
    unsupported = {
        "attentional_pool": False, "ls_init_value": None, "no_ln_pre": False, "final_ln_after_pool": False,
        "pool_type": "tok", "pos_embed_type": "learnable", "norm_kwargs": {}, "act_kwargs": None,
    }
    for key, ok in unsupported.items():
        if vision.get(key) is not None and vision.get(key) != ok:
            raise StexportError(f"backbone '{name}' sets vision_cfg.{key}={vision[key]!r}; "
                                "ST-Adapter supports plain CLIP ViTs only")
    return cfg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a weights file of any supported format. Returns (state_dict, looks_like_openai)."""
    if not path.is_file():
        raise StexportError(f"{path}: no such file")
    openai = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif _is_torchscript(path):
            # OpenAI's JIT archives: TorchScript, not pickle, so loading runs no Python.
            sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            openai = True
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except StexportError:
        raise
    except PermissionError:
        raise StexportError(f"{path}: permission denied: the weights file cannot be read; `chmod a+r` it or run "
                            "as its owner") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise StexportError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0]})")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise StexportError(f"{path}: expected a state dict of tensors")
    if any(k in sd for k in OPENAI_MARKERS):
        openai = True
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return sd, openai


def check_tensors(sd: dict[str, torch.Tensor], where: str, what: str = "weights") -> None:
    """Refuse integer-typed and non-finite (NaN/±Inf) tensors, naming the first one: such weights build a
    model that computes NaN or nonsense without a word."""
    for k, v in sd.items():
        if not (v.is_floating_point()):
            raise StexportError(f"{where}: tensor '{k}' has dtype {str(v.dtype).replace('torch.', '')}; {what} "
                                "are floating point (float32/float16/bfloat16): the file is not a trained "
                                "checkpoint or was saved wrongly; re-export it from the training run")
        if v.numel() and not bool(torch.isfinite(v).all()):
            nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            raise StexportError(f"{where}: tensor '{k}' {tuple(v.shape)} holds {nan} NaN and {inf} ±Inf values; "
                                f"the {what} are damaged (a diverged training run or a bad conversion): use an "
                                "earlier checkpoint or re-export it")


def vision_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors, without the `visual.` prefix a full CLIP state dict has."""
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return {k: v for k, v in sd.items() if k not in OPENAI_MARKERS}


def _build_tower(cfg: dict, quick_gelu: bool):
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu)


def _config_of(visual, quick_gelu: bool) -> ViTConfig:
    blocks = visual.transformer.resblocks
    b0 = blocks[0]
    ln = b0.ln_1
    return ViTConfig(
        width=visual.conv1.out_channels,
        layers=len(blocks),
        heads=b0.attn.num_heads,
        patch_size=visual.conv1.kernel_size[0],
        image_size=visual.image_size[0],
        mlp_width=b0.mlp.c_fc.out_features,
        act="quick_gelu" if quick_gelu else "gelu",
        ln_eps=float(ln.eps),
    )


KEEP = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "transformer.", "ln_post.")


def _official_state(visual) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in visual.state_dict().items():
        if not k.startswith(KEEP):
            continue
        if ".ls_" in k or "attn_pool" in k:
            raise StexportError(f"vision tower has '{k}': not a plain CLIP ViT")
        sd[k] = v.detach().float().clone()
    return sd


def load_backbone(name: str, pretrained: str = "openai", cache_dir: str | None = None) -> Backbone:
    """Resolve `name` through open_clip and load its vision tower.

    pretrained: "openai" or another open_clip tag (downloads), a local file (OpenAI JIT archive, OpenAI-style or
    open_clip state dict, safetensors, or a vision-only state dict), or "none" (random init).
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = model_config(name)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    reason = config_activation_reason(name, quick_gelu)
    source: dict = {"pretrained": pretrained}

    if pretrained in (None, "", "none"):
        warnings.warn(
            f"backbone {name} is randomly initialised (--pretrained none): predictions are meaningless",
            stacklevel=2,
        )
        return random_backbone(name, seed=0)
    elif os.path.exists(pretrained) or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        path = Path(pretrained)
        sd, openai = read_state_dict(path)
        if openai and not quick_gelu:
            log.warning("%s holds OpenAI CLIP weights (trained with QuickGELU): using QuickGELU for %s", path, name)
            quick_gelu = True
            reason = (f"{path.name} is an OpenAI CLIP file (JIT archive or OpenAI's state-dict entries), trained "
                      "with QuickGELU")
        elif not quick_gelu:
            reason += (f"; nothing in {path.name} marks it as OpenAI's weights (a re-saved open_clip state dict "
                       "does not): if it is OpenAI CLIP, use the -quickgelu name")
        visual = _build_tower(cfg, quick_gelu)
        vis = vision_keys(sd)
        own = visual.state_dict()
        check_tensors({k: v for k, v in vis.items() if k in own}, str(path), "backbone weights")
        for k, v in vis.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                raise StexportError(f"{path}: '{k}' has shape {tuple(v.shape)} but backbone {name} needs "
                                    f"{tuple(own[k].shape)}: pick the matching --backbone")
        missing = [k for k in own if k.startswith(KEEP) and k not in vis]
        if missing:
            raise StexportError(f"{path}: no vision tensor '{missing[0]}' (+{len(missing) - 1} more): "
                                f"not weights for backbone {name}")
        visual.load_state_dict({k: v for k, v in vis.items() if k in own}, strict=False)
        source.update(sha256=_sha256(path), openai=openai, file=str(path.resolve()))
    else:
        tag_cfg = get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = list_pretrained_tags_by_model(name)
            raise StexportError(
                f"--pretrained '{pretrained}' is neither a file nor an open_clip tag for {name} "
                f"(tags: {', '.join(tags) or 'none'}); or pass 'none' for random weights"
            )
        if tag_cfg.get("quick_gelu", False) and not quick_gelu:
            log.warning("weights '%s' were trained with QuickGELU: using QuickGELU for %s", pretrained, name)
            quick_gelu = True
            reason = f"open_clip tag '{pretrained}' was trained with QuickGELU"
        try:
            model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                           cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001
            raise StexportError(f"could not load {name} weights '{pretrained}': {str(e).splitlines()[0]}")
        visual = model.visual
        source.update(openai=pretrained == "openai", tag=pretrained)

    visual.eval()
    config = _config_of(visual, quick_gelu)
    state = _official_state(visual)
    check_tensors(state, f"backbone {name} ({pretrained})", "backbone weights")
    source.update(activation=config.act, activation_reason=reason)
    return Backbone(name=name, config=config, state_dict=state, source=source)


def config_activation_reason(name: str, quick_gelu: bool) -> str:
    """Why the model config alone gives this activation."""
    if quick_gelu:
        return f"model config {name} sets quick_gelu"
    return f"model config {name} uses exact GELU"


def has_quickgelu_variant(name: str) -> bool:
    """Whether open_clip also knows `name`-quickgelu: an architecture OpenAI released CLIP weights for."""
    import open_clip

    register_configs()
    return not name.endswith("-quickgelu") and f"{name}-quickgelu" in open_clip.list_models()


def official_layout_warning(name: str, act: str, reason: str) -> str | None:
    """The warning for an adapter in the official checkpoint layout on a backbone resolved to exact GELU.

    The official ST-Adapter code always runs OpenAI CLIP with QuickGELU; the same weights re-saved through
    open_clip carry nothing that says so."""
    if act != "gelu" or not has_quickgelu_variant(name):
        return None
    return (f"the adapter is in the official ST-Adapter checkpoint layout, whose code runs OpenAI CLIP with "
            f"QuickGELU, but backbone {name} resolved to exact GELU ({reason}); if the backbone weights are "
            f"OpenAI's (also when re-saved through open_clip), pass --backbone {name}-quickgelu")


def random_backbone(name: str, seed: int = 0, fp16_round: bool = True) -> Backbone:
    """A seeded random backbone (tests, demos). FP16-representable like OpenAI's released weights."""
    cfg = model_config(name)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    torch.manual_seed(seed)
    visual = _build_tower(cfg, quick_gelu).eval()
    sd = _official_state(visual)
    if fp16_round:
        sd = {k: v.half().float() for k, v in sd.items()}
    config = _config_of(visual, quick_gelu)
    return Backbone(name=name, config=config, state_dict=sd,
                    source={"pretrained": "none", "seed": seed, "activation": config.act,
                            "activation_reason": config_activation_reason(name, quick_gelu) + " (random weights)"})
