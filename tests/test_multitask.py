"""Many tasks in one forward (issue 33): a multi-task bundle stacks every task's adapters and head in one graph
with a second input, the task index per clip; the backbone runs once per batch.

Each task of it must equal its own full export (FP32 max |Δlogit| ≤ 1e-4) on every runtime that runs it, and
clips of several tasks in one backend call must get the answers they get alone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from test_tasks import KW, tasks  # noqa: F401 - the module fixture: tiny checkpoints A (10 classes), B (7), full exports

from stexport.errors import StexportError
from stexport.runtime import backends

BACKENDS = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def multi(tasks):  # noqa: F811
    """A multi-task FP32 bundle of checkpoints A and B (A first: the bundle's own task)."""
    from stexport.build.multitask import build_multitask

    return build_multitask([tasks["a"], tasks["b"]], out=tasks["root"] / "multi", backbone="stexport-tiny-vit",
                           pretrained="none", labels=[None, [f"b{i}" for i in range(7)]])


@pytest.mark.parametrize("name", BACKENDS)
def test_each_task_equals_its_full_export_and_tasks_mix_in_one_call(tasks, multi, name):  # noqa: F811
    x = tasks["clips"]
    with backends.create(name, tasks["full_a"]) as fa, backends.create(name, tasks["full_b"]) as fb:
        want = {"task_a": fa.run(x), "task_b": fb.run(x)}
    assert np.abs(want["task_a"][:, :7] - want["task_b"]).max() > 0.1  # the two tasks really differ
    with backends.create(name, multi) as be:
        own = be.run(x)  # the bundle's own task: the first
        assert own.shape == (4, 10) and np.abs(own - want["task_a"]).max() <= 1e-4
        for task in ("task_a", "task_b", 1):
            got = be.run(x, task=task)
            ref = want["task_b" if task in ("task_b", 1) else "task_a"]
            assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4
        order = ["task_b", "task_a", None, "task_b"]  # None: the current task (A)
        mixed = be.run_tasks(x, order)
        assert mixed.shape == (4, 10)
        for i, t in enumerate(order):
            ref = want[t or "task_a"][i]
            assert np.abs(mixed[i, :len(ref)] - ref).max() <= 1e-4
        np.testing.assert_array_equal(mixed[[0, 3], 7:], 0)  # B's head rows beyond its 7 classes are zero
        be.set_task("task_b")
        assert np.abs(be.run(x) - want["task_b"]).max() <= 1e-4
        assert np.abs(be.run_tasks(x, [None] * 4)[:, :7] - want["task_b"]).max() <= 1e-4


def test_manifest_lists_the_tasks_and_taps_are_per_channel(tasks, multi):  # noqa: F811
    from stexport.fileutil import sha256_file

    m = multi.manifest
    mt = m.multitask
    assert mt.input == "task" and mt.dtype == "int64" and mt.head_rows == 10
    assert [(t.name, t.index, t.classes) for t in mt.tasks] == [("task_a", 0, 10), ("task_b", 1, 7)]
    assert mt.tasks[1].labels == [f"b{i}" for i in range(7)] and mt.tasks[1].labels_source == "given"
    assert mt.tasks[0].adapter.sha256 == sha256_file(tasks["a"]) and mt.tasks[1].adapter.sha256 == sha256_file(tasks["b"])
    assert mt.tasks[0].sampling.model_dump() == tasks["full_a"].manifest.sampling.model_dump()
    assert (m.output.classes, m.model.adapter.sha256) == (10, mt.tasks[0].adapter.sha256)
    g = onnx.load(str(multi.file("onnx"))).graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in g.input] == [("frames", onnx.TensorProto.UINT8),
                                                                         ("task", onnx.TensorProto.INT64)]
    shapes = {t.name: list(t.dims) for t in g.initializer}
    taps = {n: s for n, s in shapes.items() if n.endswith(".taps")}
    assert taps and all(s == [2, 3, KW["width"]] for s in taps.values())  # (tasks, kt, W): no per-token copy
    assert shapes["head_w"][0] == 2 and shapes["head_w"][-1] == 10  # (tasks, D, head rows)


