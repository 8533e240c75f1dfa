"""`build_bundle` / `stexport build` and `stexport verify`: round trips, refusals, calibration, gates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import class_clips, separated_head, smooth_clips, trained_like, write_video
from onnx import numpy_helper
from stexport.cli.app import app
from typer.testing import CliRunner

from stexport.build.backbone import random_backbone
from stexport.runtime.backends import create, resolve
from stexport.build.pipeline import build_bundle
from stexport.bundle.store import Bundle
from stexport.build.deltas import Deltas, infer_spec
from stexport.errors import StexportError
from stexport.build.loaders import reference_for_bundle
from stexport.build.reference import build_reference, normalize
from stexport.build.synthetic import random_deltas
from stexport.build.verify import GATES, compare

runner = CliRunner()
TINY = "stexport-tiny-vit"


def cli(*args, home=None):
    env = {"STEXPORT_HOME": str(home)} if home else {}
    return runner.invoke(app, [*map(str, args)], env=env)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Six generated videos and a labelled list '<video> <label>' (labels 0..9)."""
    d = tmp_path_factory.mktemp("verify_videos")
    lines = []
    for i in range(6):
        write_video(d / f"v{i}.mp4", frames=30 + 7 * i, width=64 + 8 * i, height=48)
        lines.append(f"v{i}.mp4 {(3 * i) % 10}")
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    return d


def test_bundle_round_trip_through_files(tiny_bundle):
    b = Bundle.load(tiny_bundle.path)
    m = b.manifest
    raw = json.loads((b.path / "stexport.json").read_text())
    assert {"format", "format_version", "name", "created", "provenance", "model", "input", "output", "sampling",
            "precision", "opset", "artifacts", "files"} <= set(raw)
    assert raw["format_version"] == 2 and m.provenance.stexport and "torch" in m.provenance.libraries
    assert m.input.model_dump() == {"name": "frames", "dtype": "uint8", "layout": "BTHWC", "frames": 8, "size": 32,
                                    "mean": m.input.mean, "std": m.input.std}
    assert m.output.model_dump() == {"name": "logits", "dtype": "float32", "classes": 10, "labels_source": "generic"}
    assert m.sampling.model_dump() == {"rate": 16, "temporal_views": 3, "spatial_views": 1}  # K400 style
    assert b.labels[3] == "class_3"
    assert m.spec.layout == "2x32" and len(m.model.adapter.sha256) == 64
    assert set(m.artifacts) == {"onnx", "deltas", "labels"} and b.changed_files() == []
    ref = reference_for_bundle(b)  # rebuilt from the bundle's deltas and backbone record alone
    clips = smooth_clips(3, 32)
    with torch.no_grad():
        want = ref(normalize(torch.from_numpy(clips))).numpy()
    with create("onnxruntime", b) as backend:
        assert np.abs(backend.run(clips) - want).max() <= 1e-4


def test_ssv2_style_sampling_and_labels(tmp_path):
    bb = random_backbone(TINY)
    sd = random_deltas(bb.config, width=16, num_classes=174, pre_attn=True)
    b = build_bundle(sd, backbone=bb, out=tmp_path / "b")
    assert b.manifest.sampling.model_dump() == {"rate": 0, "temporal_views": 1, "spatial_views": 3}
    assert b.manifest.output.labels_source == "something-something-v2" and len(b.labels) == 174
    b2 = build_bundle(sd, backbone=bb, out=tmp_path / "b2", sampling={"spatial_views": 1})
    assert b2.manifest.sampling.spatial_views == 1


