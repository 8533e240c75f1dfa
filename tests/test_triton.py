"""`stexport export-triton` (issue 21): Triton model repositories whose config.pbtxt parses with Triton's own
ModelConfig schema and matches the ONNX graph, external data copied, atomic writes, one-line refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import write_video
from typer.testing import CliRunner

from stexport.bundle.store import Bundle
from stexport.cli.app import app
from stexport.build.triton import default_name

pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as pb  # noqa: E402

runner = CliRunner()
ONNX_TO_TRITON = {onnx.TensorProto.UINT8: pb.TYPE_UINT8, onnx.TensorProto.FLOAT: pb.TYPE_FP32}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def parse_config(path: Path):
    """config.pbtxt through Triton's schema: text_format.Parse raises on unknown fields and bad enum values."""
    return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".triton-" in p.name or ".old" in p.name]


@pytest.fixture(scope="module")
def float_external_bundle(tmp_path_factory, tiny_adapter):
    """A tiny bundle with float (B, T, 3, H, W) input whose ONNX keeps its weights in model.onnx.data."""
    from stexport.build.pipeline import build_bundle

    out = tmp_path_factory.mktemp("triton_float") / "tiny-float-ext"
    return build_bundle(tiny_adapter, backbone="stexport-tiny-vit", pretrained="none", precision="fp32",
                        frames=8, out=out, input_format="float", external_data=True)


@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory, tiny_bundle):
    """A copy of tiny_bundle with an engine in its cache, recorded as `stexport engine` records it. TensorRT
    cannot run here: the plan's bytes are a stand-in, which is all an export copies."""
    from stexport.fileutil import sha256_file
    from stexport.trt_engines.record import Host, make_record, profile_for

    root = tmp_path_factory.mktemp("triton_trt") / "tiny-trt"
    shutil.copytree(tiny_bundle.path, root)
    b = Bundle.load(root)
    host = Host(tensorrt="10.16.1.11", gpu="NVIDIA H100 80GB HBM3", capability="9.0")
    onnx_id = {"sha256": sha256_file(b.file("onnx"))}
    rec = make_record(host, onnx_id, profile_for(b.manifest.input, 12), "fp32", workspace_gb=None, opt_level=3,
                      seconds=1.0, size=4096)
    (root / rec["file"]).parent.mkdir(parents=True, exist_ok=True)
    (root / rec["file"]).write_bytes(os.urandom(4096))
    b.update(engines=[rec], written=[rec["file"]])
    return b


def check_against_onnx(cfg, onnx_path: Path) -> None:
    """Names, types and dims of the config's input and output are the ONNX graph's, less the batch axis."""
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    for entry, vi in ((cfg.input[0], g.input[0]), (cfg.output[0], g.output[0])):
        t = vi.type.tensor_type
        assert entry.name == vi.name
        assert entry.data_type == ONNX_TO_TRITON[t.elem_type]
        dims = t.shape.dim
        assert dims[0].dim_param and not dims[0].HasField("dim_value"), "batch axis must be dynamic"
        assert list(entry.dims) == [d.dim_value for d in dims[1:]]
    assert len(cfg.input) == len(g.input) == 1 and len(cfg.output) == len(g.output) == 1


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_onnx_repository_config_parses_and_matches_the_graph(tiny_bundle, tmp_path, backend):
    repo = tmp_path / "repo"
    r = cli("export-triton", tiny_bundle.path, "--repo", repo, "-b", backend, "--threads", 2, "--name", "clf")
    assert r.exit_code == 0, r.output
    cfg = parse_config(repo / "clf" / "config.pbtxt")
    check_against_onnx(cfg, repo / "clf" / "1" / "model.onnx")
    assert (repo / "clf" / "1" / "model.onnx").read_bytes() == tiny_bundle.file("onnx").read_bytes()
    assert cfg.name == "clf" and cfg.backend == backend
    assert cfg.platform == ("onnxruntime_onnx" if backend == "onnxruntime" else "")
    assert cfg.default_model_filename == "model.onnx"
    views = tiny_bundle.manifest.sampling.temporal_views * tiny_bundle.manifest.sampling.spatial_views
    assert cfg.max_batch_size == 32 and cfg.dynamic_batching.preferred_batch_size[0] == views
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    threads = {"onnxruntime": "intra_op_thread_count", "openvino": "INFERENCE_NUM_THREADS"}[backend]
    assert cfg.parameters[threads].string_value == "2"
    labels = (repo / "clf" / cfg.output[0].label_filename).read_text().split()
    assert labels == tiny_bundle.labels and len(labels) == cfg.output[0].dims[0]
    assert not leftovers(tmp_path)


def test_tensorrt_repository_takes_the_engine_and_its_profile(engine_bundle, tmp_path):
    repo = tmp_path / "repo"
    r = cli("export-triton", engine_bundle.path, "--repo", repo, "-b", "tensorrt")
    assert r.exit_code == 0, r.output
    name = default_name(engine_bundle)
    cfg = parse_config(repo / name / "config.pbtxt")
    check_against_onnx(cfg, engine_bundle.file("onnx"))
    rec = engine_bundle.manifest.engines[0]
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert cfg.max_batch_size == rec.profile.max[0] == 12
    assert list(cfg.dynamic_batching.preferred_batch_size) == [3, 6, 12]
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert (repo / name / "1" / "model.plan").read_bytes() == (engine_bundle.path / rec.file).read_bytes()
    assert rec.gpu in (repo / "README.md").read_text()

    r = cli("export-triton", engine_bundle.path, "--repo", tmp_path / "r2", "-b", "tensorrt", "--max-batch", 64)
    assert r.exit_code == 2 and "at most 12" in r.output and "stexport engine" in r.output
    r = cli("export-triton", engine_bundle.path, "--repo", tmp_path / "r3", "-b", "tensorrt", "--device", "cpu")
    assert r.exit_code == 2 and "GPUs only" in r.output
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists() and not leftovers(tmp_path)


