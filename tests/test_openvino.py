"""OpenVINO backend: parity with the reference per precision, explicit precision, cache, telemetry off."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("openvino") is None:  # not importorskip: a plain `import openvino` phones home
    pytest.skip("OpenVINO is not installed", allow_module_level=True)

from stexport.runtime.backends import create, resolve
from stexport.runtime.backends.openvino import OpenVINOBackend, default_cache_dir, import_openvino
from stexport.bundle.store import Bundle
from stexport.errors import StexportError
from stexport.build.verify import GATES, compare, judge

FRAMES = 4
CLASSES = 10


def label_of(video) -> int:
    """The class of a `videos` fixture file, c<label>-<i>.mp4."""
    return int(video.name[1:].split("-")[0])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Generated videos of CLASSES classes (conftest.class_frames), one folder each: calib (1 per class, to
    calibrate INT8 on), train (2 per class, to fit the head on), test (2 per class: 20 videos, 60 views)."""
    from conftest import write_class_video

    root = tmp_path_factory.mktemp("ov-videos")
    for split, per_class, seed in (("calib", 1, 0), ("train", 2, 100), ("test", 2, 200)):
        (root / split).mkdir()
        for k in range(CLASSES):
            for i in range(per_class):
                write_class_video(root / split / f"c{k}-{i}.mp4", k, CLASSES, seed=seed + 10 * k + i,
                                  frames=20 + 3 * i, width=64 + 16 * i, height=48 + 8 * i)
    return root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, videos):
    """Tiny fp32 / fp16 / int8 bundles of one random model whose head is fitted on the train videos
    (conftest.separated_head: classes apart, as a trained model's are; int8 calibrated on the calib videos)."""
    from conftest import separated_head
    from stexport.build.backbone import random_backbone
    from stexport.build.deltas import infer_spec
    from stexport.build.pipeline import build_bundle, default_sampling
    from stexport.build.synthetic import random_deltas
    from stexport.runtime.video import Sampling, decode_clips

    root = tmp_path_factory.mktemp("ov")
    bb = random_backbone("stexport-tiny-vit")
    sd = random_deltas(bb.config, width=32, num_classes=CLASSES, pre_attn=True)
    sampling = Sampling(frames=FRAMES, size=bb.config.image_size, **default_sampling(infer_spec(sd)))
    train = sorted((videos / "train").glob("*.mp4"))
    views = [decode_clips(str(p), sampling) for p in train]
    labels = [label_of(p) for p, v in zip(train, views) for _ in v]
    sd = separated_head(bb, sd, np.concatenate(views), labels)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEXPORT_CALIB_CACHE", str(root / "calib-cache"))
        for p in ("fp32", "fp16", "int8"):
            out[p] = build_bundle(sd, backbone=bb, precision=p, frames=FRAMES, out=root / p,
                                  calib=videos / "calib" if p == "int8" else None, calib_clips=CLASSES)
    assert Sampling.from_manifest(out["fp32"].manifest) == sampling
    return out


@pytest.fixture(scope="module")
def clips(bundles, videos):
    """The test videos decoded as `infer` and `verify` decode them: (60 views, T, 32, 32, 3)."""
    from stexport.runtime.video import Sampling, decode_clips

    s = Sampling.from_manifest(bundles["fp32"].manifest)
    return np.concatenate([decode_clips(str(p), s) for p in sorted((videos / "test").glob("*.mp4"))])


