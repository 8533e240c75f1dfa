"""`stexport serve` speaks the Open Inference Protocol (issue 31): tritonclient's HTTP and gRPC clients (binary
and JSON tensors, sync and async) against one real server on 127.0.0.1 with two tasks, a token and gRPC;
answers equal `stexport infer --json`; readiness, /metrics, access control and bad requests."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import held_port, serve_cli, write_video

pytest.importorskip("ray.serve")
pytest.importorskip("python_multipart")
pytest.importorskip("prometheus_client")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
requests = pytest.importorskip("requests")

from tritonclient.utils import InferenceServerException

STEXPORT = [sys.executable, "-m", "stexport.cli.app"]
TOKEN = "oip-test-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}  # pass copies: tritonclient.http adds its own headers to the dict
LIMIT_MB = 1.0
KW = {"width": 32, "pre_attn": True, "pre_mlp": True}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A swappable tiny base (task "own", 10 classes) with a pack "other" (6 classes, its own labels), five
    short videos and the token file."""
    from stexport.build.backbone import random_backbone
    from stexport.build.deltas import save_official
    from stexport.build.packing import build_pack
    from stexport.build.pipeline import build_bundle
    from stexport.build.synthetic import random_deltas

    root = tmp_path_factory.mktemp("oip")
    cfg = random_backbone("stexport-tiny-vit").config
    save_official(root / "own.pt", random_deltas(cfg, num_classes=10, seed=0, **KW))
    save_official(root / "other.pt", random_deltas(cfg, num_classes=6, seed=3, **KW))
    bundle = build_bundle(root / "own.pt", out=root / "base", swappable=True, max_classes=12,
                          backbone="stexport-tiny-vit", pretrained="none", precision="fp32")
    (root / "labels.txt").write_text("".join(f"motion {i}\n" for i in range(6)))
    pack = build_pack(root / "other.pt", bundle, out=root / "other.stpack", labels=str(root / "labels.txt"))
    videos = [write_video(root / f"v{i}.mp4", frames=14 + 6 * i, width=48 + 8 * i, height=40) for i in range(5)]
    (root / "token.txt").write_text(TOKEN + "\n")
    return {"root": root, "bundle": bundle, "pack": pack, "videos": videos, "token": root / "token.txt"}


@pytest.fixture(scope="module")
def want(base):
    """`stexport infer --json` for every video, per task."""
    out = {}
    for task, extra in (("own", []), ("other", ["--task", str(base["pack"].path)])):
        r = subprocess.run([*STEXPORT, "infer", *map(str, base["videos"]), "-m", str(base["bundle"].path),
                            "-b", "onnxruntime", "--json", *extra], capture_output=True, text=True, timeout=300,
                           check=False)
        assert r.returncode == 0, r.stderr
        for row in map(json.loads, r.stdout.splitlines()):
            out[task, row["path"]] = row
    return out


@pytest.fixture(scope="module")
def server(ray_cluster, base):
    """The one server of this module, started while another thread asks tritonclient whether it is ready:
    yields (HTTP "host:port", gRPC "host:port", what readiness said before start() returned)."""
    from stexport.serving import auth, oip_grpc
    from stexport.serving.app import ServeConfig, start, stop

    # both ports known before start() (the watcher asks from the first moment), held until the proxies bind
    with held_port() as port, held_port() as gport:
        cfg = ServeConfig(bundle=str(base["bundle"].path), backend="onnxruntime", port=port, grpc_port=gport,
                          tasks=(str(base["pack"].path),), token_sha256=auth.read_token(base["token"]),
                          max_upload_mb=LIMIT_MB, max_batch=8, batch_wait_s=0.05, decode_workers=2,
                          replica_cpus=0.5)
        url = f"127.0.0.1:{port}"
        seen, done = [], threading.Event()

        def watch():  # tritonclient.http from one thread only (not thread-safe), its own client
            client = httpclient.InferenceServerClient(url, network_timeout=5)
            while not done.is_set():
                try:
                    seen.append((client.is_server_ready(), client.is_model_ready("own", headers=dict(AUTH))))
                except Exception:  # noqa: BLE001 - nothing listens yet
                    pass
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            start(cfg)
        finally:
            done.set()
            watcher.join()
    # Serve keeps the gRPC options of whichever server first started it on the session's cluster (possibly one
    # of another test module): the module's gRPC checks go where the proxy really is, serving the protocol
    running = oip_grpc.running()
    assert running is not None and oip_grpc.SERVICER in running[1], running
    yield url, f"127.0.0.1:{running[0]}", seen
    stop(shutdown_ray=False)


