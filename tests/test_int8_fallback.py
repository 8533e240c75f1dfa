"""The layerwise precision report (`verify --layers`) and the INT8 float fallback (`build --min-agreement`):
on a tiny model with planted outliers (stexport.build.outliers, ×256 in 4 channels of each ln_2, outlier
migration off) whose plain INT8 bundle fails verify's gate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import write_video
from onnx import numpy_helper
from typer.testing import CliRunner

from stexport.bundle.store import Bundle
from stexport.cli.app import app

runner = CliRunner()
PLANTED = {"blocks.0.fc", "blocks.1.fc"}  # the readers of the planted ln_2 channels (MLP c_fc)


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """{dir, adapter, weights (planted ln_2), weights_qkv (planted ln_1 and ln_2), clips (an unlabelled list of 8
    videos)}: files the CLI takes; calibration cached in `dir` meanwhile."""
    import os

    from safetensors.torch import save_file

    from stexport.build.backbone import random_backbone
    from stexport.build.deltas import save_official
    from stexport.build.outliers import plant_norm_outliers
    from stexport.build.synthetic import random_deltas

    d = tmp_path_factory.mktemp("int8_fallback")
    old = os.environ.get("STEXPORT_CALIB_CACHE")
    os.environ["STEXPORT_CALIB_CACHE"] = str(d / "calibration")
    bb = random_backbone("stexport-tiny-vit")
    save_official(d / "adapter.pt", random_deltas(bb.config, num_classes=10, width=32, pre_attn=True,
                                                  pre_mlp=True))
    for name, norms in (("weights", ("ln_2",)), ("weights_qkv", ("ln_1", "ln_2"))):
        planted = plant_norm_outliers(bb, 256.0, 4, seed=0, norms=norms)
        save_file({k: v.contiguous() for k, v in planted.state_dict.items()}, str(d / f"{name}.safetensors"))
    lines = []
    for i in range(8):
        write_video(d / f"v{i}.mp4", frames=24 + 3 * i, width=48 + 8 * i, height=40)
        lines.append(f"v{i}.mp4")  # no labels: the gate is top-1 agreement
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    yield {"dir": d, "adapter": d / "adapter.pt", "weights": d / "weights.safetensors",
           "weights_qkv": d / "weights_qkv.safetensors", "clips": d / "list.txt"}
    if old is None:
        os.environ.pop("STEXPORT_CALIB_CACHE", None)
    else:
        os.environ["STEXPORT_CALIB_CACHE"] = old


def build_args(model, out, weights="weights"):
    return ["build", "--adapter", model["adapter"], "--backbone", "stexport-tiny-vit", "--pretrained",
            model[weights], "--precision", "int8", "--calib", model["clips"], "--int8-migrate", "off", "--out", out]


@pytest.fixture(scope="module")
def plain(model):
    r = cli(*build_args(model, model["dir"] / "plain"))
    assert r.exit_code == 0, r.output
    return Bundle.load(model["dir"] / "plain")


def test_plain_int8_fails_the_gate_and_the_report_ranks_the_planted_layers_first(model, plain, tmp_path):
    from stexport.build.verify import verify

    assert not verify(plain, model["clips"], backend="onnxruntime")["passed"]
    r = cli("verify", plain.path, "--clips", model["clips"], "--layers", "--json")
    assert r.exit_code == 0, r.output
    report = strict(r.stdout)
    ranked = [row["layer"] for row in report["layers"]]
    assert report["quantized_layers"] == len(ranked) == 20  # 2 blocks x (q, k, v, out, fc, proj, 4 adapter GEMMs)
    # ranked by the error each adds alone in INT8: every planted GEMM first, each well over any other GEMM's
    assert set(ranked[:len(PLANTED)]) == PLANTED, report["layers"][:4]
    alone = [row["mean_abs_alone"] for row in report["layers"]]
    assert alone == sorted(alone, reverse=True) and alone[len(PLANTED) - 1] > 2 * alone[len(PLANTED)], alone[:4]
    assert report["layers"][0]["mean_abs_removed"] > 0 and report["base"]["top1_agreement"] < 0.95
    r = cli("verify", plain.path, "--clips", model["clips"], "--layers", "--top", "3", "--report",
            tmp_path / "layers.json")
    assert r.exit_code == 0, r.output
    assert ranked[0] in r.output.splitlines()[5] and "(17 less sensitive layers not shown)" in r.output
    assert strict((tmp_path / "layers.json").read_text())["layers"] == report["layers"][:3]


def test_fallback_build_meets_the_gate_with_named_float_layers(model, plain):
    from stexport.build.verify import verify
    from stexport.calibration.qdq import quantized_layers
    from stexport.cli.build import fallback_text
    from stexport.trt_engines.onnx_support import check_tensorrt_ops

    out = model["dir"] / "gated"
    r = cli(*build_args(model, out), "--min-agreement", "0.95", "--json")
    assert r.exit_code == 0, r.output
    fb = strict(r.stdout)["calibration"]["float_fallback"]
    floats = [x["layer"] for x in fb["float_layers"]]
    assert set(floats[:len(PLANTED)]) == PLANTED, fb  # most sensitive first: the planted readers
    assert all(x["why"] in ("gate", "outlier") and x["mean_abs_logit_diff_alone_in_int8"] > 0
               for x in fb["float_layers"]) and fb["float_layers"][0]["why"] == "gate"
    assert fb["before"]["top1_agreement"] < 0.95 <= fb["after"]["top1_agreement"]
    assert fb["gate"] == {"min_top1_agreement": 0.95, "max_accuracy_drop_pt": None, "max_float_layers": None,
                          "min_top5_agreement": None}
    assert fb["float_layers_limit"] == 5 and fb["clips"] == 8 and fb["float_type"] == "fp32"
    assert all(fb["ms_per_clip"][k] > 0 for k in ("int8", "fallback", "fp32"))
    b = Bundle.load(out)
    assert b.manifest.calibration.quantized_layers == 20 - len(floats)
    assert verify(b, model["clips"], backend="onnxruntime")["passed"]
    graph = onnx.load(str(b.file("onnx")))
    assert check_tensorrt_ops(graph) == []
    assert not set(floats) & set(quantized_layers(graph)) and len(quantized_layers(graph)) == 20 - len(floats)
    inits = {t.name: t for t in graph.graph.initializer}
    for n in graph.graph.node:
        if n.name in floats:  # precision in the graph: a float weight, no Q/DQ
            assert numpy_helper.to_array(inits[n.input[1]]).dtype == np.float32
    text = fallback_text(fb)
    assert text.startswith(f"{len(floats)} GEMM(s) in fp32 ({', '.join(floats)})") and "top-1 agreement >= 95.0%" in text


def test_fallback_meets_a_top5_gate(model):
    """--min-top5-agreement alone is a gate: plain INT8 keeps the FP32 graph's top-5 set on < 95% of the views."""
    from stexport.cli.build import fallback_text

    r = cli(*build_args(model, model["dir"] / "top5"), "--min-top5-agreement", "0.95", "--json")
    assert r.exit_code == 0, r.output
    fb = strict(r.stdout)["calibration"]["float_fallback"]
    assert fb["gate"]["min_top5_agreement"] == 0.95 and fb["gate"]["min_top1_agreement"] is None
    assert fb["before"]["top5_agreement"] < 0.95 <= fb["after"]["top5_agreement"], fb
    assert fb["float_layers"] and fb["float_layers"][0]["why"] == "gate"
    assert "top-5 agreement >= 95.0%" in fallback_text(fb)