def test_build_refuses_to_clobber_and_force_replaces(tiny_adapter, tmp_path):
    out = tmp_path / "b"
    args = ["build", "--adapter", tiny_adapter, "--backbone", TINY, "--pretrained", "none", "--out", out]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    first = Bundle.load(out).manifest.created
    r = cli(*args)
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert Bundle.load(out).manifest.created == first
    r = cli(*args, "--force", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["precision"] == "fp32"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary directories left behind


def test_build_records_views_and_rate_for_infer(tiny_adapter, tmp_path):
    base = ["build", "--adapter", tiny_adapter, "--backbone", TINY, "--pretrained", "none"]
    r = cli(*base, "--views", "1x3", "--rate", "0", "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    assert Bundle.load(tmp_path / "b").manifest.sampling.model_dump() == {"rate": 0, "temporal_views": 1,
                                                                          "spatial_views": 3}
    for i, (bad_args, why) in enumerate(((["--views", "2x2"], "2 spatial views: use 1"),
                                    (["--views", "3by1"], "TEMPORALxSPATIAL"), (["--views", "0x1"], "at least 1"),
                                    (["--rate", "0"], "temporal views with rate 0"))):
        out = tmp_path / f"bad{i}"
        r = cli(*base, *bad_args, "--out", out)
        lines = [ln for ln in r.output.strip().splitlines() if not ln.startswith("stexport: warning: backbone")]
        assert r.exit_code == 2 and why in r.output and len(lines) == 1, r.output  # beside --pretrained none's warning
        assert not out.exists()


def test_failed_build_leaves_nothing(tiny_adapter, tmp_path):
    with pytest.raises(StexportError, match="--size 64"):
        build_bundle(tiny_adapter, backbone=TINY, pretrained="none", size=64, out=tmp_path / "b")
    with pytest.raises(StexportError, match="width mismatch"):
        build_bundle(tiny_adapter, backbone="stexport-demo-vit", pretrained="none", out=tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_int8_build_calibrates_on_videos_and_caches(tiny_adapter, videos, tmp_path):
    home = tmp_path / "home"
    args = ["build", "--adapter", tiny_adapter, "--backbone", TINY, "--pretrained", "none",
            "--precision", "int8", "--calib", videos / "list.txt", "--calib-clips", 4,
            "--calib-method", "percentile"]
    r = cli(*args, "--out", tmp_path / "a", home=home)
    assert r.exit_code == 0, r.output
    a = Bundle.load(tmp_path / "a")
    cal = a.manifest.calibration
    assert cal.clips == 4 and cal.method == "percentile" and cal.cached is False
    assert cal.sampling["temporal_views"] == 3 and len(list((home / "calibration").glob("*.json"))) == 1
    r = cli(*args, "--out", tmp_path / "b", home=home)
    assert r.exit_code == 0 and "(cached)" in r.output
    b = Bundle.load(tmp_path / "b")
    assert b.manifest.calibration.cached is True
    assert a.manifest.files["model.onnx"].sha256 == b.manifest.files["model.onnx"].sha256
    # a different seed picks other clips: a different cache entry
    r = cli(*args, "--out", tmp_path / "c", "--calib-method", "minmax", home=home)
    assert r.exit_code == 0 and len(list((home / "calibration").glob("*.json"))) == 2


def test_bad_calib_input_is_one_line_exit_2(tiny_adapter, videos, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "missing.txt").write_text("nope.mp4 1\n")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    (tmp_path / "junk.txt").write_text("junk.mp4 0\n")
    base = ["build", "--adapter", tiny_adapter, "--backbone", TINY, "--pretrained", "none",
            "--out", tmp_path / "o"]
    cases = {
        "needs --calib": [],
        "no such clip list": ["--calib", tmp_path / "nothing.txt"],
        "no video files": ["--calib", tmp_path / "empty"],
        "do not exist": ["--calib", tmp_path / "missing.txt"],
        "junk.mp4": ["--calib", tmp_path / "junk.txt"],
        "--calib-method": ["--calib", videos / "list.txt", "--calib-method", "kl"],
        "--calib-clips": ["--calib", videos / "list.txt", "--calib-clips", 0],
    }
    for expect, extra in cases.items():
        r = cli(*base, "--precision", "int8", *extra, home=tmp_path / "home")
        assert r.exit_code == 2, (expect, r.output)
        assert expect in r.output and "Traceback" not in r.output, (expect, r.output)
        assert not (tmp_path / "o").exists()
    r = cli(*base, "--precision", "int4")
    assert r.exit_code == 2 and "fp32, fp16, int8" in r.output


def test_verify_passes_with_report(tiny_bundle, videos, tmp_path):
    report_path = tmp_path / "report.json"
    r = cli("verify", tiny_bundle.path, "--clips", videos / "list.txt", "--report", report_path)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "top-1 agreement  100.0%" in r.output
    report = json.loads(report_path.read_text())
    m = report["metrics"]
    assert report["passed"] and report["videos"] == 6 and m["views"] == 18
    assert report["backend"]["backend"] == resolve("auto", tiny_bundle)  # what `infer` would run
    assert m["max_abs"] <= 1e-4 and m["cosine_min"] > 0.999999 and m["top5_agreement"] == 1.0
    acc = m["accuracy"]
    assert acc["reference_top1"] == acc["backend_top1"] and acc["top1_difference"] == 0
    r = cli("verify", tiny_bundle.path, "--clips", videos, "--max-clips", 2, "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert out["videos"] == 2 and out["metrics"]["accuracy"] is None


def corrupt(bundle_path, factor=3.0):
    """Scale one weight of the ONNX graph (a layer of the last block), keeping the manifest consistent."""
    path = bundle_path / "model.onnx"
    model = onnx.load(str(path))
    w = max((t for t in model.graph.initializer if len(t.dims) == 2), key=lambda t: t.dims[0] * t.dims[1])
    arr = numpy_helper.to_array(w) * factor
    w.CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(w).dtype), w.name))
    onnx.save(model, str(path))