def test_classify_batch_mixes_tasks_in_one_backend_call(multi, make_video):
    from stexport import Classifier

    videos = [make_video(f"v{i}.mp4", frames=24, width=64, height=48) for i in range(3)]
    with Classifier(multi, backend="onnxruntime", batch_size=64) as clf:
        alone = {(v, t): clf.classify(v, task=t) for v in videos for t in ("task_a", "task_b")}
        calls = []
        run_tasks = clf.backend.run_tasks
        clf.backend.run_tasks = lambda clips, ts: calls.append(list(ts)) or run_tasks(clips, ts)
        pairs = [(videos[0], "task_b"), (videos[1], "task_a"), (videos[2], "task_b"), (videos[0], "task_a")]
        got = list(clf.classify_batch(pairs))
    assert len(calls) == 1 and {t.name for t in calls[0]} == {"task_a", "task_b"}
    for (v, t), r in zip(pairs, got):
        want = alone[(v, t)]
        assert r.task == t == want.task
        assert [c[1] for c in r.top] == [c[1] for c in want.top]
        assert np.allclose([c[2] for c in r.top], [c[2] for c in want.top], atol=1e-6)
    assert got[0].top[0][1].startswith("b") and got[1].top[0][1].startswith("class_")
    with Classifier(multi, backend="onnxruntime", task="task_b") as clf:
        assert clf.num_classes == 7 and clf.labels_source == "task task_b of the multi-task bundle (given)"
        r, want = clf.classify(videos[0]), alone[(videos[0], "task_b")]
        assert r.task == "task_b" and [c[:2] for c in r.top] == [c[:2] for c in want.top]


def test_built_from_a_base_and_its_packs_equals_built_from_checkpoints(tasks, multi, tmp_path):  # noqa: F811
    from stexport.build.multitask import multitask_from_packs

    b = multitask_from_packs(tasks["base"], [tasks["pack_b"]], out=tmp_path / "from_packs")
    mt = b.manifest.multitask
    assert [t.name for t in mt.tasks] == ["task_a", "task_b"]
    assert [t.adapter.sha256 for t in mt.tasks] == [t.adapter.sha256 for t in multi.manifest.multitask.tasks]
    x = tasks["clips"]
    with backends.create("onnxruntime", b) as one, backends.create("onnxruntime", multi) as two:
        order = ["task_a", "task_b", "task_b", "task_a"]
        np.testing.assert_allclose(one.run_tasks(x, order), two.run_tasks(x, order), atol=1e-6)


def test_refusals_are_one_line(tasks, multi, tmp_path):  # noqa: F811
    from stexport.build.backbone import random_backbone
    from stexport.build.deltas import save_official
    from stexport.build.multitask import build_multitask
    from stexport.build.synthetic import random_deltas

    with backends.create("onnxruntime", multi) as be:
        with pytest.raises(StexportError, match="holds tasks task_a, task_b"):
            be.run(tasks["clips"], task="nope")
        with pytest.raises(StexportError, match="3 tasks for 4 clips"):
            be.run_tasks(tasks["clips"], ["task_a"] * 3)
    with backends.create("onnxruntime", tasks["full_a"]) as be, pytest.raises(StexportError, match="not a multi"):
        be.run_tasks(tasks["clips"], ["task_a"] * 4)
    other = tmp_path / "narrow.pt"
    save_official(other, random_deltas(random_backbone("stexport-tiny-vit").config, num_classes=5, seed=2,
                                       width=16, pre_attn=True, pre_mlp=True))
    with pytest.raises(StexportError, match="cannot share a graph with task_a: adapter width 16 vs the base's 32"):
        build_multitask([tasks["a"], other], out=tmp_path / "x", backbone="stexport-tiny-vit", pretrained="none")
    assert not (tmp_path / "x").exists()


