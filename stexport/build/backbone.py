"""The frozen CLIP image ViT, resolved and loaded through open_clip.

`load_backbone(name, pretrained)` returns a `Backbone`: the vision tower's config and its state dict in the
names the official ST-Adapter code uses (conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N.{ln_1,attn,ln_2,mlp}, ln_post). CLIP's `proj` is dropped: ST-Adapter does not use it.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stexport import interrupt

from stexport.build import names
from stexport.errors import StexportError
from stexport.fileutil import sha256_file
from stexport.bundle.manifest import ViTConfig

log = logging.getLogger("stexport")

CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
# Keys OpenAI's released CLIP files carry besides the weights; open_clip checkpoints never do.
OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")
WEIGHT_SUFFIXES = names.WEIGHT_SUFFIXES


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
    """open_clip's config for `name`; StexportError for unknown names (with the closest accepted ones) and for
    towers that are not plain CLIP ViTs."""
    names.check_backbone(name)  # cheap: the config files themselves, with "did you mean"
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise StexportError(f"--backbone {name}: open_clip cannot resolve it")
    why = names.refusal(name, cfg)
    if why:
        raise StexportError(why)
    return cfg


def shape_config(name: str) -> ViTConfig | None:
    """The backbone's shapes read from its config file alone (no torch model built); None for names only
    open_clip resolves ('hf-hub:…'). The activation is left as 'gelu': only shapes are meant."""
    cfg = names.check_backbone(name)
    return None if cfg is None else ViTConfig(**names.vit_shape(cfg), act="gelu")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a weights file of any supported format. Returns (state_dict, looks_like_openai)."""
    names.check_weights_file(path)
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
        interrupt.reraise(e)
        detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        raise StexportError(f"{path}: not a readable weights file ({detail}); --pretrained takes a torch.save "
                            f"checkpoint ({'/'.join(names.WEIGHT_SUFFIXES[1:])}), OpenAI's JIT archive, a "
                            ".safetensors file, an open_clip tag (e.g. openai) or 'none'") from None
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

    pretrained: "openai" or another open_clip tag (taken from the local model-hub / open_clip cache when there,
    else downloaded), a local file (OpenAI JIT archive, OpenAI-style or open_clip state dict, safetensors, or a
    vision-only state dict), or "none" (random init). The activation (QuickGELU or GELU) and why it was chosen
    are recorded in the returned Backbone's source. Raises StexportError with one line for unknown names,
    unreadable, mismatched, integer-typed or non-finite weights, and tags that cannot be fetched (offline:
    "pass --pretrained FILE").
    """
    cfg = model_config(name)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    reason = config_activation_reason(name, quick_gelu)

    if pretrained in (None, "", "none"):
        warnings.warn(random_weights_warning(name), stacklevel=2)
        log.info("weights: %s randomly initialised (seed 0)", name)
        log.info("activation: %s (%s)", "QuickGELU" if quick_gelu else "GELU", reason)
        return random_backbone(name, seed=0)
    if os.path.exists(pretrained) or Path(pretrained).suffix in WEIGHT_SUFFIXES:
        path = Path(pretrained)
        sd, openai = read_state_dict(path)
        log.info("weights: file %s (%s)", path, "OpenAI CLIP" if openai else "open_clip / plain state dict")
        if openai and not quick_gelu:
            log.warning("%s holds OpenAI CLIP weights (trained with QuickGELU): using QuickGELU for %s", path, name)
            quick_gelu = True
            reason = (f"{path.name} is an OpenAI CLIP file (JIT archive or OpenAI's state-dict entries), trained "
                      "with QuickGELU")
        elif not quick_gelu:
            reason += (f"; nothing in {path.name} marks it as OpenAI's weights (a re-saved open_clip state dict "
                       "does not): if it is OpenAI CLIP, use the -quickgelu name")
        source = {"pretrained": pretrained, "sha256": sha256_file(path), "openai": openai,
                  "file": str(path.resolve())}
    else:
        tag_cfg = tag_config(name, pretrained)
        path = fetch_weights(name, pretrained, tag_cfg, cache_dir)
        if tag_cfg.get("quick_gelu", False) and not quick_gelu:
            log.warning("weights '%s' were trained with QuickGELU: using QuickGELU for %s", pretrained, name)
            quick_gelu = True
            reason = f"open_clip tag '{pretrained}' was trained with QuickGELU"
        sd, _ = read_state_dict(path)
        source = {"pretrained": pretrained, "tag": pretrained, "openai": pretrained == "openai",
                  "sha256": sha256_file(path)}
    log.info("activation: %s (%s)", "QuickGELU" if quick_gelu else "GELU", reason)
    visual = _build_tower(cfg, quick_gelu)
    vis = vision_keys(sd)
    own = visual.state_dict()
    check_tensors({k: v for k, v in vis.items() if k in own}, str(path), "backbone weights")
    for k, v in vis.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            fits = names.fitting_backbones(int(v.shape[-1]), 0) if k == "class_embedding" else []
            hint = f"pick the matching --backbone ({', '.join(fits[:3])}?)" if fits else "pick the matching --backbone"
            raise StexportError(f"{path}: '{k}' has shape {tuple(v.shape)} but backbone {name} needs "
                                f"{tuple(own[k].shape)}: {hint}")
    missing = [k for k in own if k.startswith(KEEP) and k not in vis]
    if missing:
        raise StexportError(f"{path}: no vision tensor '{missing[0]}' (+{len(missing) - 1} more): "
                            f"not weights for backbone {name}")
    visual.load_state_dict({k: v for k, v in vis.items() if k in own}, strict=False)
    visual.eval()
    config = _config_of(visual, quick_gelu)
    source.update(activation_reason=reason)
    return Backbone(name=name, config=config, state_dict=_official_state(visual), source=source)


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


def random_weights_warning(name: str) -> str:
    return f"backbone {name} is randomly initialised (--pretrained none): predictions are meaningless"


def official_layout_warning(name: str, act: str, reason: str) -> str | None:
    """The warning for an adapter in the official checkpoint layout on a backbone resolved to exact GELU (ask
    only for an adapter that fits the backbone). `reason`, why GELU was chosen, is shown beside it already.

    The official ST-Adapter code always runs OpenAI CLIP with QuickGELU; the same weights re-saved through
    open_clip carry nothing that says so."""
    if act != "gelu" or not has_quickgelu_variant(name):
        return None
    return (f"{name} runs exact GELU; official ST-Adapter checkpoints expect QuickGELU: for OpenAI CLIP weights "
            f"pass --backbone {name}-quickgelu")


def tag_config(name: str, tag: str) -> dict:
    """open_clip's pretrained record for (name, tag): where the weights live (hf_hub / url) and their traits."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = list_pretrained_tags_by_model(name)
        raise StexportError(
            f"--pretrained '{tag}' is neither a file nor an open_clip tag for {name} "
            f"(tags: {', '.join(tags) or 'none'}); or pass 'none' for random weights"
        )
    return tag_cfg


