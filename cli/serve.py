"""`stexport serve`: classify uploaded videos over HTTP on Ray Serve."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from stexport.cli.common import OPTION_HELP, TASK_BACKENDS, Flag, handle_errors, parse_options, print_json, register as add_command

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
"""


@handle_errors
def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `stexport build`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Default: loopback only; 0.0.0.0 "
                             "exposes the server to the network."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="HTTP port."),
    route: str = typer.Option("/", "--route", help="Route prefix, e.g. /stexport (routes: PREFIX/classify, "
                              "/healthz, /metadata, /stats)."),
    backend: str = typer.Option("auto", "--backend", "-b", help="auto (as `infer` picks) or a backend name."),
    option: list[str] = typer.Option([], "--option", help=OPTION_HELP),
    threads: int = typer.Option(None, "--threads", min=1, help="Backend CPU threads per replica."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Model replicas (Ray Serve num_replicas)."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0, help="CPUs Ray reserves per replica."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Videos from different callers run together "
                                  "in one backend call (serve.batch)."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", min=0, help="How long a batch waits to fill."),
    max_upload_mb: float = typer.Option(100.0, "--max-upload-mb", min=0.001, help="Larger uploads get 413."),
    decode_timeout: float = typer.Option(30.0, "--decode-timeout", min=0.01, help="Seconds a video may take to "
                                         "decode; its decoding process is killed after that (422)."),
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
    no URL fetching; uploads over --max-upload-mb and videos that decode longer than --decode-timeout are
    refused. Every bad request gets a 4xx JSON {"error": ...}; the server keeps serving. Ctrl-C stops it.
    Needs `pip install 'stexport[serve]'`.
    """
    from stexport.serving import app as srv

    srv.require_serve()
    options = parse_options(option)
    cfg = srv.check_config(srv.ServeConfig(
        bundle=str(bundle), backend=backend, options=options, top_k=top_k, host=host, port=port,
        route_prefix=route, replicas=replicas, replica_cpus=replica_cpus, threads=threads, max_batch=max_batch,
        batch_wait_s=batch_wait_ms / 1000, max_upload_mb=max_upload_mb, decode_timeout_s=decode_timeout,
        decode_workers=decode_workers, allow_paths=tuple(str(p) for p in allow_path),
        tasks=tuple(str(p) for p in task), default_task=default_task))
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"stexport: warning: binding {host}: the server is reachable from other machines", err=True)
    names, default = srv.task_list(cfg)
    url = srv.start(cfg, ray_address, checked=True)
    if as_json:
        print_json({"url": url, "classify": f"{url}/classify", "healthz": f"{url}/healthz",
                    "metadata": f"{url}/metadata", "stats": f"{url}/stats", "bundle": cfg.bundle,
                    "tasks": names, "default_task": default})
    on = f" with tasks {', '.join(n + ' (default)' * (n == default) for n in names)}" if cfg.tasks else ""
    typer.echo(f"stexport: serving {cfg.bundle}{on} at {url}/classify (health {url}/healthz, metadata "
               f"{url}/metadata); Ctrl-C stops", err=True)
    try:
        while True:  # until Ctrl-C: its KeyboardInterrupt ends the command as "interrupted", exit code 130
            time.sleep(3600)
    finally:
        srv.stop(app=srv.app_name(cfg) if ray_address else None)  # a joined cluster keeps its other apps


def register(app: typer.Typer) -> None:
    add_command(app, "serve", serve, EXAMPLES)