def test_verify_fails_on_a_corrupted_weight(tiny_bundle, videos, tmp_path):
    shutil.copytree(tiny_bundle.path, tmp_path / "b")
    corrupt(tmp_path / "b")
    r = cli("verify", tmp_path / "b", "--clips", videos / "list.txt")
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "files changed since the build: model.onnx" in r.output
    Bundle.load(tmp_path / "b").update(written=["model.onnx"])  # a wrong but self-consistent bundle fails the same
    r = cli("verify", tmp_path / "b", "--clips", videos / "list.txt")
    assert r.exit_code == 1 and "max |Δlogit|" in r.output and "files changed" not in r.output


def test_verify_bad_input_exit_2(tiny_bundle, videos, tmp_path):
    r = cli("verify", tmp_path / "nope", "--clips", videos / "list.txt")
    assert r.exit_code == 2 and "no such bundle" in r.output
    r = cli("verify", tiny_bundle.path, "--clips", tmp_path / "none.txt")
    assert r.exit_code == 2 and "no such file" in r.output
    (tmp_path / "bad.txt").write_text("v0.mp4 99\n")
    shutil.copy(videos / "v0.mp4", tmp_path / "v0.mp4")
    r = cli("verify", tiny_bundle.path, "--clips", tmp_path / "bad.txt")
    assert r.exit_code == 2 and "outside the model's 10 classes" in r.output
    r = cli("verify", tiny_bundle.path, "--clips", videos / "list.txt", "--backend", "torch")
    assert r.exit_code == 2 and "reference itself" in r.output


def test_verify_without_a_runtime_says_what_to_install(tiny_bundle, videos, monkeypatch):
    monkeypatch.setattr("stexport.runtime.backends.auto_order", lambda: [])
    r = cli("verify", tiny_bundle.path, "--clips", videos / "list.txt")
    assert r.exit_code == 2 and "pip install onnxruntime" in r.output and "Traceback" not in r.output


def test_gates_per_precision():
    ref = np.random.default_rng(0).normal(size=(100, 10)).astype(np.float32)
    m = compare(ref, ref + 1e-5)
    assert m["max_abs"] < 2e-5 and m["top1_agreement"] == 1.0 and m["top5_agreement"] == 1.0
    from stexport.build.verify import judge

    assert all(c["passed"] for c in judge("fp32", m, GATES["fp32"]))
    flipped = ref.copy()
    flipped[0] = -flipped[0]
    m2 = compare(ref, flipped)
    assert m2["top1_agreement"] == 0.99
    assert all(c["passed"] for c in judge("fp16", m2, GATES["fp16"]))
    assert not all(c["passed"] for c in judge("fp32", m2, GATES["fp32"]))
    labelled = {**m2, "accuracy": {"reference_top1": 80.0, "backend_top1": 78.5}}
    (check,) = judge("int8", labelled, GATES["int8"])
    assert check["check"].startswith("top-1 accuracy drop") and not check["passed"]


