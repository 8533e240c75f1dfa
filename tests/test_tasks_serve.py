"""A task per request (issue 23): the batch API, `infer --task` over corpora (--output, --batch,
--decode-threads, --ray) and `stexport serve --task` on one swappable base with two task packs.

Every path must give what `Classifier(base, task=pack).classify(video)` gives for the same video: the pack's
classes, labels, default sampling and name. The server is real (Ray Serve on 127.0.0.1, a real HTTP client);
requests for different tasks interleave and share batches, never a backend call."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import serve_cli, write_video

STEXPORT = [sys.executable, "-m", "stexport.cli.app"]
KW = dict(width=32, pre_attn=True, pre_mlp=True)  # as tests/test_tasks.py
BACKEND = "onnxruntime"
C_SAMPLING = {"rate": 2, "temporal_views": 2, "spatial_views": 1}  # not the base's 1x3 whole-video views


def strict(text: str):
    def bad(c):
        raise ValueError(f"non-JSON constant {c}")

    return json.loads(text, parse_constant=bad)


def cli(*args, timeout=300):
    p = subprocess.run([*STEXPORT, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in p.stderr, p.stderr
    return p


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """A swappable FP32 tiny base built from task_a (10 classes, 12 head rows), packs of task_b (7 classes) and
    task_c (5 classes, its own labels and 2x1 views at rate 2), and five short videos."""
    from stexport.build.backbone import random_backbone
    from stexport.build.pipeline import build_bundle
    from stexport.build.deltas import save_official
    from stexport.build.packing import build_pack
    from stexport.build.synthetic import random_deltas

    root = tmp_path_factory.mktemp("tasks_serve")
    cfg = random_backbone("stexport-tiny-vit").config
    ckpt = {}
    for name, classes, seed in (("task_a", 10, 0), ("task_b", 7, 5), ("task_c", 5, 9)):
        ckpt[name] = root / f"{name}.pt"
        save_official(ckpt[name], random_deltas(cfg, num_classes=classes, seed=seed, **KW))
    base = build_bundle(ckpt["task_a"], out=root / "base", swappable=True, max_classes=12,
                        backbone="stexport-tiny-vit", pretrained="none", precision="fp32")
    labels = root / "c_labels.txt"
    labels.write_text("".join(f"motion {i}\n" for i in range(5)))
    pack_b = build_pack(ckpt["task_b"], base, out=root / "b.stpack")
    pack_c = build_pack(ckpt["task_c"], base, out=root / "c.stpack", labels=str(labels), sampling=C_SAMPLING)
    videos = [write_video(root / f"v{i}.mp4", frames=14 + 6 * i, width=48 + 8 * i, height=40) for i in range(5)]
    return {"root": root, "base": base, "b": pack_b, "c": pack_c, "videos": [str(v) for v in videos]}


@pytest.fixture(scope="module")
def want(packs):
    """Classifier(base, task=pack).classify(video).to_dict() for every task (None: the base's own) and video."""
    from stexport.runtime.classify import Classifier

    out = {}
    for name, pack in (("task_a", None), ("task_b", packs["b"]), ("task_c", packs["c"])):
        with Classifier(packs["base"], backend=BACKEND, task=pack.path if pack else None, top_k=3) as clf:
            for v in packs["videos"]:
                out[name, v] = clf.classify(v).to_dict()
    # the three tasks really differ: other classes, other labels, other views
    v = packs["videos"][0]
    assert out["task_c", v]["views"] == 2 and out["task_a", v]["views"] == 3
    assert out["task_c", v]["top"][0]["label"].startswith("motion ")
    assert out["task_c", v]["task"] == "task_c" and "task" not in out["task_a", v]
    return out


def same(got: dict, expected: dict, task: str | None) -> None:
    """Same classes, labels, views and frames, scores within 2e-6 (other batch sizes), named `task`."""
    assert [t["index"] for t in got["top"]] == [t["index"] for t in expected["top"]], (got, expected)
    assert [t["label"] for t in got["top"]] == [t["label"] for t in expected["top"]]
    for a, b in zip(got["top"], expected["top"], strict=True):
        assert abs(a["score"] - b["score"]) <= 2e-6
    assert (got["views"], got["frames"], got["path"]) == (expected["views"], expected["frames"], expected["path"])
    assert got.get("task") == task


# ------------------------------------------------------------------------------------------------------------
# the Python API


def test_spec_with_a_task_equals_classify_with_that_task(packs, want):
    """ClassifierSpec(task=) + classify_batch, views of several videos per call, 2 decoding threads: each
    result equals Classifier(task=).classify; a bad input is a Failure naming the task."""
    import pickle

    import stexport

    spec = pickle.loads(pickle.dumps(stexport.ClassifierSpec(packs["base"].path, backend=BACKEND, top_k=3,
                                                             task=packs["c"], batch_size=5, decode_threads=2)))
    assert spec.task == str(packs["c"].path)
    missing = str(packs["root"] / "missing.mp4")
    with spec.open() as clf:
        got = [r.to_dict() for r in clf.classify_batch([*packs["videos"], missing])]
    for v, row in zip(packs["videos"], got[:-1], strict=True):
        same(row, want["task_c", v], "task_c")
    assert got[-1]["task"] == "task_c" and "no such file" in got[-1]["error"]


def test_batch_with_a_task_per_source_never_mixes_tasks_in_a_call(packs, want):
    """(source, task) pairs interleaving three tasks on one Classifier: every result equals its task's own
    Classifier; every backend call holds one task; a pack that cannot be loaded fails its source only."""
    from stexport.runtime.classify import Classifier

    vs = packs["videos"]
    tasks = [None, packs["b"].path, str(packs["c"].path), packs["b"]]  # None: the current (the base's own)
    jobs = [(v, tasks[(i + k) % 4]) for k in range(2) for i, v in enumerate(vs)]
    jobs.insert(3, (vs[0], packs["root"] / "nope.stpack"))
    calls = []
    with Classifier(packs["base"], backend=BACKEND, top_k=3, batch_size=9, decode_threads=2) as clf:
        run = clf.backend.run
        lock = threading.Lock()

        def recording(x, task=None):
            with lock:
                calls.append((len(x), getattr(task, "name", None)))
            return run(x, task=task)

        clf.backend.run = recording
        got = [r.to_dict() for r in clf.classify_batch(jobs)]
        # a batch-wide task, and a pair overriding it with the base's own (None: the current task)
        one = [r.to_dict() for r in clf.classify_batch([vs[1], (vs[2], None)], task=packs["b"].path)]
    assert len(got) == len(jobs)
    assert "nope.stpack: no such task pack" in got[3]["error"] and "top" not in got[3]
    names = {None: None, str(packs["b"].path): "task_b", str(packs["c"].path): "task_c"}
    for (v, task), row in zip(jobs[:3] + jobs[4:], got[:3] + got[4:], strict=True):
        name = names[str(getattr(task, "path", task)) if task is not None else None]
        same(row, want[name or "task_a", v], name)
    same(one[0], want["task_b", vs[1]], "task_b")
    same(one[1], want["task_a", vs[2]], None)
    views = {None: 3, "task_b": 3, "task_c": 2}
    assert all(n % views[t] == 0 and n <= 9 for n, t in calls), calls  # whole videos of one task per call
    assert any(n > views[t] for n, t in calls), calls  # and several videos per call


@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"),
                    reason="OpenVINO is installed on x86-64 only")
