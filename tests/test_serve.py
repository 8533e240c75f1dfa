"""`stexport serve` (issue 21): a real Ray Serve endpoint on 127.0.0.1, one per test module. Concurrent
callers get what `stexport infer --json` prints; every kind of bad request gets a 4xx JSON error and the
server keeps answering."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import blocking_video, crash_decoder_on, held_port, release, write_video

pytest.importorskip("ray.serve")
pytest.importorskip("python_multipart")
requests = pytest.importorskip("requests")

from stexport.serving.app import ServeConfig, start, stop  # noqa: E402
from stexport.serving.proxy_errors import UNANSWERED  # noqa: E402

UPLOAD_LIMIT_MB = 2.0
DECODE_TIMEOUT_S = 2.0  # --decode-timeout: seconds without a frame
MAX_DECODE_S = 3.0  # --max-decode-s: seconds in all


def strict_json(text: str):
    def bad(name):
        raise ValueError(f"non-finite number {name} in JSON")

    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Videos inside the allowed root, a secret file outside it, and a symlink in the root pointing at it."""
    root = tmp_path_factory.mktemp("serve_media")
    allowed = root / "allowed"
    allowed.mkdir()
    videos = [write_video(allowed / f"v{i}.mp4", frames=20 + 9 * i, width=64 + 16 * i, height=48) for i in range(4)]
    videos.append(write_video(allowed / "v4.avi", frames=12, width=48, height=64))
    secret = root / "secret.mp4"
    shutil.copy(videos[0], secret)
    (allowed / "link.mp4").symlink_to(secret)
    (allowed / "sub").mkdir()
    return {"root": root, "allowed": allowed, "videos": videos, "secret": secret}


def decode_seconds(path: Path) -> float:
    """Seconds OpenCV takes on this host to decode every frame of `path` (cap.grab decodes; the server also
    converts and resizes the frames it keeps, so it is slower still)."""
    import time

    import cv2

    cap = cv2.VideoCapture(str(path))
    t = time.perf_counter()
    while cap.grab():
        pass
    cap.release()
    return time.perf_counter() - t


@pytest.fixture(scope="module")
def slow_video(media):
    """Black 1080p H.264 (40 s, one key frame; ~24 KB) copied as many times as this host needs to decode it for
    4x the test server's decode limit: slow by construction, not by the host's speed (a fixed length fell
    under the limit on a fast host). Fails, never passes quietly, if that no longer fits the upload limit."""
    import math

    if shutil.which("ffmpeg") is None:
        pytest.skip("needs ffmpeg to make a slow-decoding video")
    d = media["root"]
    seg = d / "seg.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=black:s=1920x1080:r=25:d=40",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "100000", str(seg)], check=True)
    copies = max(2, math.ceil(4 * DECODE_TIMEOUT_S / max(min(decode_seconds(seg) for _ in range(3)), 1e-4)))
    (d / "list.txt").write_text(f"file '{seg}'\n" * copies)
    path = d / "slow.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(d / "list.txt"),
                    "-c", "copy", str(path)], check=True)
    assert path.stat().st_size < UPLOAD_LIMIT_MB * 1e6, (
        f"{copies} copies ({path.stat().st_size} bytes) to decode for 4x {DECODE_TIMEOUT_S} s here: raise "
        "UPLOAD_LIMIT_MB or lengthen the segment")
    return path