@pytest.mark.slow
def test_vit_b16_parity_per_precision(tmp_path, monkeypatch):
    """ViT-B/16 + 12x384 adapters, 4x224: FP32 within 1e-6 of the logits' scale; FP32, FP16 and INT8 pass
    verify's gates (the product's) on 20 held-out clips of 5 classes the head is fitted on
    (conftest.separated_head; a random head's near-tied logits make INT8 top-1 agreement luck). Four frames,
    not the paper's 8: the model (and so what FP16 and INT8 must hold) is the full-size one, a frame count
    only multiplies the tokens, and 8 made this one test a fifth of the suite's time."""
    from stexport.build.verify import judge

    FRAMES = 4
    monkeypatch.setenv("STEXPORT_CALIB_CACHE", str(tmp_path / "cal"))
    torch.set_num_threads(2)
    bb = trained_like(random_backbone("ViT-B-16"))
    sd = random_deltas(bb.config, width=384, num_classes=5)
    sd = separated_head(bb, sd, *class_clips(2, 5, 224, frames=FRAMES, seed=12))
    ref = build_reference(bb, Deltas(infer_spec(sd), sd))
    clips, labels = class_clips(4, 5, 224, frames=FRAMES, seed=11)
    with torch.inference_mode():
        want = np.concatenate([ref(normalize(torch.from_numpy(c))).numpy() for c in np.array_split(clips, 4)])
    assert (want.argmax(1) == labels).mean() >= 0.95  # the premise: classes apart
    calib, _ = class_clips(1, 5, 224, frames=FRAMES, seed=13)
    results = {}
    for precision in ("fp32", "fp16", "int8"):
        b = build_bundle(sd, backbone=bb, precision=precision, out=tmp_path / precision, frames=FRAMES,
                         calib=calib if precision == "int8" else None)
        with create("onnxruntime", b) as backend:
            results[precision] = compare(want, backend.run(clips))
    # float-level: 1e-6 of the logits' scale (the fitted head's logits reach ~450, a random head's ~1; measured
    # 1.4e-4, 3e-7 of it); the product's FP32 gate, 1e-3 absolute, is checked below
    scale = max(1.0, float(np.abs(want).max()))
    assert results["fp32"]["max_abs"] <= 1e-6 * scale, (results["fp32"], scale)
    for precision, m in results.items():
        checks = judge(precision, {**m, "accuracy": None}, GATES[precision])
        assert checks and all(c["passed"] for c in checks), (precision, m, checks)
    assert results["fp16"]["cosine_min"] > 0.9999 and results["int8"]["cosine_min"] > 0.99, results


# --- issue 18 ------------------------------------------------------------------------------------------------