def test_fallback_fails_in_one_line_when_the_limit_is_reached(model):
    out = model["dir"] / "limited"
    r = cli(*build_args(model, out, "weights_qkv"), "--min-agreement", "1", "--max-float-layers", "1")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--max-float-layers 1 reached" in lines[0] and "Traceback" not in r.output
    assert not out.exists()


def test_bad_flag_combinations_are_one_line_errors(model, plain, tiny_bundle, tmp_path):
    base = ["build", "--adapter", model["adapter"], "--backbone", "stexport-tiny-vit", "--pretrained",
            model["weights"], "--out", tmp_path / "o"]
    cases = {
        "--min-agreement needs --precision int8": ["--min-agreement", "0.9"],
        "--max-float-layers needs --min-agreement, --max-drop or --min-top5-agreement": [
            "--precision", "int8", "--calib", model["clips"], "--max-float-layers", "2"],
        "--min-top5-agreement 2.0: a fraction between 0 and 1": ["--precision", "int8", "--calib", model["clips"],
                                                                 "--min-top5-agreement", "2"],
        "--min-agreement 1.5: a fraction between 0 and 1": ["--precision", "int8", "--calib", model["clips"],
                                                            "--min-agreement", "1.5"],
        "has videos without labels": ["--precision", "int8", "--calib", model["dir"], "--max-drop", "1"],
        "--max-float-layers 0: must be at least 1": ["--precision", "int8", "--calib", model["clips"],
                                                     "--max-drop", "1", "--max-float-layers", "0"],
        "swappable bundle's layers are shared": ["--precision", "int8", "--calib", model["clips"], "--swappable",
                                                 "--min-agreement", "0.9"],
    }
    for expect, extra in cases.items():
        r = cli(*base, *extra)
        assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output, (expect, r.output)
        assert not (tmp_path / "o").exists()
    verify_cases = {
        "--top needs --layers": [plain.path, "--top", "3"],
        "--layers runs the graph on ONNX Runtime (CPU) and checks no gate; drop --backend":
            [plain.path, "--layers", "--backend", "openvino"],
        "--top 0: must be at least 1": [plain.path, "--layers", "--top", "0"],
        "bundle has no quantized or FP16 layers": [tiny_bundle.path, "--layers"],
    }
    for expect, extra in verify_cases.items():
        r = cli("verify", *extra[:1], "--clips", model["clips"], *extra[1:])
        assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output, (expect, r.output)


