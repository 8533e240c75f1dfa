"""The clip classifier and `stexport infer`: official view averaging, overlap of decoding and inference, bad
input handled per video."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_video
from stexport import backends, classify
from stexport.classify import Classifier, Failure, softmax
from stexport.cli.app import app
from stexport.errors import StexportError
from stexport.loaders import reference_for_bundle
from stexport.reference import normalize
from stexport.video import Sampling, decode_clips

@pytest.fixture
def bundle(tiny_bundle):
    """The shared tiny FP32 ONNX bundle (conftest): 8 frames × 32 px, 10 classes, Kinetics sampling."""
    return tiny_bundle


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return [write_video(d / f"v{i}.{ext}", frames=n, width=96 + 16 * i, height=72)
            for i, (ext, n) in enumerate([("mp4", 60), ("avi", 45), ("mkv", 30)])]


def test_views_softmax_averaged_like_official_eval(bundle, videos):
    with Classifier(bundle, backend="onnxruntime", top_k=10) as clf:
        assert clf.sampling == Sampling(frames=8, size=32, rate=16, temporal_views=3, spatial_views=1)
        assert clf.labels == [f"class_{i}" for i in range(10)]
        res = clf.classify(videos[0])
    clips = decode_clips(videos[0], clf.sampling)
    model = reference_for_bundle(bundle)
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(clips)))
    want = logits.softmax(-1).mean(0).double().numpy()  # main.py evaluate(): softmax, view(B, V, -1).mean(1)
    got = np.zeros(10)
    for i, _, p in res.top:
        got[i] = p
    assert res.views == 3 and res.frames == 60
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [i for i, _, _ in res.top[:5]] == list(np.argsort(-want)[:5])
    assert [name for _, name, _ in res.top[:2]] == [clf.labels[i] for i, _, _ in res.top[:2]]


def test_backends_agree_and_auto_resolves(bundle, videos):
    with Classifier(bundle, backend="auto", top_k=3) as a, Classifier(bundle, backend="torch", top_k=3) as t:
        assert a.backend.name == backends.resolve("auto", bundle) != "torch"
        ra, rt = a.classify(videos[1]), t.classify(videos[1])
    assert [i for i, _, _ in ra.top] == [i for i, _, _ in rt.top]
    np.testing.assert_allclose([p for *_, p in ra.top], [p for *_, p in rt.top], atol=1e-5)


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[1, 0], [0.5, 0.5]])


def test_decoding_overlaps_inference(bundle, videos, monkeypatch):
    """The next video decodes (driven by a background thread, in the decode worker's process) while the
    backend runs on the current one."""
    events = []

    with Classifier(bundle, backend="onnxruntime") as clf:
        real = clf.decoder.decode

        def slow_decode(source, sampling):
            events.append(("decode", str(source), threading.current_thread().name, time.perf_counter()))
            time.sleep(0.2)
            return real(source, sampling)

        clf.decoder.decode = slow_decode
        run = clf.backend.run

        def slow_run(clips):
            events.append(("run", None, threading.current_thread().name, time.perf_counter()))
            time.sleep(0.2)
            return run(clips)

        clf.backend.run = slow_run
        t = time.perf_counter()
        results = list(clf.classify_many(list(videos)))
        wall = time.perf_counter() - t
        assert clf.decoder._proc.pid != os.getpid() and clf.decoder._proc.poll() is None
    assert [r.source for r in results] == [str(v) for v in videos]
    assert all(e[2] == "stexport-decode" for e in events if e[0] == "decode")
    runs = [e[3] for e in events if e[0] == "run"]
    decodes = [e[3] for e in events if e[0] == "decode"]
    assert decodes[1] < runs[0] + 0.2  # video 2 was being decoded while video 1 ran
    assert wall < 3 * 0.4 - 0.15, wall  # serial would be ≥ 1.2 s


def test_failures_are_per_video(bundle, videos, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0" * 4096)
    with Classifier(bundle, backend="onnxruntime", top_k=2) as clf:
        out = list(clf.classify_many([videos[0], tmp_path / "missing.avi", junk, videos[2]]))
    assert [type(r).__name__ for r in out] == ["Result", "Failure", "Failure", "Result"]
    assert "missing.avi: no such file" in out[1].error and "junk.mp4: not a video" in out[2].error


def test_timeline_windows(bundle, tmp_path):
    long = write_video(tmp_path / "long.avi", frames=100, fps=10)
    with Classifier(bundle, backend="onnxruntime", top_k=2,
                    sampling=Sampling(frames=8, size=32, rate=2, temporal_views=1)) as clf:
        wins = list(clf.timeline(long, window=3.0, stride=1.5))
    assert [(w.start, w.end) for w in wins] == [(a / 10, (a + 30) / 10) for a in range(0, 71, 15)]
    assert all(w.views == 1 and len(w.top) == 2 and w.frames == 30 for w in wins)


def test_classifier_refuses_mismatches(bundle, tmp_path):
    labels = tmp_path / "three.txt"
    labels.write_text("a\nb\nc\n")
    with pytest.raises(StexportError, match="3 labels but the model has 10 classes"):
        Classifier(bundle, backend="onnxruntime", labels=str(labels))
    with pytest.raises(StexportError, match="built for 8 frames of 32 px"):
        Classifier(bundle, backend="onnxruntime", sampling=Sampling(frames=16, size=32))
    with pytest.raises(StexportError, match="unknown backend"):
        Classifier(bundle, backend="nope")


# ---------------------------------------------------------------------------------------------------------
# The command line

def bad_inputs(good, tmp_path) -> dict[str, tuple]:
    """name -> (path, expected stderr fragment, gets a result?)."""
    t = tmp_path
    (t / "notes.txt").write_text("not a video\n" * 100)
    noise = np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8)
    (t / "random.mp4").write_bytes(noise.tobytes())
    avi = write_video(t / "src.avi", frames=40).read_bytes()
    (t / "empty.avi").write_bytes(avi[: avi.find(b"movi") + 4])
    mp4 = write_video(t / "src.mp4", frames=40).read_bytes()
    (t / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (t / "lying.avi").write_bytes(avi[: len(avi) // 2])
    midstream = bytearray(mp4)
    a, b = len(mp4) * 45 // 100, len(mp4) * 55 // 100
    midstream[a:b] = np.random.default_rng(1).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    (t / "midstream.mp4").write_bytes(bytes(midstream))
    write_video(t / "short.mp4", frames=3)
    return {
        "missing": (t / "missing.mp4", "missing.mp4: no such file", False),
        "not a video": (t / "random.mp4", "random.mp4: not a video", False),
        "text": (t / "notes.txt", "notes.txt: a text file, not a video", False),
        "zero frames": (t / "empty.avi", "empty.avi: no decodable video frames", False),
        "truncated": (t / "truncated.mp4", "truncated.mp4: not a video OpenCV/FFmpeg can read", False),
        "lying header": (t / "lying.avi", "lying.avi: header says 40 frames", True),
        "mid-stream failure": (t / "midstream.mp4", "midstream.mp4: header says 40 frames", True),
        "very short": (t / "short.mp4", "short.mp4: only 3 frames", True),
    }


def test_cli_bad_inputs_one_line_each_others_still_run(bundle, videos, tmp_path):
    cases = bad_inputs(videos[0], tmp_path)
    args = [str(videos[0]), *[str(p) for p, _, _ in cases.values()], str(videos[1])]
    env = {**os.environ, "STEXPORT_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "stexport.cli.app", "infer", *args, "-m", str(bundle.path),
                        "--json", "-k", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [d["path"] for d in lines] == args  # one object per input, in order
    by_path = {d["path"]: d for d in lines}
    for what, (path, msg, ok) in cases.items():
        said = [ln for ln in r.stderr.splitlines() if msg in ln]
        assert len(said) == 1, (what, r.stderr)
        assert ("top" in by_path[str(path)]) == ok, what
    for v in videos[:2]:
        d = by_path[str(v)]
        assert len(d["top"]) == 2 and d["views"] == 3 and set(d["timing"]) == {"decode_s", "infer_s"}
        assert d["backend"] == backends.resolve("auto", bundle)
    assert "5 of 10 inputs failed" in r.stderr
    stray = [ln for ln in r.stderr.splitlines() if not ln.startswith("stexport: ")]
    assert not stray, stray  # nothing from FFmpeg/OpenCV


runner = CliRunner()


def invoke(*args, home=None):
    env = {"STEXPORT_HOME": str(home)} if home else {}
    return runner.invoke(app, ["infer", *map(str, args)], env=env)


def test_cli_table_globs_directories_and_views(bundle, videos, tmp_path):
    r = invoke(videos[0].parent, "-m", bundle.path, "-k", "3")
    assert r.exit_code == 0, r.output
    for v in videos:
        assert f"{v}  (3 views" in r.stdout
    assert r.stdout.count("  1. ") == 3
    r = invoke(str(videos[0].parent / "*.avi"), "-m", bundle.path, "--views", "1x3", "--rate", "0", "--json")
    assert r.exit_code == 0, r.output
    (d,) = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert d["path"] == str(videos[1]) and d["views"] == 3 and len(d["top"]) == 5
    r = invoke(videos[0], "-m", bundle.path, "--views", "3x1", "--rate", "0")
    assert r.exit_code == 2 and "rate 0" in r.stderr and "Traceback" not in r.output


def test_cli_timeline_json(bundle, tmp_path):
    long = write_video(tmp_path / "long.mp4", frames=75, fps=25)
    r = invoke(long, "-m", bundle.path, "--window", "1", "--stride", "0.5", "--json", "-k", "1")
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    # seconds of the file's timestamps (75 frames at 25 fps: 3 s), not strides rounded to 13 frames
    assert [(d["start"], d["end"]) for d in rows] == [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0), (1.5, 2.5), (2.0, 3.0)]
    assert all(len(d["top"]) == 1 and d["path"] == str(long) for d in rows)
    r = invoke(long, "-m", bundle.path, "--window", "2")
    assert r.exit_code == 0 and "0.00-2.00" in r.stdout


def test_cli_default_bundle_is_newest_or_a_clear_message(bundle, videos, tmp_path):
    home = tmp_path / "home"
    r = invoke(videos[0], home=home)
    assert r.exit_code == 2 and "stexport build --adapter" in r.stderr and "Traceback" not in r.output
    (home / "bundles").mkdir(parents=True)
    os.symlink(bundle.path, home / "bundles" / "tiny")
    r = invoke(videos[0], "-k", "1", home=home)
    assert r.exit_code == 0 and "1. " in r.stdout, r.output


def test_cli_labels_file(bundle, videos, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(10)))
    r = invoke(videos[0], "-m", bundle.path, "--labels", names, "--json", "-k", "1")
    assert r.exit_code == 0 and json.loads(r.stdout)["top"][0]["label"].startswith("thing ")
    names.write_text("only\ntwo\n")
    r = invoke(videos[0], "-m", bundle.path, "--labels", names)
    assert r.exit_code == 2 and "2 labels but the model has 10 classes" in r.stderr


def test_failure_record():
    f = Failure("x.mp4", "x.mp4: no such file")
    assert f.to_dict() == {"path": "x.mp4", "error": "x.mp4: no such file"}
