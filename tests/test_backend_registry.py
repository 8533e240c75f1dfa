"""A backend is one module plus its registration: the CLI's `--backend` names and help, `bench --list-options`
and `auto` come from the registry (stexport.runtime.backends), not from hand-written lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from stexport.runtime import backends
from stexport.runtime.backends import BUILTIN, auto_order, names, registration

# A FAKE backend for this test only: it runs no model, it returns fixed logits (class 7 on top) so that its
# answer is recognisable. One module; the registry finds it through the `stexport.backends` entry-point group.
FAKE_MODULE = '''
"""FAKE backend for stexport's registry test: runs no model, returns fixed logits (class 7 highest)."""
import numpy as np

from stexport.runtime.backends.base import Backend, Option, register


@register("fake-test-runtime", artifact="onnx", auto=1000, auto_note="the FAKE test runtime")
class FakeTestBackend(Backend):
    OPTIONS = (Option("fake_level", int, 1, "FAKE option of the test backend"),)

    def run(self, clips, task=None):
        clips = self.check_input(clips)
        logits = np.zeros((clips.shape[0], self.classes()), np.float32)
        logits[:, 7] = 5.0
        return logits
'''


def _install_fake(tmp_path):
    (tmp_path / "fake_stexport_backend.py").write_text(FAKE_MODULE)
    dist = tmp_path / "fake_stexport_backend-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-stexport-backend\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[stexport.backends]\nfake-test-runtime = fake_stexport_backend\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            "PYTHONWARNINGS": "ignore", "COLUMNS": "300"}


def _stexport(env, *args):
    code = "import sys; sys.argv[0] = 'stexport'; from stexport.cli.app import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          check=False, timeout=300)


def test_a_backend_registered_from_one_module_is_offered_everywhere(tmp_path, tiny_bundle, make_video):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    env = _install_fake(plugin)

    help_ = _stexport(env, "infer", "--help")
    assert help_.returncode == 0, help_.stderr
    flat = " ".join(help_.stdout.split())
    assert "a backend name: openvino, onnxruntime, tensorrt, torchscript, torch, fake-test-runtime." in flat
    assert "auto (the FAKE test runtime, else a TensorRT engine" in flat

    listed = _stexport(env, "bench", "--list-options", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["fake-test-runtime"][0]["name"] == "fake_level"

    video = make_video("v.mp4", frames=20, width=64, height=48)
    bad = _stexport(env, "infer", video, "-m", tiny_bundle.path, "-b", "fake-test-runtme")
    assert bad.returncode == 2 and "did you mean fake-test-runtime?" in bad.stderr, bad.stderr

    run = _stexport(env, "infer", video, "-m", tiny_bundle.path, "--backend", "auto", "--json")
    assert run.returncode == 0, run.stderr
    assert " on fake-test-runtime, " in run.stderr  # auto picked the highest declared priority that is usable
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["top"][0]["index"] == 7  # the fake's logits: class 7 on top


def test_builtin_registrations_are_declared_beside_their_classes(tiny_bundle):
    for name, module in BUILTIN.items():
        reg = registration(name)
        assert reg.name == name and reg.cls.__module__ == module and reg.cls.name == name
        assert reg.cls.REGISTRATION is reg
    # tensorrt (when an engine fits this GPU), then OpenVINO (x86-64), then ONNX Runtime; never the reference
    assert auto_order() == ["tensorrt", "openvino", "onnxruntime"]
    assert names()[0] == "auto" and set(BUILTIN) <= set(names())
    assert backends.task_backends("or") == "openvino, onnxruntime, tensorrt, torchscript or torch"
    # usable() by default: the bundle holds the registered artifact (an ONNX bundle has deltas, no model.ts)
    assert registration("torch").cls.usable(tiny_bundle) and not registration("torchscript").cls.usable(tiny_bundle)


def test_naming_one_backend_imports_only_its_module():
    code = textwrap.dedent("""
        import sys
        from stexport.runtime.backends import load_class
        load_class('onnxruntime')
        print(sorted(m for m in ('stexport.build.torch_backend', 'stexport.trt_engines.runtime',
                                 'stexport.runtime.backends.openvino') if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