def test_batch_tasks_per_source_on_openvino(packs):
    """The same on OpenVINO (a compiled model per task instead of per-call adapters)."""
    from stexport.runtime.classify import Classifier

    vs = packs["videos"][:3]
    jobs = [(v, t) for v in vs for t in (packs["c"].path, None, packs["b"].path)]
    with Classifier(packs["base"], backend="openvino", top_k=3, batch_size=6) as clf:
        got = [r.to_dict() for r in clf.classify_batch(jobs)]
        expected = [clf.classify(v, task=t).to_dict() for v, t in jobs]
    for (v, t), row, exp in zip(jobs, got, expected, strict=True):
        same(row, exp, {None: None, packs["b"].path: "task_b", packs["c"].path: "task_c"}[t])
    with Classifier(packs["base"], backend="openvino", top_k=3, task=packs["c"].path) as own:
        same(got[0], own.classify(vs[0]).to_dict(), "task_c")


# ------------------------------------------------------------------------------------------------------------
# infer --task over a corpus


def test_infer_task_output_batch_and_ray_equal_one_video_at_a_time(packs, ray_cluster, tmp_path):
    """`infer --task` one video at a time (--json), with --output --batch --decode-threads, and with --ray:
    the same lines, each naming the task."""
    inputs = [*packs["videos"], str(packs["root"] / "missing.mp4")]
    base, pack = packs["base"].path, packs["c"].path
    p = cli("infer", *inputs, "-m", base, "--task", pack, "-b", BACKEND, "--json")
    assert p.returncode == 2, p.stderr
    one = [strict(line) for line in p.stdout.splitlines()]
    assert len(one) == len(inputs) and all(r["task"] == "task_c" for r in one)
    assert all(r["top"][0]["label"].startswith("motion ") and r["views"] == 2 for r in one if "top" in r)

    def scores(rows):
        return [(r["path"], r.get("task"), json.dumps(r.get("top")), r.get("error")) for r in rows]

    out = tmp_path / "c.jsonl"
    p = cli("infer", *inputs, "-m", base, "--task", pack, "-b", BACKEND, "--output", out, "--batch", "5",
            "--decode-threads", "2")
    assert p.returncode == 2 and "1 of 6 inputs failed" in p.stderr and "task task_c" in p.stderr, p.stderr
    assert scores([strict(line) for line in out.read_text().splitlines()]) == scores(one)
    ray_out = tmp_path / "ray.jsonl"
    p = cli("infer", *inputs, "-m", base, "--task", pack, "-b", BACKEND, "--output", ray_out, "--ray",
            ray_cluster, "--workers", "1", "--worker-cpus", "0.5", "--batch", "4")
    assert p.returncode == 2 and "1 of 6 inputs failed" in p.stderr, p.stderr
    assert scores([strict(line) for line in ray_out.read_text().splitlines()]) == scores(one)
    # a backend that cannot swap tasks is refused before Ray starts, in one line
    p = cli("infer", *inputs[:1], "-m", base, "--task", pack, "-b", "torchscript", "--output",
            tmp_path / "x.jsonl", "--ray", ray_cluster)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "task packs" in p.stderr, p.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_ray_actor_loads_a_shipped_pack(packs, want, ray_cluster, tmp_path):
    """--ship-bundle with --task: an actor that sees neither the bundle's nor the pack's path opens the copies
    sent through the object store (the actor runs in this process after both paths are gone)."""
    import shutil
    from pathlib import Path

    import numpy as np
    import ray

    from stexport.serving import ray_data as ray_infer
    from stexport.runtime.spec import ClassifierSpec
    from stexport.runtime.classify import default_sampling

    bundle = Path(shutil.copytree(packs["base"].path, tmp_path / "base"))
    pack = Path(shutil.copy(packs["c"].path, tmp_path / "c.stpack"))
    shipped, shipped_task = ray.put(ray_infer._bundle_files(str(bundle))), ray.put(pack.read_bytes())
    shutil.rmtree(bundle)
    pack.unlink()
    spec = ClassifierSpec(str(bundle), backend=BACKEND, top_k=3, task=str(pack),
                          sampling=default_sampling(packs["base"], packs["c"]))
    actor = ray_infer._infer_class(spec, shipped, shipped_task)()
    rows = [ray_infer._decode_row({"i": i, "source": s}, spec.sampling) for i, s in enumerate(packs["videos"])]
    batch = {k: np.array([r[k] for r in rows], dtype=object if k in ("source", "notes", "error") else None)
             for k in rows[0]}
    for v, line in zip(packs["videos"], actor(batch)["line"], strict=True):
        same(strict(line), want["task_c", v], "task_c")
    assert not pack.exists() and actor.clf.task.name == "task_c"


