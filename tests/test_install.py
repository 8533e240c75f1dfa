"""The base install runs bundles without torch: a fresh virtual environment with `pip install <project>` (base
dependencies only) classifies videos exactly as the full install does, and never imports torch."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install

PROBE = """
import atexit, sys
atexit.register(lambda: print("HEAVY", sorted(m for m in ("torch", "torchvision", "open_clip", "onnxscript")
                                           if m in sys.modules), file=sys.stderr))
sys.argv = ["stexport", *sys.argv[1:]]
from stexport.cli.app import main
main()
"""


@pytest.fixture(scope="module")
def base_env(tmp_path_factory):
    """A virtual environment (no system site-packages) holding stexport with its base dependencies only."""
    env = tmp_path_factory.mktemp("base_env") / "venv"
    venv.create(env, with_pip=True, system_site_packages=False)
    py = env / "bin" / "python"
    p = subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                       timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    return py


def test_base_install_infers_like_the_full_one_without_torch(base_env, tiny_bundle, make_video, tmp_path):
    videos = [str(make_video(f"v{i}.mp4", frames=12 + 9 * i, width=64 + 8 * i, height=48)) for i in range(4)]
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    videos.append(str(tmp_path / "bad.mp4"))
    args = ["infer", *videos, "-m", str(tiny_bundle.path), "--json"]
    backends = ["onnxruntime"] + (["openvino"] if platform.machine().lower() in ("x86_64", "amd64") else [])
    for backend in backends:
        full = subprocess.run([sys.executable, "-m", "stexport.cli.app", *args, "-b", backend],
                              capture_output=True, text=True, timeout=300)
        base = subprocess.run([base_env, "-c", PROBE, *args, "-b", backend], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert base.returncode == full.returncode == 2, base.stderr
        assert "HEAVY []" in base.stderr, base.stderr
        rows = [[(r["path"], r.get("top"), r.get("error")) for r in map(json.loads, p.stdout.splitlines())]
                for p in (full, base)]
        assert rows[0] == rows[1] and len(rows[0]) == 5
    check = subprocess.run([base_env, "-c", "import importlib.util as u; print([m for m in ('torch', "
                            "'torchvision', 'open_clip', 'onnxscript') if u.find_spec(m)])"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.stdout.strip() == "[]"  # not installed at all, not merely not imported
    for cmd in (["--help"], ["infer", "--help"], ["bench", "--help"], ["dump-clip", "--help"]):
        p = subprocess.run([base_env, "-c", PROBE, *cmd], capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0 and "HEAVY []" in p.stderr, (cmd, p.stderr)
    p = subprocess.run([base_env, "-c", PROBE, "build", "--adapter", str(tiny_bundle.path / "stexport.json"),
                        "--backbone", "stexport-tiny-vit", "--pretrained", "none", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("stexport:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "pip install 'stexport[export]'" in lines[0], p.stderr
    for cmd in ("build", "inspect"):  # open_clip's names: the install, not "unknown backbone"
        p = subprocess.run([base_env, "-c", PROBE, cmd, "--adapter", str(tiny_bundle.path / "stexport.json"),
                            "--backbone", "ViT-B-16"], capture_output=True, text=True, cwd=tmp_path)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("stexport:")]
        assert p.returncode == 2 and lines[0] == ("stexport: error: --backbone ViT-B-16 (an open_clip model) needs "
                                                  "open_clip, which this installation lacks; install it with: pip "
                                                  "install 'stexport[export]'"), (cmd, p.stderr)


def test_base_install_runs_task_packs(base_env, make_video, tmp_path):
    """A task pack on a swappable base, INT8 and FP32, from the base install (safetensors reads the pack, onnx
    writes a task's tensors into the graph): the same top-5 as the full install, no torch."""
    from stexport.build.pipeline import build_bundle
    from stexport.build.packing import build_pack
    from stexport.build.synthetic import random_deltas
    from stexport.build.backbone import random_backbone

    from conftest import smooth_clips

    bb = random_backbone("stexport-tiny-vit")
    kw = {"width": 32, "pre_attn": True, "pre_mlp": True}
    sd_a = random_deltas(bb.config, num_classes=10, seed=0, **kw)
    sd_b = random_deltas(bb.config, num_classes=7, seed=5, **kw)
    video = str(make_video("v.mp4", frames=24, width=64, height=48))
    backends = ["onnxruntime"] + (["openvino"] if platform.machine().lower() in ("x86_64", "amd64") else [])
    for precision in ("fp32", "int8"):
        calib = {"calib": smooth_clips(4, 32)} if precision == "int8" else {}
        base = build_bundle(sd_a, backbone=bb, precision=precision, swappable=True, max_classes=12,
                            out=tmp_path / f"base-{precision}", **calib)
        pack = build_pack(sd_b, base, backbone=bb, out=tmp_path / f"b-{precision}.stpack", **calib)
        args = ["infer", video, "-m", str(base.path), "--task", str(pack.path), "--json", "-k", "5"]
        for backend in backends:
            full = subprocess.run([sys.executable, "-m", "stexport.cli.app", *args, "-b", backend],
                                  capture_output=True, text=True, timeout=300)
            there = subprocess.run([base_env, "-c", PROBE, *args, "-b", backend], capture_output=True, text=True,
                                   timeout=300, cwd=tmp_path)
            assert full.returncode == there.returncode == 0, there.stderr
            assert "HEAVY []" in there.stderr, there.stderr
            tops = [[t["index"] for t in json.loads(p.stdout)["top"]] for p in (full, there)]
            assert tops[0] == tops[1] and max(tops[0]) < 7, (precision, backend, tops)
