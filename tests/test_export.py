"""ONNX export: parity per precision, typed graphs, dynamic batch, external data, the ORT backend."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
import torch
from conftest import installed_runtimes, smooth_clips, trained_like
from onnx import TensorProto
from stexport.trt_engines.onnx_support import tensor_types

from stexport.build.backbone import random_backbone
from stexport.runtime.backends import create
from stexport.runtime.device import int8_sums_saturate
from stexport.bundle.store import Bundle
from stexport.errors import StexportError
from stexport.build.export import export_onnx
from stexport.onnx_graph import external_files
from stexport.build.fold import fold
from stexport.build.reference import normalize


def reference_logits(ref, clips: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(normalize(torch.from_numpy(clips))).numpy()


def test_fp32_matches_reference_at_any_batch(onnx_variants):
    bundle, ref = onnx_variants["fp32"]
    with create("onnxruntime", bundle) as ort_backend:
        for b in (1, 3):
            clips = smooth_clips(b, 32, seed=b)
            assert np.abs(ort_backend.run(clips) - reference_logits(ref, clips)).max() <= 1e-4
    model = onnx.load(str(bundle.file("onnx")), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [8, 32, 32, 3]
    assert model.graph.input[0].name == "frames" and model.graph.output[0].name == "logits"


def test_float_input_variant_normalises_host_side(onnx_variants):
    bundle, ref = onnx_variants["fp32-float-input"]
    assert bundle.manifest.input.layout == "BTCHW"
    clips = smooth_clips(2, 32)
    with create("onnxruntime", bundle) as b:
        assert np.abs(b.run(clips) - reference_logits(ref, clips)).max() <= 1e-4


@pytest.mark.parametrize("variant", ["fp16", "fp16-gelu-3x3x3"])
def test_fp16_graph_is_strongly_typed_and_close(onnx_variants, variant):
    bundle, ref = onnx_variants[variant]
    model = onnx.load(str(bundle.file("onnx")))
    types = tensor_types(model)
    inits = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm", "Conv") and n.name != "head":
            assert {types[i] for i in n.input if i} == {TensorProto.FLOAT16}, n.name
        if n.op_type in ("LayerNormalization", "Softmax", "ReduceMean"):
            assert types[n.input[0]] == TensorProto.FLOAT, n.name
    assert any(model.graph.initializer[i].data_type == TensorProto.FLOAT16 for i in range(len(inits)))
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    clips = smooth_clips(4, 32)
    with create("onnxruntime", bundle) as b:
        got = b.run(clips)
        assert b.level == "extended"  # ORT's CPU provider crashes on FP16 ViTs at 'all'
    want = reference_logits(ref, clips)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("variant", ["int8", "int8-gelu-float-input", "int8-attention", "int8-fp16"])
def test_int8_close_to_reference(onnx_variants, variant):
    bundle, ref = onnx_variants[variant]
    cal = bundle.manifest.calibration.model_dump()
    assert cal["method"] == "minmax" and cal["clips"] == 6 and cal["quantized_layers"] > 0
    clips = smooth_clips(8, 32, seed=5)
    with create("onnxruntime", bundle) as b:
        got = b.run(clips)
    want = reference_logits(ref, clips)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.998  # measured 0.9982-0.9995 on these variants (ORT 1.32, torch 2.14.1)
    # No top-1 check here: these random tiny models' logits are near ties (top-2 margins down to 0.002 against
    # a mean |Δlogit| of 0.02 from INT8), so top-1 agreement on them is luck, not a gate. The product's INT8
    # gate (stexport.bundle.precision: ≥ 95% top-1 agreement, ≤ 1 pt accuracy drop with labels) is proven on
    # a model with real margins: tests/test_demo.py runs `stexport verify` on the demo's INT8 bundle.


def test_int8_with_fp16_float_parts_is_typed_so(onnx_variants):
    """INT8 GEMMs with FP16 around them (what TensorRT then runs the rest in): FP16 scales and dequantized
    tensors, FP16 float layers, LayerNorm/Softmax/temporal mean in FP32, opset 19 (FP16 Q/DQ); the same
    accuracy gate as the FP32-float INT8 bundle on ONNX Runtime and OpenVINO."""
    bundle, ref = onnx_variants["int8-fp16"]
    assert bundle.manifest.calibration.float_precision == "fp16" and bundle.manifest.float_precision == "fp16"
    assert onnx_variants["int8"][0].manifest.float_precision == "fp32"
    model = onnx.load(str(bundle.file("onnx")))
    assert [o.version for o in model.opset_import] == [19]
    types = tensor_types(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 20
    for n in qdq:
        assert types[n.input[1]] == TensorProto.FLOAT16, n.name  # scales
        float_side = n.input[0] if n.op_type == "QuantizeLinear" else n.output[0]
        assert types[float_side] == TensorProto.FLOAT16, n.name
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.name != "head":
            assert {types[i] for i in n.input if i} == {TensorProto.FLOAT16}, n.name
        if n.op_type in ("LayerNormalization", "Softmax", "ReduceMean"):
            assert types[n.input[0]] == TensorProto.FLOAT, n.name
    fp32_qdq = onnx.load(str(onnx_variants["int8"][0].file("onnx")))
    def count(m, op):
        return sum(n.op_type == op for n in m.graph.node)

    assert count(model, "QuantizeLinear") == count(fp32_qdq, "QuantizeLinear")  # the same layers quantized
    clips = smooth_clips(8, 32, seed=5)
    want = reference_logits(ref, clips)
    for name in installed_runtimes("onnxruntime", "openvino"):
        with create(name, bundle) as b:
            got = b.run(clips)
            if name == "onnxruntime":
                assert b.level == "extended"
            assert b.describe()["compute_precision"] in ("fp16", "fp32")
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        # top-1 on these near-tied tiny models is luck: see above. OpenVINO's INT8 sums saturate on a CPU
        # without VNNI (docs/guides/runtimes.md; auto does not pick it there): 0.9979 on this project's AVX2 EPYC
        saturates = name == "openvino" and int8_sums_saturate()
        assert cos.min() > (0.995 if saturates else 0.999), (name, cos.min())


def test_fp16_scales_never_round_below_or_to_zero():
    from stexport.calibration.qdq import scale_as

    s = np.array([1 / 127, 3e-9, 0.3e-4, 1000.0 / 127])
    got = scale_as(s, np.float16)
    assert got.dtype == np.float16 and (got.astype(np.float64) >= s).all() and (got > 0).all()
    assert np.allclose(got.astype(np.float64)[[0, 3]], s[[0, 3]], rtol=1e-3)
    assert scale_as(np.array(0.5), np.float32).dtype == np.float32


def test_int8_float_option_defaults_and_checks(tiny_adapter):
    from stexport.build.options import BuildOptions

    base = dict(adapter=tiny_adapter, backbone="stexport-tiny-vit", pretrained="none", calib=tiny_adapter)
    assert BuildOptions(precision="int8", **base).int8_float == "fp32"  # CPU runtimes
    assert BuildOptions(precision="int8", for_tensorrt=True, **base).int8_float == "fp16"  # --engine
    assert BuildOptions(precision="int8", int8_float="fp32", for_tensorrt=True, **base).int8_float == "fp32"
    with pytest.raises(StexportError, match="--int8-float fp8: .*choose one of fp32, fp16"):
        BuildOptions(precision="int8", int8_float="fp8", **base)
    with pytest.raises(StexportError, match="--int8-float fp16 needs --precision int8"):
        BuildOptions(precision="fp32", int8_float="fp16", adapter=tiny_adapter)


def test_external_data_round_trip(tmp_path):
    from stexport.build.deltas import Deltas, infer_spec
    from stexport.build.reference import build_reference
    from stexport.build.synthetic import random_deltas

    bb = trained_like(random_backbone("stexport-tiny-vit"))
    sd = random_deltas(bb.config, width=32)
    ref = build_reference(bb, Deltas(infer_spec(sd), sd))
    path = export_onnx(fold(ref), tmp_path / "model.onnx", frames=4, external_data=True)
    assert external_files(path) == ["model.onnx.data"]
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    import onnxruntime as ort

    clips = smooth_clips(2, 32, frames=4)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"frames": clips})[0]
    assert np.abs(got - reference_logits(ref, clips)).max() <= 1e-4


def test_ort_backend_options(tiny_bundle):
    with create("onnxruntime", tiny_bundle, threads=1, opt_level="basic") as b:
        d = b.describe()
        assert d["providers"][-1] == "CPUExecutionProvider"
        assert d["optimization"] == "basic" and d["threads"] == 1
        with pytest.raises(StexportError, match="shape"):
            b.run(np.zeros((1, 4, 32, 32, 3), np.uint8))
    with pytest.raises(StexportError, match="opt_level='max': choose one of disable, basic, extended, all"):
        create("onnxruntime", tiny_bundle, opt_level="max")
    from stexport.runtime.device import gpu_visible

    if not gpu_visible():
        with pytest.raises(StexportError, match="--device cuda"):
            create("onnxruntime", tiny_bundle, device="cuda")


def test_ort_backend_names_a_broken_model(tiny_bundle, tmp_path):
    import shutil

    shutil.copytree(tiny_bundle.path, tmp_path / "b")
    (tmp_path / "b" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(StexportError, match="model.onnx changed since the bundle was built"):
        create("onnxruntime", Bundle.load(tmp_path / "b"))
    b = Bundle.load(tmp_path / "b")
    b.check_hashes = False
    b.update()  # a bundle built (recorded) with a broken model
    with pytest.raises(StexportError, match="model.onnx: onnxruntime cannot load it"):
        create("onnxruntime", Bundle.load(tmp_path / "b"))
