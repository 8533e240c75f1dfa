"""ST-Adapter delta checkpoints: the trained adapters and head, in the official release layout.

The official file is a torch checkpoint dict {model, optimizer, lr_sched, loss_scaler, next_epoch} whose `model`
holds only trainable tensors:
    transformer.resblocks.{i}.adapter_pre_attn.{fc1,conv,fc2}.{weight,bias}
    transformer.resblocks.{i}.adapter_pre_mlp.{fc1,conv,fc2}.{weight,bias}
    fc.weight, fc.bias
A plain state dict with those keys, or a safetensors file, is accepted too. The adapter spec is read from the
tensors alone.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from stexport import interrupt
from stexport.build.backbone import check_tensors
from stexport.errors import StexportError
from stexport.fileutil import sha256_file
from stexport.bundle.manifest import AdapterSpec, ViTConfig

POSITIONS = ("pre_attn", "pre_mlp")
_ADAPTER_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.adapter_(pre_attn|pre_mlp)\.(fc1|conv|fc2)\.(weight|bias)$")


@dataclass
class Deltas:
    spec: AdapterSpec
    state_dict: dict[str, torch.Tensor]
    path: str | None = None
    sha256: str | None = None
    official_layout: bool = False  # saved as the official code saves it (trained on OpenAI CLIP, QuickGELU)


def _load_file(path: Path) -> object:
    if not path.exists():
        raise StexportError(f"{path}: no such file (pass the ST-Adapter checkpoint with --adapter)")
    if path.is_dir():
        raise StexportError(f"{path}: is a directory; --adapter takes a checkpoint file (.pt/.pth/.safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001
            interrupt.reraise(e)
            raise StexportError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except PermissionError:
        raise StexportError(f"{path}: permission denied: the checkpoint cannot be read; `chmod a+r` it or run "
                            "as its owner") from None
    except OSError as e:
        raise StexportError(f"{path}: cannot be read ({e.strerror}); re-copy the checkpoint") from None
    if not head:
        raise StexportError(f"{path}: empty file (0 bytes); the checkpoint was not written completely, re-copy it")
    # torch.save writes a zip archive (PK\x03\x04); legacy torch.save a pickle (protocol 2+: \x80)
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise StexportError(f"{path}: not a torch checkpoint: it is neither a zip archive nor a pickle (first "
                            f"bytes {head.hex()}); check that this is the file torch.save wrote, or use "
                            ".safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols of damaged files
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln for ln in first if "GLOBAL" in ln or "Unsupported global" in ln
                    or "Unsupported class" in ln), None)
        if why is None:  # not the weights-only refusal: the pickle itself is broken
            detail = next((ln for ln in first if "operand" in ln or "load key" in ln or "EOF" in ln or
                           "truncated" in ln), first[0] if first else "")
            raise StexportError(f"{path}: not a readable torch checkpoint, truncated or corrupt "
                                f"({detail.strip()[:160]}); re-copy or re-save it") from None
        raise StexportError(
            f"{path}: refused: the file would run code when unpickled ({why.strip()[:160]}); "
            "ST-Adapter checkpoints hold only tensors, so re-save it with torch.save(state_dict)"
        ) from None
    except PermissionError:
        raise StexportError(f"{path}: permission denied: the checkpoint cannot be read") from None
    except Exception as e:  # noqa: BLE001
        interrupt.reraise(e)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise StexportError(f"{path}: not a readable torch checkpoint, truncated or corrupt ({type(e).__name__}: "
                            f"{first}); re-copy or re-save it") from None


OFFICIAL_KEYS = {"model", "optimizer", "lr_sched", "loss_scaler", "next_epoch"}
WRAPPERS = ("model", "state_dict", "module")  # trainers nest the weights under these names


def is_official_layout(obj: object) -> bool:
    """The official release layout: {model, optimizer, lr_sched, loss_scaler, next_epoch}."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and len(OFFICIAL_KEYS & obj.keys()) >= 3


