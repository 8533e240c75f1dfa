"""The first hour with the CLI (issue 19): offline builds, -v, cheap refusals with suggestions, one meaning per
flag, Ctrl-C, messages that name the fix, output fit for pipes and terminals, verify's reference cache."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_video
from typer.testing import CliRunner

from stexport.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
TINY = "stexport-tiny-vit"
MOTION = ROOT / "examples" / "motion"
runner = CliRunner()


def cli(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def stexport(*args, env=None, timeout=120, **kw):
    """The CLI in a fresh process (what a user runs), stdout and stderr apart."""
    return subprocess.run([sys.executable, "-m", "stexport.cli.app", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout, **kw)


def strict_json(text: str):
    def bad(name):
        raise ValueError(f"non-finite number {name} in JSON")

    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def vitb_adapter(tmp_path_factory):
    """A small random adapter (width 8, 4 classes) that fits ViT-B-16 (width 768, 12 blocks)."""
    from stexport.build.backbone import shape_config
    from stexport.build.deltas import save_official
    from stexport.build.synthetic import random_deltas

    path = tmp_path_factory.mktemp("vitb") / "vitb.pt"
    save_official(path, random_deltas(shape_config("ViT-B-16"), width=8, num_classes=4))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_videos")
    lines = []
    for i in range(5):
        write_video(d / f"v{i}.mp4", frames=30 + 5 * i, width=64, height=48)
        lines.append(f"v{i}.mp4 {i % 10}")
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    return d


# --- 1. an offline default build: one line, at once ------------------------------------------------------

def test_offline_default_build_is_one_line(vitb_adapter, tmp_path):
    """Defaults (ViT-B-16 / openai) with the model hub unreachable (a closed loopback port) or declared
    offline, and nothing cached: exit 2, one stderr line naming the weights and the fix, no retries, nothing
    written. The timeout only bounds a hung run (it used to take 113 s)."""
    base = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"),
            "STEXPORT_HOME": str(tmp_path / "home")}
    for env in ({"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}):
        r = stexport("build", "--adapter", vitb_adapter, "--out", tmp_path / "b", env={**base, **env}, timeout=30)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("stexport: error: could not download 'openai' weights for ViT-B-16 (offline?")
        assert "pass --pretrained FILE" in lines[0]
        assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def _fake_tag(monkeypatch, tmp_path, backbone):
    """Register open_clip tag 'cachedtag' for `backbone` (hosted on the hub as stexport-test/tiny) and put
    its weights (an open_clip state dict, safetensors) into a model-hub cache laid out as huggingface_hub
    lays it out. Returns the cache dir."""
    import open_clip.pretrained as ocp
    from safetensors.torch import save_file

    monkeypatch.setitem(ocp._PRETRAINED, TINY, {"cachedtag": ocp._pcfg(hf_hub="stexport-test/tiny/")})
    repo = tmp_path / "hub" / "models--stexport-test--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({f"visual.{k}": v.contiguous() for k, v in backbone.state_dict.items()},
              str(snap / "open_clip_model.safetensors"))
    return tmp_path / "hub"


def test_tag_weights_come_from_the_cache_offline(monkeypatch, tmp_path):
    import torch

    from stexport.build.backbone import load_backbone, random_backbone
    from stexport.errors import StexportError

    want = random_backbone(TINY, seed=3)
    hub = _fake_tag(monkeypatch, tmp_path, want)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = load_backbone(TINY, "cachedtag", cache_dir=str(hub))
    assert got.source["tag"] == "cachedtag" and len(got.source["sha256"]) == 64 and "file" not in got.source
    assert all(torch.equal(got.state_dict[k], v) for k, v in want.state_dict.items())
    with pytest.raises(StexportError, match=r"could not download 'cachedtag' weights .*HF_HUB_OFFLINE is set"):
        load_backbone(TINY, "cachedtag", cache_dir=str(tmp_path / "empty"))


# --- 2. -v says what each stage does --------------------------------------------------------------------

def test_verbose_tells_each_stage(tiny_adapter, videos, tmp_path):
    args = ["build", "--adapter", tiny_adapter, "--backbone", TINY, "--pretrained", "none"]
    r = cli("-v", *args, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    err = r.stderr
    for expected in ("stexport: adapter: ", "stexport: weights: stexport-tiny-vit randomly initialised",
                     "stexport: activation: QuickGELU (model config stexport-tiny-vit sets quick_gelu)",
                     "stexport: graph: uint8 input", "stexport: export: ONNX opset 18",
                     "stexport: load: done in ", "stexport: export: done in ", "stexport: bundle: "):
        assert expected in err, (expected, err)
    assert "Replaced initializer" not in err  # the ONNX optimizer's own notes stay out
    r = cli("-v", "verify", tmp_path / "b", "--clips", videos / "list.txt", "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    assert re.search(r"stexport: backend: onnxruntime, options defaults: .*CPUExecutionProvider", r.stderr)
    assert "stexport: reference: " in r.stderr
    quiet = cli(*args, "--out", tmp_path / "c")
    assert quiet.exit_code == 0 and "stexport: weights" not in quiet.stderr and "done in" not in quiet.stderr


# --- 3. refusals before torch, with suggestions -------------------------------------------------------

def test_cheap_refusals_come_before_torch(tiny_adapter, tiny_bundle, videos, tmp_path):
    """Mistyped names, missing inputs and an existing --out are refused without importing torch or
    open_clip, and unknown names get the closest accepted ones."""
    (tmp_path / "exists").mkdir()
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "vit.safetensors").write_bytes(b"")
    cases = [
        (["build", "--adapter", tiny_adapter, "--backbone", "ViT-B16"],
         "unknown backbone 'ViT-B16': did you mean ViT-B-16?"),
        (["build", "--adapter", tiny_adapter, "--backbone", "ViT-L-14-SigLIP"], "did you mean ViT-L-14"),
        (["build", "--adapter", tiny_adapter, "--out", tmp_path / "exists"], "already exists; pass --force"),
        (["build", "--adapter", tmp_path / "nope.pt"], "no such file (--adapter"),
        (["build", "--adapter", tiny_adapter, "--precision", "int4"], "did you mean int8?"),
        (["build", "--adapter", tiny_adapter, "--pretrained", tmp_path / "weights"],
         "is a directory, not a weights file (found vit.safetensors in it)"),
        (["build", "--adapter", tiny_adapter, "--backbone", "RN50"], "is a ResNet"),
        (["inspect", "--adapter", tiny_adapter, "--backbone", "vit-b-16"], "did you mean ViT-B-16?"),
        (["verify", tiny_bundle.path, "--clips", videos / "list.txt", "-b", "onnxrntime"],
         "unknown backend 'onnxrntime'; did you mean onnxruntime?"),
        (["infer", videos / "v0.mp4", "-m", tiny_bundle.path, "-b", "openvno"], "did you mean openvino?"),
    ]
    code = """
