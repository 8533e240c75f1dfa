"""AOTInductor export (`build --aoti`, `export-aoti`): model.pt2 equals the deploy model, carries the manifest in
its metadata, is recorded in the bundle, and the C++ host in examples/cpp runs it with the same logits.

Compiling costs ~40-70 s on 2 cores: one compile per session (the `aoti_bundle` fixture, through the CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import host, logits_of, smooth_clips, write_video
from stexport.cli.app import app
from typer.testing import CliRunner

from stexport.runtime import backends
from stexport.bundle.store import Bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def aoti_bundle(tiny_adapter, tmp_path_factory):
    """A tiny FP32 bundle built with `stexport build --aoti` (the one AOTInductor compile of the session)."""
    out = tmp_path_factory.mktemp("aoti") / "tiny"
    r = runner.invoke(app, ["build", "--adapter", str(tiny_adapter), "--backbone", "stexport-tiny-vit",
                            "--pretrained", "none", "--aoti", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "aoti: model.pt2 (fp32, cpu) for libtorch hosts" in r.output
    return Bundle.load(out)


def test_package_is_recorded_equals_the_reference_and_embeds_the_manifest(aoti_bundle):
    from torch._inductor import aoti_load_package

    b = aoti_bundle
    rec = b.manifest.aoti
    assert b.manifest.artifacts["aoti"] == "model.pt2" and "model.pt2" in b.manifest.files
    assert (rec.file, rec.precision, rec.device, rec.batch) == ("model.pt2", "fp32", "cpu", [1, 1024])
    assert rec.check_max_abs <= 1e-4 and rec.compile_seconds > 0 and rec.torch == torch.__version__
    assert b.changed_files() == []
    compiled = aoti_load_package(str(b.file("aoti")))
    meta = compiled.get_metadata()
    embedded = json.loads(meta["stexport.json"])
    assert embedded["class_names"] == b.labels and embedded["input"]["frames"] == 8
    assert embedded["input"]["dtype"] == "uint8" and embedded["aoti"]["device"] == "cpu"
    assert embedded["artifacts"]["aoti"] == "model.pt2" and "files" not in embedded
    with backends.create("torch", b) as ref:
        for n in (1, 2, 5):  # any batch: the batch axis is dynamic
            clips = np.ascontiguousarray(smooth_clips(n, 32, seed=n))  # AOTInductor reads the input as
            with torch.no_grad():  # C-contiguous whatever its strides (smooth_clips' are not)
                got = compiled(torch.from_numpy(clips)).numpy()
            assert np.abs(got - ref.run(clips)).max() <= 1e-4


def test_export_aoti_cli_refuses_what_it_should(aoti_bundle):
    r = runner.invoke(app, ["export-aoti", str(aoti_bundle.path)])
    assert r.exit_code == 2 and "model.pt2: already exported; pass --force to replace it" in r.output
    r = runner.invoke(app, ["export-aoti", str(aoti_bundle.path), "--device", "tpu", "--force"])
    assert r.exit_code == 2 and "--device tpu: AOTInductor packages are compiled for cpu or cuda" in r.output
    r = runner.invoke(app, ["export-aoti", str(aoti_bundle.path), "--precision", "int8", "--force"])
    assert r.exit_code == 2 and "--precision int8: AOTInductor export takes fp32 or fp16" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["export-aoti", str(aoti_bundle.path), "--device", "cuda", "--force"])
        assert r.exit_code == 2 and "PyTorch sees no CUDA GPU here" in r.output
    assert aoti_bundle.changed_files() == []  # nothing was touched


def test_cpp_host_runs_the_package_like_python(cpp_host, aoti_bundle, tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=50, width=80, height=64)
    clip = tmp_path / "clip.npy"
    r = runner.invoke(app, ["dump-clip", str(video), "-m", str(aoti_bundle.path), "-o", str(clip)])
    assert r.exit_code == 0, r.output
    clips = np.load(clip)
    with backends.create("torch", aoti_bundle) as ref:
        want = ref.run(clips)
    p = host(cpp_host, aoti_bundle.file("aoti"), clip, "--logits", "--top-k", "3")
    assert p.returncode == 0, p.stderr
    got = logits_of(p.stdout)
    assert got.shape == want.shape == (3, 10)
    assert np.abs(got - want).max() <= 1e-4
    assert f"{aoti_bundle.manifest.name} (fp32, 8 frames of 32 px, 10 classes) on cpu" in p.stdout
    p = host(cpp_host, aoti_bundle.file("aoti"), clip, "--device", "cuda")
    why = "was compiled for cpu" if torch.cuda.is_available() else "--device cuda: libtorch sees no CUDA GPU"
    assert p.returncode == 2 and why in p.stderr
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    p = host(cpp_host, bad, clip)
    assert p.returncode == 2 and "not a loadable AOTInductor package" in p.stderr
