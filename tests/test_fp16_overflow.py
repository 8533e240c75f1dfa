"""FP16 builds whose activations leave FP16's range: the overflowing nodes stay FP32 inside the FP16 graph
(stexport.build.fp16_check.keep_fp32), on an exact stand-in (stexport.build.outliers.plant_fp16_overflow);
`--fp16-overflow refuse` keeps the old refusal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import smooth_clips, trained_like, write_video
from stexport.cli.app import app
from stexport.trt_engines.onnx_support import check_tensorrt_ops, operator_matrix
from typer.testing import CliRunner

from stexport.build.backbone import random_backbone
from stexport.build.deltas import Deltas, infer_spec, save_official
from stexport.build.export import export_onnx
from stexport.build.fold import fold
from stexport.build.outliers import plant_fp16_overflow
from stexport.build.pipeline import build_bundle
from stexport.build.reference import build_reference, normalize
from stexport.build.synthetic import random_deltas
from stexport.build.verify import verify
from stexport.errors import StexportError

TINY = "stexport-tiny-vit"


@pytest.fixture(scope="module")
def stand_in():
    bb = trained_like(random_backbone(TINY))
    sd = random_deltas(bb.config, width=32, num_classes=10)
    return bb, plant_fp16_overflow(bb), sd


@pytest.fixture(scope="module")
def clip_list(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16_videos")
    names = [write_video(d / f"v{i}.mp4", frames=24 + 4 * i, width=64, height=48).name for i in range(4)]
    (d / "list.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    return d / "list.txt"


def test_stand_in_keeps_the_fp32_function_and_overflows_fp16(stand_in):
    bb, planted, sd = stand_in
    x = normalize(torch.from_numpy(smooth_clips(3, 32)))
    with torch.no_grad():
        ref = build_reference(bb, Deltas(infer_spec(sd), sd))
        out = build_reference(planted, Deltas(infer_spec(sd), sd))
        np.testing.assert_allclose(out(x).numpy(), ref(x).numpy(), rtol=0, atol=1e-5)
        peak = []
        out.transformer.resblocks[0].ln_2.register_forward_hook(lambda m, i, o: peak.append(float(o.abs().max())))
        out(x)
    assert peak[0] > 65504 * 2  # the LayerNorm's output FP16 cannot hold


def test_fp16_build_keeps_overflowing_nodes_in_fp32_and_passes_the_gate(stand_in, clip_list, tmp_path):
    _, planted, sd = stand_in
    b = build_bundle(sd, backbone=planted, precision="fp16", out=tmp_path / "b")
    c = b.manifest.fp16_check
    assert c.overflow == "fp32" and c.passed and c.max_abs_activation > 65504
    nodes = {r["node"]: r for r in c.fp32_nodes}
    # the LayerNorm's cast to FP16 (now to FP32) overflows; the MLP's first GEMM reads it and computes in FP32
    assert any(r["op"] == "Cast" and "beyond FP16" in r["why"] for r in c.fp32_nodes)
    assert nodes["blocks.0.fc"]["op"] in ("MatMul", "Gemm") and "reads" in nodes["blocks.0.fc"]["why"]
    assert all(r["max_abs_activation"] > 65504 for r in c.fp32_nodes)
    assert [r["layer"] for r in c.overflow_layers] == ["block 0 ln_2"]
    assert not any(n.startswith("blocks.1.") for n in nodes)  # only what overflows, not the rest of the model
    model = onnx.load(str(b.file("onnx")))
    assert check_tensorrt_ops(model, operator_matrix()) == []
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    fc = next(n for n in model.graph.node if n.name == "blocks.0.fc")
    assert types[fc.output[0]] == onnx.TensorProto.FLOAT  # FP32 in the graph itself: strongly typed
    q = next(n for n in model.graph.node if n.name == "blocks.1.fc")
    assert types[q.output[0]] == onnx.TensorProto.FLOAT16  # the rest stays FP16
    report = verify(b, clip_list, backend="onnxruntime", use_cache=False)
    assert report["passed"], report["checks"]
    # ONNX Runtime's CPU provider computes FP16 nodes in FP32 and hides overflows; onnx's reference evaluator
    # computes FP16 as FP16 (numpy): the graph without the FP32 nodes gives NaN there, the bundle's does not
    from onnx.reference import ReferenceEvaluator

    x = smooth_clips(1, 32, seed=2)
    ref = reference_logits(planted, sd, x)
    strict = ReferenceEvaluator(model).run(None, {"frames": x})[0]
    np.testing.assert_allclose(strict, ref, rtol=0, atol=0.05)
    plain = tmp_path / "plain.onnx"
    export_onnx(fold(build_reference(planted, Deltas(infer_spec(sd), sd)), "uint8", torch.float16), plain, 8)
    assert not np.isfinite(ReferenceEvaluator(str(plain)).run(None, {"frames": x})[0]).all()


def reference_logits(bb, sd, x):
    with torch.no_grad():
        return build_reference(bb, Deltas(infer_spec(sd), sd))(normalize(torch.from_numpy(x))).numpy()


def test_fp16_overflow_refuse_is_the_old_one_line_error(stand_in, tmp_path):
    _, planted, sd = stand_in
    want = r"^--precision fp16 refused: activations leave FP16's range \(±65,504\): block 0 ln_2 reaches [0-9,]+, so"
    with pytest.raises(StexportError, match=want) as e:
        build_bundle(sd, backbone=planted, precision="fp16", fp16_overflow="refuse", out=tmp_path / "r")
    assert "The backbone's values (typical of weights trained in BF16) do not fit FP16; build with " \
           "--fp16-overflow fp32 (keeps" in str(e.value)
    assert not (tmp_path / "r").exists()
    weights = tmp_path / "planted.pt"
    torch.save(planted.state_dict, weights)
    save_official(tmp_path / "a.pt", sd)
    r = CliRunner().invoke(app, ["build", "--adapter", str(tmp_path / "a.pt"), "--backbone", TINY, "--pretrained",
                                 str(weights), "--precision", "fp16", "--fp16-overflow", "refuse",
                                 "--out", str(tmp_path / "c")])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and lines[-1].startswith("stexport: error: --precision fp16 refused: "), r.output
    assert not (tmp_path / "c").exists()
    r = CliRunner().invoke(app, ["build", "--adapter", str(tmp_path / "a.pt"), "--backbone", TINY, "--pretrained",
                                 str(weights), "--precision", "fp16", "--out", str(tmp_path / "d")])
    assert r.exit_code == 0 and "nodes kept in FP32 inside the FP16 graph" in r.output, r.output
    r = CliRunner().invoke(app, ["build", "--adapter", str(tmp_path / "a.pt"), "--backbone", TINY, "--pretrained",
                                 "none", "--precision", "fp32", "--fp16-overflow", "refuse",
                                 "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "--fp16-overflow refuse needs --precision fp16" in r.output


def test_fp16_layer_report_ranks_the_planted_layer_and_leaves_the_fp32_nodes_out(stand_in, clip_list, tmp_path):
    """`verify --layers` on an FP16 bundle: each FP16 GEMM alone in FP16 (the rest FP32 with FP32 weights)
    against the reference. Planted: block 1's ln_2 ×2^14 in 16 channels, so blocks.1.fc's input columns ÷2^14
    are FP16 subnormals (few significant bits) while the FP32 function stays the same; block 0 overflows FP16."""
    import json

    from stexport.build.fp16_check import fp16_layers
    from stexport.build.outliers import plant_norm_outliers

    _, planted, sd = stand_in
    both = plant_norm_outliers(planted, 2.0 ** 14, 16, norms=("ln_2",), blocks=(1,))
    torch.save(both.state_dict, tmp_path / "w.pt")
    save_official(tmp_path / "a.pt", sd)
    cli = CliRunner()
    r = cli.invoke(app, ["build", "--adapter", str(tmp_path / "a.pt"), "--backbone", TINY, "--pretrained",
                         str(tmp_path / "w.pt"), "--precision", "fp16", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    r = cli.invoke(app, ["verify", str(tmp_path / "b"), "--clips", str(clip_list), "--layers", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    ranked = [row["layer"] for row in report["layers"]]
    kept = [x["node"] for x in report["fp32_nodes"]]
    graph = onnx.load(str(tmp_path / "b" / "model.onnx"))
    assert report["precision"] == "fp16" and sorted(ranked) == sorted(fp16_layers(graph))
    assert "blocks.0.fc" in kept and not set(kept) & set(ranked)  # the build's FP32 nodes are not ranked
    alone = [row["mean_abs_alone"] for row in report["layers"]]
    assert alone == sorted(alone, reverse=True)
    assert ranked[0] == "blocks.1.fc" and alone[0] > 2 * alone[1], report["layers"][:3]
    # every other node in FP32 with its FP32 weights: the least sensitive layers add next to nothing
    assert alone[-1] < alone[0] / 20 and report["base"]["mean_abs"] > alone[0], (alone, report["base"])
    r = cli.invoke(app, ["verify", str(tmp_path / "b"), "--clips", str(clip_list), "--layers", "--top", "3"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "whole FP16 graph" in r.output and "blocks.1.fc" in lines[5], r.output
    assert f"({len(ranked) - 3} less sensitive layers not shown)" in r.output
    assert any(ln.startswith("kept in FP32") and "blocks.0.fc" in ln for ln in lines), r.output


def test_an_overflow_in_the_adapters_is_not_blamed_on_the_backbone(stand_in, tmp_path):
    """The refusal says where the values are: a delta whose adapter output leaves FP16's range (a plain backbone)
    names the adapters or head, not 'weights trained in BF16'."""
    bb, _, sd = stand_in
    big = {k: v.clone() for k, v in sd.items()}
    fc2 = sorted(k for k in big if k.endswith("fc2.weight"))
    big[fc2[0]][0, :] = 30000.0  # channel 0 of the first adapter's output passes 65,504 (weights still fit)
    with pytest.raises(StexportError) as e:
        build_bundle(big, backbone=bb, precision="fp16", fp16_overflow="refuse", out=tmp_path / "r")
    msg = str(e.value)
    assert "The adapters' or head's values do not fit FP16" in msg and "BF16" not in msg, msg
    assert not (tmp_path / "r").exists()
