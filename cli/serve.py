"""`stexport serve`: classify uploaded videos over HTTP on Ray Serve."""

from __future__ import annotations

import signal
import time
from urllib.parse import urlsplit
from pathlib import Path

import typer

from stexport.cli.common import OPTION_HELP, TASK_BACKENDS, Flag, handle_errors, parse_options, print_json, register as add_command
from stexport.cli.common import decode_timeout_option, header_limit_options, max_decode_option

_HEADER = header_limit_options()

EXAMPLES = """
Examples:

  stexport serve BUNDLE                                   # http://127.0.0.1:8000, auto backend

  curl --data-binary @clip.mp4 -H 'Content-Type: video/mp4' http://127.0.0.1:8000/classify

  curl -F video=@clip.mp4 http://127.0.0.1:8000/classify  # multipart upload

  stexport serve BUNDLE --allow-path /data/videos         # also {"path": "/data/videos/a.mp4"}

  stexport serve BUNDLE --replicas 2 --threads 4 --max-batch 16 --port 9000

  curl http://127.0.0.1:8000/metadata

  stexport serve BASE --task ssv2.stpack --task diving.stpack   # task packs on one swappable base

  curl --data-binary @clip.mp4 -H 'Content-Type: video/mp4' 'http://127.0.0.1:8000/classify?task=ssv2'

  curl -F video=@clip.mp4 -F task=diving http://127.0.0.1:8000/classify

  stexport serve BUNDLE --grpc-port 8001 --token-file token.txt   # Open Inference Protocol, HTTP and gRPC

  curl -H "Authorization: Bearer $(cat token.txt)" http://127.0.0.1:8000/v2/models/NAME   # model metadata

  curl http://127.0.0.1:8000/metrics                      # Prometheus (with the token where one is set)
"""


