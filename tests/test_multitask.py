"""Many tasks in one forward (issue 33): a multi-task bundle stacks every task's adapters and head in one graph
with a second input, the task index per clip; the backbone runs once per batch.

Each task of it must equal its own full export (FP32 max |Δlogit| ≤ 1e-4) on every runtime that runs it, and
clips of several tasks in one backend call must get the answers they get alone."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from test_tasks import KW, tasks  # noqa: F401 - the module fixture: tiny checkpoints A (10 classes), B (7), full exports

from stexport.bundle.store import Bundle
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


def test_results_without_a_task_name_the_first_task(multi, make_video):
    """A multi-task bundle's own task is its first: every entry point that runs it without a task names it
    (as `infer` does), so a caller can tell which task answered."""
    from stexport import Classifier

    video = make_video("v.mp4", frames=24, width=64, height=48)
    with Classifier(multi, backend="onnxruntime") as clf:
        want = clf.classify(video, task="task_a")
        assert clf.task.name == "task_a" and clf.labels_source.startswith("task task_a of the multi-task")
        got = [clf.classify(video), *clf.classify_batch([video, (video, None), (video, "task_b")])]
        clf.set_task("task_b")
        clf.set_task(None)
        got.append(clf.classify(video))
    assert [r.task for r in got] == ["task_a", "task_a", "task_a", "task_b", "task_a"]
    for r in got[:3] + got[4:]:
        assert [c[:2] for c in r.top] == [c[:2] for c in want.top] and r.to_dict()["task"] == "task_a"


def test_task_pack_options_are_refused_on_bundles_without_packs(multi, tiny_bundle):
    """onnxruntime's `tasks` option picks how task packs run: on a bundle that takes none it would change
    nothing, so it is one line naming the bundle, not silently ignored."""
    from stexport import Classifier

    for bundle, kind in ((multi, "a multi-task bundle"), (tiny_bundle, "a plain bundle")):
        for mode in ("adapters", "sessions"):
            with pytest.raises(StexportError, match=f"^onnxruntime option tasks={mode}: {bundle.path.name} is "
                                                    f"{kind} .*, not a swappable one; .*: drop it$"):
                Classifier(bundle, backend="onnxruntime", tasks=mode)
        with Classifier(bundle, backend="onnxruntime", tasks="auto") as clf:  # the default: fine everywhere
            assert "tasks" not in clf.describe()


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
        for bad in (2, "2", -1):  # an index past the tasks: the valid ones are named
            with pytest.raises(StexportError, match=r"task '(2|-1)': multi holds tasks task_a, task_b; pass one of "
                                                    r"them or its index, 0 to 1 \(--task NAME\)$"):
                be.run(tasks["clips"], task=bad)
        assert be.run(tasks["clips"], task=1).shape == be.run(tasks["clips"], task="task_b").shape
        with pytest.raises(StexportError, match="3 tasks for 4 clips"):
            be.run_tasks(tasks["clips"], ["task_a"] * 3)
    # a pack offered to a multi-task bundle: its tasks are built in (not "rebuild it --swappable")
    why = tasks["pack_b"].mismatch(multi)
    assert why.startswith("bundle multi is a multi-task bundle, which takes its own tasks (--task NAME: task_a, "
                          "task_b), not packs") and "--swappable" not in why
    with backends.create("onnxruntime", tasks["full_a"]) as be, pytest.raises(StexportError, match="not a multi"):
        be.run_tasks(tasks["clips"], ["task_a"] * 4)
    from stexport.bundle.multitask import loaded_task

    # a task name on a plain bundle: it said "no such task pack (make one with stexport pack ...)", which refuses it
    with pytest.raises(StexportError, match=r"^--task task_a: full_a runs its own task only \(neither swappable nor "
                                            r"multi-task\); --task takes a task pack of a swappable bundle"):
        loaded_task(tasks["full_a"], "task_a")
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
    r = cli("infer", video, "-m", out, "-b", "onnxruntime", "--task", "task_a", "--json")
    first = json.loads(r.stdout.splitlines()[0])
    r = cli("infer", video, "-m", out, "-b", "onnxruntime", "--json")  # no --task: the first task, named
    row = json.loads(r.stdout.splitlines()[0])
    assert r.returncode == 0 and row["task"] == "task_a" and row["top"] == first["top"], (row, first)
    r = cli("infer", video, "-m", out, "-b", "onnxruntime", "--task", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds tasks task_a, task_b" in r.stderr
    # the run's header names the task and its bundle once; a results file of one task is not resumed by another
    results = tmp_path / "b.jsonl"
    r = cli("infer", video, "-m", out, "-b", "onnxruntime", "--task", "task_b", "--output", results)
    assert r.returncode == 0, r.stderr
    assert f"stexport: task task_b (1 of 2) of {out} on onnxruntime" in r.stderr, r.stderr
    assert f"1 result written to {results} (1 line)" in r.stderr, r.stderr
    r = cli("infer", video, "-m", out, "-b", "onnxruntime", "--output", results)
    assert r.returncode == 2 and "line 1 holds a result of task task_b, this run is task task_a" in r.stderr


def test_torchscript_module_takes_the_task_input(tasks, multi, tmp_path):  # noqa: F811
    import shutil

    from stexport.build.torchscript import add_to_bundle
    from stexport.bundle.store import Bundle

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


def test_export_torchscript_of_a_multitask_bundle_names_the_task_input(multi, tmp_path):
    """Its summary says the module takes the task index too, and points to `infer --task`, not to the C++
    example host (which calls forward(clips) on one-task modules)."""
    import shutil

    copy = shutil.copytree(multi.path, tmp_path / "multi")
    r = subprocess.run([sys.executable, "-m", "stexport.cli.app", "export-torchscript", str(copy)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "fp32, uint8 (B, 8, 32, 32, 3) + int64 task (B,) -> logits" in r.stdout, r.stdout
    assert "--task NAME (tasks: task_a, task_b)" in r.stdout and "model.ts clip.npy" not in r.stdout
    assert "stexport-host runs one-task modules only" in r.stdout


def test_bench_times_a_task_of_a_multitask_bundle(multi):
    """bench --task takes a multi-task bundle's task by name or index (it looked for a pack file of that name)."""
    def bench(*extra):
        return subprocess.run([sys.executable, "-m", "stexport.cli.app", "bench", str(multi.path), "-b", "onnxruntime",
                               "--batch", "1", "--iters", "1", "--warmup", "0", "--no-peaks", "--in-process", "--json",
                               *extra], capture_output=True, text=True, timeout=600)

    for task in ("task_b", "1"):
        r = bench("--task", task)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["task"]["name"] == "task_b"
    r = bench("--task", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds tasks task_a, task_b" in r.stderr, r.stderr


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
    Classifier.classify(video, task=) gives, and each batch, mixed, runs as one backend call. Batches by
    construction: max_batch 8 and a batch wait far beyond the time 8 concurrent requests take to arrive, so 16
    /classify requests from 8 callers are two batches, and 8 OIP requests one (a batch that never filled would
    fail the requests' own timeout)."""
    pytest.importorskip("ray.serve")
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from conftest import write_video

    from stexport import Classifier
    from stexport.serving.app import ServeConfig, start, stop

    videos = [str(write_video(tmp_path / f"v{i}.mp4", frames=16 + 4 * i, width=48, height=40)) for i in range(3)]
    with Classifier(multi, backend="onnxruntime", top_k=3) as clf:
        want = {(v, t): clf.classify(v, task=t).to_dict() for v in videos for t in ("task_a", "task_b")}
    cfg = ServeConfig(bundle=str(multi.path), backend="onnxruntime", top_k=3, port=0,
                      allow_paths=(str(tmp_path),), max_batch=8, batch_wait_s=600, decode_workers=2,
                      replica_cpus=0.5)
    url = start(cfg)
    try:
        meta = requests.get(f"{url}/metadata", timeout=30).json()
        assert [t["name"] for t in meta["tasks"]] == ["task_a", "task_b"] and meta["default_task"] == "task_a"
        jobs = [(videos[i % 3], ("task_a", "task_b")[i % 2]) for i in range(16)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda j: requests.post(f"{url}/classify", json={"path": j[0], "task": j[1]},
                                                            timeout=120), jobs))
        for (v, t), r in zip(jobs, answers):
            assert r.status_code == 200, r.text
            got, ref = r.json(), want[v, t]
            assert got["task"] == t and [c["label"] for c in got["top"]] == [c["label"] for c in ref["top"]]
            assert np.allclose([c["score"] for c in got["top"]], [c["score"] for c in ref["top"]], atol=1e-5)
        stats = requests.get(f"{url}/stats", timeout=30).json()
        assert stats["tasks"] == {"task_a": 8, "task_b": 8}
        assert {k: stats[k] for k in ("batches", "batched_videos", "backend_calls", "mixed_batches")} == {
            "batches": 2, "batched_videos": 16, "backend_calls": 2, "mixed_batches": 2}

        # the Open Inference Protocol's infer route: each task is a model; a batch of both is one backend call
        from prometheus_client.parser import text_string_to_metric_families

        from stexport.runtime.video import Sampling, decode

        def calls(model):  # backend calls the replica counted under `model` ("": calls that mixed tasks)
            text = requests.get(f"{url}/metrics", timeout=30).text
            return sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
                       if x.name == "stexport_backend_seconds_count" and x.labels.get("model") == model)

        views = decode(videos[2], Sampling.from_manifest(multi.manifest)).clips
        oip_jobs = [(i % len(views), ("task_a", "task_b")[i % 2]) for i in range(8)]
        with backends.create("onnxruntime", multi) as be:
            alone = {j: be.run(views[j[0]:j[0] + 1], task=j[1])[0] for j in set(oip_jobs)}
        before = calls("")

        def infer(job):
            x = views[job[0]:job[0] + 1]
            body = {"inputs": [{"name": "frames", "datatype": "UINT8", "shape": list(x.shape),
                                "data": x.ravel().tolist()}]}
            return requests.post(f"{url}/v2/models/{job[1]}/infer", json=body, timeout=120)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(infer, oip_jobs))
        for job, r in zip(oip_jobs, answers):
            assert r.status_code == 200, r.text
            out = {o["name"]: o for o in r.json()["outputs"]}
            z = alone[job] - alone[job].max()
            want_p = np.exp(z) / np.exp(z).sum()
            assert out["probabilities"]["shape"] == [1, len(want_p)]
            np.testing.assert_allclose(out["probabilities"]["data"], want_p, atol=1e-5)
        assert calls("") == before + 1  # the 8 requests of both tasks: one batch, one backend call
    finally:
        stop(shutdown_ray=False)