def _hub_files(tag_cfg: dict) -> list[tuple[str, str]]:
    """(repo_id, filename) candidates on the model hub, in the order open_clip tries them (safetensors first)."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return []
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    return [(repo, f) for f in [*_get_safe_alternatives(filename), filename]]


def cached_weights(tag_cfg: dict, cache_dir: str | None = None) -> Path | None:
    """The tag's weights file if the model hub's cache (or open_clip's URL cache, ~/.cache/clip) has it."""
    if tag_cfg.get("file"):
        return Path(tag_cfg["file"])
    from huggingface_hub import try_to_load_from_cache

    for repo, filename in _hub_files(tag_cfg):
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    url = tag_cfg.get("url")
    if url:
        p = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if p.is_file():
            return p
    return None


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "STEXPORT_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    return None


def unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why `url`'s host cannot be reached (a TCP connect, DNS included, bounded by `timeout`), or None."""
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return f"bad URL {url!r}"
    result: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}: {e.strerror or e}")

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout + 1)
    return result[0] if result else f"{host}: no answer in {timeout:g} s"


def fetch_weights(name: str, tag: str, tag_cfg: dict, cache_dir: str | None = None) -> Path:
    """The local file of open_clip tag `tag` for `name`: from the cache when there; else downloaded, after a
    quick check that the hub is reachable, so an offline machine gets one line at once instead of minutes
    of retries."""
    hit = cached_weights(tag_cfg, cache_dir)
    if hit is not None:
        log.info("weights: %s '%s' from the local cache %s", name, tag, hit)
        return hit
    advice = f"could not download '{tag}' weights for {name}"
    fix = "pass --pretrained FILE (a local weights file), or run once with network access to fill the cache"
    why = _offline_env()
    if why is None:
        from huggingface_hub import constants

        url = constants.ENDPOINT if _hub_files(tag_cfg) else tag_cfg.get("url", "")
        why = unreachable(url) if url else "no download location"
    if why:
        raise StexportError(f"{advice} (offline? {why}); {fix}")
    from open_clip.pretrained import download_pretrained

    log.info("weights: downloading %s '%s' (%s)", name, tag, tag_cfg.get("hf_hub") or tag_cfg.get("url"))
    try:
        path = download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any download failure is reported the same way
        interrupt.reraise(e)
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise StexportError(f"{advice} ({first}); {fix}") from e
    if not path or not os.path.isfile(path):
        raise StexportError(f"{advice}; {fix}")
    return Path(path)


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