def test_tensorrt_without_an_engine_is_one_line_and_writes_nothing(tiny_bundle, tmp_path):
    r = cli("export-triton", tiny_bundle.path, "--repo", tmp_path / "repo", "-b", "tensorrt")
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "no TensorRT engine" in r.output and "stexport engine" in r.output
    assert list(tmp_path.iterdir()) == []


def test_external_data_is_copied_and_the_repository_model_runs(float_external_bundle, tmp_path):
    """Float-input graph with external data: config dims (T, 3, H, W) FP32; model.onnx.data beside the model;
    the repository's model, fed as the README says, gives the bundle's logits."""
    import onnxruntime as ort

    from stexport.runtime import backends
    from stexport.runtime.video import Sampling, decode

    b = float_external_bundle
    assert "onnx_data" in b.manifest.artifacts
    repo = tmp_path / "repo"
    r = cli("export-triton", b.path, "--repo", repo, "--name", "m")
    assert r.exit_code == 0, r.output
    cfg = parse_config(repo / "m" / "config.pbtxt")
    check_against_onnx(cfg, repo / "m" / "1" / "model.onnx")
    assert cfg.input[0].data_type == pb.TYPE_FP32 and list(cfg.input[0].dims) == [8, 3, 32, 32]
    data = Path(b.manifest.artifacts["onnx_data"]).name
    assert (repo / "m" / "1" / data).read_bytes() == (b.path / b.manifest.artifacts["onnx_data"]).read_bytes()
    onnx.load(str(repo / "m" / "1" / "model.onnx"))  # resolves the external data from the repository

    video = write_video(tmp_path / "v.mp4", frames=30, width=64, height=48)
    clips = decode(video, Sampling.from_manifest(b.manifest)).clips
    sess = ort.InferenceSession(str(repo / "m" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run([cfg.output[0].name], {cfg.input[0].name: b.manifest.input.feed(clips)})[0]
    be = backends.create("onnxruntime", b)
    try:
        want = be.run(clips)
    finally:
        be.close()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    readme = (repo / "README.md").read_text()
    assert "float32" in readme and str(list(b.manifest.input.mean)) in readme and "dump-clip" in readme


def test_readme_states_the_manifest_sampling(tiny_bundle, tmp_path):
    cli("export-triton", tiny_bundle.path, "--repo", tmp_path / "repo")
    s = tiny_bundle.manifest.sampling
    text = (tmp_path / "repo" / "README.md").read_text()
    assert f"rate {s.rate}" in text and f"Temporal views ({s.temporal_views})" in text
    assert f"Spatial views ({s.spatial_views})" in text and "stexport dump-clip" in text


def test_fp16_graph_on_cpu_uses_the_extended_optimisation_level(tiny_bundle):
    from stexport.build.triton import TritonOptions, build_config

    half = Bundle(tiny_bundle.path, tiny_bundle.manifest.with_(precision="fp16"))
    assert build_config(half, TritonOptions()).optimization.graph.level == 1
    assert not build_config(tiny_bundle, TritonOptions()).HasField("optimization")


def test_existing_repository_needs_force_and_only_ours_is_replaced(tiny_bundle, tmp_path):
    repo = tmp_path / "repo"
    assert cli("export-triton", tiny_bundle.path, "--repo", repo).exit_code == 0
    first = (repo / "stexport-triton.json").stat().st_ino
    r = cli("export-triton", tiny_bundle.path, "--repo", repo)
    assert r.exit_code == 2 and "already exists; pass --force" in r.output and r.output.count("\n") == 1
    assert (repo / "stexport-triton.json").stat().st_ino == first
    r = cli("export-triton", tiny_bundle.path, "--repo", repo, "--force", "--name", "again")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "again", "stexport-triton.json"]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    r = cli("export-triton", tiny_bundle.path, "--repo", other, "--force")
    assert r.exit_code == 2 and "not a repository written by" in r.output
    assert (other / "precious.txt").read_text() == "keep"
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--max-batch", 2], "use at least 3"),
    (["-b", "tensorflow"], "Triton serves stexport bundles with"),
    (["--name", "../x"], "--name"),
    (["--device", "tpu"], "choose cpu or gpu"),
    (["-b", "openvino", "--device", "gpu"], "CPUs only"),
])
def test_bad_options_are_one_line_and_write_nothing(tiny_bundle, tmp_path, args, message):
    r = cli("export-triton", tiny_bundle.path, "--repo", tmp_path / "repo", *args)
    assert r.exit_code == 2 and message in r.output and r.output.startswith("stexport: error:")
    assert list(tmp_path.iterdir()) == []


def test_missing_tritonclient_names_the_pip_install(tiny_bundle, tmp_path):
    code = ("import sys; sys.modules['tritonclient'] = None; sys.argv = ['stexport', 'export-triton', "
            f"{str(tiny_bundle.path)!r}, '--repo', {str(tmp_path / 'repo')!r}]; "
            "from stexport.cli.app import main; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "stexport: error: export-triton needs tritonclient, which this installation lacks; install it with: "
        "pip install 'stexport[triton]'"]
    assert not (tmp_path / "repo").exists()


def test_a_misspelt_field_fails_the_schema_check():
    """The check the tests above rely on: Triton's schema refuses what Triton would refuse."""
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "m"\nmax_batch_sise: 4\n', pb.ModelConfig())
    with pytest.raises(text_format.ParseError):
        text_format.Parse('instance_group { kind: KIND_TPU }\n', pb.ModelConfig())