def test_verify_checks_the_views_and_rate_it_is_given(tiny_bundle, videos):
    """verify --views/--rate check the sampling infer --views/--rate would run (new-user finding: a table's
    '1x1 views, rate 0' could not be reproduced from the CLI); the default is the bundle's (3 views here)."""
    r = cli("verify", tiny_bundle.path, "--clips", videos / "v0.mp4", "--views", "1x1", "--rate", "0", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["metrics"]["views"] == 1 and out["passed"]
    assert {k: out["sampling"][k] for k in ("rate", "temporal_views", "spatial_views")} == \
        {"rate": 0, "temporal_views": 1, "spatial_views": 1}
    r = cli("verify", tiny_bundle.path, "--clips", videos / "v0.mp4", "--views", "0x2")
    assert r.exit_code == 2 and "--views '0x2': both counts must be at least 1" in r.output


def test_verify_takes_the_inputs_build_calib_takes(tiny_bundle, videos, tmp_path):
    """A video file (was a 49-line UnicodeDecodeError traceback), several --clips, and a list that is not UTF-8
    (one line naming the line and the fix)."""
    r = cli("verify", tiny_bundle.path, "--clips", videos / "v0.mp4", "--json", "-")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["videos"] == 1 and out["metrics"]["views"] == 3 and out["passed"]
    r = cli("verify", tiny_bundle.path, "--clips", videos / "v0.mp4", "--clips", videos / "list.txt", "--json", "-")
    assert r.exit_code == 0 and json.loads(r.stdout)["videos"] == 7
    assert "only some videos have labels; accuracy is not reported" in r.stderr
    latin = tmp_path / "liste.txt"
    latin.write_bytes(f"{videos / 'v0.mp4'} 1\n{videos}/vidéo.mp4 2\n".encode("latin-1"))
    r = cli("verify", tiny_bundle.path, "--clips", latin)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip() == (f"stexport: error: {latin}: line 2 is not UTF-8 text (byte 0xe9); save the list as "
                                "UTF-8, e.g. `iconv -f latin1 -t utf-8 LIST > LIST.utf8`")


def test_verify_fails_when_inputs_could_not_be_decoded_unless_allowed(tiny_bundle, videos, tmp_path):
    """verify printed PASS with 5 of 7 inputs undecodable (issue 29): a failed input fails the gate, with its
    reason; --allow-undecodable lets the rest decide, and the report still says how many failed. A list with
    a byte-order mark and '#' comments reads as people write it."""
    (tmp_path / "broken.mp4").write_bytes(b"\0not a video" * 100)
    lst = tmp_path / "list.txt"
    lst.write_bytes(f"\ufeff# two clips\n{videos / 'v0.mp4'}\n\nbroken.mp4\n".encode())
    r = cli("verify", tiny_bundle.path, "--clips", lst)
    assert r.exit_code == 1, r.output
    assert "videos           1 (3 views), 1 could not be decoded" in r.stdout
    assert "gate             videos decoded = 1 (limit all 2): FAIL" in r.stdout
    assert f"                 {tmp_path / 'broken.mp4'}: not a video" in r.stdout
    assert r.stdout.rstrip().endswith("result           FAIL")
    r = cli("verify", tiny_bundle.path, "--clips", lst, "--allow-undecodable", "--json", "-")
    assert r.exit_code == 0, r.output
    out = strict_loads(r.stdout)
    assert out["passed"] and out["videos"] == 1 and len(out["failed"]) == 1
    assert out["checks"][0]["check"] == "videos decoded" and out["checks"][0]["limit"] == "all 2 (fewer allowed)"


def test_verify_fails_the_gate_on_nan_logits_with_strict_json(tiny_bundle, videos, tmp_path):
    shutil.copytree(tiny_bundle.path, tmp_path / "b")
    nan_weight(tmp_path / "b")
    r = cli("verify", tmp_path / "b", "--clips", videos / "list.txt", "--json", "-")
    assert r.exit_code == 1, r.output
    out = strict_loads(r.stdout)
    assert out["metrics"]["non_finite_views"] == {"reference": 0, "backend": 18}
    first = videos / "v0.mp4"
    assert out["checks"][0] == {"check": "finite logits", "value": 18, "limit": "0 non-finite views",
                                "passed": False, "error": non_finite_error(first, out["backend"]["backend"])}


def non_finite_error(video, backend: str) -> str:
    return (f"{video}: the model returned non-finite logits (NaN/Inf) for 3 of 3 views on backend {backend}: "
            "the fp32 model computes NaN/Inf on this input: check the bundle with `stexport verify` and rebuild "
            "it from finite weights")


def test_non_finite_logits_get_one_message_on_every_path(tiny_bundle, videos, tmp_path):
    """The same NaN logits used to read three ways (classify, the batch API and serve, verify's bare count):
    every path now scores through stexport.runtime.scoring and says the same line."""
    from stexport.build.verify import verify
    from stexport.runtime.classify import Classifier, NonFiniteOutput
    from stexport.runtime.video import decode
    from stexport.serving.app import ServingClassifier
    from stexport.serving.requests import Clips

    shutil.copytree(tiny_bundle.path, tmp_path / "b")
    nan_weight(tmp_path / "b")
    video = videos / "v0.mp4"
    want = non_finite_error(video, "onnxruntime")
    with Classifier(tmp_path / "b", backend="onnxruntime") as clf:
        with pytest.raises(NonFiniteOutput) as e:
            clf.classify(video)
        assert str(e.value) == want
        assert [f.error for f in clf.classify_batch([video, video])] == [want, want]
        assert next(iter(clf.classify_many([video]))).error == want
    r = cli("infer", video, "-m", tmp_path / "b", "--backend", "onnxruntime", "--batch", "6", "--json")
    assert r.exit_code == 2 and strict_loads(r.stdout.splitlines()[0])["error"] == want
    served = ServingClassifier(str(tmp_path / "b"), backend="onnxruntime")
    try:
        d = decode(video, served.sampling)
        assert served.classify([Clips(str(video), d.clips, d.frames, 0.0, [])]) == [{"path": str(video),
                                                                                    "error": want}]
    finally:
        served.close()
    report = verify(tmp_path / "b", video, backend="onnxruntime")
    assert report["checks"][0]["error"] == want and not report["passed"]


def strict_loads(text: str):
    """json.loads that refuses NaN and ±Infinity (Python's json accepts them; JSON does not)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def nan_weight(bundle_path) -> None:
    """Set one value of the head's bias to NaN in model.onnx and re-stamp the manifest: a self-consistent
    bundle whose logits are NaN (what a NaN adapter weight built into a graph looked like)."""
    path = bundle_path / "model.onnx"
    model = onnx.load(str(path))
    b = next(t for t in model.graph.initializer if tuple(t.dims) == (10,))
    arr = numpy_helper.to_array(b).copy()
    arr[0] = np.nan
    b.CopyFrom(numpy_helper.from_array(arr, b.name))
    onnx.save(model, str(path))
    Bundle.load(bundle_path).update(written=["model.onnx"])


def test_build_refuses_nan_adapter_in_one_line(tiny_adapter, tmp_path):
    sd = torch.load(tiny_adapter, weights_only=True)
    sd["model"]["transformer.resblocks.0.adapter_pre_mlp.fc2.weight"][4, 2] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    r = cli("build", "--adapter", tmp_path / "nan.pt", "--backbone", TINY, "--pretrained", "none",
            "--out", tmp_path / "o")
    assert r.exit_code == 2 and not (tmp_path / "o").exists()
    assert r.output.strip().splitlines()[-1] == (
        f"stexport: error: {tmp_path / 'nan.pt'}: tensor 'transformer.resblocks.0.adapter_pre_mlp.fc2.weight' "
        "(64, 32) holds 1 NaN and 0 ±Inf values; the adapter weights are damaged (a diverged training run or a "
        "bad conversion): use an earlier checkpoint or re-export it")


def huge_activation_backbone():
    """A tiny backbone with one MLP channel far beyond FP16's range, as in backbones trained in BF16: block 0's
    ln_2 bias at 10 and c_fc row 0 at 200 make that channel 200 * 10 * 64 ≈ 128,000 on every token."""
    bb = random_backbone(TINY)
    bb.state_dict["transformer.resblocks.0.ln_2.bias"][:] = 10.0
    bb.state_dict["transformer.resblocks.0.mlp.c_fc.weight"][0, :] = 200.0
    return bb


def test_fp16_build_refuses_activations_beyond_fp16(tmp_path):
    from stexport.build.fold import fold
    from stexport.build.fp16_check import generated_clips

    bb = huge_activation_backbone()
    sd = random_deltas(bb.config, width=32, num_classes=10)
    ref = build_reference(bb, Deltas(infer_spec(sd), sd))
    clips = torch.from_numpy(generated_clips(8, 32))
    with torch.no_grad():  # the premise: computed in FP16, this model gives NaN; in FP32 it is fine
        assert torch.isnan(fold(ref, "uint8", torch.float16)(clips[:1])).all()
        assert torch.isfinite(fold(ref, "uint8", torch.float32)(clips)).all()
    with pytest.raises(StexportError) as e:
        build_bundle(sd, backbone=bb, precision="fp16", fp16_overflow="refuse", out=tmp_path / "fp16")
    msg = str(e.value)
    assert msg.startswith("--precision fp16 refused: activations leave FP16's range (±65,504): block 0 fc reaches "
                          "128,")
    assert "checked on 4 generated clips" in msg and msg.endswith(
        "do not fit FP16; build with --fp16-overflow fp32 (keeps the overflowing nodes in FP32 inside the FP16 "
        "graph), --precision fp32, or int8 (its float parts are FP32; check it with verify)")
    assert not (tmp_path / "fp16").exists()
    fp32 = build_bundle(sd, backbone=bb, precision="fp32", out=tmp_path / "fp32")
    assert fp32.manifest.fp16_check is None


def test_fp16_build_records_its_check_on_calibration_videos(tmp_path, videos):
    bb = trained_like(random_backbone(TINY))
    sd = random_deltas(bb.config, width=32, num_classes=10)
    b = build_bundle(sd, backbone=bb, precision="fp16", out=tmp_path / "fp16", calib=videos / "list.txt")
    c = b.manifest.fp16_check.model_dump()
    assert c["passed"] and c["source"] == "calibration videos" and c["clips"] == 4
    assert 0 < c["max_abs_activation"] < 65504 and c["top1_agreement"] == 1.0 and c["max_abs_logit_diff"] < 0.05


def test_fp16_build_refuses_weights_beyond_fp16(tmp_path):
    """A weight FP16 cannot store (it would become Inf in the graph) is named like an activation."""
    bb = random_backbone(TINY)
    bb.state_dict["transformer.resblocks.1.attn.out_proj.weight"][2, 3] = 70000.0
    sd = random_deltas(bb.config, width=32, num_classes=10)
    with pytest.raises(StexportError, match=r"refused: weights FP16 cannot store \(they become ±Inf\): block 1 "
                                            r"attn.out.weight reaches 70,000; activations leave"):
        build_bundle(sd, backbone=bb, precision="fp16", out=tmp_path / "fp16")
    assert not (tmp_path / "fp16").exists()