@pytest.fixture(scope="module")
def local(tiny_bundle, media):
    """What `stexport infer --json` prints for each video, by path (same auto backend)."""
    r = subprocess.run([sys.executable, "-m", "stexport.cli.app", "infer", *map(str, media["videos"]),
                        "-m", str(tiny_bundle.path), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return {d["path"]: d for d in map(strict_json, r.stdout.splitlines())}


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_bundle, media):
    cfg = ServeConfig(bundle=str(tiny_bundle.path), port=0, route_prefix="/stexport",
                      allow_paths=(str(media["allowed"]),), max_upload_mb=UPLOAD_LIMIT_MB,
                      decode_timeout_s=DECODE_TIMEOUT_S, max_decode_s=MAX_DECODE_S, decode_workers=2, max_batch=8,
                      batch_wait_s=0.2,
                      replica_cpus=0.5)
    url = start(cfg)
    yield url
    stop(shutdown_ray=False)


def same_result(got: dict, want: dict) -> None:
    """Equal to infer --json but for timing, and for scores within 2e-6 (batched across videos, the backend
    runs other batch sizes than infer's one video at a time)."""
    assert [t["index"] for t in got["top"]] == [t["index"] for t in want["top"]]
    assert [t["label"] for t in got["top"]] == [t["label"] for t in want["top"]]
    for a, b in zip(got["top"], want["top"], strict=True):
        assert abs(a["score"] - b["score"]) <= 2e-6
    for key in ("views", "frames", "backend", "notes"):
        assert got.get(key) == want.get(key), key
    assert set(got) == set(want) and set(got["timing"]) == {"decode_s", "infer_s"}


def post_video(url: str, path: Path, how: str):
    if how == "raw":
        return requests.post(f"{url}/classify", data=path.read_bytes(), timeout=120,
                             headers={"Content-Type": "video/mp4", "X-Filename": str(path)})
    if how == "multipart":
        return requests.post(f"{url}/classify", files={"video": (str(path), path.read_bytes(), "video/mp4")},
                             timeout=120)
    return requests.post(f"{url}/classify", json={"path": str(path)}, timeout=120)


def test_concurrent_callers_get_what_infer_prints(server, media, local):
    """40 requests (5 videos × raw, multipart and path), 8 callers at a time; batched across callers."""
    before = requests.get(f"{server}/stats", timeout=30).json()
    jobs = [(v, how) for how in ("raw", "multipart", "path") for v in media["videos"]] * 2
    jobs = jobs[:40]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: (job, post_video(server, *job)), jobs))
    for (video, how), r in answers:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        got = strict_json(r.text)
        assert got["path"] == str(video)
        assert "task" not in got  # a server without task packs answers exactly what infer --json prints
        same_result(got, local[str(video)])
    stats = requests.get(f"{server}/stats", timeout=30).json()
    assert stats["requests"] - before["requests"] == len(jobs)
    batches = stats["batches"] - before["batches"]
    # however the requests fell into batches: every video in one, one backend call per batch (one task)
    assert stats["batched_videos"] - before["batched_videos"] == len(jobs)
    assert stats["backend_calls"] - before["backend_calls"] == batches >= len(jobs) / 8
    assert stats["largest_batch"] <= 8


def test_a_full_batch_is_one_backend_call(server, tiny_bundle, media, local):
    """Batching by construction, not by luck: an application whose batch waits for its 4th video (max_batch
    4, batch_wait_s far beyond the time 4 requests take to arrive; one that never came would fail the
    requests' own timeout) gets 4 concurrent requests: one batch of 4 videos, one backend call, and each
    answer is what infer prints for its video. It joins the module server's Ray Serve as another application."""
    from stexport.serving.app import app_name

    cfg = ServeConfig(bundle=str(tiny_bundle.path), port=0, route_prefix="/full",
                      allow_paths=(str(media["allowed"]),), max_batch=4, batch_wait_s=600, replica_cpus=0.25)
    url = start(cfg)
    try:
        videos = media["videos"][:4]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda v: post_video(url, v, "path"), videos))
        for video, r in zip(videos, answers, strict=True):
            assert r.status_code == 200, r.text
            same_result(strict_json(r.text), local[str(video)])
        stats = requests.get(f"{url}/stats", timeout=30).json()
    finally:
        stop(shutdown_ray=False, app=app_name(cfg))
    assert url.startswith(server.rsplit("/", 1)[0] + "/")  # the same proxy
    assert {k: stats[k] for k in ("requests", "batches", "largest_batch", "batched_videos", "backend_calls")} \
        == {"requests": 4, "batches": 1, "largest_batch": 4, "batched_videos": 4, "backend_calls": 1}


def test_health_and_metadata(server, tiny_bundle, local):
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}
    meta = strict_json(requests.get(f"{server}/metadata", timeout=30).text)
    m = tiny_bundle.manifest
    assert meta["labels"] == tiny_bundle.labels and meta["precision"] == m.precision
    assert meta["model"]["backbone"] == m.model.backbone.name and meta["model"]["classes"] == m.output.classes
    assert meta["backend"]["backend"] == next(iter(local.values()))["backend"]  # the same auto choice
    assert meta["backend"]["compute_precision"]
    assert meta["sampling"]["temporal_views"] == m.sampling.temporal_views
    assert meta["limits"]["max_upload_bytes"] == int(UPLOAD_LIMIT_MB * 1e6) and meta["limits"]["urls"] is False