@pytest.fixture(scope="module")
def reference(bundles, clips, videos):
    """The PyTorch reference's logits on `clips`; it classifies the held-out test videos right (the premise of
    the INT8 gate: classes apart, as a trained model's are)."""
    logits = create("torch", bundles["fp32"]).run(clips)
    labels = np.repeat([label_of(p) for p in sorted((videos / "test").glob("*.mp4"))], len(clips) // (2 * CLASSES))
    assert (logits.argmax(1) == labels).mean() >= 0.95
    return logits


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_parity_gate(bundles, clips, reference, precision):
    with OpenVINOBackend(bundles[precision]) as be:
        out = be.run(clips)
        d = be.describe()
    assert out.shape == reference.shape and out.dtype == np.float32
    m = compare(reference, out)
    checks = judge(precision, {**m, "accuracy": None}, GATES[precision])
    assert checks and all(c["passed"] for c in checks), (m, checks)
    # never BF16 unless asked for: every float GEMM runs in f32
    assert d["inference_precision"] == "f32"
    assert "bf16" not in d["gemm_precisions"] and d["gemm_precisions"].get("f32", 0) > 0
    if precision == "fp32":
        assert m["max_abs"] <= 1e-3
    if precision == "int8":
        assert d["gemm_precisions"].get("i8", 0) >= 8  # the Q/DQ linears run as integer GEMMs
        assert m["max_abs"] > 1e-6  # and they really are quantized


def test_bf16_only_when_asked(bundles, clips, reference):
    if "BF16" not in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(StexportError, match="cannot compute in BF16"):
            OpenVINOBackend(bundles["fp32"], compute="bf16")
        return
    with OpenVINOBackend(bundles["fp32"], compute="bf16") as be:
        out = be.run(clips)
        d = be.describe()
    assert d["inference_precision"] == "bf16" and "bf16" in d["gemm_precisions"]
    m = compare(reference, out)
    assert 1e-5 < m["max_abs"] < 0.1 and m["top1_agreement"] >= 0.9


def test_throughput_hint_splits_batch_over_streams(bundles, clips, reference):
    with OpenVINOBackend(bundles["fp32"], hint="throughput", threads=2) as be:
        out = be.run(clips[:5])
        d = be.describe()
    assert d["hint"] == "throughput"
    np.testing.assert_allclose(out, reference[:5], atol=1e-3)


def test_throughput_hint_closes_without_deadlock(bundles, tmp_path):
    """Closing a throughput-hint backend joins OpenVINO's stream threads; with Python callbacks on those
    threads this deadlocked within ~5-30 open/run/close cycles. A child process that reports each cycle, so
    a hang fails, not stalls: no limit on the whole run (a loaded host is slow), only a cycle that makes no
    progress for STALL_S (a cycle takes well under a second) counts as hung."""
    code = textwrap.dedent(f"""
        import numpy as np
        from stexport.bundle.store import Bundle
        from stexport.runtime.backends.openvino import OpenVINOBackend
        b = Bundle.load({str(bundles["fp32"].path)!r})
        x = np.zeros((5, {FRAMES}, b.size, b.size, 3), np.uint8)
        for i in range(40):
            with OpenVINOBackend(b, hint="throughput", threads=2, cache_dir={str(tmp_path)!r}) as be:
                be.run(x)
                be.run(x[:2])
            print("closed", i + 1, flush=True)
    """)
    import selectors

    STALL_S = 120
    errfile = tmp_path / "stderr.txt"  # a file, not a pipe nobody reads while the loop runs
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=errfile.open("w"), text=True)
    lines = []
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            while True:
                if not sel.select(timeout=STALL_S):
                    pytest.fail(f"a throughput-hint OpenVINOBackend hung on close after {len(lines)} cycles")
                line = p.stdout.readline()
                if not line:
                    break
                lines.append(line.strip())
        p.wait(timeout=STALL_S)
    finally:
        p.kill()
    assert p.returncode == 0 and lines and lines[-1] == "closed 40", errfile.read_text()[-2000:]


