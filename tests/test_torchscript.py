"""TorchScript export: the frozen module equals the reference, carries the manifest, runs as a
backend, and the C++ host in examples/cpp builds here and prints the same logits."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import host, logits_of, smooth_clips, trained_like, write_video
from stexport.cli.app import app
from typer.testing import CliRunner

from stexport.runtime import backends
from stexport.build.backbone import random_backbone
from stexport.bundle.store import Bundle
from stexport.build.deltas import Deltas, infer_spec
from stexport.errors import StexportError
from stexport.build.fold import fold
from stexport.build.reference import build_reference, normalize
from stexport.build.synthetic import random_deltas
from stexport.build.torchscript import EXTRA, FILE, add_to_bundle, export_torchscript, load
from stexport.runtime.video import Sampling, decode_clips

ROOT = Path(__file__).resolve().parents[1]
LABELS = [f"class_{i}" for i in range(8)] + ["café crème", "日本 \"quoted\" \\ tab\t🙂"]
runner = CliRunner()


def reference(name, **delta_kw):
    bb = trained_like(random_backbone(name))
    sd = random_deltas(bb.config, num_classes=10, **delta_kw)
    return build_reference(bb, Deltas(infer_spec(sd), sd))


@pytest.fixture(scope="module")
def ts_bundle(tiny_bundle, tmp_path_factory):
    """A copy of the shared tiny bundle with non-ASCII class names and model.ts added."""
    path = tmp_path_factory.mktemp("ts_bundle") / "tiny"
    shutil.copytree(tiny_bundle.path, path)
    b = Bundle.load(path)
    b.file("labels").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    b.update(written=["labels.txt"])
    return add_to_bundle(b)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("ts_video") / "v.mp4", frames=50, width=80, height=64)


@pytest.mark.parametrize("name, delta_kw", [
    ("stexport-tiny-vit", dict(width=32, pre_attn=True, pre_mlp=True)),  # temporal shifts
    ("stexport-tiny-vit-gelu", dict(width=16, kernel=(3, 3, 3))),  # Conv3d adapters, exact GELU
])
def test_frozen_module_equals_reference_any_batch(tmp_path, name, delta_kw):
    ref = reference(name, **delta_kw)
    size = ref.cfg.image_size
    rec = export_torchscript(fold(ref), tmp_path / FILE, frames=8, size=size, manifest={"frames": 8})
    module, embedded = load(tmp_path / FILE)
    assert rec.precision == "fp32" and rec.trace_check_max_abs <= 1e-4
    assert embedded == {"frames": 8, "torchscript": rec.model_dump(mode="json")}
    for batch in (1, 2, 3):  # traced at 2: the batch stays free
        u = torch.from_numpy(smooth_clips(batch, size, seed=batch))
        with torch.no_grad():
            got, want = module(u), ref(normalize(u))
        assert got.dtype == torch.float32 and got.shape == (batch, 10)
        assert (got - want).abs().max().item() <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temp file left behind


def test_fp16_module(tmp_path):
    ref = reference("stexport-tiny-vit", width=32, pre_attn=True)
    rec = export_torchscript(fold(ref, compute_dtype=torch.float16), tmp_path / FILE, 8, 32, precision="fp16")
    module, embedded = load(tmp_path / FILE)
    assert rec.precision == embedded["torchscript"]["precision"] == "fp16"
    u = torch.from_numpy(smooth_clips(4, 32))
    with torch.no_grad():
        got, want = module(u), ref(normalize(u))
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 2e-2
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_bundle_records_and_embeds_the_manifest(ts_bundle):
    b = Bundle.load(ts_bundle.path)  # what is on disk, not the object add_to_bundle changed
    assert b.manifest.artifacts["torchscript"] == FILE and b.changed_files() == []
    rec = b.manifest.torchscript.model_dump()
    assert rec["precision"] == "fp32" and rec["frozen"] is True
    with zipfile.ZipFile(b.file("torchscript")) as z:  # a plain zip entry any host can read
        raw = [n for n in z.namelist() if n.endswith(f"extra/{EXTRA}")]
        assert len(raw) == 1
        embedded = json.loads(z.read(raw[0]).decode("utf-8"))
    assert embedded == load(b.file("torchscript"))[1]
    assert embedded["class_names"] == LABELS
    assert embedded["format_version"] == 2
    assert (embedded["input"]["frames"], embedded["input"]["size"]) == (8, 32)
    assert embedded["sampling"] == b.manifest.sampling.model_dump()
    assert embedded["input"]["dtype"] == "uint8" and embedded["input"]["layout"] == "BTHWC"
    assert embedded["torchscript"] == rec and "files" not in embedded
    with pytest.raises(StexportError, match="already exported; pass --force"):
        add_to_bundle(b)


def test_backend_matches_reference_and_verifies(ts_bundle, video):
    clips = smooth_clips(3, 32, seed=5)
    with backends.create("torchscript", ts_bundle, device="cpu", threads=1) as ts, \
            backends.create("torch", ts_bundle) as ref:
        assert ts.describe()["backend"] == "torchscript" and ts.describe()["device"] == "cpu"
        assert np.abs(ts.run(clips) - ref.run(clips)).max() <= 1e-4
        assert ts.run(clips[:1]).shape == (1, 10)
        with pytest.raises(StexportError, match="clips must have shape"):
            ts.run(clips[:, :4])
    from stexport.build.verify import verify

    report = verify(ts_bundle, video.parent, backend="torchscript")
    assert report["passed"] and report["backend"]["backend"] == "torchscript"
    assert report["metrics"]["max_abs"] <= 1e-4


def test_backend_errors(ts_bundle, tiny_bundle, tmp_path):
    assert not backends.load_class("torchscript").usable(tiny_bundle)
    with pytest.raises(StexportError, match="no torchscript artifact"):
        backends.create("torchscript", tiny_bundle)
    if not torch.cuda.is_available():
        with pytest.raises(StexportError, match="no CUDA GPU"):
            backends.create("torchscript", ts_bundle, device="cuda")
    with pytest.raises(StexportError, match="unknown device"):
        backends.create("torchscript", ts_bundle, device="tpu")
    broken = tmp_path / "b"
    shutil.copytree(ts_bundle.path, broken)
    (broken / FILE).write_bytes(b"not a zip")
    with pytest.raises(StexportError, match="model.ts changed since the bundle was built"):
        backends.create("torchscript", Bundle.load(broken))
    b = Bundle.load(broken)
    b.check_hashes = False
    b.update()  # a bundle recorded with a broken module
    with pytest.raises(StexportError, match="not a loadable TorchScript module"):
        backends.create("torchscript", Bundle.load(broken))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_backend_on_cuda(ts_bundle):
    clips = smooth_clips(2, 32, seed=3)
    with backends.create("torchscript", ts_bundle) as ts, backends.create("torch", ts_bundle) as ref:
        assert ts.describe()["device"].startswith("cuda")
        assert np.abs(ts.run(clips) - ref.run(clips)).max() <= 1e-3


def test_cli_export_and_dump_clip(ts_bundle, video, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(ts_bundle.path, b)
    r = runner.invoke(app, ["export-torchscript", str(b)])
    assert r.exit_code == 2 and "already exported; pass --force" in r.output
    r = runner.invoke(app, ["export-torchscript", str(b), "--force", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["path"] == str(b / FILE) and Bundle.load(b).changed_files() == []

    out = tmp_path / "clip.npy"
    r = runner.invoke(app, ["dump-clip", str(video), "-m", str(b), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"stexport-host {b / FILE} {out}" in r.stdout
    want = decode_clips(str(video), Sampling.from_manifest(Bundle.load(b).manifest))
    np.testing.assert_array_equal(np.load(out), want)
    assert runner.invoke(app, ["dump-clip", str(video), "-m", str(b), "-o", str(out)]).exit_code == 2
    raw = tmp_path / "clip.u8"
    r = runner.invoke(app, ["dump-clip", str(video), "-m", str(b), "-o", str(raw), "--raw", "--views", "1x3",
                            "--rate", "0", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["shape"] == [3, 8, 32, 32, 3] and info["format"] == "raw"
    want = decode_clips(str(video), Sampling(frames=8, size=32, rate=0, temporal_views=1, spatial_views=3))
    assert raw.read_bytes() == want.tobytes()
    missing = tmp_path / "missing.mp4"
    r = runner.invoke(app, ["dump-clip", str(missing), "-m", str(b), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and not (tmp_path / "x").exists()


def test_cli_build_with_torchscript(tiny_adapter, tmp_path):
    out = tmp_path / "b"
    r = runner.invoke(app, ["build", "-a", str(tiny_adapter), "--backbone", "stexport-tiny-vit", "--pretrained",
                            "none", "-o", str(out), "--torchscript"])
    assert r.exit_code == 0, r.output
    assert "torchscript: model.ts (fp32)" in r.stdout
    b = Bundle.load(out)
    assert b.has("onnx") and b.has("torchscript") and b.changed_files() == []
    clips = smooth_clips(2, 32, seed=9)
    with backends.create("torchscript", b) as ts, backends.create("onnxruntime", b) as ort:
        assert np.abs(ts.run(clips) - ort.run(clips)).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------
# The C++ host (examples/cpp), built once per session against the installed torch's libtorch.


def test_cpp_host_matches_python(cpp_host, ts_bundle, video, tmp_path):
    clip = tmp_path / "clip.npy"
    r = runner.invoke(app, ["dump-clip", str(video), "-m", str(ts_bundle.path), "-o", str(clip)])
    assert r.exit_code == 0, r.output
    clips = np.load(clip)
    with backends.create("torch", ts_bundle) as ref:
        want = ref.run(clips)
    p = host(cpp_host, ts_bundle.file("torchscript"), clip, "--logits", "--top-k", "10", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    got = logits_of(p.stdout)
    assert got.shape == want.shape == (3, 10)
    assert np.abs(got - want).max() <= 1e-4
    # top-k: softmax per view, averaged, best first (as `stexport infer`), with the embedded class names
    probs = np.exp(want - want.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).mean(0)
    ranked = re.findall(r"^\s+\d+\. (.+?)\s+(\d\.\d{4})$", p.stdout, re.MULTILINE)
    assert [name for name, _ in ranked] == [LABELS[i] for i in np.argsort(-probs, kind="stable")]
    np.testing.assert_allclose([float(v) for _, v in ranked], np.sort(probs)[::-1], atol=1e-4)
    assert f"{ts_bundle.manifest.name} (fp32, 8 frames of 32 px, 10 classes) on cpu" in p.stdout

    raw = tmp_path / "clip.u8"  # headerless bytes: views counted from the file size
    clips[:2].tofile(raw)
    p = host(cpp_host, ts_bundle.file("torchscript"), raw, "--logits", "-k", "2")
    assert p.returncode == 0, p.stderr
    assert np.abs(logits_of(p.stdout) - want[:2]).max() <= 1e-4
    one = tmp_path / "one.npy"  # a single (T, S, S, 3) view
    np.save(one, clips[2])
    p = host(cpp_host, ts_bundle.file("torchscript"), one, "--logits")
    assert p.returncode == 0, p.stderr
    assert np.abs(logits_of(p.stdout) - want[2:]).max() <= 1e-4


def test_cpp_host_errors(cpp_host, ts_bundle, tmp_path):
    model = ts_bundle.file("torchscript")
    cases = {
        "small.npy": (np.zeros((1, 8, 16, 16, 3), np.uint8), "clips must be (V, 8, 32, 32, 3)"),
        "float.npy": (np.zeros((1, 8, 32, 32, 3), np.float32), "not uint8 clips"),
    }
    for name, (arr, message) in cases.items():
        np.save(tmp_path / name, arr)
        p = host(cpp_host, model, tmp_path / name)
        assert p.returncode == 2 and message in p.stderr, p.stderr
    (tmp_path / "odd.u8").write_bytes(b"\0" * 1000)
    p = host(cpp_host, model, tmp_path / "odd.u8")
    assert p.returncode == 2 and "not a whole number of 8x32x32x3 uint8 clips" in p.stderr
    p = host(cpp_host, ts_bundle.file("onnx"), tmp_path / "small.npy")
    assert p.returncode == 2 and "not a loadable TorchScript module" in p.stderr
    p = host(cpp_host, model)
    assert p.returncode == 2 and "usage:" in p.stderr
    if not torch.cuda.is_available():
        np.save(tmp_path / "ok.npy", np.zeros((1, 8, 32, 32, 3), np.uint8))
        p = host(cpp_host, model, tmp_path / "ok.npy", "--device", "cuda")
        assert p.returncode == 2 and "no CUDA GPU" in p.stderr