def test_every_deployment_runtime_runs_multitask_bundles(multi):
    """Which backends run them is read from the backends themselves (the refusals name that list); TensorRT
    feeds the task input as its engine's second input (tests/test_trt.py), so on this host it fails only for
    want of TensorRT, never for the bundle."""
    from stexport.runtime.backends import load_class, multitask_backends

    listed = multitask_backends()
    assert set(listed.replace(" or ", ", ").split(", ")) == {"onnxruntime", "openvino", "tensorrt", "torchscript"}
    assert multitask_backends("and") == listed.replace(" or ", " and ")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(StexportError) as e:
            load_class("tensorrt")(multi)
        assert "multi-task" not in str(e.value)


# --- FP16 and INT8 multi-task bundles ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """{fp16, int8} multi-task bundles of task A (10 classes) and task C (7 classes, other weights) on the
    seeded random tiny backbone, and the unlabelled list of 8 videos INT8 calibrates on and verify checks on.
    Not test_tasks' A and B: B's own single-task INT8 export fails verify's INT8 gate on these videos (91.7%
    top-1 agreement: on this random model its logits' top two nearly tie on some views), so no INT8 graph of
    it could pass. These two tasks' logits are not near ties (checked: each task's own INT8 export, and the
    multi-task one, agree on 24 of 24 views)."""
    import os

    from conftest import write_video

    from stexport.build.backbone import random_backbone
    from stexport.build.deltas import save_official
    from stexport.build.multitask import build_multitask
    from stexport.build.synthetic import random_deltas

    root = tmp_path_factory.mktemp("multitask_quantized")
    old = os.environ.get("STEXPORT_CALIB_CACHE")
    os.environ["STEXPORT_CALIB_CACHE"] = str(root / "calibration")
    bb = random_backbone("stexport-tiny-vit")
    a, c = root / "task_a.pt", root / "task_c.pt"
    save_official(a, random_deltas(bb.config, num_classes=10, seed=12, **KW))
    save_official(c, random_deltas(bb.config, num_classes=7, seed=2, **KW))
    lines = []
    for i in range(8):
        write_video(root / f"v{i}.mp4", frames=24 + 3 * i, width=48 + 8 * i, height=40)
        lines.append(f"v{i}.mp4")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    built = {p: build_multitask([a, c], out=root / p, backbone="stexport-tiny-vit", pretrained="none", precision=p,
                                calib=root / "list.txt" if p == "int8" else None) for p in ("fp16", "int8")}
    yield {**built, "clips": root / "list.txt"}
    if old is None:
        os.environ.pop("STEXPORT_CALIB_CACHE", None)
    else:
        os.environ["STEXPORT_CALIB_CACHE"] = old


def test_multitask_graphs_pass_the_tensorrt_operator_check(multi, quantized):
    """What TensorRT's parser accepts, checked on CPU for FP32, FP16 and INT8 (Q/DQ) multi-task graphs: the
    task input's Gathers and batched MatMuls included (trt_engines.onnx_support)."""
    from stexport.trt_engines.onnx_support import check_tensorrt_ops

    for b in (multi, quantized["fp16"], quantized["int8"]):
        model = onnx.load(str(b.file("onnx")))
        assert [i.name for i in model.graph.input] == [b.manifest.input.name, "task"]
        assert check_tensorrt_ops(model) == [], b.manifest.precision


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_layer_report_ranks_a_task_of_a_multitask_bundle(quantized, precision):
    """verify --layers on a multi-task bundle was a 59-line traceback (the graph's task input was not fed; new-user
    finding): it ranks the task asked for (default the first, as infer), its whole-graph figures are verify's for
    that task, and the report names the task."""
    from stexport.build.verify import layer_report, verify

    b = quantized[precision]
    for task in (None, "task_c"):
        report = layer_report(b, quantized["clips"], max_clips=3, task=task, use_cache=False)
        name = task or "task_a"
        assert report["task"]["name"] == name and report["task"]["index"] == (1 if task else 0)
        assert report["layers"] and report["quantized_layers"] == len(report["layers"])
        gate = verify(b, quantized["clips"], backend="onnxruntime", max_clips=3, task=task, use_cache=False)
        assert gate["task"] == report["task"]
        assert report["base"]["top1_agreement"] == gate["metrics"]["top1_agreement"]
        assert report["base"]["mean_abs"] == pytest.approx(gate["metrics"]["mean_abs"], rel=1e-3, abs=1e-6)