def test_cache_beside_bundle_and_fallback(bundles, tmp_path, monkeypatch):
    b = Bundle.load(bundles["fp32"].path)
    cache = default_cache_dir(b)
    assert cache.parent.parent == b.path.parent and cache.parent.name.startswith(".")
    x = np.zeros((7, FRAMES, b.size, b.size, 3), np.uint8)  # a batch size no other test runs
    before = set(cache.glob("*/*.blob"))
    with OpenVINOBackend(b) as be:
        d = be.describe()
        assert d["cache_dir"] == str(cache / "f32-latency-0t")
        assert d["batch_sizes"] == [] and d["gemm_precisions"] is None  # describing compiles nothing
        assert d["inference_precision"] == "f32"
        be.run(x)
    blobs = sorted(cache.glob("*/*.blob"))
    assert set(blobs) - before, "OpenVINO wrote no compiled-model blob"
    with OpenVINOBackend(b) as be:
        be.run(x)
    assert sorted(cache.glob("*/*.blob")) == blobs  # second start reused it
    assert not b.changed_files()  # the bundle itself is untouched

    # a rebuild (other weights, same size, maybe the same second) gets a new folder; the old one is dropped
    stale = cache.parent / "0123456789abcdef"
    (stale / "f32-latency-0t").mkdir(parents=True)
    (stale / "1.blob").write_bytes(b"old")
    (stale / "f32-latency-0t" / "2.blob").write_bytes(b"old")
    mine = cache.parent / "notes"  # not a cache folder: kept
    mine.mkdir()
    (mine / "a.txt").write_text("keep")
    files = b.manifest.model_dump(mode="json")["files"]
    changed = Bundle(path=b.path, manifest=b.manifest.with_(files={**files, "model.onnx": {
        **files["model.onnx"], "sha256": "0" * 64}}))
    assert default_cache_dir(changed) != cache and default_cache_dir(changed).parent == cache.parent
    with OpenVINOBackend(b):
        pass
    assert not stale.exists() and cache.is_dir() and (mine / "a.txt").exists()

    # bundle folder not writable: a per-bundle folder under $STEXPORT_HOME's cache
    monkeypatch.setenv("STEXPORT_HOME", str(tmp_path / "home"))
    import stexport.runtime.backends.openvino as ovb

    real = os.access
    monkeypatch.setattr(ovb.os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))
    fallback = default_cache_dir(b)
    assert str(fallback).startswith(str(tmp_path / "home"))
    with OpenVINOBackend(b) as be:
        assert be.describe()["cache_dir"] == str(fallback / "f32-latency-0t")
        be.run(x)
    assert list(fallback.glob("*/*.blob"))
    with OpenVINOBackend(b, cache=False) as be:
        assert be.describe()["cache_dir"] is None


def test_cache_keeps_compile_settings_apart(bundles, clips, reference, tmp_path):
    """OpenVINO names a cached blob by the model file alone, so an f32 blob was loaded for a bf16 request
    (wrong logits, sometimes NaN): each precision / hint / thread count gets its own folder."""
    b = bundles["fp32"]
    caps = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with OpenVINOBackend(b, compute="bf16" if "BF16" in caps else "f32", cache=False) as be:
        uncached = be.run(clips)
    dirs = set()
    for options in ({}, {"compute": "bf16"} if "BF16" in caps else {}, {"hint": "throughput"}, {"threads": 1}):
        with OpenVINOBackend(b, cache_dir=tmp_path, **options) as be:
            out = be.run(clips)
            dirs.add(be.describe()["cache_dir"])
        if options.get("compute") == "bf16":
            np.testing.assert_allclose(out, uncached, atol=1e-5)
        else:
            np.testing.assert_allclose(out, reference, atol=1e-3)
    assert len(dirs) == (4 if "BF16" in caps else 3)
    assert all(list(Path(d).glob("*.blob")) for d in dirs)


def test_static_batch_sizes(bundles, clips, reference):
    """The first KEEP batch sizes run on models compiled for them, others on one dynamic-batch model."""
    from stexport.runtime.backends.openvino import KEEP

    sizes = [1, 3, len(clips), 2, 1]
    with OpenVINOBackend(bundles["int8"], cache=False) as be, \
            OpenVINOBackend(bundles["int8"], cache=False, static=False) as dyn:
        for n in sizes:
            out, ref = be.run(clips[:n]), dyn.run(clips[:n])
            assert out.shape == (n, reference.shape[1])
            # The same integer GEMMs, but the static model fuses each activation quantization into the float op
            # before it, which rounds differently in the last bit: a value on a rounding boundary can land one
            # INT8 step away. Measured on this fixture (60 views): batches of 1-3 are identical; at batch 60, 9
            # views differ, by at most 1.4e-2 (up to 1.8x that view's own INT8 error, which ranges 0.007-0.063;
            # 0.22x the batch's largest). So: under half of what quantization itself moves the batch, no
            # prediction changed, never the float-level 1e-4.
            quantization = np.abs(ref - reference[:n]).max()
            assert np.abs(out - ref).max() <= 0.5 * quantization, (out - ref, quantization)
            assert (out.argmax(1) == ref.argmax(1)).all()
        assert be.describe()["batch_sizes"] == [*sorted(sizes[:KEEP]), "any"]
        assert dyn.describe()["batch_sizes"] == ["any"]
        # no activation quantization left as a layer of its own (under a dynamic batch some are)
        ops = be.compiled_for(3)[0].get_runtime_model().get_ops()
        assert not [op for op in ops if op.get_rt_info()["layerType"].astype(str) == "FakeQuantize"]
    with OpenVINOBackend(bundles["fp32"], cache=False, hint="throughput") as be:
        assert be.describe()["batch_sizes"] == ["any"]
    with OpenVINOBackend(bundles["fp32"], cache=False) as be, \
            OpenVINOBackend(bundles["fp32"], cache=False, static=False) as dyn:  # no quantization: float-level
        np.testing.assert_allclose(be.run(clips[:3]), dyn.run(clips[:3]), atol=1e-5)


