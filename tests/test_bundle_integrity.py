"""The bundle is what was built, or it does not run; concurrent and interrupted builds never clobber or litter
(issue: field-tested inputs, kinds 4 and 5)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from stexport.runtime.backends import create
from stexport.bundle.store import TEMP_MARK, Bundle, clean_stale, newest, writing
from stexport.cli.app import app
from stexport.errors import BundleChanged, StexportError

TINY = "stexport-tiny-vit"


def flip_one_initializer(path: Path) -> str:
    """Negate the floats of the largest float initializer in place: still valid ONNX, same size."""
    m = onnx.load(str(path))
    t = max((t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
            key=lambda t: numpy_helper.to_array(t).size)
    a = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(-a, t.name))
    before = path.stat().st_size
    onnx.save(m, str(path))
    assert path.stat().st_size == before
    return t.name


def test_a_changed_model_never_runs(tiny_bundle, tmp_path, make_video):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    name = flip_one_initializer(b / "model.onnx")
    onnx.checker.check_model(str(b / "model.onnx"))  # still a valid model: only the hash tells
    for backend in ("onnxruntime", "openvino", "auto"):
        with pytest.raises(BundleChanged, match="model.onnx changed since the bundle was built"):
            create(backend, Bundle.load(b))
    video = make_video("v.mp4", frames=20, width=64, height=48)
    r = CliRunner().invoke(app, ["infer", str(video), "-m", str(b)])
    assert r.exit_code == 2, (name, r.output)
    line = r.output.strip().splitlines()
    assert len(line) == 1 and "changed since the bundle was built" in line[0] and "stexport verify" in line[0]
    assert "torch" not in r.output  # never a silent fall-back to the PyTorch reference


def test_the_verified_hash_is_cached_and_rechecked_when_the_file_changes(tiny_bundle, tmp_path, monkeypatch):
    import stexport.bundle.store as bundle_mod

    monkeypatch.setenv("STEXPORT_HOME", str(tmp_path / "home"))
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    calls = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    Bundle.load(b).file("onnx")
    Bundle.load(b).file("onnx")
    assert calls.count("model.onnx") == 1  # the second open trusts size + mtime + inode
    flip_one_initializer(b / "model.onnx")
    with pytest.raises(BundleChanged):
        Bundle.load(b).file("onnx")


def test_a_missing_model_is_an_error_for_the_chosen_backend_not_a_fallback(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    (b / "model.onnx").unlink()
    for backend in ("onnxruntime", "auto"):
        with pytest.raises(StexportError) as e:
            create(backend, Bundle.load(b))
        msg = str(e.value)  # the same one line for the named backend and for auto: no fallback to torch
        assert msg.startswith(f"{b / 'model.onnx'}: missing from the bundle") and "stexport build" in msg, msg
        assert "torch" not in msg, msg


def _build_cmd(adapter, out, *extra):
    return [sys.executable, "-m", "stexport.cli.app", "build", "--adapter", str(adapter), "--backbone", TINY,
            "--pretrained", "none", "--out", str(out), *extra]


def test_two_builds_of_one_target_never_replace_each_other(tiny_adapter, tmp_path):
    """Both start before either finishes (no --force): exactly one succeeds, the other is refused at the
    rename, and the bundle on disk is the winner's, whole."""
    out = tmp_path / "race"
    env = {**os.environ, "STEXPORT_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen(_build_cmd(tiny_adapter, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in results)
    assert codes == [0, 2], results
    loser = next(err for _, err, rc in results if rc == 2)
    lines = [ln for ln in loser.strip().splitlines() if not ln.startswith("stexport: warning: backbone")]
    assert "already exists" in loser and len(lines) == 1, loser  # beside --pretrained none's warning
    assert Bundle.load(out).changed_files() == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_writing_refuses_at_the_rename_when_the_target_appeared_meanwhile(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(StexportError, match="written by another process while this build ran"):
        with writing(out) as tmp:
            (tmp / "x").write_text("mine")
            out.mkdir()
            (out / "stexport.json").write_text("{}")  # someone else's bundle landed first
    assert (out / "stexport.json").read_text() == "{}" and not list(tmp_path.glob(f".b{TEMP_MARK}*"))


def test_a_killed_build_leaves_a_temp_dir_that_the_next_build_removes(tiny_adapter, tmp_path):
    out = tmp_path / "b"
    env = {**os.environ, "STEXPORT_HOME": str(tmp_path / "home")}
    p = subprocess.Popen(_build_cmd(tiny_adapter, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(f".b{TEMP_MARK}*")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    stale = list(tmp_path.glob(f".b{TEMP_MARK}*"))
    assert stale and not out.exists()  # SIGKILL: nothing can clean up, and nothing reached the target
    r = subprocess.run(_build_cmd(tiny_adapter, out), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not any(s.exists() for s in stale) and Bundle.load(out).changed_files() == []


def test_stale_dirs_of_live_processes_are_kept(tmp_path):
    out = tmp_path / "b"
    live = tmp_path / f".b{TEMP_MARK}{os.getpid()}-abc"
    dead = tmp_path / f".b{TEMP_MARK}999999999-abc"
    other = tmp_path / ".c.bundle-999999999-abc"  # another target's: not ours to remove
    for d in (live, dead, other):
        d.mkdir()
    assert clean_stale(out) == [dead]
    assert live.exists() and other.exists() and not dead.exists()


def test_bundles_respect_the_umask(tiny_adapter, tmp_path):
    from stexport.build.pipeline import build_bundle

    old = os.umask(0o027)
    try:
        b = build_bundle(tiny_adapter, backbone=TINY, pretrained="none", out=tmp_path / "b")
    finally:
        os.umask(old)
    assert (b.path.stat().st_mode & 0o777) == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in b.path.iterdir()}
    assert set(modes.values()) == {0o640}, modes


def test_newest_is_by_build_time_not_folder_mtime(tmp_path):
    home = tmp_path / "bundles"
    for name, created in (("old", "2026-01-01T00:00:00.000001Z"), ("new", "2026-02-01T00:00:00Z")):
        (home / name).mkdir(parents=True)
        (home / name / "stexport.json").write_text(json.dumps({"created": created}))
    os.utime(home / "old" / "stexport.json")  # touched later (e.g. model.ts added): still the older build
    (home / "junk").mkdir()
    (home / "junk" / "stexport.json").write_text("{not json")
    assert newest(home) == home / "new"


def test_json_output_is_strict(tiny_bundle, tmp_path, make_video):
    video = make_video("v.mp4", frames=20, width=64, height=48)
    r = CliRunner().invoke(app, ["infer", str(video), "-m", str(tiny_bundle.path), "--json"])
    assert r.exit_code == 0, r.output

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    for line in r.stdout.strip().splitlines():
        json.loads(line, parse_constant=refuse)
    assert np.isfinite(json.loads(r.stdout.splitlines()[0])["top"][0]["score"])


# ------------------------------------------------------------------------------------------------------------
# found by trying it as a new user: edits of the manifest or the files never make a changed bundle run


def test_adding_an_artifact_never_records_a_changed_model(tiny_bundle, tmp_path):
    """Updating the manifest (as export-torchscript and the engine cache do) re-hashes only what the caller
    wrote: a changed model.onnx stays refused instead of being recorded as built."""
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    flip_one_initializer(b / "model.onnx")
    (b / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleChanged, match="model.onnx changed"):
        Bundle.load(b).update(artifacts={"extra": "extra.bin"}, written=["extra.bin"])
    with pytest.raises(BundleChanged):
        create("onnxruntime", Bundle.load(b))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["artifacts"].update(onnx="/etc/hostname"), "is not a path inside the bundle"),
    (lambda m: m["artifacts"].update(onnx="../other/model.onnx"), "is not a path inside the bundle"),
    (lambda m: m["files"].pop("model.onnx"), "model.onnx is not among the files the manifest recorded"),
    (lambda m: m.pop("files"), "is not among the files the manifest recorded"),
    (lambda m: m["input"].update(frames=4), "the graph takes 'frames' of shape (B, 8, 32, 32, 3)"),
    (lambda m: m["input"].update(frames=True), "field 'input.frames' is wrong"),
    (lambda m: m["input"].update(frames=10 ** 12), "field 'input.frames' is wrong"),
    (lambda m: m["input"].update(std=[0.0, 1.0, 1.0]), "field 'input.std' is wrong"),
    (lambda m: m.pop("format_version"), "field 'format_version' is missing"),
    (lambda m: m.update(format_version=0), "field 'format_version' is wrong"),
])
def test_edited_manifests_never_run(tiny_bundle, tmp_path, make_video, edit, words):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    m = json.loads((b / "stexport.json").read_text())
    edit(m)
    (b / "stexport.json").write_text(json.dumps(m))
    video = make_video("v.mp4", frames=20, width=64, height=48)
    for backend in ("auto", "onnxruntime"):
        r = CliRunner().invoke(app, ["infer", str(video), "-m", str(b), "-b", backend])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and words in lines[0], (backend, r.output)


def test_a_manifest_with_a_key_twice_is_refused(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    text = (b / "stexport.json").read_text()
    (b / "stexport.json").write_text(text.replace('"precision": "fp32"', '"precision": "fp32", "precision": "int8"'))
    with pytest.raises(StexportError, match="appears twice"):
        Bundle.load(b)


def test_missing_model_or_labels_is_named_not_a_runtime_problem(tiny_bundle, tmp_path, make_video):
    video = make_video("v.mp4", frames=20, width=64, height=48)
    for gone, words in (("model.onnx", "model.onnx: missing from the bundle"),
                        ("labels.txt", "labels.txt: missing from the bundle")):
        b = tmp_path / gone
        shutil.copytree(tiny_bundle.path, b)
        (b / gone).unlink()
        r = CliRunner().invoke(app, ["infer", str(video), "-m", str(b)])
        assert r.exit_code == 2 and words in r.output and "install one" not in r.output, r.output


def test_auto_refuses_a_misspelt_option_and_never_drops_a_bad_value(tiny_bundle, caplog):
    import logging

    from stexport.runtime.backends import resolve

    with pytest.raises(StexportError, match="no backend has an option 'compte' \\(did you mean 'compute'\\?\\)"):
        create("auto", tiny_bundle, compte="bf16")
    with pytest.raises(StexportError, match="threads=0: must be at least 1"):
        create("auto", tiny_bundle, threads="0")
    # a value no backend that declares the option takes is refused whichever backend auto picks
    with pytest.raises(StexportError, match="^onnxruntime option int8_gemms='nope': choose one of exact, fast$"):
        create("auto", tiny_bundle, int8_gemms="nope")
    with pytest.raises(StexportError, match="^onnxruntime option tasks='both': choose one of auto, adapters"):
        create("auto", tiny_bundle, tasks="both")
    # a good value for a runtime auto did not pick is dropped with a warning naming it
    chosen = resolve("auto", tiny_bundle)
    other = {"onnxruntime": {"static": "false"}}.get(chosen, {"int8_gemms": "fast"})
    with caplog.at_level(logging.WARNING, logger="stexport"):
        create("auto", tiny_bundle, **other).close()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"auto picked {chosen}, which does not take option(s) {next(iter(other))}" in m for m in said), said


def test_bench_runs_from_a_folder_holding_a_stexport_directory(tiny_bundle, tmp_path):
    """The measuring child must import the installed stexport, not a `stexport` folder in the working directory
    (a clone's parent directory)."""
    (tmp_path / "stexport").mkdir()
    r = subprocess.run([sys.executable, "-c", "import sys; del sys.path[0]; from stexport.cli.app import main; "
                        "main()", "bench", str(tiny_bundle.path), "-b", "onnxruntime", "--batch", "1", "--iters",
                        "1", "--warmup", "0", "--no-peaks", "--json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backend"] == "onnxruntime"