def test_task_names_an_index_could_read_as_are_refused(tasks, tmp_path):  # noqa: F811
    """`--task 0` takes a name or an index: a task named "1" made `--task 1` run task 0 (new-user finding); blank
    names could never be picked."""
    from stexport.build.multitask import build_multitask

    for names in (["1", "0"], ["", "b"], ["a", " b"], ["a", "   "]):
        with pytest.raises(StexportError, match=r"^task name .*: a task name must not be blank, start or end with a "
                                                r"space, or be a number"):
            build_multitask([tasks["a"], tasks["b"]], names=names, out=tmp_path / "x", backbone="stexport-tiny-vit",
                            pretrained="none")
        assert not (tmp_path / "x").exists()


def test_random_weights_for_a_base_built_on_real_ones_warn(tasks, tmp_path, caplog):  # noqa: F811
    """multitask --base B --pretrained none swapped the base's weights for random ones without a word."""
    import logging

    from safetensors.torch import save_file

    from stexport.build.backbone import random_backbone
    from stexport.build.multitask import multitask_from_packs
    from stexport.build.pipeline import build_bundle

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in random_backbone("stexport-tiny-vit", seed=3).state_dict.items()},
              str(weights))
    base = build_bundle(tasks["a"], out=tmp_path / "base", swappable=True, backbone="stexport-tiny-vit",
                        pretrained=str(weights))
    assert not base.manifest.model.backbone.weights.random
    with caplog.at_level(logging.WARNING, logger="stexport"), pytest.raises(StexportError, match="int4"):
        multitask_from_packs(base, [], out=tmp_path / "y", pretrained="none", precision="int4")
    assert "randomly initialised (--pretrained none): predictions are meaningless (the base was built with real " \
           "weights)" in caplog.text

