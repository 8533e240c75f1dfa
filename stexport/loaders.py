"""From files to the reference model: backbone + deltas → STAdapterViT, and the same for a bundle's manifest."""

from __future__ import annotations

import warnings
from pathlib import Path

from stexport.backbone import Backbone, load_backbone, random_backbone
from stexport.bundle import Bundle
from stexport.deltas import Deltas, check_fits, infer_spec, load_deltas
from stexport.errors import StexportError
from stexport.reference import STAdapterViT, build_reference


def load_pair(adapter: str | Path, backbone: str, pretrained: str) -> tuple[Backbone, Deltas]:
    deltas = load_deltas(adapter)  # cheap and most likely to be wrong: check it before loading a backbone
    bb = load_backbone(backbone, pretrained)
    check_fits(deltas.spec, bb.config, backbone)
    return bb, deltas


def backbone_record(bb: Backbone) -> dict:
    return {"name": bb.name, "config": bb.config.to_dict(), **bb.source}


def deltas_from_bundle(bundle: Bundle) -> Deltas:
    from safetensors.torch import load_file

    path = bundle.file("deltas")
    sd = load_file(str(path))
    return Deltas(spec=infer_spec(sd, str(path)), state_dict=sd, path=str(path))


def backbone_from_record(rec: dict, pretrained: str | None = None) -> Backbone:
    """Reload the backbone a bundle was built from (or the one given by `pretrained`)."""
    spec = pretrained or rec.get("file") or rec.get("pretrained", "none")
    if spec in (None, "", "none"):
        return random_backbone(rec["name"], seed=int(rec.get("seed", 0)))
    if rec.get("file") and spec == rec["file"] and not Path(spec).exists():
        raise StexportError(f"backbone weights {spec} (recorded in the bundle) are gone; pass --pretrained FILE")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(rec["name"], spec)
    want = rec.get("sha256")
    if want and bb.source.get("sha256") and bb.source["sha256"] != want:
        raise StexportError(f"backbone weights {spec} differ from the ones the bundle was built from "
                            f"(sha256 {bb.source['sha256'][:12]}… vs {want[:12]}…)")
    return bb


def reference_for_bundle(bundle: Bundle, pretrained: str | None = None) -> STAdapterViT:
    bb = backbone_from_record(bundle.manifest["backbone"], pretrained)
    return build_reference(bb, deltas_from_bundle(bundle))