def test_cli_multitask_and_infer_task(tasks, multi, make_video, tmp_path):  # noqa: F811
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "stexport.cli.app", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    out = tmp_path / "mt"
    r = cli("multitask", "--base", tasks["base"].path, "--pack", tasks["pack_b"].path, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [t["name"] for t in info["tasks"]] == ["task_a", "task_b"]
    video = make_video("v.mp4", frames=24, width=64, height=48)
    r = cli("infer", video, "-m", out, "-b", "onnxruntime", "--task", "task_b", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[0])
    assert row["task"] == "task_b" and len(row["top"]) == 5
    r = cli("infer", video, "-m", out, "-b", "onnxruntime", "--task", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds tasks task_a, task_b" in r.stderr


def test_torchscript_module_takes_the_task_input(tasks, multi, tmp_path):  # noqa: F811
    import shutil

    from stexport.bundle.store import Bundle
    from stexport.build.torchscript import add_to_bundle

    b = Bundle.load(shutil.copytree(multi.path, tmp_path / "multi"))
    b = add_to_bundle(b)
    x = tasks["clips"]
    with backends.create("onnxruntime", tasks["full_a"]) as fa, backends.create("onnxruntime", tasks["full_b"]) as fb:
        want = {"task_a": fa.run(x), "task_b": fb.run(x)}
    with backends.create("torchscript", b) as be:
        assert np.abs(be.run(x) - want["task_a"]).max() <= 1e-4
        assert np.abs(be.run(x, task="task_b") - want["task_b"]).max() <= 1e-4
        order = ["task_b", "task_a", "task_a", "task_b"]
        mixed = be.run_tasks(x, order)
        for i, t in enumerate(order):
            assert np.abs(mixed[i, :want[t].shape[1]] - want[t][i]).max() <= 1e-4


def test_verify_task_against_its_own_reference(multi, make_video):
    """verify --task NAME: the backend runs that task of the multi-task graph, the reference is the backbone
    with that task's own deltas (kept in the bundle's task_deltas); the report names the task."""
    from stexport.build.verify import verify

    video = make_video("v.mp4", frames=24, width=64, height=48)
    for name in ("task_b", "task_a"):
        report = verify(multi, video.parent, backend="onnxruntime", task=name, use_cache=False)
        assert report["passed"] and report["task"]["name"] == name and report["metrics"]["max_abs"] <= 1e-4


def test_serve_mixes_tasks_in_one_backend_call(ray_cluster, multi, tmp_path):
    """`stexport serve` on a multi-task bundle: interleaved requests for both tasks get what
    Classifier.classify(video, task=) gives, and /stats shows each batch run as one backend call, mixed or not
    (a mixed batch by construction: test_classify_batch_mixes_tasks_in_one_backend_call)."""
    pytest.importorskip("ray.serve")
    import requests
    from concurrent.futures import ThreadPoolExecutor

    from conftest import write_video
    from stexport import Classifier
    from stexport.serving.app import ServeConfig, start, stop

    videos = [str(write_video(tmp_path / f"v{i}.mp4", frames=16 + 4 * i, width=48, height=40)) for i in range(3)]
    with Classifier(multi, backend="onnxruntime", top_k=3) as clf:
        want = {(v, t): clf.classify(v, task=t).to_dict() for v in videos for t in ("task_a", "task_b")}
    cfg = ServeConfig(bundle=str(multi.path), backend="onnxruntime", top_k=3, port=0,
                      allow_paths=(str(tmp_path),), max_batch=8, batch_wait_s=0.3, decode_workers=2,
                      replica_cpus=0.5)
    url = start(cfg)
    try:
        meta = requests.get(f"{url}/metadata", timeout=30).json()
        assert [t["name"] for t in meta["tasks"]] == ["task_a", "task_b"] and meta["default_task"] == "task_a"
        jobs = [(videos[i % 3], ("task_a", "task_b")[i % 2]) for i in range(12)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda j: requests.post(f"{url}/classify", json={"path": j[0], "task": j[1]},
                                                            timeout=120), jobs))
        for (v, t), r in zip(jobs, answers):
            assert r.status_code == 200, r.text
            got, ref = r.json(), want[v, t]
            assert got["task"] == t and [c["label"] for c in got["top"]] == [c["label"] for c in ref["top"]]
            assert np.allclose([c["score"] for c in got["top"]], [c["score"] for c in ref["top"]], atol=1e-5)
        stats = requests.get(f"{url}/stats", timeout=30).json()
        assert stats["tasks"] == {"task_a": 6, "task_b": 6}
        # however they fell into batches: each video in one, one backend call per batch, mixed or not
        assert stats["batched_videos"] == 12 and stats["backend_calls"] == stats["batches"] >= 12 / 8
    finally:
        stop(shutdown_ray=False)


def test_tensorrt_and_triton_refuse_a_multitask_bundle(multi, tmp_path):
    """Neither feeds the task input yet: each says so in one line instead of running task 0 silently."""
    from stexport.build.triton import export_repository
    from stexport.runtime.backends import load_class

    with pytest.raises(StexportError, match="does not feed yet"):
        load_class("tensorrt")(multi)
    with pytest.raises(StexportError, match="export-triton does not describe that input yet"):
        export_repository(multi, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