@pytest.mark.parametrize("precision,name", [("fp16", "onnxruntime"), ("fp16", "openvino"), ("int8", "onnxruntime"),
                                            ("int8", "openvino")])
def test_each_task_of_a_quantized_multitask_bundle_passes_verify_gate(quantized, precision, name):
    """verify --task NAME against the task's own FP32 reference, with verify's default gate for the bundle's
    precision (stexport.bundle.precision): FP16 ≥ 99% top-1 agreement, INT8 ≥ 95% (no labels)."""
    from stexport.build.verify import verify

    b = quantized[precision]
    assert b.manifest.precision == precision
    for task in ("task_a", "task_c"):
        report = verify(b, quantized["clips"], backend=name, task=task, use_cache=False)
        assert report["task"]["name"] == task and report["passed"], (task, report["metrics"], report["checks"])
        assert 0 < report["metrics"]["max_abs"] < (1e-2 if precision == "fp16" else 0.5)


def test_torchscript_of_an_int8_multitask_bundle_is_its_float_model(quantized, tmp_path):
    """libtorch exports are FP32/FP16 (stexport.bundle.precision): an INT8 multi-task bundle's module is its
    float model with the task input, said in the manifest; each task passes verify's gate against its own
    reference on it, and a mixed batch gives each clip its own answer."""
    import shutil

    from stexport.build.torchscript import add_to_bundle
    from stexport.build.verify import verify
    from stexport.bundle.store import Bundle

    b = add_to_bundle(Bundle.load(shutil.copytree(quantized["int8"].path, tmp_path / "int8")))
    assert b.manifest.precision == "int8" and b.manifest.torchscript.precision == b.manifest.float_precision
    for task in ("task_a", "task_c"):
        report = verify(b, quantized["clips"], backend="torchscript", task=task, use_cache=False)
        assert report["passed"] and report["metrics"]["max_abs"] <= 1e-3, (task, report["metrics"])
    x = np.random.default_rng(3).integers(0, 256, (4, b.frames, b.size, b.size, 3), dtype=np.uint8)
    with backends.create("torchscript", b) as be:
        order = ["task_c", "task_a", "task_c", "task_a"]
        mixed = be.run_tasks(x, order)
        for i, t in enumerate(order):
            np.testing.assert_allclose(mixed[i], be.run_tasks(x[i:i + 1], [t])[0], atol=1e-4)


