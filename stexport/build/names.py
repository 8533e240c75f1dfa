"""Backbone names stexport accepts, read from config files without importing torch or open_clip.

open_clip describes each architecture in a JSON file shipped in its package (`open_clip/model_configs/*.json`);
stexport adds its own small ViTs (`stexport/model_configs/*.json`). Reading these files directly lets the CLI
refuse a mistyped `--backbone` (and suggest the closest accepted names) in milliseconds, before torch loads.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

from stexport.bundle.precision import INPUT_FORMATS as _INPUT_FORMATS
from stexport.calibration.ranges import METHODS as CALIB_METHODS  # noqa: F401 - re-exported for the CLI
from stexport.bundle.precision import NAMES as PRECISIONS  # noqa: F401 - the CLI's choices, re-exported
from stexport.errors import StexportError

CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
# choices the CLI checks before importing torch; the modules that implement them import these (PRECISIONS and
# INPUT_FORMATS: the names of stexport.bundle.precision's tables)
INPUT_FORMATS = tuple(_INPUT_FORMATS)
# vision_cfg keys that would change the tower away from a plain CLIP ViT, with the value that keeps it plain
PLAIN_VIT = {
    "attentional_pool": False, "ls_init_value": None, "no_ln_pre": False, "final_ln_after_pool": False,
    "pool_type": "tok", "pos_embed_type": "learnable", "norm_kwargs": {}, "act_kwargs": None,
}


def open_clip_config_dir() -> Path | None:
    """open_clip's model_configs folder, found without importing open_clip (None when not installed)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def all_configs() -> dict[str, dict]:
    """{name: config} of every model config open_clip would list, stexport's own included (they win), plus
    those registered at run time with open_clip.add_model_config when open_clip is already imported (it is
    never imported here)."""
    out = dict(_file_configs())
    live = getattr(sys.modules.get("open_clip.factory"), "_MODEL_CONFIGS", None)
    if isinstance(live, dict):
        for k, v in live.items():
            if k not in out and isinstance(v, dict) and "vision_cfg" in v:
                out[k] = v
    return {k: out[k] for k in sorted(out, key=lambda n: (_rank(n), _natural(n)))}


@functools.lru_cache(maxsize=1)
def _file_configs() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for folder in (open_clip_config_dir(), CONFIG_DIR):
        if folder is None or not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.json")):
            try:
                cfg = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                out[f.stem] = cfg
    return {k: out[k] for k in sorted(out, key=lambda n: (_rank(n), _natural(n)))}


def refusal(name: str, cfg: dict) -> str | None:
    """Why stexport cannot use this architecture, or None when it is a plain CLIP ViT."""
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision or "hf_model_name" in vision:
        return f"backbone '{name}' is a timm/HF tower; ST-Adapter needs an open_clip CLIP ViT"
    if isinstance(vision.get("layers"), (list, tuple)):
        return f"backbone '{name}' is a ResNet; ST-Adapter needs a ViT backbone (e.g. ViT-B-16)"
    for key, ok in PLAIN_VIT.items():
        if vision.get(key) is not None and vision.get(key) != ok:
            return (f"backbone '{name}' sets vision_cfg.{key}={vision[key]!r}; "
                    "ST-Adapter supports plain CLIP ViTs only")
    if "width" not in vision or "patch_size" not in vision:
        return f"backbone '{name}' is not a ViT config (no vision width/patch size)"
    return None


def accepted() -> dict[str, dict]:
    """{name: config} of the architectures stexport can build (plain CLIP ViTs), in open_clip's order."""
    return {n: c for n, c in all_configs().items() if refusal(n, c) is None}


def _rank(name: str) -> int:
    """ViT-* first, then stexport's own, then CLIP ViTs paired with other text towers."""
    return 0 if name.startswith("ViT-") else 1 if name.startswith("stexport-") else 2


def _natural(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def is_schema(name: str) -> bool:
    """'hf-hub:org/repo' or 'local-dir:/path': open_clip resolves these itself (they are not in the files)."""
    return name.startswith(("hf-hub:", "local-dir:"))


def suggest(name: str, n: int = 4) -> list[str]:
    """The accepted names closest to `name` (case-insensitive), best first."""
    names = list(accepted())
    lower = {k.lower(): k for k in names}
    close = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)
    return [lower[c] for c in close]


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def check_weights_file(path: Path) -> None:
    """StexportError unless `path` is a file: a directory gets the weights files found in it named."""
    path = Path(path)
    if path.is_dir():
        found = sorted(f.name for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
        inside = (f"found {', '.join(found[:4])} in it" if found
                  else f"no {'/'.join(WEIGHT_SUFFIXES)} file in it")
        raise StexportError(f"{path}: is a directory, not a weights file ({inside}); pass the file itself, "
                            f"e.g. --pretrained {path / (found[0] if found else 'ViT-B-16.pt')}")
    if not path.is_file():
        raise StexportError(f"{path}: no such file")


def check_backbone(name: str) -> dict | None:
    """The config of an accepted backbone name; StexportError naming the closest valid ones otherwise, or the
    `pip install 'stexport[export]'` that brings open_clip's names when open_clip is not installed.

    Returns None for 'hf-hub:'/'local-dir:' names, which only open_clip can resolve."""
    if is_schema(name):
        return None
    cfg = all_configs().get(name)
    if cfg is None and open_clip_config_dir() is None:
        # open_clip's names are unknown without open_clip (the base install): the fix is the install
        from stexport.extras import require

        require(f"--backbone {name} (an open_clip model)", "open_clip")
    if cfg is None:
        close = suggest(name)
        if close:
            hint = f"did you mean {close[0]}?" + (f" (also close: {', '.join(close[1:])})" if close[1:] else "")
        else:
            hint = f"accepted: {', '.join(list(accepted())[:10])} …"
        raise StexportError(f"unknown backbone '{name}': {hint}; `stexport inspect --adapter FILE` names the "
                            "backbones an adapter fits")
    why = refusal(name, cfg)
    if why:
        raise StexportError(why)
    return cfg


def vit_shape(cfg: dict) -> dict:
    """width, layers, heads, patch_size, image_size, mlp_width of a ViT config (open_clip's defaults filled)."""
    v = cfg["vision_cfg"]
    width = int(v["width"])
    size = v.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {"width": width, "layers": int(v.get("layers", 12)), "heads": width // int(v.get("head_width", 64)),
            "patch_size": int(v["patch_size"]), "image_size": int(size),
            "mlp_width": int(width * float(v.get("mlp_ratio", 4.0)))}


def fitting_backbones(width: int, blocks_used: int) -> list[str]:
    """Accepted backbones an adapter of this width fits, whose depth covers its highest block (`blocks_used`
    = highest block index + 1); exact depth first, then by name order. `-quickgelu` twins are left out when
    the plain name is listed (same shapes)."""
    exact, deeper = [], []
    for name, cfg in accepted().items():
        s = vit_shape(cfg)
        if s["width"] != width or s["layers"] < blocks_used:
            continue
        (exact if s["layers"] == blocks_used else deeper).append(name)
    found = exact + deeper
    return [n for n in found if not (n.endswith("-quickgelu") and n[: -len("-quickgelu")] in found)]
