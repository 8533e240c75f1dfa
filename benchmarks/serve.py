"""Serving overhead: the Ray Serve endpoint (`stexport serve`) against in-process classification, and its
three protocols against each other, one run.

    python benchmarks/serve.py BUNDLE VIDEOS [--requests 64] [--clients 1,8,32] [--protocols classify,oip-http,oip-grpc]

VIDEOS: a `<video> <label>` list or a directory. Per row: latency p50/p99 (seconds per video, as a caller sees
it: decode + model, plus upload and HTTP for the endpoint) and throughput (videos/s). Rows:

- in-process, 1 caller: what a replica does per video, without HTTP (decode with one FFmpeg thread, then
  `ServingClassifier.classify`), each video in turn; measured before and after the endpoint rows;
- in-process, classify_many: throughput of `Classifier.classify_many` (decoding overlapped with the model);
- per protocol, N concurrent callers, the same videos cycled until --requests requests have been answered:
  `classify`: POST PREFIX/classify with the raw video bytes (a thread pool of N, `requests`);
  `oip-http`: the Open Inference Protocol over HTTP with binary tensors (tritonclient.http.aio, N coroutines:
  its sync client is not thread-safe); `oip-grpc`: over gRPC (tritonclient.grpc.aio, N coroutines). One video
  per request (BYTES [1]), so each protocol carries the same work. The server runs with a token (each request
  carries it), as a server beyond loopback must.

Server overhead per request = endpoint p50 at 1 caller − the lower in-process p50 (upload, HTTP proxy, Ray's request
routing, the decoding process's hand-off, the batch wait). Scores through the endpoint are checked equal to
the in-process ones (top-1 label) so a fast wrong server cannot pass. Starts a local Ray on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row(name: str, lat: list[float], wall: float) -> dict:
    lat = np.asarray(lat)
    return {"setting": name, "requests": len(lat), "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)), "videos_per_s": len(lat) / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("videos", help="a '<video> <label>' list or a directory of videos")
    p.add_argument("--requests", type=int, default=64, help="requests per endpoint setting (bounded)")
    p.add_argument("--clients", default="1,8,32", help="concurrent callers, comma-separated")
    p.add_argument("--protocols", default="classify,oip-http,oip-grpc", help="endpoint protocols, comma-separated")
    p.add_argument("--backend", "-b", default="auto")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--json", dest="as_json", action="store_true")
    a = p.parse_args()

    import ray
    import requests

    from stexport.runtime.video import read_clip_list
    from stexport.serving.app import ServeConfig, start, stop

    videos = [Path(v) for v, _ in read_clip_list(a.videos)]
    blobs = {v: v.read_bytes() for v in videos}

    # in-process: the work a replica does for one video (decode with one FFmpeg thread, then the model), run
    # before and after the endpoint rows so the machine's drift shows in both
    from stexport.runtime.video import decode
    from stexport.serving.app import Clips, ServingClassifier

    model = ServingClassifier(a.bundle, backend=a.backend)
    backend = model.clf.backend.name
    local_top: dict = {}

    def in_process() -> tuple[list[float], float]:
        lat = []
        t0 = time.perf_counter()
        for v in videos:
            t = time.perf_counter()
            d = decode(v, model.sampling, threads=1)
            out = model.classify([Clips(str(v), d.clips, d.frames, 0.0, d.notes)])
            local_top[v] = out[0]["top"][0]["label"]
            lat.append(time.perf_counter() - t)
        return lat, time.perf_counter() - t0

    in_process()  # warm-up
    lat_before, wall_before = in_process()
    t0 = time.perf_counter()
    n_many = sum(1 for _ in model.clf.classify_many(videos))
    rows = [row("in-process, 1 caller", lat_before, wall_before)]
    many = {"setting": "in-process, classify_many", "requests": n_many, "p50_s": None, "p99_s": None,
            "videos_per_s": n_many / (time.perf_counter() - t0)}

    t = time.perf_counter()
    ray.init(_node_ip_address="127.0.0.1", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import secrets

    from stexport.serving.auth import digest

    token = secrets.token_urlsafe(32)
    auth = {"authorization": f"Bearer {token}"}
    cfg = ServeConfig(bundle=a.bundle, backend=a.backend, port=a.port or free_port(), max_batch=a.max_batch,
                      batch_wait_s=a.batch_wait_ms / 1000, decode_workers=a.decode_workers, replica_cpus=0,
                      grpc_port=free_port(), token_sha256=digest(token), max_ongoing_requests=64)
    url = start(cfg)
    model_name = model.default
    print(f"server up in {time.perf_counter() - t:.1f} s (Ray + Serve + model) at {url}", file=sys.stderr)
    wrong = 0
    try:
        def call(v):
            t = time.perf_counter()
            r = requests.post(f"{url}/classify", data=blobs[v], headers={"Content-Type": "video/mp4", **auth},
                              timeout=300)
            r.raise_for_status()
            return v, time.perf_counter() - t, r.json()["top"][0]["label"]

        def threads(n, jobs):
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(call, jobs[: 2 * n]))  # warm-up at this concurrency
                t0 = time.perf_counter()
                out = list(pool.map(call, jobs))
                return out, time.perf_counter() - t0

        def coroutines(kind, n, jobs):
            import asyncio

            import tritonclient.grpc.aio as grpc_aio
            import tritonclient.http.aio as http_aio
            from tritonclient import grpc, http

            mod, aio = (http, http_aio) if kind == "oip-http" else (grpc, grpc_aio)
            where = url.split("//", 1)[1] if kind == "oip-http" else f"127.0.0.1:{cfg.grpc_port}"

            async def run():
                client = aio.InferenceServerClient(where)

                async def one(v):
                    inp = mod.InferInput("video", [1], "BYTES")
                    data = np.array([blobs[v]], dtype=np.object_)
                    if mod is http:
                        inp.set_data_from_numpy(data, binary_data=True)
                    else:
                        inp.set_data_from_numpy(data)
                    t = time.perf_counter()
                    r = await client.infer(model_name, [inp], headers=dict(auth))
                    return v, time.perf_counter() - t, r.as_numpy("labels")[0][0].decode()

                async def drain(queue, out):
                    while queue:
                        out.append(await one(queue.pop()))

                try:
                    warm, head = [], list(jobs[: 2 * n])  # warm-up at this concurrency
                    await asyncio.gather(*(drain(head, warm) for _ in range(n)))
                    queue, out = list(reversed(jobs)), []
                    t0 = time.perf_counter()
                    await asyncio.gather(*(drain(queue, out) for _ in range(n)))
                    return out, time.perf_counter() - t0
                finally:
                    await client.close()

            return asyncio.run(run())

        names = {"classify": "classify", "oip-http": "OIP HTTP (binary)", "oip-grpc": "OIP gRPC"}
        for v in videos[:4]:  # warm-up: every batch size the server will meet compiles before timing
            call(v)
        for kind in a.protocols.split(","):
            for n in (int(c) for c in a.clients.split(",")):
                jobs = [videos[i % len(videos)] for i in range(a.requests)]
                out, wall = threads(n, jobs) if kind == "classify" else coroutines(kind, n, jobs)
                wrong += sum(label != local_top[v] for v, _, label in out)
                rows.append(row(f"{names[kind]}, {n} caller{'s' * (n > 1)}", [x for _, x, _ in out], wall))
        stats = requests.get(f"{url}/stats", headers=auth, timeout=30).json()
    finally:
        stop()
    lat_after, wall_after = in_process()
    model.close()
    rows.insert(1, row("in-process, 1 caller (after)", lat_after, wall_after))
    rows.insert(2, many)
    base = min(rows[0]["p50_s"], rows[1]["p50_s"])
    overhead = next((r["p50_s"] for r in rows if r["setting"].endswith(", 1 caller")), base) - base
    result = {"bundle": a.bundle, "backend": backend, "videos": len(videos), "rows": rows,
              "overhead_per_request_s": overhead, "server_stats": stats, "top1_mismatches": wrong}
    if a.as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{a.bundle} on {backend}, {len(videos)} videos")
        print(f"{'setting':<34} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'videos/s':>9}")

        def ms(x):
            return "-" if x is None else f"{x * 1e3:.1f}"

        for r in rows:
            print(f"{r['setting']:<34} {r['requests']:>8} {ms(r['p50_s']):>8} {ms(r['p99_s']):>8} "
                  f"{r['videos_per_s']:>9.1f}")
        print(f"server overhead per request (first endpoint p50 at 1 caller - lower in-process p50): "
              f"{overhead * 1e3:.1f} ms")
        print(f"server: {stats['batches']} batches for {stats['requests']} requests, largest {stats['largest_batch']}; "
              f"top-1 mismatches vs in-process: {wrong}")
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