def bad_requests(server, media, slow_video):
    """(what, response, expected status, words in the error) for every kind of bad request."""
    url = f"{server}/classify"
    text = media["root"] / "notes.txt"
    text.write_text("not a video\n" * 50)
    video = media["videos"][0].read_bytes()
    boundary = "XyZ"
    two_files = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.mp4\"\r\n\r\n".encode()
                 + video + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"b\"; filename=\"b.mp4\""
                 f"\r\n\r\n".encode() + video + f"\r\n--{boundary}--\r\n".encode())
    cases = [
        ("corrupt video", lambda: requests.post(url, data=os.urandom(50_000), headers={"Content-Type": "video/mp4"}),
         422, "not a video"),
        ("truncated video", lambda: requests.post(url, data=video[: len(video) // 5],
                                                  headers={"Content-Type": "video/mp4"}), 422, ""),
        ("text as a video", lambda: requests.post(url, files={"video": ("n.mp4", text.read_bytes())}), 422, ""),
        ("empty upload", lambda: requests.post(url, data=b"", headers={"Content-Type": "video/mp4"}), 400,
         "empty"),
        ("oversized upload", lambda: requests.post(url, data=b"\0" * int(UPLOAD_LIMIT_MB * 1e6 + 1),
                                                   headers={"Content-Type": "video/mp4"}), 413, "limit"),
        ("oversized, chunked", lambda: requests.post(
            url, data=iter([b"\0" * 500_000] * 5), headers={"Content-Type": "video/mp4"}), 413, "limit"),
        ("wrong type", lambda: requests.post(url, data=video, headers={"Content-Type": "text/plain"}), 415,
         "content type"),
        ("no type", lambda: requests.post(url, data=video, headers={"Content-Type": ""}), 415, ""),
        ("two files", lambda: requests.post(url, data=two_files,
                                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}),
         400, "exactly one"),
        ("multipart without a boundary", lambda: requests.post(
            url, data=video, headers={"Content-Type": "multipart/form-data"}), 400, "boundary"),
        ("bad JSON", lambda: requests.post(url, data=b"{nope", headers={"Content-Type": "application/json"}), 400,
         "JSON"),
        ("JSON not an object", lambda: requests.post(url, json=["a"]), 400, "path"),
        ("JSON with 100,000 keys", lambda: requests.post(url, json={f"k{i}": i for i in range(100_000)}), 413,
         "limit"),
        ("JSON nested 5000 deep", lambda: requests.post(url, data=b'{"path": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                                        headers={"Content-Type": "application/json"}), 400,
         "nested too deeply"),
        ("JSON repeating a key", lambda: requests.post(url, data=b'{"path": "a", "task": "b", "path": "c"}',
                                                       headers={"Content-Type": "application/json"}), 400,
         'repeats "path"'),
        ("URL", lambda: requests.post(url, json={"url": "http://127.0.0.1:1/x.mp4"}), 403, "URLs is off"),
        ("path outside the roots", lambda: requests.post(url, json={"path": str(media["secret"])}), 403,
         "outside"),
        ("/etc/passwd", lambda: requests.post(url, json={"path": "/etc/passwd"}), 403, "outside"),
        ("'..' in the path", lambda: requests.post(
            url, json={"path": str(media["allowed"] / ".." / "secret.mp4")}), 403, "'..'"),
        ("symlink out of the root", lambda: requests.post(url, json={"path": str(media["allowed"] / "link.mp4")}),
         403, "outside"),
        ("missing file", lambda: requests.post(url, json={"path": str(media["allowed"] / "nope.mp4")}), 404,
         "no such file"),
        ("directory", lambda: requests.post(url, json={"path": str(media["allowed"] / "sub")}), 400,
         "regular file"),
        ("relative path", lambda: requests.post(url, json={"path": "v0.mp4"}), 403, "outside"),
        # (a file that decodes too long: the total limit is tested on a blocking decoder in test_decoding.py and
        # test_a_stalled_or_crashed_decoder_costs_only_its_request; a long file no longer decodes slowly by seeking)
        ("NUL in the path", lambda: requests.post(url, json={"path": str(media["allowed"] / "v0.mp4") + "\0x"}),
         400, "NUL character"),
        ("unknown route", lambda: requests.get(f"{server}/admin"), 404, "GET /stexport/metrics (Prometheus)"),
        ("wrong method", lambda: requests.get(url), 405, "POST"),
        ("POST to /metrics", lambda: requests.post(f"{server}/metrics", data=b"x"), 405, "takes GET"),
    ]
    return [(what, call(), status, words) for what, call, status, words in cases]


def test_every_bad_request_is_a_4xx_json_error_and_the_server_keeps_serving(server, media, slow_video, local):
    for what, r, status, words in bad_requests(server, media, slow_video):
        assert r.status_code == status, (what, r.status_code, r.text)
        body = strict_json(r.text)
        assert set(body) == {"error"} and words in body["error"], (what, body)
        assert "stexport-serve-" not in body["error"], (what, body)  # no server-side temporary path leaks
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}
    video = media["videos"][1]
    r = post_video(server, video, "raw")
    assert r.status_code == 200, r.text
    same_result(strict_json(r.text), local[str(video)])


def test_serve_refuses_bad_input_before_starting(tiny_bundle, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "stexport.cli.app", "serve", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    r = run(tiny_bundle.path, "--allow-path", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"stexport: error: --allow-path {tmp_path / 'nope'}: no such directory (name directories whose files "
        "callers may classify by path)"]
    r = run(tmp_path / "no-bundle")
    assert r.returncode == 2 and "no such bundle" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run(tiny_bundle.path, "--route", "stexport/")
    assert r.returncode == 2 and "--route" in r.stderr


def test_missing_extra_names_the_pip_install(tiny_bundle):
    code = ("import sys; sys.modules['python_multipart'] = None; sys.argv = ['stexport', 'serve', "
            f"{str(tiny_bundle.path)!r}]; from stexport.cli.app import main; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["stexport: error: serve needs python_multipart, which this installation "
                                             "lacks; install it with: pip install 'stexport[serve]'"]


def serve_cli(*args, env=None, timeout=120, user=None):
    prefix = ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups"] if user is not None else []
    return subprocess.run([*prefix, sys.executable, "-m", "stexport.cli.app", "serve", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    return lines[0]


def test_port_in_use_is_one_line_before_ray_starts(tiny_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = serve_cli(tiny_bundle.path, "--port", port, timeout=60)
    assert one_line(r) == (f"stexport: error: --port {port}: already in use on 127.0.0.1 (another server listens "
                           "there); stop it or pass another --port")


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_host_not_on_this_machine_is_one_line(tiny_bundle, host):
    line = one_line(serve_cli(tiny_bundle.path, "--host", host, "--port", 0, timeout=60))
    assert line.startswith(f"stexport: error: --host {host}: not an address")
    assert line.endswith("pass one of its addresses (127.0.0.1 for this machine only, 0.0.0.0 for every interface)")


def test_privileged_port_as_a_user_is_one_line(tiny_bundle):
    """Tests run as root here, where port 80 binds: the check runs as user nobody (setpriv) when it can."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to drop to an unprivileged user with setpriv")
    probe = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable,
                            "-c", "import stexport.serving.app"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot import stexport from this checkout: {probe.stderr.strip()[-200:]}")
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 80:
            pytest.skip("this kernel lets every user bind port 80")
    code = "from stexport.serving.app import check_address; check_address('127.0.0.1', 80)"
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c",
                        code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and ("StexportError: --port 80: ports below 1024 need root (or CAP_NET_BIND_SERVICE); "
                                  "pass --port 1024 or higher, e.g. --port 8000") in r.stderr, r.stderr


def test_unreachable_cluster_is_one_line_at_once(tiny_bundle):
    with held_port() as port:  # bound, nothing listens there
        line = one_line(serve_cli(tiny_bundle.path, "--ray-address", f"127.0.0.1:{port}", timeout=60))
    assert line == (f"stexport: error: --ray-address 127.0.0.1:{port}: cannot reach a Ray cluster there "
                    "(Connection refused); check the address and that `ray start --head` runs there, or leave "
                    "--ray-address out for a local one")


def test_ray_failing_to_start_is_one_line(tiny_bundle, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    line = one_line(serve_cli(tiny_bundle.path, "--port", 0, env={"RAY_TMPDIR": str(not_a_dir / "ray")},
                              timeout=120))
    assert line.startswith("stexport: error: Ray could not start a local cluster (")
    assert line.endswith("check free memory and space in Ray's temporary directory ($RAY_TMPDIR, default "
                         "/tmp/ray); `stexport -v serve ...` shows Ray's log")


def test_a_proxy_killed_for_memory_says_so_not_the_port():
    """Ray's memory monitor kills the starting HTTP proxy when the machine runs low on memory (seen here with a
    ViT-B/16 benchmark beside the suite): the line says memory, not "pass another --port". The exception is
    Ray's own, carrying the death cause the GCS writes for such a worker."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    from stexport.serving.app import proxy_failure

    oom = ActorDiedError(ActorDiedErrorContext(
        class_name="ProxyActor", actor_id=bytes(16), pid=11095,
        error_message="The actor is dead because its worker process has died. Worker exit type: NODE_OUT_OF_MEMORY "
                      "Worker exit detail: 1 worker(s) were killed due to the node running low on memory."))
    line = proxy_failure(oom, "127.0.0.1", 8000)
    assert line.startswith("Ray Serve could not start its HTTP proxy on 127.0.0.1:8000 (ActorDiedError: The actor "
                           "died unexpectedly before finishing this task.); the machine ran low on memory")
    assert "--port" not in line and "\n" not in line
    other = proxy_failure(OSError("[Errno 98] Address already in use"), "127.0.0.1", 8000)
    assert other.endswith("(OSError: [Errno 98] Address already in use); pass another --port, or see "
                          "`stexport -v serve ...`")


def replica_decoders() -> list[int]:
    """The pids of the decoder children of this machine's Ray Serve replicas."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"stexport.runtime.decode_worker" in cmd and b"ServeReplica" in parent:
            out.append(int(pid))
    return out


def test_a_stalled_or_crashed_decoder_costs_only_its_request(server, media, local):
    """A file the decoder blocks on is 422 after --decode-timeout seconds without a frame; a decoder that
    crashes on a file is 422 naming the signal; the next request on the same replica gets its answer."""
    stall, fifo = blocking_video(media["allowed"], "stall")
    crash, crash_fifo = blocking_video(media["allowed"], "crash")
    video = media["videos"][2]
    try:
        r = requests.post(f"{server}/classify", json={"path": str(stall)}, timeout=120)
        assert r.status_code == 422 and strict_json(r.text)["error"].startswith(
            f"{stall}: decoding stalled: no frame for {DECODE_TIMEOUT_S:g} s"), r.text
        killer = crash_decoder_on(crash_fifo)
        r = requests.post(f"{server}/classify", json={"path": str(crash)}, timeout=120)
        killer.join(30)
        assert killer.killed and r.status_code == 422, r.text
        assert strict_json(r.text)["error"].startswith(f"{crash}: the decoder crashed (signal SIGSEGV) on this input")
    finally:
        release(fifo)
    for _ in range(3):  # every decoder of the replica, the replaced ones included
        r = post_video(server, video, "path")
        assert r.status_code == 200, r.text
        same_result(strict_json(r.text), local[str(video)])


def test_decoders_that_die_idle_are_replaced(server, media, local):
    """Issue 29 kind 2: the replica's decoder processes killed while idle (the pool used to stay broken: every
    later request got 500); the next requests get their answers and /healthz stays right."""
    pids = replica_decoders()
    assert pids, "no decoder process of a serve replica found"
    for pid in pids:
        os.kill(pid, 9)
    video = media["videos"][3]
    for how in ("raw", "path", "multipart"):
        r = post_video(server, video, how)
        assert r.status_code == 200, r.text
        same_result(strict_json(r.text), local[str(video)])
    assert not set(replica_decoders()) & set(pids)
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}


def test_a_replica_killed_mid_request_answers_in_the_json_error_shape(server, media, local):
    """Issue 29 kind 2: a replica killed (SIGKILL) while a request is in it: Ray's proxy gets no answer (it wrote a
    plain-text 500); the caller gets 503 {"error": ...} with Retry-After, Ray Serve replaces the replica, and
    the next request gets its answer."""
    stall, fifo = blocking_video(media["allowed"], "replica-killed")
    try:
        killer = crash_decoder_on(fifo, parent=True)
        r = requests.post(f"{server}/classify", json={"path": str(stall)}, timeout=120)
        killer.join(30)
        assert killer.killed, "the replica holding the request was not found"
        assert r.status_code == 503 and r.headers["retry-after"] == "1", (r.status_code, r.text)
        assert r.headers["content-type"] == "application/json"
        assert strict_json(r.text) == {"error": UNANSWERED}
    finally:
        release(fifo)
    for _ in range(120):  # bounded: the replacement replica loads the tiny model in seconds
        try:
            if requests.get(f"{server}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    video = media["videos"][1]
    r = post_video(server, video, "path")
    assert r.status_code == 200, r.text
    same_result(strict_json(r.text), local[str(video)])


def test_the_proxys_own_errors_are_json(server):
    """A path with no route is answered by Ray's proxy, not a replica: 404 in the JSON error shape too."""
    r = requests.get(server.rsplit("/", 1)[0] + "/no-such-route", timeout=30)
    assert r.status_code == 404 and r.headers["content-type"] == "application/json", r.text
    assert strict_json(r.text)["error"]


def test_decode_bomb_is_refused_from_its_header(server, media, local, decode_bomb):
    """Issue 29 kind 1: a tiny upload of huge frames is 422 from the stream's header (the server's default
    --max-pixels), before a frame is decoded; the limits are in /metadata; the next request gets its answer."""
    r = requests.post(f"{server}/classify", data=decode_bomb.read_bytes(), timeout=120,
                      headers={"Content-Type": "video/x-matroska", "X-Filename": "bomb.mkv"})
    assert r.status_code == 422, r.text
    assert strict_json(r.text)["error"].startswith("bomb.mkv: its frames are 8000x8000 (64 megapixels), over the "
                                                   "decoder's limit of 36 megapixels (--max-pixels)")
    limits = requests.get(f"{server}/metadata", timeout=30).json()["limits"]
    assert limits["max_pixels"] == 36_000_000 and limits["max_frames"] == 1_000_000
    assert limits["decode_timeout_s"] == DECODE_TIMEOUT_S and limits["max_decode_s"] == MAX_DECODE_S
    video = media["videos"][0]
    r = post_video(server, video, "raw")
    assert r.status_code == 200, r.text
    same_result(strict_json(r.text), local[str(video)])


def slow_sender(url: str, declared: int = 100_000, every_s: float = 0.25, give_up_s: float = 60.0) -> int:
    """POST `declared` bytes to `url` as a raw socket, one byte every `every_s` seconds, until the server
    answers (or `give_up_s`): the status it answered with, 0 for none."""
    import time
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=every_s) as sock:
        sock.sendall(f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: video/mp4\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode())
        end, answer = time.monotonic() + give_up_s, b""
        while time.monotonic() < end and b"\r\n" not in answer:
            try:
                sock.sendall(b"\0")
            except OSError:  # the server closed its side; its answer may still be readable
                pass
            try:
                got = sock.recv(4096)
                if not got:
                    break
                answer += got
            except TimeoutError:
                continue
    return int(answer.split()[1]) if answer.startswith(b"HTTP/") else 0


def test_slow_senders_get_408_and_hold_no_one_up(server, media, local):
    """Callers that trickle their body (1 byte per 0.25 s, below --min-upload-rate) are answered 408 after the
    grace period; while they are connected, /healthz and a good request are answered as usual. (Latency under
    this attack is a benchmark figure: benchmarks/serve_attacks.py.)"""
    video = media["videos"][2]
    with ThreadPoolExecutor(40) as pool:
        slow = [pool.submit(slow_sender, f"{server}/classify") for _ in range(40)]
        assert requests.get(f"{server}/healthz", timeout=60).json() == {"status": "ok"}
        r = post_video(server, video, "raw")
        assert r.status_code == 200, r.text
        same_result(strict_json(r.text), local[str(video)])
        statuses = [f.result() for f in slow]
    assert statuses == [408] * 40


def test_read_body_budget_and_rate():
    """requests.read_body on a real Starlette request: the upload budget (503, given back by the caller), the
    size limit (413) and the rate floor (408) for a sender that stops sending."""
    import asyncio

    from starlette.requests import Request

    from stexport.serving.requests import RATE_GRACE_S, RequestError, UploadBudget, read_body

    def request(chunks, stall_s=0.0):
        """A request whose body is `chunks`; with stall_s, more is announced and then nothing sent for stall_s."""
        async def receive():
            if chunks:
                return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks) or stall_s > 0}
            await asyncio.sleep(stall_s)
            return {"type": "http.request", "body": b"", "more_body": False}
        return Request({"type": "http", "method": "POST", "headers": [], "path": "/"}, receive)

    async def run():
        budget = UploadBudget(1000)
        r = request([b"a" * 600])
        assert await read_body(r, 2000, 1e3, budget) == b"a" * 600 and budget.held == r.state.held == 600
        with pytest.raises(RequestError) as e:
            await read_body(request([b"b" * 600]), 2000, 1e3, budget)
        assert e.value.status == 503 and "retry" in e.value.message
        budget.give(r.state.held)
        with pytest.raises(RequestError) as e:
            await read_body(request([b"c" * 300] * 4), 1000, 1e3, UploadBudget(10_000))
        assert e.value.status == 413
        # one chunk, then nothing: cut off once the average falls below 100 kB/s after the grace period
        stalled = request([b"d" * 1000], stall_s=60)
        with pytest.raises(RequestError) as e:
            await asyncio.wait_for(read_body(stalled, 10_000, 100e3, UploadBudget(10_000)), RATE_GRACE_S + 30)
        assert e.value.status == 408 and "100 kB/s" in e.value.message

    asyncio.run(run())


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: no psutil here)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def test_sigterm_stops_serve_cleanly_with_what_it_started(tiny_bundle):
    """A service manager's SIGTERM: exit 143 after the same shutdown as Ctrl-C (was: exit 134, Ray's agents
    left running); the startup line names every route; `--json`'s object is the whole of stdout (Ray's
    '(raylet) Task ServeController.graceful_shutdown failed' line followed it there). The processes of the local
    cluster it started end with it (no `ray stop`: that would end other sessions' Ray too)."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "stexport.cli.app", "serve", str(tiny_bundle.path), "--port",
                          "0", "--insecure", "-b", "onnxruntime", "--replica-cpus", "0.25", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = ""
        deadline = time.monotonic() + 240
        while "stexport: serving" not in started and time.monotonic() < deadline and p.poll() is None:
            started += p.stderr.readline()
        url = re.search(r" at (http://127\.0\.0\.1:[1-9]\d*)/classify", started).group(1)  # the bound port
        assert f"at {url}/classify (health {url}/healthz, metadata {url}/metadata, Open Inference Protocol " \
               f"{url}/v2, Prometheus {url}/metrics); Ctrl-C stops" in started, started
        assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
        below = _descendants(p.pid)
        assert below  # Ray's head processes, started by this server
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 143, err
    assert "stexport: stopping (SIGTERM)" in err and "Traceback" not in err, err
    assert strict_json(out)["url"] == url, out  # one JSON object and nothing else

    def alive(q: int) -> str | None:  # its command line, None once it has ended (a zombie has ended)
        try:
            with open(f"/proc/{q}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return None
            with open(f"/proc/{q}/cmdline") as f:
                return f.read().replace("\0", " ")[:120]
        except OSError:
            return None

    deadline = time.monotonic() + 30
    while (left := [c for c in map(alive, below) if c]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


def test_oip_json_nested_too_deeply_is_400():
    """A 20,000-deep JSON array in an infer request was a 500 (RecursionError); it is a 400 like any malformed
    request."""
    from stexport.serving import oip
    from stexport.serving.requests import RequestError

    with pytest.raises(RequestError) as e:
        oip.parse_http(b'{"inputs": ' + b"[" * 20000 + b"]" * 20000 + b"}", None, "m")
    assert e.value.status == 400 and "nested too deeply" in e.value.message
