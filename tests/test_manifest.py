"""The typed manifest: load/migrate/save, one-line errors for malformed manifests, backend options, and the
import direction between the runtime and build wings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import installed_runtimes
from stexport.cli.app import app
from typer.testing import CliRunner

from stexport.bundle import manifest as mf
from stexport.runtime.backends import create, load_class, names
from stexport.bundle.store import Bundle
from stexport.errors import StexportError

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


def copy_v1(tmp_path) -> Path:
    out = tmp_path / "v1"
    shutil.copytree(DATA / "bundle-v1", out)
    return out


def test_v1_bundle_from_before_the_typed_manifest_loads_and_gives_the_same_logits(tmp_path):
    """tests/data/bundle-v1 was written by stexport before format 2. Its expected logits are not the runtimes'
    own output: tests/data/make_bundle_v1_expected.py computed them with test_foundation.plain_forward (the
    official forward, float64) on seed 0's backbone and the bundle's deltas; the clips predict two classes."""
    b = Bundle.load(copy_v1(tmp_path))
    m = b.manifest
    assert m.format_version == mf.FORMAT_VERSION == 2
    assert (m.frames, m.size, m.precision, m.output.classes) == (8, 32, "fp32", 10)
    assert m.model.backbone.name == "stexport-tiny-vit" and m.model.backbone.weights.seed == 0
    assert m.model.backbone.activation == "quick_gelu" and m.spec.pre_mlp == (0, 1) and m.spec.layout == "2x32"
    assert m.sampling.model_dump() == {"rate": 16, "temporal_views": 3, "spatial_views": 1}
    assert m.provenance.stexport == "0.1.0" and b.changed_files() == []
    clips = np.load(DATA / "bundle-v1-clips.npy")
    want = np.load(DATA / "bundle-v1-logits.npy")
    assert len(set(want.argmax(1).tolist())) >= 2  # a model predicting one class for all would not pass
    for name in installed_runtimes("onnxruntime", "openvino"):
        assert load_class(name).usable(b), name
        with create(name, b) as be:
            got = be.run(clips)
        assert np.abs(got - want).max() <= 1e-4, name
        assert (got.argmax(1) == want.argmax(1)).all(), name


def test_v1_expected_logits_are_the_reference_models(tmp_path):
    """A third path: stexport's PyTorch reference rebuilt from the v1 manifest (seed 0 + deltas)."""
    pytest.importorskip("torch")
    import torch

    from stexport.build.loaders import reference_for_bundle
    from stexport.build.reference import normalize

    b = Bundle.load(copy_v1(tmp_path))
    clips = np.load(DATA / "bundle-v1-clips.npy")
    with torch.no_grad():
        got = reference_for_bundle(b)(normalize(torch.from_numpy(clips))).numpy()
    assert np.abs(got - np.load(DATA / "bundle-v1-logits.npy")).max() <= 1e-5


def test_save_then_load_round_trips(tiny_bundle, tmp_path):
    m = tiny_bundle.manifest
    mf.save(m, tmp_path)
    assert mf.load(tmp_path) == m
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind
    # the v1 manifest migrates to the same records a fresh save would write
    v1 = mf.load(DATA / "bundle-v1")
    assert mf.parse(json.loads(v1.to_json()), "x") == v1


def test_feed_is_a_method_of_the_input_record():
    inp = mf.InputRecord(dtype="float32", layout="BTCHW", frames=2, size=4)
    clips = np.full((1, 2, 4, 4, 3), 255, np.uint8)
    x = inp.feed(clips)
    assert x.shape == (1, 2, 3, 4, 4) == inp.shape(1) and x.dtype == np.float32
    assert np.allclose(x[0, 0, :, 0, 0], (1 - np.array(mf.CLIP_MEAN)) / np.array(mf.CLIP_STD))
    u8 = mf.InputRecord(frames=2, size=4)
    assert u8.feed(clips) is not None and u8.feed(clips).dtype == np.uint8 and u8.normalized_in_graph
    with pytest.raises(StexportError, match=r"shape \(B, 2, 4, 4, 3\)"):
        u8.feed(clips[:, :1])