def check_answer(probs: np.ndarray, labels: np.ndarray, want: dict) -> None:
    """One element's outputs equal infer --json's answer: the same top labels in order, scores within 1e-5."""
    assert [x.decode() if isinstance(x, bytes) else x for x in labels] == [t["label"] for t in want["top"]]
    for t in want["top"]:
        assert abs(float(probs[t["index"]]) - t["score"]) <= 1e-5
    assert abs(float(probs.sum()) - 1) < 1e-4


def video_input(module, paths, binary=True):
    data = np.array([p.read_bytes() for p in paths], dtype=np.object_)
    inp = module.InferInput("video", [len(paths)], "BYTES")
    if module is httpclient:
        inp.set_data_from_numpy(data, binary_data=binary)
    else:
        inp.set_data_from_numpy(data)
    return inp


def http_outputs(binary: bool):
    return [httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("labels", binary_data=binary)]


def test_readiness_is_false_until_the_model_is_loaded(server):
    url, gurl, seen = server
    assert seen and (False, False) in seen, seen  # the proxy answered before the replica had loaded
    assert (True, False) not in seen and (False, True) not in seen
    http = httpclient.InferenceServerClient(url)
    grpc = grpcclient.InferenceServerClient(gurl)
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    for name in ("own", "other"):
        assert http.is_model_ready(name, headers=dict(AUTH)) and grpc.is_model_ready(name, headers=dict(AUTH))
    assert not http.is_model_ready("nope", headers=dict(AUTH)) and not grpc.is_model_ready("nope", headers=dict(AUTH))


def test_metadata_names_every_task_its_inputs_outputs_and_labels(server, base):
    url, gurl, _ = server
    http = httpclient.InferenceServerClient(url)
    assert http.get_server_metadata(headers=dict(AUTH))["extensions"] == ["binary_tensor_data"]
    meta = http.get_model_metadata("other", headers=dict(AUTH))
    assert meta["parameters"]["labels"] == [f"motion {i}" for i in range(6)]
    assert {t["name"]: t["datatype"] for t in meta["inputs"]} == {"video": "BYTES", "frames": "UINT8"}
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 6]}
    own = http.get_model_metadata("own", headers=dict(AUTH))
    s = base["bundle"].manifest.input
    assert own["inputs"][1]["shape"] == [-1, s.frames, s.size, s.size, 3] and own["parameters"]["default"]
    g = grpcclient.InferenceServerClient(gurl).get_model_metadata("other", headers=dict(AUTH))
    assert g.name == "other" and [o.name for o in g.outputs] == ["probabilities", "labels"]
    assert list(g.outputs[0].shape) == [-1, 6]


def test_http_binary_and_json_tensors_equal_infer(server, base, want):
    """tritonclient.http, sync: every video of both tasks in one request each, binary outputs, then JSON
    outputs; the frames input as a JSON tensor: the mean over a video's views is infer's score."""
    from stexport.runtime.video import Sampling, decode

    url, _, _ = server
    http = httpclient.InferenceServerClient(url)
    videos = base["videos"]
    for task in ("own", "other"):
        for binary in (True, False):
            r = http.infer(task, [video_input(httpclient, videos)], outputs=http_outputs(binary), headers=dict(AUTH),
                           request_id=f"{task}-{binary}")
            probs, labels = r.as_numpy("probabilities"), r.as_numpy("labels")
            assert probs.dtype == np.float32 and probs.shape == (5, 10 if task == "own" else 6)
            assert r.get_response()["id"] == f"{task}-{binary}"
            for i, v in enumerate(videos):
                check_answer(probs[i], labels[i], want[task, str(v)])
    meta = http.get_model_metadata("own", headers=dict(AUTH))["parameters"]["sampling"]
    clips = decode(str(videos[2]), Sampling(**meta)).clips
    inp = httpclient.InferInput("frames", list(clips.shape), "UINT8")
    inp.set_data_from_numpy(clips, binary_data=False)
    r = http.infer("own", [inp], outputs=http_outputs(False), headers=dict(AUTH), parameters={"top_k": 2})
    assert r.as_numpy("labels").shape == (len(clips), 2)
    mean = r.as_numpy("probabilities").mean(axis=0)
    for t in want["own", str(videos[2])]["top"]:
        assert abs(mean[t["index"]] - t["score"]) <= 1e-5


