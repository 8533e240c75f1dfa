"""benchmarks/gpu_check.sh: the GPU check cannot run here (no GPU), so its dry run is checked: every step and
command it would run, every `stexport` flag it passes exists, it writes nothing, it is shellcheck-clean, and
without a GPU it refuses in one line."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def dry_run(tmp_path, *args):
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--work", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(ln.strip()[2:].split(" > ")[0]) for ln in stdout.splitlines() if ln.startswith("   $ ")]


def test_dry_run_lists_every_step_and_writes_nothing(tmp_path):
    p = dry_run(tmp_path)
    assert p.returncode == 0, p.stderr
    steps = [ln for ln in p.stdout.splitlines() if ln.startswith("== [")]
    assert len(steps) == 9 and steps[-1].endswith("write benchmarks/RESULTS-gpu.md")
    cmds = commands(p.stdout)
    joined = [" ".join(c) for c in cmds]
    assert any("pytest -q -m tensorrt or gpu tests/" in c for c in joined)
    assert any(c[0].endswith("pip") or "pip" in c for c in cmds)
    engines = [c for c in cmds if c[:2] == [".venv/bin/stexport", "engine"]]
    assert len(engines) == 4 and all("--batch" in c for c in engines)
    verifies = [c for c in cmds if c[1:3] == ["verify", c[2]] and "--backend" in c]
    assert len(verifies) == 4 and all(c[c.index("--backend") + 1] == "tensorrt" for c in verifies)
    int8 = [c for c in cmds if c[1:2] == ["build"] and "int8" in c]
    assert len(int8) == 2 and all(c[c.index("--int8-float") + 1] == "fp16" for c in int8)
    benches = [c for c in cmds if c[1:2] == ["bench"]]
    assert [c[c.index("--backend") + 1] for c in benches] == ["tensorrt", "tensorrt", "onnxruntime"]
    assert all(c[c.index("--batch") + 1] == "1,32" for c in benches)
    assert "device=cuda" in benches[-1]
    assert not (tmp_path / "work").exists()  # a dry run creates nothing
    short = dry_run(tmp_path, "--skip-vitb16", "--no-install")
    assert short.returncode == 0 and "ViT-B/16" not in short.stdout and "pip install" not in short.stdout


def test_every_stexport_flag_it_passes_exists(tmp_path):
    from stexport.cli.app import app

    group = typer.main.get_command(app)
    cmds = [c for c in commands(dry_run(tmp_path).stdout) if c[0].endswith("/stexport")]
    assert {c[1] for c in cmds} == {"build", "engine", "verify", "bench"}
    for c in cmds:
        params = group.commands[c[1]].params
        known = {o for param in params for o in [*param.opts, *getattr(param, "secondary_opts", [])]}
        flags = [a for a in c[2:] if a.startswith("--")]
        assert set(flags) <= known, (c[1], set(flags) - known)


def test_refuses_bad_arguments_and_a_machine_without_gpu(tmp_path):
    p = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, check=False)
    assert p.returncode == 2 and "unknown argument '--frobnicate'" in p.stderr
    if shutil.which("nvidia-smi") is None:
        p = subprocess.run(["bash", str(SCRIPT), "--no-install", "--work", str(tmp_path / "w")],
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 2 and p.stderr.strip() == ("gpu_check.sh: no NVIDIA GPU here (nvidia-smi finds "
                                                         "none); run it on a GPU host, or --dry-run")
        assert not (tmp_path / "w").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt install shellcheck)")
def test_shellcheck_clean():
    p = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout
