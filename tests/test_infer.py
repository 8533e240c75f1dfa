"""The clip classifier and `stexport infer`: official view averaging, overlap of decoding and inference, bad
input handled per video."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_video
from stexport.runtime import backends
from stexport.runtime.classify import Classifier, Failure, softmax
from stexport.cli.app import app
from stexport.errors import StexportError
from stexport.build.loaders import reference_for_bundle
from stexport.build.reference import normalize
from stexport.runtime.video import Sampling, decode_clips

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


def test_views_are_scored_by_averaging_probabilities_not_logits(bundle, videos, monkeypatch):
    """By construction: the backend answers three views with logits chosen so that the mean of their
    softmaxes (the official eval) and the softmax of their mean (a plausible mistake) rank differently.
    The tiny random model cannot show this: its views' logits are nearly equal, where both agree."""
    views = np.zeros((3, 10), np.float32)
    views[0, 0], views[1, 1], views[2, 1] = 10.0, 2.0, 2.0
    p = np.exp(views - views.max(1, keepdims=True))
    want = (p / p.sum(1, keepdims=True)).mean(0)  # mean softmax: class 0 0.333, class 1 0.301
    wrong = np.exp(views.mean(0)) / np.exp(views.mean(0)).sum()  # softmax of the mean: class 0 0.61
    assert abs(want[0] - wrong[0]) > 0.2
    with Classifier(bundle, backend="onnxruntime", top_k=10) as clf:
        monkeypatch.setattr(clf.backend, "run", lambda clips, task=None: np.tile(views, (len(clips) // 3, 1)))
        for res in (clf.classify(videos[0]), *clf.classify_batch([videos[0], videos[1]])):
            got = np.zeros(10)
            for i, _, prob in res.top:
                got[i] = prob
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_batch_timing_is_each_videos_share_of_its_call(bundle, videos, monkeypatch):
    """classify_batch: a video's timing.infer_s is its views' share of the backend call that ran them, not the
    whole call's time (issue 30, kind 4); the shares of one call add up to that call's time."""
    import time

    with Classifier(bundle, backend="onnxruntime", top_k=1, batch_size=64) as clf:
        run, calls = clf.backend.run, []

        def timed(clips, task=None):
            t = time.perf_counter()
            out = run(clips)
            calls.append(time.perf_counter() - t)
            return out

        monkeypatch.setattr(clf.backend, "run", timed)
        results = list(clf.classify_batch(videos[:3]))
    assert len(calls) == 1 and len(results) == 3
    assert sum(r.infer_s for r in results) == pytest.approx(calls[0], rel=0.05)
    per_view = results[0].infer_s / results[0].views
    for r in results:
        assert r.infer_s == pytest.approx(per_view * r.views, rel=1e-9)
        assert r.to_dict()["timing"]["infer_s"] == round(r.infer_s, 4)


def test_backends_agree_and_auto_resolves(bundle, videos):
    with Classifier(bundle, backend="auto", top_k=3) as a, Classifier(bundle, backend="torch", top_k=3) as t:
        assert a.backend.name == backends.resolve("auto", bundle) != "torch"
        ra, rt = a.classify(videos[1]), t.classify(videos[1])
    assert [i for i, _, _ in ra.top] == [i for i, _, _ in rt.top]
    np.testing.assert_allclose([p for *_, p in ra.top], [p for *_, p in rt.top], atol=1e-5)


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[1, 0], [0.5, 0.5]])


def test_score_videos_splits_one_call_by_video_and_names_the_cause():
    """One backend call's rows, split per video: softmax per view, mean over the video's views (main.py
    evaluate()); a video with NaN/Inf gets the message, its neighbours their probabilities."""
    from stexport.runtime.scoring import NonFiniteOutput, score_videos

    logits = np.array([[1.0, 0.0], [0.0, 1.0], [np.inf, 0.0], [0.0, 0.0], [2.0, 0.0]])
    a, bad, c = score_videos(logits, [2, 2, 1], "onnxruntime", "fp16")
    np.testing.assert_allclose(a, [0.5, 0.5])
    np.testing.assert_allclose(c, softmax(logits[4:])[0])
    assert isinstance(bad, NonFiniteOutput) and str(bad).startswith(
        "the model returned non-finite logits (NaN/Inf) for 1 of 2 views on backend onnxruntime: likely an FP16 "
        "overflow")
    assert "rebuild with --precision fp32" in str(bad)


def test_ordered_map_keeps_order_and_stops_with_its_consumer():
    """The one prefetcher: input order whatever finishes first, an input's error in its place, inputs not
    started dropped when the consumer stops, `finish` in the worker thread."""
    import time

    from stexport.runtime.batch import ordered_map

    ran, finished = [], []

    def fn(x):
        ran.append(x)
        if x == 2:
            raise ValueError("two")
        time.sleep(0.05 if x % 2 else 0)
        return x * 10

    out = ordered_map(fn, range(100), threads=2, depth=3,
                      finish=lambda: finished.append(threading.current_thread().name))
    got = [next(out) for _ in range(4)]
    assert [x for x, _ in got] == [0, 1, 2, 3]
    assert [y for _, y in got if not isinstance(y, Exception)] == [0, 10, 30] and str(got[2][1]) == "two"
    out.close()
    deadline = time.monotonic() + 10
    while len(finished) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(finished) == ["stexport-decode-0", "stexport-decode-1"] and max(ran) < 4 + 3

def test_decoding_overlaps_inference(bundle, videos):
    """Decoding of video k+1 starts (driven by a background thread, in the decode worker's process) before
    inference of video k ends: proven by the order of events, not by timing. Each backend call waits for the
    next video's decoding to start; a serial pipeline never starts it during the call (the wait gives up after
    60 s and the order check fails). Speed is measured in benchmarks/infer.py."""
    n = len(videos)
    index = {str(v): i for i, v in enumerate(videos)}
    started = [threading.Event() for _ in range(n)]
    events = []
    lock = threading.Lock()

    with Classifier(bundle, backend="onnxruntime") as clf:
        real = clf.decoder.decode

        def decode(source, sampling):
            i = index[str(source)]
            with lock:
                events.append(("decode starts", i, threading.current_thread().name))
            started[i].set()
            return real(source, sampling)

        clf.decoder.decode = decode
        run = clf.backend.run
        calls = iter(range(n))

        def run_waiting_for_the_next_decode(clips):
            k = next(calls)
            if k + 1 < n:
                started[k + 1].wait(timeout=60)
            out = run(clips)
            with lock:
                events.append(("inference ends", k, threading.current_thread().name))
            return out

        clf.backend.run = run_waiting_for_the_next_decode
        results = list(clf.classify_many(list(videos)))
        assert clf.decoder._proc.pid != os.getpid() and clf.decoder._proc.poll() is None
    assert [r.source for r in results] == [str(v) for v in videos]
    assert {name for kind, _, name in events if kind == "decode starts"} == {"stexport-decode"}
    order = [(kind, i) for kind, i, _ in events]
    for k in range(n - 1):
        assert order.index(("decode starts", k + 1)) < order.index(("inference ends", k)), order


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
    # every 1.5 s up to 6-9 s, then one window aligned to the end covers the last second (issue 30, kind 4)
    assert [(w.start, w.end) for w in wins] == [(a / 10, (a + 30) / 10) for a in range(0, 61, 15)] + [(7.0, 10.0)]
    assert all(w.views == 1 and len(w.top) == 2 and w.frames == 30 for w in wins)
    assert not any(w.notes for w in wins[:-1]) and "aligned to the end" in wins[-1].notes[0]


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
    midstream = bytearray(mp4)  # damaged where the sampled frame 16 of 40 lies: damage no sampled frame needs is
    a, b = len(mp4) * 35 // 100, len(mp4) * 45 // 100  # never read, since files are decoded by seeking
    midstream[a:b] = np.random.default_rng(1).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    (t / "midstream.mp4").write_bytes(bytes(midstream))
    write_video(t / "short.mp4", frames=3)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                    "-c:a", "aac", str(t / "audio.mp4")], check=True, timeout=60)
    return {
        "missing": (t / "missing.mp4", "missing.mp4: no such file", False),
        "not a video": (t / "random.mp4", "random.mp4: not a video", False),
        "text": (t / "notes.txt", "notes.txt: a text file, not a video", False),
        "zero frames": (t / "empty.avi", "empty.avi: no decodable video frames", False),
        "truncated": (t / "truncated.mp4", "truncated.mp4: not a video OpenCV/FFmpeg can read", False),
        "lying header": (t / "lying.avi", "lying.avi: header says 40 frames", True),
        "mid-stream failure": (t / "midstream.mp4", "midstream.mp4: header says 40 frames", True),
        "very short": (t / "short.mp4", "short.mp4: only 3 frames", True),
        "audio only": (t / "audio.mp4", "audio.mp4: has no video stream (only audio); pass a file with video",
                       False),
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
    assert "6 of 11 inputs failed" in r.stderr
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
    r = invoke(long, "-m", bundle.path, "--window", "2")  # the last second is not dropped (issue 30, kind 4)
    assert r.exit_code == 0 and "0.00-2.00" in r.stdout and "1.00-3.00" in r.stdout, r.output
    assert "the last window (1-3 s) is aligned to the end of the video" in r.stderr


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


# ---------------------------------------------------------------------------------------------------------
# Issue 18: one bad input never costs the batch, and no wrong answer is silent.

def strict_loads(text: str):
    """json.loads that refuses NaN and ±Infinity (Python's json accepts them; JSON does not)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_cli_mixed_batch_every_input_one_strict_json_line(bundle, videos, tmp_path):
    """Good videos, a directory named like a video, an empty directory, a FIFO, a non-UTF-8 name, a damaged
    file, a missing one and a character device through ONE `stexport infer --json` call, under a timeout (a FIFO
    used to block OpenCV forever, a non-UTF-8 name to crash it, a directory to abort the whole call)."""
    (tmp_path / "x.mp4").mkdir()
    (tmp_path / "nothing").mkdir()
    os.mkfifo(tmp_path / "pipe.mp4")
    bad_name = os.fsencode(tmp_path) + b"/caf\xe9.mp4"
    with open(bad_name, "wb") as f:
        f.write(videos[0].read_bytes())
    data = videos[0].read_bytes()
    (tmp_path / "damaged.mp4").write_bytes(data[: len(data) // 2])  # cut: MP4's index (moov) is at the end
    inputs = [os.fsencode(videos[0]), os.fsencode(tmp_path / "x.mp4"), os.fsencode(tmp_path / "nothing"),
              os.fsencode(tmp_path / "pipe.mp4"), bad_name, os.fsencode(videos[1]),
              os.fsencode(tmp_path / "damaged.mp4"), os.fsencode(tmp_path / "missing.mp4"), b"/dev/zero",
              os.fsencode(videos[2])]
    env = {**os.environ, "STEXPORT_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable.encode(), b"-m", b"stexport.cli.app", b"infer", *inputs, b"-m",
                        os.fsencode(bundle.path), b"--json", b"-k", b"2"], capture_output=True, env=env,
                       timeout=300)
    stdout, stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")  # both UTF-8: no raw bytes leak
    assert r.returncode == 2, stderr
    assert "Traceback" not in stdout + stderr
    lines = [strict_loads(ln) for ln in stdout.splitlines()]
    shown = [os.fsdecode(i).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for i in inputs]
    assert [d["path"] for d in lines] == shown  # exactly one line per input, in order
    by = dict(zip(shown, lines))
    for v in videos:
        d = by[str(v)]
        assert len(d["top"]) == 2 and d["views"] == 3 and d["sampled"] == "whole file" and "error" not in d
        assert all(0 <= t["score"] <= 1 for t in d["top"])
    errors = {
        "x.mp4": "is a directory, not a video, and holds no video files",
        "nothing": "is a directory, not a video, and holds no video files",
        "pipe.mp4": "is a FIFO (named pipe), not a regular file",
        "caf\\xe9.mp4": "the file name is not valid UTF-8",
        "damaged.mp4": "not a video OpenCV/FFmpeg can read",
        "missing.mp4": "no such file",
        "/dev/zero": "is a character device, not a regular file",
    }
    for tail, msg in errors.items():
        (d,) = [d for p, d in by.items() if p.endswith(tail)]
        assert set(d) == {"path", "error"} and msg in d["error"], (tail, d)
        assert sum(msg in ln and tail in ln for ln in stderr.splitlines()) == 1, (tail, stderr)
    assert "7 of 10 inputs failed" in stderr


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts HTTP requests and never answers: a stalled stream."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    connected = threading.Event()
    held = []

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)
            connected.set()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/live.ts", connected
    srv.close()
    for c in held:
        c.close()


def test_stalled_decoder_costs_only_its_input(bundle, videos, silent_server):
    url, _ = silent_server
    with Classifier(bundle, backend="onnxruntime", top_k=1, decode_timeout=2.0) as clf:
        out = list(clf.classify_many([videos[0], url, videos[1]]))
    assert [type(r).__name__ for r in out] == ["Result", "Failure", "Result"]
    assert out[1].error.startswith(f"{url}: decoding stalled: no frame for 2 s")
    assert "--decode-timeout" in out[1].error


def test_crashed_decoder_costs_only_its_input(bundle, videos, silent_server):
    """The decode worker dies of a segfault mid-input (what OpenCV does on some inputs): that input gets an
    error naming the signal, a new worker takes the next input."""
    import signal

    url, connected = silent_server
    with Classifier(bundle, backend="onnxruntime", top_k=1, decode_timeout=120.0) as clf:

        def crash():
            assert connected.wait(60)  # the worker is inside FFmpeg, reading the stalled stream
            os.kill(clf.decoder._proc.pid, signal.SIGSEGV)

        killer = threading.Thread(target=crash)
        killer.start()
        out = list(clf.classify_many([videos[0], url, videos[1]], prefetch=1))
        killer.join()
    assert [type(r).__name__ for r in out] == ["Result", "Failure", "Result"]
    assert out[1].error.startswith(f"{url}: the decoder crashed (signal SIGSEGV) on this input")


def test_nan_logits_are_an_error_never_a_ranking(bundle, videos, tmp_path):
    """A bundle whose graph computes NaN (one NaN weight) used to print `1. class_3 nan` and exit 0; --json
    wrote bare NaN."""
    import shutil

    from test_build_verify import nan_weight

    shutil.copytree(bundle.path, tmp_path / "b")
    nan_weight(tmp_path / "b")
    r = invoke(videos[0], videos[1], "-m", tmp_path / "b", "--json", "--backend", "onnxruntime")
    assert r.exit_code == 2
    lines = [strict_loads(ln) for ln in r.stdout.splitlines()]
    assert [set(d) for d in lines] == [{"path", "error"}] * 2
    assert lines[0]["error"] == (f"{videos[0]}: the model returned non-finite logits (NaN/Inf) for 3 of 3 views "
                                 "on backend onnxruntime: the fp32 model computes NaN/Inf on this input: check the "
                                 "bundle with `stexport verify` and rebuild it from finite weights")
    r = invoke(videos[0], "-m", tmp_path / "b", "--backend", "onnxruntime")
    assert r.exit_code == 2 and "nan" not in r.stdout.lower() and " 1. " not in r.stdout
    r = invoke(videos[0], "-m", tmp_path / "b", "--window", "1", "--json", "--backend", "onnxruntime")
    assert r.exit_code == 2 and "non-finite logits" in strict_loads(r.stdout.splitlines()[-1])["error"]


def test_cli_says_how_each_source_was_sampled(bundle, tmp_path, http_dir):
    """An http:// link to a file is the whole file (it used to be read as a live stream: the first seconds,
    while the output said "whole video"); a stream that cannot be counted is live, and says so."""
    import shutil

    write_video(tmp_path / "clip.mp4", frames=60)
    r = invoke(f"{http_dir}/clip.mp4", tmp_path / "clip.mp4", "-m", bundle.path, "--json", "-k", "1")
    assert r.exit_code == 0, r.output
    url, local = [strict_loads(ln) for ln in r.stdout.splitlines()]
    assert url["sampled"] == local["sampled"] == "whole file" and url["frames"] == local["frames"] == 60
    assert url["top"] == local["top"]
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg CLI for an MPEG-TS stream (apt-get install -y ffmpeg)")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(tmp_path / "clip.mp4"), "-c:v", "mpeg4", "-q:v", "2",
                    "-f", "mpegts", str(tmp_path / "cam.ts")], check=True, timeout=120)
    r = invoke(f"{http_dir}/live/cam.ts", "-m", bundle.path, "-k", "1", "--rate", "2")
    assert r.exit_code == 0, r.output
    assert f"{http_dir}/live/cam.ts  (3 views, 45 frames, live stream: the first 45 frames as they arrived, 1.8 s;" \
        in r.stdout
