"""Many videos: the batch Python API (stexport.ClassifierSpec, Classifier.classify_batch), `infer --output`
(JSON Lines, resumable) and `infer --ray` on a local Ray cluster; every path gives `infer --json`'s numbers."""

from __future__ import annotations

import json
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_video

STEXPORT = [sys.executable, "-m", "stexport.cli.app"]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def strict(line: str) -> dict:
    def bad(c):
        raise ValueError(f"non-JSON constant {c}")

    return json.loads(line, parse_constant=bad)


def scores(rows: list[dict]) -> list[tuple]:
    """What must be equal to the last digit: each input's path and top classes with scores, or its error."""
    return [(r["path"], json.dumps(r.get("top")), r.get("error")) for r in rows]


def run(*args, check_rc=(0, 2), timeout=300, **kw):
    p = subprocess.run([*STEXPORT, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode in check_rc, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return p


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """45 inputs: 40 generated videos of varied length and size, then damaged ones (garbage bytes, a truncated
    MP4, an empty file, a text file, a missing path), interleaved."""
    d = tmp_path_factory.mktemp("corpus")
    paths = []
    for i in range(40):
        paths.append(write_video(d / f"v{i:02d}.{'avi' if i % 5 == 4 else 'mp4'}", frames=6 + 3 * i,
                                 width=48 + 4 * (i % 7), height=32 + 2 * (i % 3)))
    (d / "garbage.mp4").write_bytes(os.urandom(3000))
    whole = paths[30].read_bytes()
    (d / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.mp4").write_text("not a video\n" * 50)
    bad = [d / "garbage.mp4", d / "truncated.mp4", d / "empty.mp4", d / "notes.mp4", d / "missing.mp4"]
    for k, b in enumerate(bad):
        paths.insert(3 + 8 * k, b)
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def local_json(tiny_bundle, corpus):
    """`stexport infer --json` on the corpus, one video per backend call: the numbers everything must match."""
    p = run("infer", *corpus, "-m", tiny_bundle.path, "-b", "onnxruntime", "--json")
    rows = [strict(line) for line in p.stdout.splitlines()]
    assert len(rows) == len(corpus) and sum("error" in r for r in rows) >= 5
    return rows


def test_spec_pickles_and_import_stays_light(tiny_bundle):
    import stexport

    spec = stexport.ClassifierSpec(tiny_bundle.path, backend="onnxruntime", options={"threads": 1},
                                   batch_size=6, decode_threads=2)
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and hash(back) == hash(spec)
    assert back.bundle == str(tiny_bundle.path) and back.options == (("threads", 1),)
    with pytest.raises(stexport.StexportError, match="batch_size=0"):
        stexport.ClassifierSpec(str(tiny_bundle.path), batch_size=0)
    code = ("import sys, stexport\nspec = stexport.ClassifierSpec('b')\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'openvino', 'cv2', 'ray', 'stexport.runtime.classify') "
            "if m in sys.modules]\nprint(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    not X86, reason="OpenVINO is installed on x86-64 only"))])
def test_classify_batch_equals_infer_json(tiny_bundle, corpus, local_json, backend):
    """Views of several videos per backend call (7 views: 2 videos of 3, odd sizes) and 2 decoding threads
    give infer's scores to the last digit; bad inputs are Failures in their place, nothing raises."""
    import stexport

    if backend == "openvino":  # OpenVINO's own reference: infer --json on OpenVINO
        p = run("infer", *corpus, "-m", tiny_bundle.path, "-b", backend, "--json")
        want = [strict(line) for line in p.stdout.splitlines()]
    else:
        want = local_json
    spec = pickle.loads(pickle.dumps(stexport.ClassifierSpec(tiny_bundle.path, backend=backend, batch_size=7,
                                                             decode_threads=2)))
    with spec.open() as clf:
        calls = []
        run_ = clf.backend.run
        clf.backend.run = lambda x: calls.append(len(x)) or run_(x)
        got = [item.to_dict() for item in clf.classify_batch(iter(corpus))]
    assert scores(got) == scores(want)
    assert max(calls) == 6 and len(calls) < 40  # packed: at most 7 views, whole videos only
    assert isinstance(next(iter(stexport.open(tiny_bundle.path, backend, threads=1).classify_batch(
        [corpus[3]]))), stexport.Failure)


def test_output_file_resumes(tiny_bundle, corpus, local_json, tmp_path):
    """--output writes JSON Lines in input order; a rerun skips what is done, a line cut short is redone."""
    out = tmp_path / "r.jsonl"
    run("infer", *corpus[:20], "-m", tiny_bundle.path, "-b", "onnxruntime", "--output", out, "--batch", "9")
    text = out.read_text()
    assert len(text.splitlines()) == 20
    out.write_text(text[: text.index("\n", len(text) // 2) + 30])  # keep ~half, then a torn line
    p = run("infer", *corpus, "-m", tiny_bundle.path, "-b", "onnxruntime", "--output", out,
            "--decode-threads", "2")
    assert "already done; resuming" in p.stderr and p.returncode == 2 and p.stdout == ""
    rows = [strict(line) for line in out.read_text().splitlines()]
    assert scores(rows) == scores(local_json)  # every input exactly once, in order, same numbers
    p = run("infer", *corpus, "-m", tiny_bundle.path, "--output", out)
    assert p.returncode == 0 and f"{len(corpus)} of {len(corpus)} inputs already done" in p.stderr
    (tmp_path / "other.jsonl").write_text("hello\n")
    p = run("infer", corpus[0], "-m", tiny_bundle.path, "--output", tmp_path / "other.jsonl")
    assert p.returncode == 2 and "line 1 is not a stexport result" in p.stderr


def test_ray_pipeline_equals_local_infer(ray_cluster, tiny_bundle, corpus, local_json, tmp_path):
    """`infer --ray ADDRESS` (decode tasks, 2 inference actors, 32 views per call) on 45 inputs, 5 of them
    damaged: the same lines as local `infer --json`, in input order."""
    out = tmp_path / "ray.jsonl"
    p = run("infer", *corpus, "-m", tiny_bundle.path, "-b", "onnxruntime", "--output", out, "--ray", ray_cluster,
            "--workers", "2", "--worker-cpus", "0.5", "--decode-threads", "1", timeout=300)
    assert p.returncode == 2 and "5 of 45 inputs failed" in p.stderr
    rows = [strict(line) for line in out.read_text().splitlines()]
    assert scores(rows) == scores(local_json)
    assert all(r["backend"] == "onnxruntime" for r in rows if "top" in r)


def test_ray_killed_run_resumes(ray_cluster, tiny_bundle, corpus, local_json, tmp_path):
    """Kill `infer --ray` after some results are written (a FIFO in the list holds the pipeline there: the
    decoder waits for a writer), put a video in the FIFO's place, rerun: every input exactly once, same
    results."""
    d = tmp_path / "v"
    d.mkdir()
    inputs = [str(shutil.copy(s, d)) if Path(s).exists() else s for s in corpus]
    stuck = 25
    orig = inputs[stuck]
    os.unlink(orig)
    os.mkfifo(orig)
    out = tmp_path / "resume.jsonl"
    args = [*STEXPORT, "infer", *inputs, "-m", str(tiny_bundle.path), "-b", "onnxruntime", "--output", str(out),
            "--ray", ray_cluster, "--batch", "3"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= 10:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = len(out.read_text().splitlines())
    assert 10 <= written <= stuck
    try:  # release a decoder still waiting on the FIFO, then make it a video
        os.close(os.open(orig, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass
    os.unlink(orig)
    shutil.copy(corpus[stuck], orig)
    p = run(*args[len(STEXPORT):])
    assert f"{written} of {len(inputs)} inputs already done" in p.stderr
    rows = [strict(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == inputs  # each exactly once, in input order
    def key(rows):  # the copies live in another folder: compare names, scores and errors without it
        return [(Path(r["path"]).name, r.get("top"), r.get("error", "").replace(str(Path(r["path"]).parent), ""))
                for r in rows]

    assert key(rows) == key(local_json)


def test_ray_ships_the_bundle_to_workers_that_lack_it(ray_cluster, tiny_bundle, corpus, local_json, tmp_path):
    """--ship-bundle: an actor that cannot see the bundle's path opens the copy sent through the object store
    (here the actor runs in this process after the path is gone)."""
    import ray

    from stexport.serving import ray_data as ray_infer
    from stexport.runtime.spec import ClassifierSpec

    copy = Path(shutil.copytree(tiny_bundle.path, tmp_path / "bundle"))
    shipped = ray.put(ray_infer._bundle_files(str(copy)))
    shutil.rmtree(copy)
    spec = ClassifierSpec(str(copy), backend="onnxruntime", sampling=_sampling(tiny_bundle))
    actor = ray_infer._infer_class(spec, shipped)()
    rows = [ray_infer._decode_row({"i": i, "source": s}, spec.sampling) for i, s in enumerate(corpus[:6])]
    batch = {k: __import__("numpy").array([r[k] for r in rows], dtype=object if k in ("source", "notes", "error")
                                          else None) for k in rows[0]}
    got = [json.loads(line) for line in actor(batch)["line"]]
    assert scores(got) == scores(local_json[:6])
    assert not copy.exists() and Path(actor.clf.bundle.path).name == "bundle"


def _sampling(bundle):
    from stexport.runtime.video import Sampling

    return Sampling.from_manifest(bundle.manifest)


def test_ray_missing_backend_is_one_line(ray_cluster, tiny_bundle, corpus, tmp_path):
    p = run("infer", corpus[0], "-m", tiny_bundle.path, "-b", "onnxrt", "--output", tmp_path / "x.jsonl",
            "--ray", ray_cluster, check_rc=(2,))
    assert "unknown backend 'onnxrt'" in p.stderr and not (tmp_path / "x.jsonl").exists()
    p = run("infer", corpus[0], "-m", tiny_bundle.path, "--ray=nowhere", check_rc=(2,))
    assert "--ray nowhere: expected nothing" in p.stderr