def test_gate_reads_labels_and_checks_each_part(model):
    """--max-drop's labels come from the gate clips' list; both parts of a gate are checked (verify's judge)."""
    from stexport.build.fallback import FallbackGate, gate_inputs
    from stexport.bundle.manifest import InputRecord
    from stexport.calibration import choose
    from stexport.runtime.video import Sampling

    listed = model["dir"] / "labelled.txt"
    listed.write_text("".join(f"v{i}.mp4 {(3 * i) % 10}\n" for i in range(8)))
    clips = choose(listed, 3, seed=1)
    feeds, labels = gate_inputs(clips, Sampling(frames=8, size=32, rate=0, temporal_views=1, spatial_views=3),
                                InputRecord(frames=8, size=32))
    assert labels == [(3 * int(v.stem[1:])) % 10 for v in clips.videos] and len(labels) == 3
    assert all(f.shape == (3, 8, 32, 32, 3) and f.dtype == np.uint8 for f in feeds)
    gate = FallbackGate(min_agreement=0.9, max_drop=1.0)
    checks = gate.checks({"top1_agreement": 0.95, "accuracy": {"reference_top1": 80.0, "backend_top1": 78.0}})
    assert [(c["check"], c["passed"]) for c in checks] == [("top-1 agreement", True),
                                                           ("top-1 accuracy drop (pt)", False)]
    assert gate.limit(20) == 5 and FallbackGate(max_float_layers=30).limit(20) == 20
    assert gate.flags() == "--min-agreement 0.9 --max-drop 1"
    top5 = FallbackGate(min_agreement=0.9, min_top5_agreement=0.95)
    checks = top5.checks({"top1_agreement": 0.95, "top5_agreement": 0.9})
    assert [(c["check"], c["passed"]) for c in checks] == [("top-1 agreement", True), ("top-5 agreement", False)]
    assert top5.flags() == "--min-agreement 0.9 --min-top5-agreement 0.95"
    assert top5.to_dict()["min_top5_agreement"] == 0.95