@handle_errors
def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `stexport build`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Default: loopback only; 0.0.0.0 "
                             "exposes the server to the network."),
    port: int = typer.Option(8000, "--port", min=0, max=65535,
                             help="HTTP port; 0: one the kernel picks, printed in the URL."),
    route: str = typer.Option("/", "--route", help="Route prefix, e.g. /stexport (routes: PREFIX/classify, "
                              "/healthz, /metadata, /stats, /metrics, /v2/... (Open Inference Protocol))."),
    backend: str = typer.Option("auto", "--backend", "-b", help="auto (as `infer` picks) or a backend name: {backends}."),
    option: list[str] = typer.Option([], "--option", help=OPTION_HELP),
    threads: int = typer.Option(None, "--threads", min=1, help="Backend CPU threads per replica."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Model replicas (Ray Serve num_replicas)."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0, help="CPUs Ray reserves per replica."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Videos from different callers run together "
                                  "in one backend call (serve.batch)."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", min=0, help="How long a batch waits to fill."),
    max_upload_mb: float = typer.Option(100.0, "--max-upload-mb", min=0.001, help="Larger uploads get 413."),
    min_upload_rate: float = typer.Option(64.0, "--min-upload-rate", min=0, metavar="KB/S", help="A request "
                                          "body that arrives slower than this on average (after its first 2 s) "
                                          "gets 408, so slow senders cannot hold the server's request slots; "
                                          "0: no floor."),
    upload_budget_mb: float = typer.Option(1024.0, "--upload-budget-mb", min=0.001, help="Request bodies one "
                                           "replica holds at once; past it 503 (retry): with the decoders' "
                                           "--decode-memory-mb, what bounds a replica's memory."),
    decode_timeout: float = decode_timeout_option(),
    max_decode_s: float = max_decode_option(30.0, "30 (a server bounds each request's decoding; such a video "
                                            "gets 422)"),
    max_pixels: int = _HEADER["max_pixels"],
    max_frames: int = _HEADER["max_frames"],
    decode_memory_mb: int = _HEADER["decode_memory_mb"],
    decode_workers: int = typer.Option(1, "--decode-workers", min=1, help="Decoding processes per replica."),
    allow_path: list[Path] = typer.Option([], "--allow-path", help="Directory whose files callers may name "
                                          "with {\"path\": ...} (repeatable). Default: none, paths are refused."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Classes per answer."),
    task: list[Path] = typer.Option([], "--task", help="A task pack (`stexport pack`) for the swappable "
                                    "BUNDLE (repeatable): one backend holds the base and every pack, and each "
                                    "request names its task (?task=NAME, a \"task\" JSON or form field, or the "
                                    "serve_multiplexed_model_id header). " + TASK_BACKENDS),
    default_task: str = typer.Option(None, "--default-task", metavar="NAME", help="The task of requests that "
                                     "name none. Default: the bundle's own (named after its adapter "
                                     "checkpoint's file stem)."),
    grpc_port: int = typer.Option(None, "--grpc-port", min=1, max=65535, help="Also serve the Open Inference "
                                  "Protocol over gRPC (inference.GRPCInferenceService) on this port. Ray Serve's "
                                  "gRPC proxy listens on every address, so this needs --token-file or --insecure."),
    token_file: Path = typer.Option(None, "--token-file", help="A file holding one token line (16+ characters): "
                                    "every route but the health checks then wants 'Authorization: Bearer TOKEN' "
                                    "(HTTP header or gRPC metadata), else 401 / UNAUTHENTICATED."),
    insecure: bool = Flag(False, "--insecure", help="Serve beyond loopback (--host, --grpc-port) without a token."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join a running Ray cluster instead of "
                                    "starting a local one on 127.0.0.1 (as its own Ray Serve application, named "
                                    "after --route; Ctrl-C removes only it)."),
    as_json: bool = Flag(False, "--json", help="Once the server answers, print its URL and routes as JSON on "
                         "stdout (for scripts that start it)."),
):
    """Serve BUNDLE over HTTP on Ray Serve: POST a video to PREFIX/classify (raw body or multipart) and get
    the JSON `stexport infer --json` prints for it.

    Requests from different callers are batched into one backend call (one per task: tasks are never mixed
    in a call). With --task packs, a request runs the task it names, decoded with that task's sampling and
    answered with its labels and name; an unknown name gets 404 listing the loaded tasks, and GET
    PREFIX/metadata lists them. Safe defaults: binds 127.0.0.1; no
    server-side paths (--allow-path DIR enables them, confined to those directories: no '..', no symlinks out);
    no URL fetching; uploads over --max-upload-mb and videos whose decoder reads no frame for --decode-timeout
    seconds, takes longer than --max-decode-s in all or crashes are refused (422); a decoder process that dies
    is replaced. Every bad request gets a 4xx JSON {"error": ...}; the server keeps serving. Ctrl-C stops it.
    A port in use, an address not on this machine, a privileged port, an unreachable --ray-address or Ray
    failing to start is one line naming the cause and the fix, exit 2 (checked before Ray starts).
    Needs `pip install 'stexport[serve]'`.
    """
    from stexport.serving import app as srv
    from stexport.serving import auth

    srv.require_serve()
    token = auth.read_token(token_file) if token_file else None
    if ray_address:  # where the server will listen or join, checked before the backend opens and Ray starts
        srv.check_cluster(ray_address)
    else:
        srv.check_address(host, port)
    options = parse_options(option)
    cfg = srv.check_config(srv.ServeConfig(
        bundle=str(bundle), backend=backend, options=options, top_k=top_k, host=host, port=port,
        route_prefix=route, replicas=replicas, replica_cpus=replica_cpus, threads=threads, max_batch=max_batch,
        batch_wait_s=batch_wait_ms / 1000, max_upload_mb=max_upload_mb,
        min_upload_kbps=min_upload_rate, upload_budget_mb=upload_budget_mb, decode_timeout_s=decode_timeout, max_decode_s=max_decode_s,
        max_pixels=max_pixels, max_frames=max_frames, decode_memory_mb=decode_memory_mb,
        decode_workers=decode_workers, allow_paths=tuple(str(p) for p in allow_path),
        tasks=tuple(str(p) for p in task), default_task=default_task, grpc_port=grpc_port, token_sha256=token,
        insecure=insecure))
    if not auth.is_loopback(host):
        typer.echo(f"stexport: warning: binding {host}: the server is reachable from other machines", err=True)
    if insecure and not token and (grpc_port or not auth.is_loopback(host)):
        typer.echo("stexport: warning: --insecure: no token; anyone who reaches this server can use it", err=True)
    names, default = srv.task_list(cfg)

    def terminate(signum, frame):  # a service manager's stop: the same clean shutdown as Ctrl-C, exit 143
        raise SystemExit(128 + signum)

    # without it SIGTERM killed the interpreter mid-way through Ray's threads (exit 134) and left the local
    # cluster's processes running; start() keeps it past Ray's own handler
    signal.signal(signal.SIGTERM, terminate)
    try:
        url = srv.start(cfg, ray_address, checked=True)
        if as_json:
            grpc_at = f"{urlsplit(url).hostname}:{grpc_port}" if grpc_port else None
            print_json({"url": url, "classify": f"{url}/classify", "healthz": f"{url}/healthz",
                        "metadata": f"{url}/metadata", "stats": f"{url}/stats", "metrics": f"{url}/metrics",
                        "v2": f"{url}/v2", "grpc": grpc_at, "bundle": cfg.bundle, "tasks": names,
                        "default_task": default})
        on = f" with tasks {', '.join(n + ' (default)' * (n == default) for n in names)}" if cfg.tasks else ""
        typer.echo(f"stexport: serving {cfg.bundle}{on} at {url}/classify (health {url}/healthz, metadata "
                   f"{url}/metadata, Open Inference Protocol {url}/v2, Prometheus {url}/metrics); Ctrl-C stops",
                   err=True)
        quiet_stdout()
        while True:  # until Ctrl-C: its KeyboardInterrupt ends the command as "interrupted", exit code 130
            time.sleep(3600)
    except SystemExit as e:
        if e.code == 128 + signal.SIGTERM:
            typer.echo("stexport: stopping (SIGTERM)", err=True)
        raise
    finally:
        srv.stop(app=srv.app_name(cfg) if ray_address else None)  # a joined cluster keeps its other apps


def quiet_stdout() -> None:
    """Nothing more goes to standard output once the server's URL is printed (`--json`'s object stays the whole
    of it): Ray's shutdown lines ('(raylet) Task ServeController.graceful_shutdown failed ...') go to stderr
    with -v, else nowhere."""
    import logging
    import os
    import sys

    sys.stdout.flush()
    verbose = logging.getLogger("stexport").isEnabledFor(logging.INFO)
    target = os.dup(2) if verbose else os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 1)
    os.close(target)


def register(app: typer.Typer) -> None:
    add_command(app, "serve", serve, EXAMPLES)
