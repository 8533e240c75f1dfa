"""Caches are an optimisation, output is not (issue 29, kind 3): a read-only home skips the calibration and
reference caches with one warning; a read-only or full disk under the output is one line naming the folder and
the fix, exit 2, nothing half-written. Real read-only and full filesystems: tmpfs mounts in a mount namespace the
test makes (`unshare -m`), and /dev/full."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_video

from stexport.fileutil import as_os_error, write_cache

TINY = "stexport-tiny-vit"
CLI = [sys.executable, "-m", "stexport.cli.app"]


def _namespaces() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k none /mnt"], capture_output=True)
    return r.returncode == 0


needs_mounts = pytest.mark.skipif(not _namespaces(), reason="needs mount namespaces (unshare -m) to make a "
                                                            "read-only or full filesystem")


def mounted(folder: Path, options: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI with a fresh tmpfs mounted on `folder` (mount `options`, e.g. "ro" or "size=200k") in a
    mount namespace of its own: the mount is gone when the command ends."""
    folder.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "$0" none "$1" && shift && exec "$@"'
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEXPORT_")} | (env or {})
    return subprocess.run(["unshare", "-m", "sh", "-c", script, options, str(folder), *CLI, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("stexport: error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cache_clips")
    for i in range(3):
        write_video(d / f"v{i}.mp4", frames=16, width=64, height=48)
    lst = d / "list.txt"
    lst.write_text("".join(f"v{i}.mp4 {i}\n" for i in range(3)))
    return lst


@needs_mounts
def test_build_into_a_read_only_home_says_which_folder_and_the_fix(tmp_path, tiny_adapter):
    ro = tmp_path / "ro"
    r = mounted(ro, "ro", "build", "-a", tiny_adapter, "--backbone", TINY, "--pretrained", "none",
                env={"STEXPORT_HOME": str(ro / "home"), "HOME": str(ro)})
    line = one_line_error(r)
    assert str(ro / "home") in line and "Read-only file system" in line
    assert "STEXPORT_HOME" in line and "--out" in line


@needs_mounts
def test_caches_in_a_read_only_home_are_skipped_with_a_warning(tmp_path, tiny_adapter, clips):
    ro, out = tmp_path / "ro", tmp_path / "int8"
    env = {"STEXPORT_HOME": str(ro / "home"), "HOME": str(ro)}
    r = mounted(ro, "ro", "build", "-a", tiny_adapter, "--backbone", TINY, "--pretrained", "none", "-p", "int8",
                "--calib", clips, "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    assert "calibration cache not written" in r.stderr and "STEXPORT_CALIB_CACHE" in r.stderr
    assert (out / "stexport.json").is_file()
    r = mounted(ro, "ro", "verify", out, "--clips", clips, env=env)
    assert r.returncode == 0, r.stderr
    assert "reference-logit cache not written" in r.stderr and "STEXPORT_REFERENCE_CACHE" in r.stderr
    assert "Traceback" not in r.stderr


@needs_mounts
@pytest.mark.parametrize("size", ["20k", "300k"])  # full at the ONNX graph; full later, at the safetensors deltas
def test_a_full_disk_during_build_leaves_nothing(tmp_path, tiny_adapter, size):
    full = tmp_path / "full"
    full.mkdir()
    script = 'mount -t tmpfs -o size="$0" none "$1" && "${@:2}"; s=$?; ls -A "$1"; exit $s'
    r = subprocess.run(["unshare", "-m", "bash", "-c", script, size, str(full), *CLI, "build", "-a",
                        str(tiny_adapter), "--backbone", TINY, "--pretrained", "none", "--out", str(full / "b")],
                       capture_output=True, text=True, timeout=300)
    line = one_line_error(r)
    assert f"cannot write {full / 'b'}: No space left on device" in line and "free space" in line
    assert r.stdout.strip() == "", f"left behind: {r.stdout}"  # ls -A of the full disk


def test_infer_output_on_a_full_device_is_one_line(tiny_bundle, clips):
    video = clips.parent / "v0.mp4"
    r = subprocess.run([*CLI, "infer", str(video), "-m", str(tiny_bundle.path), "--backend", "onnxruntime",
                        "--output", "/dev/full"], capture_output=True, text=True, timeout=300)
    line = one_line_error(r)
    assert "cannot write /dev/full: No space left on device" in line


def test_write_cache_skips_what_cannot_be_written(tmp_path, caplog):
    assert write_cache(tmp_path / "c" / "x.json", b"{}", "test", "STEXPORT_TEST_CACHE")
    assert (tmp_path / "c" / "x.json").read_bytes() == b"{}"
    (tmp_path / "file").write_text("")
    with caplog.at_level("WARNING", logger="stexport"):
        assert not write_cache(tmp_path / "file" / "x.json", b"{}", "test", "STEXPORT_TEST_CACHE")
    assert "test cache not written" in caplog.text and "STEXPORT_TEST_CACHE" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "file"]


def test_library_write_errors_become_os_errors():
    e = as_os_error(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "/x")
    assert isinstance(e, OSError) and e.errno == 28 and e.filename == "/x"
    other = ValueError("bad")
    assert as_os_error(other, "/x") is other