# ------------------------------------------------------------------------------------------------------------
# stexport serve --task


@pytest.fixture(scope="module")
def server(ray_cluster, packs):
    """One server for this module: the base with packs task_b and task_c (default: the base's own task_a)."""
    pytest.importorskip("ray.serve")
    pytest.importorskip("python_multipart")
    from stexport.serving.app import ServeConfig, start, stop

    cfg = ServeConfig(bundle=str(packs["base"].path), backend=BACKEND, top_k=3, port=0,
                      tasks=(str(packs["b"].path), str(packs["c"].path)), allow_paths=(str(packs["root"]),),
                      max_batch=8, batch_wait_s=0.2, decode_workers=2, replica_cpus=0.5)
    url = start(cfg)
    yield url
    stop(shutdown_ray=False)


def ask(url: str, video: str, task: str | None, how: str):
    """POST `video` naming `task` the way `how` says (None: no task, the default)."""
    import requests

    data = open(video, "rb").read()
    if how == "query":
        return requests.post(f"{url}/classify", params={"task": task} if task else None, data=data, timeout=120,
                             headers={"Content-Type": "video/mp4", "X-Filename": video})
    if how == "header":
        return requests.post(f"{url}/classify", data=data, timeout=120, headers={
            "Content-Type": "video/mp4", "X-Filename": video, **({"serve_multiplexed_model_id": task} if task else {})})
    if how == "form":
        return requests.post(f"{url}/classify", files={"video": (video, data, "video/mp4")},
                             data={"task": task} if task else None, timeout=120)
    return requests.post(f"{url}/classify", json={"path": video, **({"task": task} if task else {})}, timeout=120)