def test_http_async_callers_equal_infer(server, base, want):
    """tritonclient.http.aio: 10 requests at once (both tasks, one video each), batched on the server."""
    from tritonclient.http import aio

    url, _, _ = server

    async def main():
        client = aio.InferenceServerClient(url)
        try:
            jobs = [(task, v) for task in ("own", "other") for v in base["videos"]]
            got = await asyncio.gather(*(client.infer(task, [video_input(httpclient, [v])], headers=dict(AUTH))
                                         for task, v in jobs))
            return list(zip(jobs, got))
        finally:
            await client.close()

    for (task, v), r in asyncio.run(main()):
        check_answer(r.as_numpy("probabilities")[0], r.as_numpy("labels")[0], want[task, str(v)])


def test_grpc_sync_and_async_equal_infer(server, base, want):
    """tritonclient.grpc (raw tensors, the only kind its client sends): sync, then tritonclient.grpc.aio."""
    from tritonclient.grpc import aio

    _, gurl, _ = server
    client = grpcclient.InferenceServerClient(gurl)
    for task in ("own", "other"):
        r = client.infer(task, [video_input(grpcclient, base["videos"])], headers=dict(AUTH), parameters={"top_k": 3})
        for i, v in enumerate(base["videos"]):
            labels = r.as_numpy("labels")[i]
            assert len(labels) == 3
            check_answer(r.as_numpy("probabilities")[i], labels, {"top": want[task, str(v)]["top"][:3]})

    async def main():
        async with aio.InferenceServerClient(gurl) as c:
            jobs = [(task, v) for task in ("other", "own") for v in base["videos"][:3]]
            got = await asyncio.gather(*(c.infer(task, [video_input(grpcclient, [v])], headers=dict(AUTH))
                                         for task, v in jobs))
            return list(zip(jobs, got))

    for (task, v), r in asyncio.run(main()):
        check_answer(r.as_numpy("probabilities")[0], r.as_numpy("labels")[0], want[task, str(v)])


def test_curl_with_a_plain_json_body(server, base):
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    url, _, _ = server
    meta = httpclient.InferenceServerClient(url).get_model_metadata("own", headers=dict(AUTH))
    shape = [1, *meta["inputs"][1]["shape"][1:]]
    body = {"id": "c1", "inputs": [{"name": "frames", "datatype": "UINT8", "shape": shape,
                                    "data": np.full(shape, 128, np.uint8).ravel().tolist()}]}
    (base["root"] / "req.json").write_text(json.dumps(body))
    r = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                        "--data-binary", f"@{base['root'] / 'req.json'}", f"http://{url}/v2/models/own/infer"],
                       capture_output=True, text=True, timeout=60, check=False)
    answer = json.loads(r.stdout)
    assert answer["id"] == "c1" and answer["model_name"] == "own"
    out = {o["name"]: o for o in answer["outputs"]}
    assert out["probabilities"]["shape"] == [1, 10] and abs(sum(out["probabilities"]["data"]) - 1) < 1e-4
    assert len(out["labels"]["data"]) == 5


def metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_count_what_was_sent(server, base):
    url, gurl, _ = server
    get = lambda: requests.get(f"http://{url}/metrics", headers=dict(AUTH), timeout=30).text
    before = get()
    http, grpc = httpclient.InferenceServerClient(url), grpcclient.InferenceServerClient(gurl)
    for v in base["videos"][:3]:
        http.infer("other", [video_input(httpclient, [v])], headers=dict(AUTH))
    grpc.infer("own", [video_input(grpcclient, base["videos"][:2])], headers=dict(AUTH))
    with pytest.raises(InferenceServerException):
        http.infer("own", [video_input(httpclient, [base["root"] / "labels.txt"])], headers=dict(AUTH))
    requests.post(f"http://{url}/classify", data=base["videos"][0].read_bytes(), timeout=60,
                  headers={"Content-Type": "video/mp4", **AUTH}).raise_for_status()
    after = get()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("stexport_requests_total", model="other", route="v2/models/infer", status="200") == 3
    assert delta("stexport_requests_total", model="own", route="grpc/ModelInfer", status="OK") == 1
    assert delta("stexport_requests_total", model="own", route="v2/models/infer", status="422") == 1
    # /classify counts under the task it ran (was model="")
    assert delta("stexport_requests_total", model="own", route="classify", status="200") == 1
    assert delta("stexport_decode_seconds_count") == 6  # 3 + 2 + 1 videos decoded
    assert delta("stexport_decode_failures_total", reason="invalid") == 1
    assert delta("stexport_queue_seconds_count") == 6
    assert delta("stexport_batch_videos_sum") == 6
    assert 1 <= delta("stexport_batch_videos_count") <= 6
    assert delta("stexport_backend_seconds_count") >= 1


def test_without_the_token_every_route_but_health_is_refused(server, base):
    import grpc as grpclib

    url, gurl, _ = server
    send = "send header 'Authorization: Bearer TOKEN'"
    said = {"": f"this server needs a token: {send}",
            "Bearer wrong-token-0123456789": "wrong token: it is not the one this server was started with "
                                             f"(--token-file); {send}",
            TOKEN: f"the authorization is not a bearer token: {send}"}  # the token without its scheme
    for bad in ({}, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": TOKEN}):
        for method, route in (("POST", "classify"), ("GET", "metadata"), ("GET", "stats"), ("GET", "metrics"),
                              ("GET", "v2"), ("GET", "v2/models/own"), ("GET", "v2/models/own/ready"),
                              ("POST", "v2/models/own/infer"), ("GET", "nope")):
            r = requests.request(method, f"http://{url}/{route}", headers=bad, data=b"{}", timeout=30)
            assert r.status_code == 401, (route, r.text)
            assert r.json()["error"] == said[bad.get("authorization", "")], (route, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        for route in ("healthz", "v2/health/live", "v2/health/ready"):
            assert requests.get(f"http://{url}/{route}", headers=bad, timeout=30).status_code == 200
        client = grpcclient.InferenceServerClient(gurl)
        assert client.is_server_live(headers=bad) and client.is_server_ready(headers=bad)
        for call, args in (("get_server_metadata", ()), ("get_model_metadata", ("own",)),
                           ("is_model_ready", ("own",)),
                           ("infer", ("own", [video_input(grpcclient, base["videos"][:1])]))):
            with pytest.raises(InferenceServerException) as e:
                getattr(client, call)(*args, headers=dict(bad))
            assert e.value.status() == str(grpclib.StatusCode.UNAUTHENTICATED), e.value
            assert said[bad.get("authorization", "")].replace("header 'A", "metadata 'a") in e.value.message()


def test_bad_requests_get_the_protocols_errors_and_the_server_keeps_serving(server, base, want):
    url, gurl, _ = server
    http, grpc = httpclient.InferenceServerClient(url), grpcclient.InferenceServerClient(gurl)
    v = base["videos"]

    def inp(module, name, dtype, array):
        i = module.InferInput(name, list(array.shape), dtype)
        i.set_data_from_numpy(array)
        return i

    corrupt = base["root"] / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 40_000, dtype=np.uint8).tobytes())
    big = base["root"] / "big.mp4"
    big.write_bytes(v[0].read_bytes() + b"\0" * int(LIMIT_MB * 1e6))
    t, size = base["bundle"].manifest.input.frames, base["bundle"].manifest.input.size
    cases = [  # (what, model, inputs(module), HTTP status, gRPC code, words)
        ("wrong datatype", "own", lambda m: [inp(m, "video", "UINT8", np.zeros(4, np.uint8))], 400,
         "INVALID_ARGUMENT", "datatype BYTES"),
        ("wrong shape", "own", lambda m: [inp(m, "frames", "UINT8", np.zeros((1, t - 1, size, size, 3), np.uint8))],
         400, "INVALID_ARGUMENT", f"shape [N, {t}, {size}, {size}, 3]"),
        ("missing input", "own", lambda m: [inp(m, "clip", "UINT8", np.zeros((1,), np.uint8))], 400,
         "INVALID_ARGUMENT", "takes one input"),
        ("unknown model", "nope", lambda m: [video_input(m, v[:1])], 404, "NOT_FOUND", "no model 'nope'"),
        ("oversized BYTES element", "own", lambda m: [video_input(m, [v[1], big])], 413, "RESOURCE_EXHAUSTED",
         "video[1]: 1"),
        ("corrupt video among good ones", "other", lambda m: [video_input(m, [v[0], corrupt, v[2]])], 422,
         "INVALID_ARGUMENT", "video[1]"),
        ("too many elements", "own", lambda m: [video_input(m, v * 2)], 400, "INVALID_ARGUMENT", "1 to 8"),
    ]
    for what, model, inputs, status, code, words in cases:
        with pytest.raises(InferenceServerException) as e:
            http.infer(model, inputs(httpclient), headers=dict(AUTH))
        assert words in e.value.message() and e.value.status() == str(status), (what, e.value)
        assert "video[0]" not in e.value.message() and "stexport-serve-" not in e.value.message(), what
        with pytest.raises(InferenceServerException) as e:
            grpc.infer(model, inputs(grpcclient), headers=dict(AUTH))
        assert words in e.value.message() and e.value.status() == f"StatusCode.{code}", (what, e.value)
    r = requests.post(f"http://{url}/v2/models/own/infer", data=b"{nope", headers=dict(AUTH), timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    with pytest.raises(InferenceServerException, match="top_k"):
        http.infer("own", [video_input(httpclient, v[:1])], headers=dict(AUTH), parameters={"top_k": 0})
    r = http.infer("other", [video_input(httpclient, v[:2])], headers=dict(AUTH))  # still serving
    for i in range(2):
        check_answer(r.as_numpy("probabilities")[i], r.as_numpy("labels")[i], want["other", str(v[i])])


def test_exposure_without_a_token_is_refused_in_one_line(base, tmp_path):
    def run(*args):
        return subprocess.run([*STEXPORT, "serve", str(base["bundle"].path), *map(str, args)], capture_output=True,
                              text=True, timeout=120, check=False)

    r = run("--host", "0.0.0.0")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        ("stexport: error: --host 0.0.0.0 exposes the server to other machines: give --token-file FILE (callers "
        "send 'Authorization: Bearer TOKEN'), or --insecure to serve anyone who reaches it")]
    r = run("--grpc-port", "8001")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "every address" in r.stderr
    (tmp_path / "short").write_text("abc\n")
    r = run("--host", "0.0.0.0", "--token-file", tmp_path / "short")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "16 characters" in r.stderr


