"""From files to the reference model: backbone + deltas → STAdapterViT, and the same for a bundle's manifest."""

from __future__ import annotations

import warnings
from pathlib import Path

from stexport.build.backbone import Backbone, load_backbone, random_backbone
from stexport.bundle.store import Bundle
from stexport.build.deltas import Deltas, infer_spec
from stexport.errors import StexportError
from stexport.bundle.manifest import BackboneRecord, WeightsSource
from stexport.build.reference import STAdapterViT, build_reference


def backbone_record(bb: Backbone) -> BackboneRecord:
    """The manifest's record of a loaded backbone: name, config, where its weights came from, activation."""
    weights = {k: v for k, v in bb.source.items() if k in WeightsSource.model_fields}
    weights.setdefault("pretrained", "none")
    return BackboneRecord(name=bb.name, config=bb.config, weights=WeightsSource(**weights),
                          activation_reason=bb.source.get("activation_reason"))


def deltas_from_bundle(bundle: Bundle) -> Deltas:
    from safetensors.torch import load_file

    path = bundle.file("deltas")
    sd = load_file(str(path))
    return Deltas(spec=infer_spec(sd, str(path)), state_dict=sd, path=str(path))


def backbone_from_record(rec: BackboneRecord, pretrained: str | None = None) -> Backbone:
    """Reload the backbone a bundle was built from (or the one given by `pretrained`)."""
    w = rec.weights
    spec = pretrained or w.file or w.pretrained or "none"
    if spec in (None, "", "none"):
        return random_backbone(rec.name, seed=int(w.seed or 0))
    if w.file and spec == w.file and not Path(spec).exists():
        raise StexportError(f"backbone weights {spec} (recorded in the bundle) are gone; pass --pretrained FILE")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(rec.name, spec)
    want = w.sha256
    if want and bb.source.get("sha256") and bb.source["sha256"] != want:
        raise StexportError(f"backbone weights {spec} differ from the ones the bundle was built from "
                            f"(sha256 {bb.source['sha256'][:12]}… vs {want[:12]}…)")
    return bb


def reference_for_bundle(bundle: Bundle, pretrained: str | None = None) -> STAdapterViT:
    bb = backbone_from_record(bundle.manifest.model.backbone, pretrained)
    return build_reference(bb, deltas_from_bundle(bundle))


def task_reference(bundle: Bundle, pack, pretrained: str | None = None) -> STAdapterViT:
    """The reference model of a task pack on `bundle`'s backbone: the pack's own delta state dict."""
    import torch

    if not pack.deltas:
        raise StexportError(f"{pack.path}: holds no delta state dict; rebuild it with `stexport pack --force`")
    sd = {k: torch.from_numpy(v.copy()) for k, v in pack.deltas.items()}
    bb = backbone_from_record(bundle.manifest.model.backbone, pretrained)
    return build_reference(bb, Deltas(spec=infer_spec(sd, str(pack.path)), state_dict=sd, path=str(pack.path)))
