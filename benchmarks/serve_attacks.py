"""`stexport serve` under the attacks of the field (issue 29, kind 1): what /healthz and a good request cost
while strangers try to stall the server, and the server's peak memory, in one run.

    python benchmarks/serve_attacks.py BUNDLE VIDEO [--probes 5] [--slow 64] [--bombs 4]

Starts `stexport serve BUNDLE` (defaults, as a user would) on a free loopback port, then for each attack starts
the attackers, waits 3 s, and times --probes sequential probes of GET /healthz and of POST /classify with
VIDEO (a good request) while the attack runs; the attack then stops (every loop here is bounded). Attacks:

- none: the baseline;
- json-keys: 8 callers each sending a 1.2 MB JSON body with 100,000 keys, again and again;
- json-55mb: 2 callers sending a 55 MB JSON body to the Open Inference Protocol's infer route;
- slow-N: N callers trickling a body at 1 byte/s (each reconnects when cut off);
- bombs-N: N callers uploading a 16000x16000 PNG-in-Matroska frame (made by ffmpeg; ~2 MB, ~1 GB to decode).

Per attack: /healthz and good-request latency (median and max, seconds), the attackers' answers by status, and the
peak resident memory of the server's replica with its decoding processes (MB, /proc, sampled every 50 ms).
Prints a Markdown table and writes --json FILE when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_rss_mb() -> float:
    """Resident MB of every Ray Serve replica process and its descendants (the decoders)."""
    parent, rss, roots = {}, {}, []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            status = Path(f"/proc/{d}/status").read_text()
        except OSError:
            continue
        pid = int(d)
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[pid] = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        if cmd.startswith(b"ray::ServeReplica"):
            roots.append(pid)
    keep = set(roots)
    grew = True
    while grew:
        more = {p for p, pp in parent.items() if pp in keep} - keep
        grew, keep = bool(more), keep | more
    return sum(rss[p] for p in keep) / 1024


class Peak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0.0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, replica_rss_mb())
            self.stop.wait(0.05)


def slow_client(url: str, stop: threading.Event, statuses: Counter) -> None:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    while not stop.is_set():
        try:
            with socket.create_connection((u.hostname, u.port), timeout=1.0) as s:
                s.sendall(f"POST {u.path} HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
                          f"Content-Length: 1000000\r\n\r\n".encode())
                answer = b""
                while not stop.is_set() and b"\r\n" not in answer:
                    try:
                        s.sendall(b"\0")
                    except OSError:
                        pass
                    try:
                        got = s.recv(4096)
                        if not got:
                            break
                        answer += got
                    except TimeoutError:
                        continue
                statuses[answer.split()[1].decode() if answer.startswith(b"HTTP/") else "none"] += 1
        except OSError:
            statuses["refused"] += 1
            time.sleep(0.1)


def repeat(call, stop: threading.Event, statuses: Counter) -> None:
    while not stop.is_set():
        try:
            statuses[str(call().status_code)] += 1
        except requests.RequestException as e:
            statuses[type(e).__name__] += 1


def probe(url: str, video: bytes, n: int) -> tuple[list[float], list[float], list[int]]:
    health, good, codes = [], [], []
    for _ in range(n):
        t = time.perf_counter()
        requests.get(f"{url}/healthz", timeout=120)
        health.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = requests.post(f"{url}/classify", data=video, headers={"Content-Type": "video/mp4"}, timeout=300)
        good.append(time.perf_counter() - t)
        codes.append(r.status_code)
    return health, good, codes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("video", type=Path, help="a good video for the probes")
    p.add_argument("--probes", type=int, default=5)
    p.add_argument("--slow", type=int, default=64, help="slow senders")
    p.add_argument("--bombs", type=int, default=4, help="decode bombs in flight")
    p.add_argument("--json", dest="json_out", type=Path)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-attacks-"))
    bomb = work / "bomb.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=black:s=16000x16000:d=0.04:r=25",
                    "-frames:v", "1", "-pix_fmt", "gray", "-c:v", "png", str(bomb)], check=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "stexport.cli.app", "serve", a.bundle, "--port", str(port),
                               "--json"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        text = ""
        while True:  # --json prints one indented object once the server answers
            line = server.stdout.readline()
            if not line:
                raise SystemExit("stexport serve exited before answering")
            text += line
            if line.startswith("}"):
                break
        url = json.loads(text)["url"]
        video, keys = a.video.read_bytes(), json.dumps({f"k{i}": i for i in range(100_000)}).encode()
        big = b'{"inputs": [{"name": "video", "shape": [1], "datatype": "BYTES", "data": ["' + b"a" * 55_000_000 \
            + b'"]}]}'
        bomb_bytes = bomb.read_bytes()
        name = requests.get(f"{url}/metadata", timeout=30).json()["default_task"]
        infer = f"{url}/v2/models/{name}/infer"
        attacks = {
            "none": (0, None),
            "json-keys": (8, lambda: requests.post(f"{url}/classify", data=keys,
                                                   headers={"Content-Type": "application/json"}, timeout=300)),
            "json-55mb": (2, lambda: requests.post(infer, data=big, headers={"Content-Type": "application/json"},
                                                   timeout=300)),
            f"slow-{a.slow}": (a.slow, "slow"),
            f"bombs-{a.bombs}": (a.bombs, lambda: requests.post(f"{url}/classify", data=bomb_bytes,
                                                                headers={"Content-Type": "video/x-matroska"},
                                                                timeout=300)),
        }
        rows = []
        for what, (n, call) in attacks.items():
            stop, statuses, peak = threading.Event(), Counter(), Peak()
            peak.start()
            workers = [threading.Thread(target=slow_client if call == "slow" else repeat, daemon=True,
                                        args=(f"{url}/classify", stop, statuses) if call == "slow" else
                                        (call, stop, statuses)) for _ in range(n)]
            for w in workers:
                w.start()
            time.sleep(3.0)  # past read_body's 2 s grace: slow senders are being cut off meanwhile
            health, good, codes = probe(url, video, a.probes)
            stop.set()
            for w in workers:
                w.join(timeout=120)
            peak.stop.set()
            peak.join()
            rows.append({"attack": what, "healthz_p50_s": sorted(health)[len(health) // 2], "healthz_max_s": max(health),
                         "good_p50_s": sorted(good)[len(good) // 2], "good_max_s": max(good),
                         "good_status": dict(Counter(codes)), "attackers_got": dict(statuses),
                         "peak_replica_mb": round(peak.peak)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    print("| attack | /healthz p50 / max (s) | good request p50 / max (s) | attackers got | peak replica MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r['healthz_p50_s']:.3f} / {r['healthz_max_s']:.3f} | {r['good_p50_s']:.3f} / "
              f"{r['good_max_s']:.3f} | {', '.join(f'{k}: {v}' for k, v in r['attackers_got'].items()) or '-'} | "
              f"{r['peak_replica_mb']} |")
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