def test_cli_server_joining_the_cluster_speaks_oip_under_its_prefix(server, base, want, ray_cluster):
    """`stexport serve --token-file --grpc-port --json` joining the session's cluster (another route prefix, so
    another Ray Serve application): tritonclient.http reaches its models under the prefix with the token; its
    --grpc-port cannot apply (Serve's gRPC proxy started with the module's server) and it says so. Ctrl-C
    removes only its application (exit 130, as Ctrl-C ends every command); the module's server keeps serving
    over gRPC."""
    import signal

    url, gurl, _ = server
    with held_port() as other:  # a gRPC port that cannot be the running proxy's
        proc, text = serve_cli(base["bundle"].path, "--task", base["pack"].path, "-b", "onnxruntime",
                               "--ray-address", ray_cluster, "--route", "/joined", "--port",
                               url.rsplit(":", 1)[1], "--grpc-port", other, "--token-file", base["token"],
                               "--replica-cpus", "0.25")
    try:
        info = json.loads(text)
        assert info["v2"] == f"http://{url}/joined/v2" and info["tasks"] == ["own", "other"]
        client = httpclient.InferenceServerClient(f"{url}/joined")
        assert client.is_server_ready() and client.is_model_ready("other", headers=dict(AUTH))
        r = client.infer("other", [video_input(httpclient, base["videos"][3:])], headers=dict(AUTH))
        for i, v in enumerate(base["videos"][3:]):
            check_answer(r.as_numpy("probabilities")[i], r.as_numpy("labels")[i], want["other", str(v)])
        assert requests.get(f"http://{url}/joined/v2", timeout=30).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.rstrip().endswith("stexport: interrupted"), err
    assert (f"stexport: warning: Ray Serve already runs on this cluster with its gRPC proxy on port "
            f"{gurl.rsplit(':', 1)[1]} serving stexport.serving.oip_grpc:add_servicer; --grpc-port ") in err, err
    assert "Traceback" not in err
    grpc = grpcclient.InferenceServerClient(gurl)
    r = grpc.infer("own", [video_input(grpcclient, base["videos"][:1])], headers=dict(AUTH))
    check_answer(r.as_numpy("probabilities")[0], r.as_numpy("labels")[0], want["own", str(base["videos"][0])])