def test_bad_options(bundles):
    with pytest.raises(StexportError, match="compute precision 'int4'"):
        OpenVINOBackend(bundles["fp32"], compute="int4")
    with pytest.raises(StexportError, match="hint 'fast'"):
        OpenVINOBackend(bundles["fp32"], hint="fast")
    with pytest.raises(StexportError, match="--device npu9: OpenVINO here offers only CPU"):
        OpenVINOBackend(bundles["fp32"], device="npu9")
    with pytest.raises(StexportError, match=r"shape \(B, 4, 32, 32, 3\)"):
        OpenVINOBackend(bundles["fp32"]).run(np.zeros((1, 3, 32, 32, 3), np.uint8))


def test_auto_prefers_openvino_on_x86_and_usable_imports_nothing(bundles, tmp_path):
    import platform

    from stexport.runtime.device import int8_sums_saturate

    if platform.machine().lower() in ("x86_64", "amd64"):
        assert resolve("auto", bundles["fp32"]) in ("tensorrt", "openvino")
        # an INT8 bundle on a CPU without VNNI goes to the runtime whose INT8 sums do not saturate
        want = "onnxruntime" if int8_sums_saturate() else "openvino"
        assert resolve("auto", bundles["int8"]) in ("tensorrt", want)
    code = textwrap.dedent(f"""
        import sys
        from stexport.bundle.store import Bundle
        from stexport.runtime.backends.openvino import OpenVINOBackend
        print(OpenVINOBackend.usable(Bundle.load({str(bundles['fp32'].path)!r})), 'openvino' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = out.stdout.split()
    assert out[1] == "False"


def test_telemetry_stays_off(bundles, tmp_path):
    """Running a model through the backend writes no telemetry consent/client-id files and leaves OpenVINO's
    converter bound to its no-op telemetry stub."""
    home = tmp_path / "home"
    home.mkdir()
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from stexport.bundle.store import Bundle
        from stexport.runtime.backends.openvino import OpenVINOBackend
        be = OpenVINOBackend(Bundle.load({str(bundles['fp32'].path)!r}), cache=False)
        be.run(np.zeros((1, {FRAMES}, 32, 32, 3), np.uint8))
        import openvino.tools.ovc.telemetry_utils as t
        print(json.dumps({{"stub": t.tm.__name__}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1])["stub"].endswith("telemetry_stub")
    assert not (home / "intel").exists()


def test_verify_int8_through_openvino(bundles, videos):
    """The `verify` pipeline (decode → backend vs reference → INT8 gate) with --backend openvino."""
    from stexport.build.verify import verify

    report = verify(bundles["int8"], videos / "test", backend="openvino")
    assert report["backend"]["backend"] == "openvino" and "i8" in report["backend"]["gemm_precisions"]
    assert report["videos"] == 2 * CLASSES and report["metrics"]["views"] == 6 * CLASSES
    assert report["passed"], report["checks"]


def test_unreadable_model_is_one_line_error(bundles, tmp_path):
    import shutil

    from stexport.runtime.backends.openvino import reason

    broken = tmp_path / "broken"
    shutil.copytree(bundles["fp32"].path, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(StexportError, match=r"model.onnx changed since the bundle was built"):
        OpenVINOBackend(Bundle.load(broken), cache=False)
    b = Bundle.load(broken)
    b.check_hashes = False
    b.update()  # a bundle built (recorded) with a broken model
    with pytest.raises(StexportError, match=r"broken/model.onnx: OpenVINO cannot compile it \(.+\); rebuild"):
        OpenVINOBackend(Bundle.load(broken), cache=False)
    e = RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\nException from x.cpp:54:\n"
                     "[ReshapeTransformation] shapes differ\n")
    assert reason(e) == "[ReshapeTransformation] shapes differ"


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_int8_graph_fuses_its_quantizations(onnx_variants, precision):
    """The INT8 graph's shape lets OpenVINO fuse what would otherwise be extra passes over the activations:
    no LayerNorm output, adapter conv output or attention output is quantized by a FakeQuantize of its own."""
    bundle, _ = onnx_variants["int8-attention"]
    if precision == "bf16" and "BF16" not in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no BF16 (OpenVINO's OPTIMIZATION_CAPABILITIES)")
    be = OpenVINOBackend(bundle, precision=precision, cache=False)  # any other refusal is a failure
    ops = list(be.compiled_for(1)[0].get_runtime_model().get_ops())

    def kind(op):
        return op.get_rt_info()["layerType"].astype(str)

    def fused(op):
        return op.get_rt_info()["originalLayersNames"].astype(str)

    layers = bundle.manifest.model.backbone.config.layers
    assert sum(kind(op) == "MVN" for op in ops) >= 2 * layers
    for op in ops:
        if kind(op) == "FakeQuantize":
            src = op.input(0).get_source_output().get_node()
            while kind(src) == "Reorder":
                src = src.input(0).get_source_output().get_node()
            assert kind(src) != "MVN", f"{fused(op)} after {fused(src)}"
            assert kind(src) != "Reshape", f"{fused(op)} after {fused(src)}"
    standalone = [fused(op) for op in ops if kind(op) == "FakeQuantize"]
    assert len(standalone) <= layers, standalone  # the adapter input, after a residual add also read in float


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *map(str, args)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_benchmark_scripts_read_an_int8_bundle(onnx_variants):
    """benchmarks/openvino_profile.py attributes every integer GEMM to its role; roofline.py and
    openvino_static.py give their ratios."""
    bundle, _ = onnx_variants["int8"]
    layers = bundle.manifest.model.backbone.config.layers
    spec = bundle.manifest.spec.to_dict()
    adapters = len(spec["pre_attn"]) + len(spec["pre_mlp"])
    out = _script("openvino_profile.py", bundle.path, "--batch", 1, "--iters", 1)
    roles = {m[1].rstrip("*"): int(m[2]) for m in re.finditer(r"^  (\S.*?)\s+(\d+) layers ", out, re.MULTILINE)}
    assert roles == {"q, k, v": 3 * layers, "mlp fc (+GELU)": layers, "mlp proj": layers, "adapter fc1": adapters,
                     "adapter fc2": adapters, "attention out": layers}, out
    out = _script("roofline.py", bundle.path, "--rounds", 1, "--calls", 1, "--batch", 1)
    assert "% of the INT8 GEMM peak" in out.splitlines()[-1]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "roofline.py"),
                        str(onnx_variants["fp32"][0].path)], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode != 0 and "needs an int8 one" in r.stderr
    out = _script("openvino_static.py", bundle.path, "--batch", 2, "--pairs", 2)
    ratio, delta = re.search(r"per pair: median ([\d.]+) .*max \|Δlogit\| (\S+)$", out).groups()
    assert float(ratio) > 0 and float(delta) < 0.5, out


def saturating_matmul():
    """A one-GEMM QDQ model (x int8 per tensor, W int8 ±127, K=64) whose u8×s8 pairs overflow 16 bits (2 × 255
    × 127 > 32767), the input, and its exact answer: int8 products summed in int32."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    k, n = 64, 8
    w = np.full((k, n), 127, np.int8)
    w[:, 1::2] = -127
    g = h.make_graph([h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                      h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                      h.make_node("DequantizeLinear", ["w", "ws", "z"], ["wd"]),
                      h.make_node("MatMul", ["xd", "wd"], ["y"])], "saturating",
                     [h.make_tensor_value_info("x", T.FLOAT, [None, k])],
                     [h.make_tensor_value_info("y", T.FLOAT, [None, n])],
                     [nh.from_array(np.array(0.01, np.float32), "s"),
                      nh.from_array(np.array(0, np.int8), "z"),
                      nh.from_array(w, "w"), nh.from_array(np.array(1.0, np.float32), "ws")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    x = np.full((2, k), 1.27, np.float32)
    x[1, ::2] = -1.27
    exact = (np.round(x / 0.01) * 0.01) @ w.astype(np.float32)  # ±10322.56 per output
    return model, x, exact


def test_int8_gemms_are_exact_on_every_cpu(tmp_path, caplog):
    """ONNX Runtime's INT8 GEMMs as stexport runs them (session_options: session.x64quantprecision) give the
    int32 sum on every CPU. On an x86-64 CPU without VNNI the fast U8S8 kernel (int8_gemms=fast) and
    OpenVINO's CPU plugin saturate 16-bit pair sums: this project's AVX2 machine gave 81.6 for 10322.56; so
    `auto` runs INT8 bundles there with onnxruntime, and choosing OpenVINO warns."""
    import onnxruntime as ort

    from stexport.runtime.backends.ort import session_options
    from stexport.runtime.device import int8_sums_saturate

    model, x, exact = saturating_matmul()
    run = {g: ort.InferenceSession(model.SerializeToString(), session_options("all", None, g),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for g in ("exact", "fast")}
    np.testing.assert_allclose(run["exact"], exact, rtol=1e-6, atol=1e-2)
    core = import_openvino().Core()
    ov_out = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU")({"x": x})
    ov_y = next(iter(ov_out.values()))
    if int8_sums_saturate():
        assert np.abs(run["fast"] - exact).max() > 1000 and np.abs(ov_y - exact).max() > 1000
    else:  # VNNI (or ARM): every kernel is exact
        np.testing.assert_allclose(run["fast"], exact, rtol=1e-6, atol=1e-2)
    with pytest.raises(StexportError, match="int8_gemms=nearly: choose one of exact, fast"):
        session_options("all", None, "nearly")


def test_cpus_without_vnni_are_told_apart(tmp_path, monkeypatch, bundles, caplog):
    """int8_sums_saturate reads the CPU's flags: AVX2 alone saturates, VNNI (AVX-512 or AVX) or AMX does not,
    an unreadable file says nothing. On a saturating CPU `auto` passes OpenVINO over for INT8 bundles only (-v
    says why), and choosing it warns once."""
    import logging
    import platform

    from stexport.runtime import device
    from stexport.runtime.backends import openvino as ov_backend

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("reads x86-64 CPU flags")
    for flags, want in (("fpu sse4_1 avx avx2 fma", True), ("avx2 avx512f avx512_vnni", False),
                        ("avx2 avx_vnni", False), ("avx2 avx512f amx_int8", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        device.int8_sums_saturate.cache_clear()
        assert device.int8_sums_saturate(str(tmp_path / "cpuinfo")) is want, flags
    device.int8_sums_saturate.cache_clear()
    assert device.int8_sums_saturate(str(tmp_path / "missing")) is False
    device.int8_sums_saturate.cache_clear()
    for saturates in (True, False):
        monkeypatch.setattr(device, "int8_sums_saturate", lambda: saturates)
        ov_backend._said.clear()
        with caplog.at_level(logging.INFO, logger="stexport"):
            caplog.clear()
            want = "onnxruntime" if saturates else "openvino"
            assert resolve("auto", bundles["int8"], skip=("tensorrt",)) == want
            assert resolve("auto", bundles["fp32"], skip=("tensorrt",)) == "openvino"
            said = [r.getMessage() for r in caplog.records if "not using OpenVINO" in r.getMessage()]
            assert len(said) == int(saturates) and all("no VNNI" in m and "onnxruntime" in m for m in said)
            caplog.clear()
            OpenVINOBackend(bundles["int8"]).close()
            OpenVINOBackend(bundles["int8"]).close()  # said once
            warned = [r for r in caplog.records
                      if r.levelno == logging.WARNING and "saturating" in r.getMessage()]
            assert len(warned) == int(saturates), [r.getMessage() for r in caplog.records]
