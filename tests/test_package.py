"""The package builds as a wheel and an sdist that pass `twine check`, and the wheel holds every wing and its
data (the console script's modules included)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install

pytest.importorskip("build", reason="the dev extra installs build")
pytest.importorskip("twine", reason="the dev extra installs twine")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    p = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_wheel_and_sdist_pass_twine_check(dist):
    files = sorted(dist.iterdir())
    assert sorted(f.suffix for f in files) == [".gz", ".whl"], files
    p = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("PASSED") == 2, p.stdout


def test_wheel_holds_every_wing_and_its_data(dist):
    with zipfile.ZipFile(next(dist.glob("*.whl"))) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for package in ("cli", "calibration", "trt_engines", "bundle", "runtime", "runtime/backends", "serving", "build"):
        assert f"stexport/{package}/__init__.py" in names, package
    for data in ("stexport/data/k400.txt", "stexport/data/ssv2.txt", "stexport/model_configs/stexport-demo-vit.json",
                 "stexport/trt_engines/data/onnx-tensorrt-operators.md"):
        assert data in names, data
    assert not [n for n in names if n.startswith(("tests/", "docs/", "examples/"))]
    assert "License-Expression: Apache-2.0" in metadata and "Project-URL: Paper" in metadata
    assert "Description-Content-Type: text/markdown" in metadata
    assert "Provides-Extra: docs" in metadata


def test_sdist_holds_what_the_tests_docs_and_demo_need(dist):
    with tarfile.open(next(dist.glob("*.tar.gz"))) as sdist:
        names = sdist.getnames()
    top = names[0].split("/")[0]
    for path in ("LICENSE", "mkdocs.yml", "docs/index.md", "docs/hooks.py", "tests/conftest.py",
                 "examples/motion/run_demo.sh", "examples/motion/motion_adapter.pt", ".ci/run"):
        assert f"{top}/{path}" in names, path