def test_int8_multitask_calibrates_the_backbone_on_every_task_and_keeps_adapters_float(quantized, tasks):  # noqa: F811
    """The backbone's GEMMs carry Q/DQ (ranges from clips run round-robin over both tasks); the adapters' per-clip
    GEMMs, which read gathered per-task weights, stay float; a clip's logits in a mixed batch are those it gets
    alone (static per-tensor scales: rows do not interact)."""
    b = quantized["int8"]
    c = b.manifest.calibration
    assert c is not None and c.clips == 8 and c.quantized_layers > 0
    g = onnx.load(str(b.file("onnx"))).graph
    made = {o: n for n in g.node for o in n.output}
    quantized_gemms = {n.name for n in g.node if n.op_type in ("MatMul", "Gemm")
                       and any(made.get(i) is not None and made[i].op_type == "DequantizeLinear" for i in n.input)}
    assert len(quantized_gemms) == c.quantized_layers
    assert all(n.startswith("blocks.") and ".pre_" not in n for n in quantized_gemms), quantized_gemms
    adapters = [n for n in g.node if n.op_type == "MatMul" and ".pre_" in n.name]
    assert adapters and not any(made[i].op_type == "DequantizeLinear" for n in adapters for i in n.input
                                if i in made)
    x = tasks["clips"]
    with backends.create("onnxruntime", b) as be:
        alone = {t: be.run(x, task=t) for t in ("task_a", "task_c")}
        order = ["task_c", "task_a", "task_a", "task_c"]
        mixed = be.run_tasks(x, order)
    for i, t in enumerate(order):
        assert np.abs(mixed[i, :alone[t].shape[1]] - alone[t][i]).max() <= 1e-5