import json, sys
from typer.testing import CliRunner
from stexport.cli.app import app
out = [[r.exit_code, r.stderr] for r in (CliRunner().invoke(app, args) for args in json.loads(sys.argv[1]))]
print(json.dumps({"results": out, "torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules}))
"""
    argv = json.dumps([[str(a) for a in args] for args, _ in cases])
    r = subprocess.run([sys.executable, "-c", code, argv], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["open_clip"] is False
    for (args, expected), (code_, err) in zip(cases, got["results"]):
        assert code_ == 2 and expected in err and len(err.strip().splitlines()) == 1, (args, err)


def test_only_accepted_backbones_are_listed_or_suggested():
    from stexport.build import names

    accepted = names.accepted()
    assert "ViT-B-16" in accepted and "stexport-demo-vit" in accepted
    assert not [n for n in accepted if "SigLIP" in n or n.startswith(("RN", "convnext", "EVA", "MobileCLIP"))]
    for typo in ("ViT-SO400M-14-SigLIP", "RN50x4", "EVA02-B-16", "vit_b_16"):
        assert all(s in accepted for s in names.suggest(typo)), typo
    assert names.suggest("vit-b-16")[0] == "ViT-B-16"
    # the shapes read from the files are the shapes open_clip builds
    from stexport.build.backbone import random_backbone, shape_config

    for name in ("stexport-demo-vit", TINY):
        built, read = random_backbone(name, fp16_round=False).config, shape_config(name)
        assert (built.width, built.layers, built.heads, built.patch_size, built.image_size, built.mlp_width) == \
            (read.width, read.layers, read.heads, read.patch_size, read.image_size, read.mlp_width)


# --- 4. one meaning per flag --------------------------------------------------------------------------

def _short_flags():
    import typer.main

    group = typer.main.get_command(app)
    seen: dict[str, dict[str, str]] = {}
    for name, cmd in group.commands.items():
        for p in cmd.params:
            longs = [o for o in p.opts if o.startswith("--")]
            for o in p.opts + p.secondary_opts:
                if re.fullmatch(r"-[A-Za-z]", o):
                    seen.setdefault(o, {})[name] = longs[0]
    return seen


def test_each_short_flag_means_one_thing():
    seen = _short_flags()
    for flag, where in seen.items():
        assert len(set(where.values())) == 1, (flag, where)
    assert set(seen["-b"].values()) == {"--backend"}
    assert set(seen["-o"].values()) == {"--out"}
    import typer.main

    for name, cmd in typer.main.get_command(app).commands.items():
        js = [p for p in cmd.params if "--json" in p.opts]
        assert js and js[0].is_flag, f"{name} --json must be an on/off flag"


def test_usage_mistakes_are_one_line_naming_the_help():
    """Click printed usage, a hint and the error on three lines (new-user finding); one line, exit 2."""
    cases = {
        ("build", "--bogus"): "stexport: error: No such option: --bogus (Possible options: --out); "
                              "see `stexport build -h`",
        ("verify",): "stexport: error: Missing argument 'bundle'; see `stexport verify -h`",
        ("bogus",): "stexport: error: No such command 'bogus'; see `stexport -h`",
        ("--nope",): "stexport: error: No such option: --nope; see `stexport -h`",
        ("multitask", "--pack"): "stexport: error: Option '--pack' requires an argument; see `stexport multitask -h`",
        ("infer", "-v", "x.mp4"): "stexport: error: No such option: -v; -v goes before the command: "
                                  "`stexport -v infer …`",
    }
    for args, line in cases.items():
        p = stexport(*args)
        assert p.returncode == 2 and p.stderr.strip() == line and not p.stdout, (args, p.stderr)
    p = stexport()  # no command: the help, and no empty error line (new-user finding)
    assert p.returncode == 2 and "Usage: stexport" in p.stdout + p.stderr and "error" not in p.stderr, p.stderr


def test_verify_json_is_a_flag_and_report_writes_a_file(tiny_bundle, videos, tmp_path):
    r = cli("verify", tiny_bundle.path, "--clips", videos / "list.txt", "--json")
    assert r.exit_code == 0, r.output
    report = strict_json(r.stdout)
    assert report["passed"] and report["videos"] == 5
    r = cli("verify", tiny_bundle.path, "--clips", videos / "list.txt", "--report", tmp_path / "r.json")
    assert r.exit_code == 0 and "PASS" in r.stdout
    assert strict_json((tmp_path / "r.json").read_text())["videos"] == 5
    # the old spelling works for one release, with a deprecation line
    r = cli("verify", tiny_bundle.path, "--clips", videos / "list.txt", "--json", tmp_path / "old.json")
    assert r.exit_code == 0 and "PASS" in r.stdout and (tmp_path / "old.json").is_file()
    assert "`verify --json FILE` is deprecated" in r.stderr and f"--report {tmp_path / 'old.json'}" in r.stderr


def test_old_short_flags_still_work_with_a_deprecation_line(tiny_adapter, tiny_bundle, tmp_path):
    r = cli("build", "--adapter", tiny_adapter, "-b", "ViT-B16")
    assert r.exit_code == 2 and "`build -b` is deprecated" in r.stderr and "did you mean ViT-B-16?" in r.stderr
    r = cli("inspect", "--adapter", tiny_adapter, "-b", TINY, "--json")
    assert r.exit_code == 0 and strict_json(r.stdout)["fits"] is True and "deprecated" in r.stderr
    r = cli("bench", tiny_bundle.path, "-o", "precision")  # a malformed option: refused before any timing
    assert r.exit_code == 2 and "`bench -o` is deprecated" in r.stderr and "expected KEY=VALUE" in r.stderr


# --- 6. Ctrl-C ------------------------------------------------------------------------------------------

def clean_env(tmp, home) -> dict:
    """The environment of a fresh shell: TMPDIR and STEXPORT_HOME of the test's own, and no
    TORCHINDUCTOR_CACHE_DIR (importing torch._dynamo in this pytest process writes one into os.environ)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    return {**env, "TMPDIR": str(tmp), "STEXPORT_HOME": str(home)}


def test_a_build_leaves_nothing_in_tmpdir(tiny_adapter, tmp_path):
    """torch creates $TMPDIR/torchinductor_$USER when the exporter imports torch._dynamo: the CLI points that
    cache at a directory of its own and removes it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, "-m", "stexport.cli.app", "build", "--adapter", str(tiny_adapter),
                        "--backbone", TINY, "--pretrained", "none", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, env=clean_env(tmp, tmp_path / "home"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "stexport.json").is_file()
    assert not list(tmp.iterdir()), list(tmp.iterdir())


def test_ctrl_c_during_a_build_is_one_line_exit_130_and_leaves_nothing(tiny_adapter, tmp_path):
    """SIGINT as the ONNX export starts: 'stexport: interrupted', exit 130, no traceback, no bundle, no
    temporary directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "bundles" / "b"
    env = clean_env(tmp, tmp_path / "home")
    p = subprocess.Popen([sys.executable, "-m", "stexport.cli.app", "-v", "build", "--adapter", str(tiny_adapter),
                          "--backbone", TINY, "--pretrained", "none", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in p.stderr:  # bounded: the build ends either way
            lines.append(line)
            if "stexport: export: ONNX" in line:
                p.send_signal(signal.SIGINT)
                break
        rest = p.communicate(timeout=120)[1]
    finally:
        p.kill()
    err = "".join(lines) + rest
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "stexport: interrupted"
    assert "Traceback" not in err and "Next steps" not in err and "stexport: error" not in err
    assert not out.exists()
    assert not (out.parent.exists() and list(out.parent.iterdir())), list(out.parent.iterdir())
    assert not list(tmp.iterdir())


def test_ctrl_c_during_infer_is_one_line_exit_130(tiny_bundle, make_video, tmp_path):
    """Any command, not only build: SIGINT once `infer` has printed its first result (200 inputs: it is
    still busy). One line, exit 130, no traceback; the lines printed so far are whole JSON lines."""
    video = make_video("v.mp4", frames=20, width=64, height=48)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "stexport.cli.app", "infer", *[str(video)] * 200, "-m",
                          str(tiny_bundle.path), "--backend", "onnxruntime", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=clean_env(tmp, tmp_path / "home"))
    try:
        first = p.stdout.readline()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert json.loads(first)["top"], first
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "stexport: interrupted" and "Traceback" not in err, err
    assert all(json.loads(line) for line in out.splitlines()) and len(out.splitlines()) < 199
    # nothing of stexport's; `import onnxruntime` (1.32) itself writes its telemetry session id to $TMPDIR/.ses
    assert {p.name for p in tmp.iterdir()} <= {".ses"}


FINALIZER_SIGINT = """
import gc, signal, sys, time, weakref
from stexport import interrupt

interrupt.install()


class Garbage:  # what open_clip's tokenizer leaves: objects whose __del__ runs at some later allocation
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C lands while the collector runs this finalizer
        sum(range(1000))


class Cycle:
    pass


c = Cycle()
c.self, c.garbage = c, Garbage()
weakref.finalize(c, signal.raise_signal, signal.SIGINT)
del c
try:
    gc.collect()
    time.sleep(5)
    print("ran on")
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_in_a_finalizer_is_not_lost():
    """The cause of the Ctrl-C flake (issue 30): a SIGINT whose handler runs inside a __del__ (or a
    weakref.finalize callback) that the garbage collector calls. Raised there, Python prints 'Exception ignored
    ... Traceback' and drops it; stexport's handler delivers it again in the first ordinary frame."""
    r = subprocess.run([sys.executable, "-c", FINALIZER_SIGINT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "interrupted" and r.stderr == "", (r.stdout, r.stderr)


def test_an_interrupt_wrapped_by_a_library_stays_an_interrupt(tmp_path):
    """What the exporter does with a Ctrl-C in its C++ code: another exception raised from it. export_onnx
    must not report it as 'ONNX export failed'."""
    import torch

    from stexport.build.export import export_onnx

    class Wrapped(torch.nn.Module):
        image_size, input_format = 8, "float"

        def forward(self, x):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise RuntimeError("exporter: tracing failed") from e

    with pytest.raises(KeyboardInterrupt):
        export_onnx(Wrapped(), tmp_path / "m.onnx", 2)
    assert not (tmp_path / "m.onnx").exists()


# --- 7. words that name the fix -------------------------------------------------------------------------

def test_inspect_names_the_backbone_that_fits():
    r = cli("inspect", "--adapter", MOTION / "motion_adapter.pt")  # default ViT-B-16: does not fit
    assert r.exit_code == 1
    assert "use --backbone stexport-demo-vit" in r.stdout and "fits           stexport-demo-vit" in r.stdout
    r = cli("inspect", "--adapter", MOTION / "motion_adapter.pt", "--json")
    report = strict_json(r.stdout)
    assert report["fits"] is False and report["fits_backbones"][0] == "stexport-demo-vit"
    # build says the same, before any weights are fetched
    r = cli("build", "--adapter", MOTION / "motion_adapter.pt", "--out", "/nonexistent/x")
    assert r.exit_code == 2 and "use --backbone stexport-demo-vit" in r.stderr


def test_bench_figures_carry_units(capsys):
    from stexport.cli.bench import show

    base = {"bundle": "b", "precision": "int8", "frames": 8, "size": 32, "described": {}, "backend": "openvino",
            "latency_ms": None, "batches": {}, "peak_rss_mb": 100, "rss_before_mb": 50, "load_s": 0.1,
            "achieved_gflops": {"throughput": 300.0}, "gflop_per_clip": 1.5, "throughput": {"batch": 32},
            "peak_gflops": 700.0, "fraction_of_peak": {"throughput": 0.43}, "fraction_of_roofline":
            {"throughput": 0.5}, "roofline_clips_per_s": 9.0}
    show({**base, "compute_precision": "int8"})
    out = capsys.readouterr().out
    assert "GEMM peak (700 GOP/s)" in out and "-> 300 GOP/s" in out
    show({**base, "compute_precision": "fp32"})
    out = capsys.readouterr().out
    assert "GEMM peak (700 GFLOP/s)" in out and "-> 300 GFLOP/s" in out


def test_infer_banner_names_the_labels_file_from_anywhere(tiny_adapter, videos, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "names.txt").write_text("\n".join(f"thing_{i}" for i in range(10)) + "\n")
    monkeypatch.chdir(work)
    r = cli("build", "--adapter", tiny_adapter, "--backbone", TINY, "--pretrained", "none", "--labels",
            "names.txt", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = cli("infer", videos / "v0.mp4", "-m", tmp_path / "b", "-b", "onnxruntime")
    assert r.exit_code == 0, r.output
    banner = next(ln for ln in r.stderr.splitlines() if "labels: " in ln)
    shown = banner.split("labels: ", 1)[1].split(" (")[0]
    assert Path(shown).is_absolute() and Path(shown).is_file() and Path(shown) == (tmp_path / "b" / "labels.txt")
    assert f"copied from {work / 'names.txt'}" in banner


# --- 8. output for pipes and terminals ------------------------------------------------------------------

def test_bench_writes_no_progress_frames_into_a_redirected_stderr(tiny_bundle, tmp_path):
    with open(tmp_path / "err.txt", "w") as f:
        r = subprocess.run([sys.executable, "-m", "stexport.cli.app", "bench", str(tiny_bundle.path), "-b",
                            "onnxruntime", "--batch", "1,2", "--iters", "2", "--warmup", "0", "--no-peaks"],
                           stdout=subprocess.PIPE, stderr=f, text=True, timeout=300)
    err = (tmp_path / "err.txt").read_text()
    assert r.returncode == 0, err
    assert "\r" not in err and "it/s" not in err and "call/s" not in err, err


@pytest.mark.parametrize("command", ["build", "inspect", "verify", "engine", "infer", "bench",
                                     "export-torchscript", "export-aoti", "dump-clip"])
def test_help_keeps_paragraphs_whole_and_flags_without_placeholders(command):
    import typer.main

    from stexport.cli.common import command_help

    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"})
    assert r.exit_code == 0
    out = re.sub(r"[ \t]+", " ", r.stdout)
    cmd = typer.main.get_command(app).commands[command]
    for para in command_help(cmd.callback.__doc__).split("\n\n"):
        text = re.sub(r"\\\[", "[", para)
        assert re.sub(r"\s+", " ", text).strip() in out, (command, text)
    assert "<bool>" not in r.stdout


# --- 9. verify's reference: batched across videos, cached -------------------------------------------------

def test_verify_batches_and_caches_the_reference(tiny_bundle, videos, tmp_path, monkeypatch):
    from stexport.build.torch_backend import TorchBackend
    from stexport.build.verify import verify

    calls = []
    real = TorchBackend.run
    monkeypatch.setattr(TorchBackend, "run", lambda self, clips: calls.append(len(clips)) or real(self, clips))
    monkeypatch.setenv("STEXPORT_REFERENCE_CACHE", str(tmp_path / "ref"))
    first = verify(tiny_bundle, videos / "list.txt", backend="onnxruntime")
    assert sum(calls) == first["metrics"]["views"] == 15 and len(calls) < first["videos"]
    assert first["reference"]["cached"] is False and len(list((tmp_path / "ref").glob("*.npz"))) == 1
    calls.clear()
    second = verify(tiny_bundle, videos / "list.txt", backend="openvino")
    assert calls == [] and second["reference"]["cached"] is True
    assert second["metrics"]["accuracy"]["reference_top1"] == first["metrics"]["accuracy"]["reference_top1"]
    # another set of videos is another entry; --no-cache recomputes
    verify(tiny_bundle, videos / "list.txt", backend="onnxruntime", max_clips=2)
    assert len(list((tmp_path / "ref").glob("*.npz"))) == 2
    calls.clear()
    verify(tiny_bundle, videos / "list.txt", backend="onnxruntime", use_cache=False)
    assert sum(calls) == 15
    # unbatched reference logits (one video per call) agree with the batched ones
    ref = TorchBackend(tiny_bundle)
    from stexport.runtime.video import Sampling, decode_clips

    s = Sampling.from_manifest(tiny_bundle.manifest)
    import numpy as np

    views = [decode_clips(str(videos / f"v{i}.mp4"), s) for i in range(5)]
    one = np.concatenate([ref.run(v) for v in views])
    many = ref.run(np.concatenate(views))
    np.testing.assert_allclose(one, many, atol=1e-5)
