"""Class names for a model's outputs.

Shipped lists, in the class order of the official releases (so output i is named as the dataset's label id i):
- Kinetics-400 (data/k400.txt): the standard alphabetical 400-class label map, 'abseiling' … 'zumba'
  (as open-mmlab/mmaction2 tools/data/kinetics/label_map_k400.txt).
- Something-Something-v2 (data/ssv2.txt): the 174 templates ordered by their id in
  something-something-v2-labels.json, 0 = 'Approaching something with your camera'
  (as open-mmlab/mmaction2 tools/data/sthv2/label_map.txt).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from stexport.errors import StexportError

KNOWN = {400: ("k400.txt", "kinetics-400"), 174: ("ssv2.txt", "something-something-v2")}


def read_names(path: str | Path) -> list[str]:
    """One class name per line; blank lines are ignored."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def builtin(name: str) -> list[str]:
    """A shipped list by file name ('k400.txt', 'ssv2.txt')."""
    text = resources.files("stexport").joinpath("data", name).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def resolve_labels(path: str | None, num_classes: int) -> tuple[list[str], str]:
    """(names, source): --labels FILE, else the shipped list for 400 or 174 classes, else class_0, class_1…"""
    if path:
        p = Path(path)
        if not p.is_file():
            raise StexportError(f"{p}: no such labels file (one class name per line)")
        names = read_names(p)
        if len(names) != num_classes:
            raise StexportError(f"{p}: {len(names)} labels but the model has {num_classes} classes; "
                                f"pass a file with one name per class, in class order")
        return names, str(p.resolve())
    if num_classes in KNOWN:
        file, source = KNOWN[num_classes]
        return builtin(file), source
    return [f"class_{i}" for i in range(num_classes)], "generic"