def test_interleaved_tasks_get_what_their_classifier_gives(server, packs, want):
    """32 requests, 8 callers at a time, cycling over the three tasks (and none: the default) and the four
    ways to name one: each answer equals Classifier(task=that pack).classify; however they fell into
    batches, every video was in one and no batch ran fewer backend calls than it held tasks (exactly one per task:
    test_serving_classifier_runs_one_backend_call_per_task)."""
    import requests

    before = requests.get(f"{server}/stats", timeout=30).json()
    hows = ("query", "header", "form", "json")
    tasks = ("task_b", "task_c", None, "task_a")
    jobs = [(packs["videos"][i % 5], tasks[i % 4], hows[(i // 4) % 4]) for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: (job, ask(server, *job)), jobs))
    for (video, task, how), r in answers:
        assert r.status_code == 200, (how, r.text)
        same(strict(r.text), want[task or "task_a", video], task or "task_a")
    stats = requests.get(f"{server}/stats", timeout=30).json()
    assert stats["requests"] - before["requests"] == 32
    assert {k: stats["tasks"][k] - before["tasks"][k] for k in stats["tasks"]} == \
        {"task_a": 16, "task_b": 8, "task_c": 8}
    batches = stats["batches"] - before["batches"]
    mixed = stats["mixed_batches"] - before["mixed_batches"]
    assert stats["batched_videos"] - before["batched_videos"] == 32 and batches >= 32 / 8 and mixed <= batches
    calls = stats["backend_calls"] - before["backend_calls"]
    assert batches + mixed <= calls <= batches + 2 * mixed  # a call per task in a batch, 3 tasks at most


def test_unknown_or_conflicting_task_is_a_one_line_4xx(server, packs):
    import requests

    v = packs["videos"][0]
    loaded = "loaded: task_a (default), task_b, task_c"
    for how in ("query", "header", "form", "json"):
        r = ask(server, v, "task_z", how)
        assert r.status_code == 404, (how, r.text)
        body = strict(r.text)
        assert set(body) == {"error"} and "\n" not in body["error"]
        assert body["error"] == f"no task 'task_z' on this server; {loaded}", body
    # a name that is not a string is a 400 naming the field and its type, never a lookup
    for value, kind in ((7, "a number"), (["task_b"], "an array"), (None, "null"), ({"n": 1}, "an object")):
        r = requests.post(f"{server}/classify", json={"path": v, "task": value}, timeout=60)
        assert r.status_code == 400 and r.json() == {
            "error": f'the body\'s "task" must be a string naming a task, not {kind}'}, (value, r.text)
    r = requests.post(f"{server}/classify?task=task_b", json={"path": v, "task": "task_c"}, timeout=60)
    assert r.status_code == 400 and "different tasks" in r.json()["error"], r.text
    # names given twice, in one place or several: 400 when they differ, the task when they agree
    data = open(v, "rb").read()
    raw = {"data": data, "headers": {"Content-Type": "video/mp4"}, "timeout": 60}
    differ = [
        ("?task= twice", lambda: requests.post(f"{server}/classify?task=task_b&task=task_c", **raw)),
        ("two form fields", lambda: requests.post(f"{server}/classify", files={"video": ("v.mp4", data)},
                                                  data={"task": ["task_b", "task_c"]}, timeout=60)),
        ("form and ?task=", lambda: requests.post(f"{server}/classify?task=task_c", files={"video": ("v.mp4", data)},
                                                  data={"task": "task_b"}, timeout=60)),
        ("header and ?task=", lambda: requests.post(f"{server}/classify?task=task_c", data=data, timeout=60, headers={
            "Content-Type": "video/mp4", "serve_multiplexed_model_id": "task_b"})),
    ]
    for what, call in differ:
        r = call()
        assert r.status_code == 400, (what, r.text)
        err = r.json()["error"]
        assert err.startswith("the request names different tasks: ") and '"task_b"' in err and '"task_c"' in err, \
            (what, err)
    agree = [
        ("?task= twice", lambda: requests.post(f"{server}/classify?task=task_b&task=task_b", **raw)),
        ("two form fields", lambda: requests.post(f"{server}/classify", files={"video": ("v.mp4", data)},
                                                  data={"task": ["task_b", "task_b"]}, timeout=60)),
        ("header and JSON", lambda: requests.post(f"{server}/classify", json={"path": v, "task": "task_b"},
                                                  headers={"serve_multiplexed_model_id": "task_b"}, timeout=60)),
    ]
    for what, call in agree:
        r = call()
        assert r.status_code == 200 and r.json()["task"] == "task_b", (what, r.text)
    r = requests.post(f"{server}/classify", json={"path": v, "task": "task_b", "x": 1}, timeout=60)
    assert r.status_code == 400, r.text
    for body in ('{"path": %s, "task": "task_b", "task": "task_c"}', '{"path": %s, "path": %s}'):
        text = body % ((json.dumps(str(v)),) * body.count("%s"))
        r = requests.post(f"{server}/classify", data=text, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 400 and "the JSON body repeats" in r.json()["error"], r.text
    r = ask(server, v, "task_b", "query")  # still serving
    assert r.status_code == 200 and r.json()["task"] == "task_b"


def test_metadata_lists_the_tasks(server, packs):
    import requests

    meta = strict(requests.get(f"{server}/metadata", timeout=30).text)
    assert meta["default_task"] == "task_a"
    tasks = {t["name"]: t for t in meta["tasks"]}
    assert list(tasks) == ["task_a", "task_b", "task_c"]
    assert tasks["task_a"]["pack"] is None and tasks["task_a"]["default"] and tasks["task_a"]["classes"] == 10
    assert tasks["task_a"]["labels"] == packs["base"].labels
    assert tasks["task_b"]["classes"] == 7 and tasks["task_b"]["pack"] == "b.stpack"
    assert tasks["task_c"]["labels"] == [f"motion {i}" for i in range(5)]
    assert tasks["task_c"]["sampling"] == {"frames": 8, "size": 32, **C_SAMPLING}
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}


def test_serve_task_refusals_before_starting(packs, tmp_path):
    """Bad --task / --default-task / backend options, and a backend that cannot run packs on this bundle: one
    line on stderr (the backend's own check or refusal), exit 2, before Ray starts (with -v, a Ray start would
    print its own lines)."""
    base, b = packs["base"].path, packs["b"].path
    trt = "TensorRT" if __import__("importlib").util.find_spec("tensorrt") is None else "task packs"
    cases = [
        (["--task", tmp_path / "none.stpack"], "none.stpack: no such task pack"),
        (["--task", b, "--task", b], "a task named 'task_b' is already loaded (another pack)"),
        (["--task", b, "--default-task", "task_q"], "--default-task task_q: no such task; loaded: task_a, task_b"),
        (["--task", b, "-b", BACKEND, "--option", "tasks=bogus"],
         "error: onnxruntime option tasks='bogus': choose one of auto, adapters, sessions"),
        (["--task", b, "-b", BACKEND, "--option", "nosuch=1"], "error: onnxruntime has no option 'nosuch'; its options:"),
        (["-b", BACKEND, "--option", "nosuch=1"], "error: onnxruntime has no option 'nosuch'"),
        (["--option", "nosuch=1"], "error: no backend has an option 'nosuch'"),
        (["--task", b, "-b", "torchscript"], f"error: --task with -b torchscript: {base}: bundle has no torchscript "
                                             f"artifact; make it with `stexport export-torchscript {base}`"),
        (["--task", b, "-b", "tensorrt"], f"error: --task with -b tensorrt: {trt}"),
    ]
    for args, words in cases:
        p = cli("-v", "serve", base, *args, "--json", timeout=120)
        assert p.returncode == 2 and p.stdout == "", (args, p.stderr)
        # -v also says why `auto` passed TensorRT over (no GPU here): a stage note, not a Ray line
        lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("stexport: auto: not using TensorRT")]
        assert len(lines) == 1 and words in lines[0], (args, p.stderr)


def test_torchscript_serves_task_packs(packs, want, tmp_path):
    """TorchScript runs packs (forward_task): serve's checks accept it once the bundle has a model.ts, and the
    classifier a replica runs gives each task what its ONNX Runtime Classifier gives."""
    import shutil

    import numpy as np

    from stexport.serving.app import ServeConfig, ServingClassifier, check_config
    from stexport.serving.requests import Clips
    from stexport.runtime.video import decode

    base = shutil.copytree(packs["base"].path, tmp_path / "base")
    p = cli("export-torchscript", base, timeout=300)
    assert p.returncode == 0, p.stderr
    tasks = (str(packs["b"].path), str(packs["c"].path))
    cfg = check_config(ServeConfig(bundle=str(base), backend="torchscript", tasks=tasks))
    assert cfg.tasks == tasks
    model = ServingClassifier(str(base), "torchscript", top_k=3, tasks=tasks)
    try:
        v = packs["videos"][1]
        items = [Clips(v, decode(v, model.tasks[t].sampling).clips, 0, 0.0, [], t)
                 for t in ("task_c", "task_a", "task_b")]
        for it, row in zip(items, model.classify(items), strict=True):
            expected = want[it.task, v]
            assert row["task"] == it.task and row["backend"] == "torchscript"
            assert [t["label"] for t in row["top"]] == [t["label"] for t in expected["top"]], (row, expected)
            assert np.allclose([t["score"] for t in row["top"]], [t["score"] for t in expected["top"]], atol=1e-4)
    finally:
        model.close()


def test_serving_classifier_runs_one_backend_call_per_task(packs, want):
    """The batch a serve replica hands its classifier, built here: 7 videos of 3 tasks, interleaved, are 3
    backend calls (one per task, each with all of that task's views), counted where the backend is called;
    a batch of one task is one call. Each answer is its task's own Classifier's."""
    from stexport.runtime.video import decode
    from stexport.serving.app import ServingClassifier
    from stexport.serving.requests import Clips

    model = ServingClassifier(str(packs["base"].path), BACKEND, top_k=3,
                              tasks=(str(packs["b"].path), str(packs["c"].path)))
    try:
        calls = []
        run = model.clf.backend.run
        model.clf.backend.run = lambda x, task=None: calls.append((len(x), getattr(task, "name", None))) or \
            run(x, task=task)
        vs, names = packs["videos"], ("task_b", "task_a", "task_c", "task_a", "task_b", "task_c", "task_a")
        decoded = [(vs[i % 5], decode(vs[i % 5], model.tasks[t].sampling), t) for i, t in enumerate(names)]
        items = [Clips(v, d.clips, d.frames, 0.0, [], t) for v, d, t in decoded]
        rows = model.classify(items)
        views = {t: sum(len(it.clips) for it in items if it.task == t) for t in set(names)}
        assert sorted(calls, key=str) == sorted([(views["task_a"], None), (views["task_b"], "task_b"),
                                                 (views["task_c"], "task_c")], key=str)
        assert model.backend_calls == 3
        for it, row in zip(items, rows, strict=True):
            same(row, want[it.task, it.source], it.task)
        model.classify([it for it in items if it.task == "task_b"])
        assert model.backend_calls == 4 and calls[-1] == (views["task_b"], "task_b")
    finally:
        model.close()


def test_replica_failure_is_one_line_and_the_cli_server_logs_only_its_own_lines(server, packs, want,
                                                                              ray_cluster, tmp_path):
    """`stexport serve --json` joining the session's cluster beside the module's server (another route, so
    another Ray Serve application): a bundle whose model a replica cannot open fails with the replica's own
    reason in one line, exit 2, no traceback; a good one answers, and its stderr holds only stexport's lines
    (no Ray or Ray Serve INFO/WARNING lines without -v) up to Ctrl-C, which ends it as it ends every command
    (exit 130, "stexport: interrupted"). The module's server keeps serving."""
    import shutil
    import signal

    import requests

    from stexport.bundle.store import Bundle

    broken = Bundle.load(shutil.copytree(packs["base"].path, tmp_path / "broken"))
    (broken.path / "model.onnx").write_bytes(b"not an ONNX model\n" * 64)
    broken.update(written=["model.onnx"])  # recorded as built: only opening it fails
    p = cli("serve", broken.path, "--task", packs["b"].path, "-b", BACKEND, "--ray-address", ray_cluster,
            "--route", "/broken", "--port", 0, "--replica-cpus", "0.25", "--json", timeout=300)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stexport: error: {broken.path / 'model.onnx'}: onnxruntime "
                                                   "cannot load it ("), p.stderr

    proc, text = serve_cli(packs["base"].path, "--task", packs["c"].path, "-b", BACKEND, "--ray-address",
                           ray_cluster, "--route", "/cli", "--port", 0, "--replica-cpus", "0.25",
                           "--top-k", "3")
    try:
        info = strict(text)
        assert info["tasks"] == ["task_a", "task_c"] and info["classify"].endswith("/cli/classify")
        v = packs["videos"][2]
        r = requests.post(info["classify"], json={"path": v, "task": "task_c"}, timeout=120)
        assert r.status_code == 403  # this server reads no paths; an upload it classifies
        r = requests.post(f"{info['classify']}?task=task_c", data=open(v, "rb").read(), timeout=120,
                          headers={"Content-Type": "video/mp4", "X-Filename": v})
        assert r.status_code == 200, r.text
        same(strict(r.text), want["task_c", v], "task_c")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # Ctrl-C ends serve as it ends every command
    assert err.strip() and all(line.startswith("stexport: ") for line in err.strip().splitlines()), err
    assert err.strip().splitlines()[-1] == "stexport: interrupted" and "Traceback" not in err
    r = ask(server, v, "task_b", "query")  # the module's server was left alone
    assert r.status_code == 200 and r.json()["task"] == "task_b"