def test_fp16_multitask_records_its_check(quantized):
    c = quantized["fp16"].manifest.fp16_check
    assert c is not None and c.top1_agreement == 1.0 and c.max_abs_logit_diff < 1e-2 and not c.fp32_nodes
    g = onnx.load(str(quantized["fp16"].file("onnx"))).graph
    taps = [t for t in g.initializer if t.name.endswith(".taps")]
    assert taps and all(t.data_type == onnx.TensorProto.FLOAT16 for t in taps)


def test_cli_multitask_int8_needs_calib(tasks, tmp_path):  # noqa: F811
    r = subprocess.run([sys.executable, "-m", "stexport.cli.app", "multitask", "-a", tasks["a"], "-a", tasks["b"],
                        "--backbone", "stexport-tiny-vit", "--pretrained", "none", "--precision", "int8",
                        "--out", tmp_path / "x"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--calib" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
    from stexport.build.multitask import multitask_from_packs

    with pytest.raises(StexportError, match="--precision int8 needs calibration videos"):  # options pass through
        multitask_from_packs(tasks["base"], [tasks["pack_b"]], out=tmp_path / "y", precision="int8")
    with pytest.raises(StexportError, match="--precision int4: choose"):
        multitask_from_packs(tasks["base"], [tasks["pack_b"]], out=tmp_path / "y", precision="int4")
    assert not (tmp_path / "y").exists()



def test_cli_multitask_names_options_that_do_not_apply(tasks, tmp_path):  # noqa: F811
    """New-user findings: options multitask would have ignored are named (one line, exit 2, nothing written), a
    --calib no FP32 build uses is a warning as in `build`, and an FP16 --base gives an FP16 bundle (it gave FP32)."""
    from stexport.build.options import CALIB_UNUSED
    from stexport.build.packing import build_pack
    from stexport.build.pipeline import build_bundle

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "stexport.cli.app", "multitask", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    out, base, pack = tmp_path / "x", tasks["base"].path, tasks["pack_b"].path
    refusals = {
        ("--pack", pack, "--out", out): "--pack needs the swappable --base the packs were made for",
        ("--base", base, "--pack", pack, "--frames", 4, "--name", "n", "--out", out):
            "--name, --frames: with --base the tasks' names, labels, backbone, frames and sampling are the base's",
        ("--base", base, "-a", tasks["a"], "--out", out): "or a swappable --base with its --pack files, not both",
    }
    for args, message in refusals.items():
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
        assert not out.exists()
    r = cli("--base", base, "--pack", pack, "--views", "1x1", "--out", out)
    assert r.returncode == 2 and "--views: with --base" in r.stderr, r.stderr
    r = cli("-a", tasks["a"], "-a", tasks["b"], "--backbone", "stexport-tiny-vit", "--pretrained", "none",
            "-t", 4, "--views", "1x1", "--rate", 0, "--calib", tasks["root"], "--out", out, "--json")
    assert r.returncode == 0 and CALIB_UNUSED in r.stderr, r.stderr
    info = json.loads(r.stdout)
    assert info["tasks"][1]["name"] == "task_b"
    assert all(t["sampling"] == {"rate": 0, "temporal_views": 1, "spatial_views": 1} for t in info["tasks"]), info
    r = cli("-a", tasks["a"], "--backbone", "stexport-tiny-vit", "--views", "3", "--out", tmp_path / "y")
    assert r.returncode == 2 and "--views '3': write TEMPORALxSPATIAL" in r.stderr and not (tmp_path / "y").exists()
    base16 = build_bundle(tasks["a"], out=tmp_path / "base16", swappable=True, max_classes=12,
                          backbone="stexport-tiny-vit", pretrained="none", precision="fp16")
    pack16 = build_pack(tasks["b"], base16, out=tmp_path / "b16.stpack")
    r = cli("--base", base16.path, "--pack", pack16.path, "--out", tmp_path / "mt16")
    assert r.returncode == 0, r.stderr
    assert Bundle.load(tmp_path / "mt16").manifest.precision == "fp16" and "fp16" in r.stdout.splitlines()[0]

# --- export-triton and TensorRT ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_triton_repository_takes_the_task_input_and_its_readme_client_works(multi, tmp_path, backend, monkeypatch):
    """export-triton of a multi-task bundle: config.pbtxt (through Triton's ModelConfig schema) has the task
    index as a second input, named and typed as the graph's, dims [1] reshaped to [] (the graph's (B,)); the
    README's client code, run as written against a stand-in for the server, sends a request (built by
    tritonclient itself) that the config accepts and that, run on the repository's model with Triton's reshape,
    gives the bundle's logits for the README's task."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    import re

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    from conftest import write_video
    from google.protobuf import text_format
    from tritonclient.grpc import _utils
    from tritonclient.grpc import model_config_pb2 as pb
    from tritonclient.utils import triton_to_np_dtype

    from stexport.build.triton import TritonOptions, export_repository
    from stexport.runtime.video import Sampling, decode

    repo = tmp_path / "repo"
    summary = export_repository(multi, repo, TritonOptions(backend=backend, name="mt"))
    cfg = text_format.Parse((repo / "mt" / "config.pbtxt").read_text(), pb.ModelConfig())
    g = onnx.load(str(repo / "mt" / "1" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in cfg.input] == [i.name for i in g.input] == ["frames", "task"]
    task_in = cfg.input[1]
    assert task_in.data_type == pb.TYPE_INT64 and g.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert list(task_in.dims) == [1] and task_in.HasField("reshape") and list(task_in.reshape.shape) == []
    assert [d.dim_param != "" for d in g.input[1].type.tensor_type.shape.dim] == [True]  # (batch,)
    assert list(cfg.output[0].dims) == [10] and not cfg.output[0].label_filename
    assert (repo / "mt" / "labels" / "1.txt").read_text().split() == [f"b{i}" for i in range(7)]
    assert len((repo / "mt" / "labels" / "0.txt").read_text().split()) == 10
    assert "mt/labels/1.txt" in summary["files"]
    readme = (repo / "README.md").read_text()
    assert "| 1 | `task_b` | 7 | `labels/1.txt` |" in readme

    m = multi.manifest
    video = write_video(tmp_path / "v.mp4", frames=30, width=64, height=48)
    clips = decode(video, Sampling.from_manifest(m)).clips
    np.save(repo / "clip.npy", clips)
    sess = ort.InferenceSession(str(repo / "mt" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    sent = []

    class Server:  # what Triton does with a request for this config: check it, reshape, run the model
        def __init__(self, url):
            assert url == "127.0.0.1:8001"

        def infer(self, model_name, inputs, **kw):
            req = _utils._get_inference_request(model_name, inputs, "", "", None, 0, False, False, 0, None, None)
            assert req.model_name == cfg.name
            feed = {}
            for tensor, raw in zip(req.inputs, req.raw_input_contents):
                spec = next(i for i in cfg.input if i.name == tensor.name)
                assert tensor.datatype == pb.DataType.Name(spec.data_type)[len("TYPE_"):]
                batch, *dims = tensor.shape
                assert 1 <= batch <= cfg.max_batch_size and dims == list(spec.dims), (tensor.name, tensor.shape)
                x = np.frombuffer(raw, triton_to_np_dtype(tensor.datatype)).reshape(tensor.shape)
                feed[tensor.name] = x.reshape(batch, *spec.reshape.shape) if spec.HasField("reshape") else x
            assert set(feed) == {i.name for i in cfg.input}
            sent.append(feed)
            out = sess.run([cfg.output[0].name], feed)[0]
            return type("Result", (), {"as_numpy": lambda self, name: out if name == cfg.output[0].name else None})()

    monkeypatch.setattr(grpcclient, "InferenceServerClient", Server)
    code = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    monkeypatch.chdir(repo)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example, as a user runs it
    assert len(sent) == 1 and (sent[0]["task"] == 1).all() and sent[0]["task"].shape == (len(clips),)
    with backends.create("onnxruntime", multi) as be:
        want = be.run(clips, task="task_b")
    assert scope["logits"].shape == want.shape == (len(clips), 7)
    np.testing.assert_allclose(scope["logits"], want, atol=1e-5)
    assert scope["labels"][:7] == [f"b{i}" for i in range(7)]