def unwrap(obj: object, where: str) -> dict[str, torch.Tensor]:
    """The delta state dict inside an official checkpoint, a `{"state_dict": …}` wrapper or a plain state
    dict, with a `module.` prefix (DataParallel) removed. Raises StexportError naming the entry that is not a
    floating-point, finite tensor."""
    for _ in range(3):
        inner = next((obj[w] for w in WRAPPERS if isinstance(obj, dict) and isinstance(obj.get(w), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) and k.startswith("fc.") for k, v in obj.items()):
            break
        obj = inner
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise StexportError(f"{where}: expected an ST-Adapter checkpoint (a dict with 'model') or a state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        found = ", ".join(f"'{k}'" for k in list(obj)[:6])
        raise StexportError(f"{where}: entry '{bad[0]}' ({type(sd[bad[0]]).__name__}) is not a tensor; expected "
                            f"the official checkpoint ({{'model': state dict, …}}), {{'state_dict': …}} or a "
                            f"state dict of tensors (found {found})")
    check_tensors(sd, where, "adapter weights")
    return sd


def infer_spec(sd: dict[str, torch.Tensor], where: str = "checkpoint") -> AdapterSpec:
    """Read the adapter spec from tensor names and shapes; reject anything unexpected."""
    if "fc.weight" not in sd or "fc.bias" not in sd:
        raise StexportError(f"{where}: no classification head 'fc.weight'/'fc.bias': not an ST-Adapter checkpoint")
    blocks: dict[str, set[int]] = {p: set() for p in POSITIONS}
    for k in sd:
        if k in ("fc.weight", "fc.bias"):
            continue
        m = _ADAPTER_KEY.match(k)
        if not m:
            raise StexportError(f"{where}: unexpected key '{k}' (shape {tuple(sd[k].shape)}): an ST-Adapter "
                                "checkpoint holds only adapter_pre_attn/adapter_pre_mlp tensors and fc")
        blocks[m.group(2)].add(int(m.group(1)))
    if not blocks["pre_attn"] and not blocks["pre_mlp"]:
        raise StexportError(f"{where}: no adapter tensors found (only a head); not an ST-Adapter checkpoint")

    fc_w = sd["fc.weight"]
    if fc_w.ndim != 2:
        raise StexportError(f"{where}: 'fc.weight' has shape {tuple(fc_w.shape)}, expected (classes, width)")
    num_classes, dim = fc_w.shape
    first = sorted(blocks["pre_attn"] or blocks["pre_mlp"])[0]
    pos = "pre_attn" if blocks["pre_attn"] else "pre_mlp"
    conv = sd.get(f"transformer.resblocks.{first}.adapter_{pos}.conv.weight")
    if conv is None or conv.ndim != 5:
        raise StexportError(f"{where}: adapter conv weight of block {first} missing or not 5-D")
    width = conv.shape[0]
    kernel = tuple(int(x) for x in conv.shape[2:])
    if any(k % 2 == 0 for k in kernel):
        raise StexportError(f"{where}: adapter kernel {kernel} has an even size; ST-Adapter pads k//2 (odd sizes)")

    expected = {
        "fc1.weight": (width, dim), "fc1.bias": (width,),
        "conv.weight": (width, 1, *kernel), "conv.bias": (width,),
        "fc2.weight": (dim, width), "fc2.bias": (dim,),
    }
    for p in POSITIONS:
        for i in sorted(blocks[p]):
            for name, shape in expected.items():
                key = f"transformer.resblocks.{i}.adapter_{p}.{name}"
                if key not in sd:
                    raise StexportError(f"{where}: missing key '{key}' (expected shape {shape})")
                if tuple(sd[key].shape) != shape:
                    raise StexportError(f"{where}: '{key}' has shape {tuple(sd[key].shape)}, expected {shape}")
    if tuple(sd["fc.bias"].shape) != (num_classes,):
        raise StexportError(f"{where}: 'fc.bias' has shape {tuple(sd['fc.bias'].shape)}, expected ({num_classes},)")
    return AdapterSpec(dim=dim, width=width, kernel=kernel, pre_attn=tuple(sorted(blocks["pre_attn"])),
                       pre_mlp=tuple(sorted(blocks["pre_mlp"])), num_classes=num_classes)


def matching_backbones(spec: AdapterSpec) -> str:
    """'use --backbone X (or Y, Z)': the accepted backbones whose width and depth this adapter fits."""
    from stexport.build.names import fitting_backbones

    found = fitting_backbones(spec.dim, max(spec.pre_attn + spec.pre_mlp) + 1)
    if not found:
        return f"no known backbone has width {spec.dim} and {max(spec.pre_attn + spec.pre_mlp) + 1}+ blocks"
    more = f" (or {', '.join(found[1:4])}{' …' if len(found) > 4 else ''})" if found[1:] else ""
    return f"use --backbone {found[0]}{more}"


def check_fits(spec: AdapterSpec, cfg: ViTConfig, backbone: str = "backbone") -> None:
    """Raise a clear error if the deltas cannot sit on this backbone."""
    top = max(spec.pre_attn + spec.pre_mlp)
    if spec.dim != cfg.width:
        raise StexportError(
            f"adapter width mismatch: 'fc.weight' and the adapters expect a width-{spec.dim} ViT, but {backbone} has "
            f"width {cfg.width} (shape (…, {spec.dim}) vs (…, {cfg.width})); {matching_backbones(spec)}"
        )
    if top >= cfg.layers:
        raise StexportError(f"adapter on block {top} but {backbone} has only {cfg.layers} blocks; "
                            f"{matching_backbones(spec)}")
    if spec.kernel[1] > cfg.grid or spec.kernel[2] > cfg.grid:
        raise StexportError(f"adapter kernel {spec.kernel} is larger than the {cfg.grid}x{cfg.grid} token grid")


def load_deltas(path: str | Path) -> Deltas:
    """Deltas from a checkpoint file (see the module docstring); StexportError naming the cause and fix for
    unreadable, damaged, code-running, integer-typed or non-finite files."""
    path = Path(path)
    obj = _load_file(path)
    sd = unwrap(obj, str(path))
    spec = infer_spec(sd, str(path))
    return Deltas(spec=spec, state_dict={k: v.float() for k, v in sd.items()}, path=str(path),
                  sha256=sha256_file(path), official_layout=is_official_layout(obj))


def as_deltas(adapter) -> Deltas:
    """`adapter` as Deltas: Deltas as they are, a state dict (str → tensor, possibly wrapped as a checkpoint)
    in float32, or a checkpoint path loaded with `load_deltas`. Raises what `load_deltas` raises (and, for a
    dict, StexportError for keys that are not an ST-Adapter's)."""
    if isinstance(adapter, Deltas):
        return adapter
    if isinstance(adapter, dict):
        sd = unwrap(adapter, "deltas")
        return Deltas(spec=infer_spec(sd, "deltas"), state_dict={k: v.float() for k, v in sd.items()})
    return load_deltas(adapter)


def save_official(path: str | Path, state_dict: dict[str, torch.Tensor], next_epoch: int = 1,
                  optimizer: dict | None = None, lr_sched: dict | None = None, loss_scaler: dict | None = None) -> None:
    """Write deltas in the official release layout (what linziyi96/st-adapter's save_model writes)."""
    torch.save({"model": state_dict, "optimizer": optimizer or {"state": {}, "param_groups": []},
                "lr_sched": lr_sched or {}, "loss_scaler": loss_scaler or {}, "next_epoch": next_epoch}, path)