BROKEN = {
    # (what to do to the v1 manifest dict, text the one line must contain)
    "adapter missing": (lambda d: d.pop("adapter"), "field 'model.adapter' is missing"),
    "frames not a number": (lambda d: d.update(frames="eight"), "field 'input.frames' is wrong"),
    "negative size": (lambda d: d.update(size=-1), "field 'input.size' is wrong"),
    "spec num_classes missing": (lambda d: d["adapter"]["spec"].pop("num_classes"),
                                 "field 'model.adapter.spec.num_classes' is missing"),
    "unknown precision": (lambda d: d.update(precision="int4"), "field 'precision' is wrong"),
    "sampling views 2": (lambda d: d["sampling"].update(spatial_views=2), "field 'sampling.spatial_views'"),
    "a misspelt key": (lambda d: d.update(precission="fp32"), "unknown field 'precission'"),
    "newer format": (lambda d: d.update(format_version=99), "newer than this stexport"),
    "not a manifest": (lambda d: d.update(format="other"), "not a stexport manifest"),
    "format_version text": (lambda d: d.update(format_version="2"), "field 'format_version' is wrong"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_malformed_manifest_is_one_line_and_exit_2_for_infer_verify_bench(case, tmp_path, make_video):
    change, words = BROKEN[case]
    b = copy_v1(tmp_path)
    d = json.loads((b / "stexport.json").read_text())
    change(d)
    (b / "stexport.json").write_text(json.dumps(d))
    video = make_video("v.mp4", frames=20, width=64, height=48)
    (tmp_path / "list.txt").write_text(f"{video} 0\n")
    runner = CliRunner()
    for args in (["infer", str(video), "-m", str(b)], ["verify", str(b), "--clips", str(tmp_path / "list.txt")],
                 ["bench", str(b), "--iters", "1", "--warmup", "0", "--batch", "1", "--no-peaks"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stexport: error: "), (args, r.output)
        assert words in lines[0] and "stexport.json" in lines[0], (args, lines[0])
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_unreadable_manifest_json(tmp_path):
    b = copy_v1(tmp_path)
    (b / "stexport.json").write_text("{not json")
    with pytest.raises(StexportError, match="not valid JSON"):
        Bundle.load(b)


@pytest.mark.parametrize("backend", names(auto=False))
def test_unknown_or_mistyped_backend_option_is_refused_with_the_valid_ones(backend):
    cls = load_class(backend)
    valid = [o.name for o in cls.OPTIONS]
    assert valid and all(o.help for o in cls.OPTIONS)
    with pytest.raises(StexportError) as e:
        cls.check_options({"opt_levle": "basic"})
    assert f"{backend} has no option 'opt_levle'" in str(e.value) and ", ".join(valid) in str(e.value)
    typed = next(o for o in cls.OPTIONS if o.type in (int, bool))
    with pytest.raises(StexportError, match=f"{typed.name}='x': expected {typed.type.__name__}"):
        cls.check_options({typed.name: "x"})


def test_options_are_typed_from_command_line_strings():
    ort = load_class("onnxruntime")
    assert ort.check_options({"threads": "2", "opt_level": "basic"}) == {"threads": 2, "opt_level": "basic"}
    with pytest.raises(StexportError, match="choose one of"):
        ort.check_options({"opt_level": "fastest"})
    ov = load_class("openvino")
    assert ov.check_options({"static": "false", "compute": "bf16"}) == {"static": False, "compute": "bf16"}
    assert ov.check_options({"precision": "f32"}) == {"compute": "f32"}  # the old name still works


def test_cli_refuses_a_misspelt_option_for_every_command(tiny_bundle, make_video):
    video = make_video("v.mp4", frames=20, width=64, height=48)
    runner = CliRunner()
    for args in (["bench", str(tiny_bundle.path), "--backend", "onnxruntime", "--option", "opt_levle=basic"],
                 ["infer", str(video), "-m", str(tiny_bundle.path), "--backend", "onnxruntime",
                  "--option", "opt_levle=basic"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "no option 'opt_levle' (did you mean 'opt_level'?)" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["bench", "--list-options"])
    assert r.exit_code == 0 and all(f"{name}:" in r.output for name in ("onnxruntime", "openvino", "tensorrt"))


def test_every_backend_reports_the_compute_precision(tiny_bundle):
    for name in installed_runtimes("onnxruntime", "openvino", "torch"):
        assert load_class(name).usable(tiny_bundle), name
        with create(name, tiny_bundle) as be:
            be.run(np.zeros((1, 8, 32, 32, 3), np.uint8))
            d = be.describe()
            assert d["precision"] == "fp32" and d["compute_precision"] == "fp32", (name, d)


# ------------------------------------------------------------------------------------------------------------
# the runtime wing imports no torch and nothing of the build wing (the import rules themselves: test_layout.py)

BUILD = ("stexport.build", "stexport.calibration", "stexport.cli")
HEAVY = ("torch", "torchvision", "open_clip", "onnxscript")


def test_classifying_imports_no_torch_and_no_build_module(tiny_bundle, make_video):
    """In a fresh interpreter: open the bundle, classify a video on ONNX Runtime; torch never loads."""
    video = make_video("v.mp4", frames=20, width=64, height=48)
    code = (
        "import sys, json\n"
        "from stexport.runtime.classify import Classifier\n"
        f"with Classifier({str(tiny_bundle.path)!r}, backend='onnxruntime') as c:\n"
        f"    r = c.classify({str(video)!r})\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith({BUILD!r}))\n"
        "print(json.dumps({'bad': bad, 'top': r.top[0][1]}))\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["bad"] == [] and out["top"].startswith("class_")
