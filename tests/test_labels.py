"""Shipped class-name lists (official order) and --labels handling."""

from __future__ import annotations

import pytest

from stexport.errors import StexportError
from stexport.bundle.labels import resolve_labels


def test_kinetics_400_in_official_order():
    names, source = resolve_labels(None, 400)
    assert source == "kinetics-400" and len(names) == len(set(names)) == 400
    assert names == sorted(names)  # the standard label map is alphabetical
    assert names[:3] == ["abseiling", "air drumming", "answering questions"]
    assert names[-2:] == ["yoga", "zumba"]
    assert names[196] == "massaging person's head"


def test_something_something_v2_ordered_by_label_id():
    names, source = resolve_labels(None, 174)
    assert source == "something-something-v2" and len(names) == len(set(names)) == 174
    # ids from something-something-v2-labels.json
    ids = {0: "Approaching something with your camera", 16: "Holding something",
           67: "Pretending to open something without actually opening it",
           93: "Pushing something from left to right", 109: "Putting something on a surface",
           140: "Spinning something that quickly stops spinning",
           160: "Touching (without moving) part of something", 173: "Wiping something off of something"}
    assert {i: names[i] for i in ids} == ids


def test_generic_names_and_labels_file(tmp_path):
    assert resolve_labels(None, 3) == (["class_0", "class_1", "class_2"], "generic")
    f = tmp_path / "mine.txt"
    f.write_text("fade in\nfade out\n\nstatic\n")
    assert resolve_labels(str(f), 3) == (["fade in", "fade out", "static"], str(f))
    with pytest.raises(StexportError, match=r"mine.txt: 3 labels but the model has 400 classes"):
        resolve_labels(str(f), 400)
    with pytest.raises(StexportError, match="no such labels file"):
        resolve_labels(str(tmp_path / "none.txt"), 3)
