"""Messages that point the right way (issue 30, kind 3): each case with the line the user gets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from test_foundation import clip_arch, official_checkpoint  # noqa: F401 - the fixture and its helper

# Runs the CLI as the base install would: torch, torchvision, open_clip and onnxscript cannot be found.
BASE_INSTALL = """
import importlib.util, sys
real = importlib.util.find_spec
hidden = ("torch", "torchvision", "open_clip", "onnxscript")
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] in hidden else real(name, *a, **k)
sys.argv = ["stexport", *sys.argv[1:]]
from stexport.cli.app import main
main()
"""


def cli(*args, code=None):
    return subprocess.run([sys.executable, "-c", code or "import sys; sys.argv[0] = 'stexport'; "
                           "from stexport.cli.app import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def one_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


@pytest.mark.parametrize("command", ["build", "inspect"])
def test_base_install_names_the_export_extra_for_open_clip_backbones(tiny_adapter, command):
    line = one_error(cli(command, "--adapter", tiny_adapter, "--backbone", "ViT-B-16", code=BASE_INSTALL))
    assert line == ("stexport: error: --backbone ViT-B-16 (an open_clip model) needs open_clip, which this "
                    "installation lacks; install it with: pip install 'stexport[export]'")


def test_random_weights_warn_at_build_and_mark_every_result(tiny_adapter, tiny_bundle, tmp_path, make_video):
    from typer.testing import CliRunner

    from stexport.cli.app import app

    runner = CliRunner()
    r = runner.invoke(app, ["build", "--adapter", str(tiny_adapter), "--backbone", "stexport-tiny-vit",
                            "--pretrained", "none", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines().count("stexport: warning: backbone stexport-tiny-vit is randomly initialised "
                                       "(--pretrained none): predictions are meaningless") == 1, r.stderr
    video = str(make_video("v.mp4", frames=24))
    r = runner.invoke(app, ["infer", video, "-m", str(tiny_bundle.path), "--json", "-b", "onnxruntime"])
    assert r.exit_code == 0 and json.loads(r.stdout)["weights"] == "random", r.output
    r = runner.invoke(app, ["infer", video, "-m", str(tiny_bundle.path), "-b", "onnxruntime"])
    assert r.stdout.splitlines()[0].endswith("s)  (random weights: predictions are meaningless)"), r.stdout


def test_trained_weights_are_not_marked():
    from stexport.bundle.manifest import WeightsSource
    from stexport.runtime.classify import Result

    assert WeightsSource(pretrained="none", seed=0).random
    assert not WeightsSource(pretrained="openai", tag="openai", openai=True).random
    assert not WeightsSource(pretrained="/w/ViT-B-16.pt", file="/w/ViT-B-16.pt", sha256="0" * 64).random
    assert "weights" not in Result("v.mp4", [(0, "a", 1.0)], 1, 8, 0.0, 0.0).to_dict()


def test_quickgelu_advisory_is_short_prefixed_alike_and_only_for_a_fitting_adapter(tmp_path, clip_arch):  # noqa: F811
    from typer.testing import CliRunner

    from stexport.build.backbone import random_backbone
    from stexport.build.synthetic import random_deltas
    from stexport.cli.app import app

    official_checkpoint(tmp_path / "fits.pt", random_deltas(random_backbone(clip_arch).config, width=8,
                                                            num_classes=3))
    wide = random_backbone("stexport-demo-vit").config  # width 192: fits no 18-wide tower
    official_checkpoint(tmp_path / "other.pt", random_deltas(wide, width=8, num_classes=3))
    advisory = (f"stexport: warning: {clip_arch} runs exact GELU; official ST-Adapter checkpoints expect QuickGELU: "
                f"for OpenAI CLIP weights pass --backbone {clip_arch}-quickgelu")
    assert len(advisory) < 160
    runner = CliRunner()
    said = {}
    for command, extra in (("inspect", []), ("build", ["--pretrained", "none", "--out", str(tmp_path / "b")])):
        r = runner.invoke(app, [command, "--adapter", str(tmp_path / "fits.pt"), "--backbone", clip_arch, *extra])
        assert r.exit_code == 0, r.output
        said[command] = [ln for ln in r.stderr.splitlines() if "QuickGELU" in ln]
    assert said == {"inspect": [advisory], "build": [advisory]}
    r = runner.invoke(app, ["inspect", "--adapter", str(tmp_path / "other.pt"), "--backbone", clip_arch])
    assert r.exit_code == 1 and "fits backbone  NO" in r.stdout and "warning" not in r.stderr, r.output


def test_window_zero_is_refused_before_the_backend_loads(tiny_bundle, make_video):
    video = make_video("v.mp4", frames=12)
    code = ("import sys; sys.argv[0] = 'stexport'\n"
            "import stexport.runtime.classify as c\n"
            "def never(*a, **k): raise SystemExit('the backend was loaded')\n"
            "c.Classifier.__init__ = never\n"
            "from stexport.cli.app import main; main()")
    for flag, value in (("--window", "0"), ("--window", "-2"), ("--window", "nan"), ("--window", "inf")):
        line = one_error(cli("infer", video, "-m", tiny_bundle.path, flag, value, code=code))
        assert line == (f"stexport: error: {flag} {float(value):g}: must be a positive, finite number of seconds, "
                        f"e.g. {flag} 4")
    for stride in ("0", "inf"):
        line = one_error(cli("infer", video, "-m", tiny_bundle.path, "--window", "4", "--stride", stride, code=code))
        assert line == (f"stexport: error: --stride {float(stride):g}: must be a positive, finite number of "
                        "seconds, e.g. --stride 4")


def test_a_clip_list_where_videos_go_is_read_as_a_list(tiny_bundle, make_video, tmp_path):
    """`stexport infer LIST.txt` decoded the list as a video (issue 29), although the documentation says
    `infer DIR|LIST|GLOB`: a list among the inputs gives its videos (BOM and comments as people write them), in
    place, as `--clips LIST` does; a URL line is one error naming the line."""
    video, other = make_video("v.mp4", frames=12), make_video("w.mp4", frames=12)
    lst = tmp_path / "list.txt"
    lst.write_bytes(f"\ufeff# my clips\n{video} 1\n\n{video}\n".encode())
    r = cli("infer", other, lst, "-m", tiny_bundle.path, "--json", "-b", "onnxruntime")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["path"] for x in r.stdout.splitlines()] == [str(other), str(video), str(video)]
    r = cli("infer", "--clips", lst, "-m", tiny_bundle.path, "--json", "-b", "onnxruntime")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["path"] for x in r.stdout.splitlines()] == [str(video), str(video)]
    # a line refused for itself is one failed input (new-user finding: it ended the run, nothing classified)
    lst.write_text(f"{video}\nhttp://127.0.0.1:9/x.mp4\n{video.name}\tmove_left\n")
    r = cli("infer", other, lst, "-m", tiny_bundle.path, "--json", "-b", "onnxruntime")
    assert r.returncode == 2, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["path"], "error" in x) for x in rows] == [(str(lst), True), (str(lst), True), (str(other), False),
                                                        (str(video), False)]
    assert rows[0]["error"] == (f"{lst}: line 2 is a URL (http://127.0.0.1:9/x.mp4); clip lists hold local files: "
                                "download it first (stexport infer takes a URL itself)")
    assert rows[1]["error"].startswith(f"{lst}: line 3: label 'move_left' is not a class index")
    errors = [x for x in r.stderr.splitlines() if x.startswith("stexport: error:")]
    assert errors == [f"stexport: error: {rows[0]['error']}", f"stexport: error: {rows[1]['error']}"], r.stderr
    assert r.stderr.splitlines()[-1] == "stexport: 2 of 4 inputs failed"


@pytest.mark.parametrize("inside", ["model.onnx", "labels.txt"])
def test_a_file_inside_a_bundle_names_the_bundle(tiny_bundle, tmp_path, make_video, inside):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, bundle)
    line = one_error(cli("infer", make_video("v.mp4", frames=12), "-m", bundle / inside))
    assert line == (f"stexport: error: {bundle / inside}: a file inside the bundle {bundle}; pass the bundle "
                    f"directory: {bundle}")