def test_protocol_translation_refuses_malformed_requests():
    """oip.py alone: the binary extension's framing, BYTES framing, JSON values outside their datatype, and a
    round trip of the outputs through tritonclient's own response parser."""
    from tritonclient.utils import serialize_byte_tensor

    from stexport.serving import oip
    from stexport.serving.requests import RequestError

    blob = serialize_byte_tensor(np.array([b"ab", b"\0\xffc"], dtype=np.object_)).item()

    def head(size, **extra):
        return json.dumps({"inputs": [{"name": "video", "datatype": "BYTES", "shape": [2],
                                       "parameters": {"binary_data_size": size}}], **extra}).encode()

    h = head(len(blob))
    assert oip.parse_http(h + blob, str(len(h)), "m").inputs[0].data == [b"ab", b"\0\xffc"]
    for body, length, words in (
            (h + blob + b"x", str(len(h)), "no input claims"),
            (head(len(blob) + 1) + blob, str(len(head(len(blob) + 1))), "past the body's end"),
            (head(3) + b"\x09\0\0", str(len(head(3))), "malformed BYTES"),
            (h + blob, "12x", "Inference-Header-Content-Length"),
            (b'{"inputs": [{"name": "frames", "datatype": "UINT8", "shape": [2], "data": [1, 256]}]}', None,
             "outside UINT8"),
            (b'{"inputs": [{"name": "frames", "datatype": "UINT8", "shape": [1], "data": ["a"]}]}', None,
             "numbers"),
            (b'{"inputs": {}}', None, '"inputs"')):
        with pytest.raises(RequestError, match=words) as e:
            oip.parse_http(body, length, "m")
        assert e.value.status == 400
    m = oip.Model("m", ["a", "b", "c"], 8, 32, {}, "onnxruntime")
    req = oip.parse_http(h + blob, str(len(h)), "m")
    req.outputs = {"probabilities": True, "labels": False}
    body, length = oip.http_response(req, m, oip.outputs(m, np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]), 2))
    result = httpclient.InferResult.from_response_body(body, header_length=length)
    assert result.as_numpy("probabilities").tolist() == np.float32([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]).tolist()
    assert result.as_numpy("labels").tolist() == [["b", "c"], ["a", "b"]]


def test_grpc_typed_contents_read_like_raw_ones():
    """A ModelInferRequest with typed `contents` (what clients other than tritonclient may send) reads as the
    same tensors as raw_input_contents."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.utils import serialize_byte_tensor

    from stexport.serving import oip

    frames = np.arange(2 * 3, dtype=np.uint8).reshape(2, 3)
    typed = pb.ModelInferRequest(model_name="m", id="7")
    as_frames = typed.inputs.add(name="frames", datatype="UINT8", shape=[2, 3])
    as_frames.contents.uint_contents.extend(frames.ravel().tolist())
    typed.inputs.add(name="video", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"ab", b"c"])
    typed.parameters["top_k"].int64_param = 2
    raw = pb.ModelInferRequest(model_name="m", id="7", inputs=[
        pb.ModelInferRequest.InferInputTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in typed.inputs])
    raw.raw_input_contents.extend([frames.tobytes(), serialize_byte_tensor(np.array([b"ab", b"c"], np.object_)).item()])
    for req in (oip.from_grpc(typed), oip.from_grpc(raw)):
        assert req.inputs[0].data.tolist() == frames.ravel().tolist() and req.inputs[1].data == [b"ab", b"c"]
        assert req.id == "7"
    assert oip.from_grpc(typed).parameters == {"top_k": 2}
