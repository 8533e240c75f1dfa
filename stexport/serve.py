"""`stexport serve`: an HTTP endpoint on Ray Serve that classifies uploaded videos.

Routes (under the route prefix, default "/"):

    POST classify     a video as the raw body (video/*, application/octet-stream), as a multipart/form-data
                      file field, or (only with allowed roots) {"path": "..."} as application/json naming a
                      server-side file. Answers the JSON object `stexport infer --json` prints for that video.
    GET  healthz      {"status": "ok"} once the model is loaded
    GET  metadata     the bundle's model, labels, precision, sampling, the backend in use and the server's limits
    GET  stats        requests, batches and the largest batch (videos) this replica ran

Requests from different callers are batched (`serve.batch`): the views of up to `max_batch` clips run in one
backend call. A server is an attack surface, so by default it binds 127.0.0.1, reads no server-side path and
fetches no URL; uploads over `max_upload_mb` are refused before they are read; every video is decoded in a
separate worker process that is killed after `decode_timeout_s` (a hostile file can neither hang nor crash the
replica); server-side paths, when enabled with allowed roots, must resolve (symlinks followed) to a regular file
inside one of them and may not contain `..`. Every bad request gets a 4xx JSON `{"error": ...}` and the server
keeps serving.

Classification goes through `ServingClassifier`, the one place this module touches stexport.classify.
Ray Serve, python-multipart and pebble are the `stexport[serve]` extra, imported only when a server starts.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stexport.errors import StexportError
from stexport.extras import missing

SERVE_MODULES = ("ray", "python_multipart", "pebble")
PIP = "pip install 'stexport[serve]'"
RAW_TYPES = ("application/octet-stream",)  # and every video/* type
CHUNK = 1 << 20


def require_serve() -> None:
    """Raise StexportError naming the pip install when Ray Serve or the upload helpers are missing."""
    gone = missing(*SERVE_MODULES)
    if gone:
        raise StexportError(f"serve needs {', '.join(gone)}, which this installation lacks; install it with: {PIP}")


class ServeConfig(BaseModel):
    """Everything a server needs; plain data, so Ray ships it to every replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: str
    backend: str = "auto"
    options: dict[str, str] = {}
    top_k: int = Field(5, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(1.0, ge=0)
    threads: int | None = Field(None, ge=1)  # backend CPU threads per replica
    max_ongoing_requests: int = Field(32, ge=1)  # per replica: requests decoding or waiting for a batch
    max_batch: int = Field(8, ge=1)  # videos per backend call
    batch_wait_s: float = Field(0.01, ge=0)
    max_upload_mb: float = Field(100.0, gt=0)
    decode_timeout_s: float = Field(30.0, gt=0)
    decode_workers: int = Field(1, ge=1)  # decoding processes per replica
    allow_paths: tuple[str, ...] = ()  # roots server-side paths may be read from (realpaths)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)


def check_config(cfg: ServeConfig) -> ServeConfig:
    """Cheap checks before Ray starts: the bundle loads, allowed roots exist (stored as realpaths), the route
    prefix is a path. Returns the config with roots resolved. Raises StexportError, one line."""
    from stexport.bundle import Bundle

    Bundle.load(cfg.bundle)
    roots = []
    for r in cfg.allow_paths:
        p = Path(r)
        if not p.is_dir():
            raise StexportError(f"--allow-path {r}: no such directory (name directories whose files callers "
                                "may classify by path)")
        roots.append(os.path.realpath(p))
    prefix = cfg.route_prefix
    if not prefix.startswith("/") or (len(prefix) > 1 and prefix.endswith("/")):
        raise StexportError(f"--route {prefix!r}: a path starting with '/' and not ending with one, e.g. /stexport")
    return cfg.model_copy(update={"allow_paths": tuple(roots), "bundle": str(Path(cfg.bundle).resolve())})


# ------------------------------------------------------------------------------------------------------------
# requests


class RequestError(Exception):
    """A bad request: HTTP `status` (4xx) and a one-line message for the JSON error body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def confine(path: str, roots: tuple[str, ...]) -> str:
    """The realpath of `path` if it names a regular file inside one of `roots` (realpaths), else RequestError:
    403 when paths are off, the path holds '..' or resolves outside every root (symlinks included), 404 when
    there is no such file, 400 when it is not a regular file or not a usable string."""
    if not roots:
        raise RequestError(403, "reading server-side paths is off on this server; upload the video instead")
    if not isinstance(path, str) or not path or "\0" in path:
        raise RequestError(400, "'path' must be a non-empty string")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, "'path' is not valid UTF-8") from None
    if ".." in Path(path).parts:
        raise RequestError(403, f"{path}: '..' is not allowed in paths")
    real = os.path.realpath(path)
    inside = [r for r in roots if os.path.commonpath([real, r]) == r]
    if not inside:
        raise RequestError(403, f"{path}: outside the directories this server may read")
    if not os.path.exists(real):
        raise RequestError(404, f"{path}: no such file")
    if not os.path.isfile(real):
        raise RequestError(400, f"{path}: not a regular file")
    return real


def _warm_decoder() -> None:
    """A decoding process's start: import the decoder before any request's time limit runs."""
    import stexport.video  # noqa: F401


def _decode_worker(path: str, sampling: dict, name: str):
    """Runs in a decoding process: (source name, clips, frames decoded, notes)."""
    from stexport.video import Sampling, decode

    d = decode(path, Sampling(**sampling), threads=1)
    return name, d.clips, d.frames, d.notes


# ------------------------------------------------------------------------------------------------------------
# the one place serving touches classification


@dataclass
class Clips:
    """One video's decoded views, ready to classify."""

    source: str
    clips: np.ndarray  # (V, T, S, S, 3) uint8
    frames: int
    decode_s: float
    notes: list[str]


class ServingClassifier:
    """Classify many decoded videos in one backend call; results as `stexport infer --json` prints them.

    Built on stexport.classify.Classifier (same backend choice, labels, softmax-then-mean over views); when the
    batch API lands, this class is where serving switches to it."""

    def __init__(self, bundle: str, backend: str = "auto", top_k: int = 5, **backend_options):
        from stexport.classify import Classifier

        self.clf = Classifier(bundle, backend=backend, top_k=top_k, **backend_options)
        self.sampling = self.clf.sampling

    def describe(self) -> dict:
        return self.clf.describe()

    def classify(self, items: list[Clips]) -> list[dict]:
        """One backend call over the views of every item (the views of item i are rows off_i…off_i+V_i of the
        batch); per item, softmax each view's logits, average over its views, name the top k. Returns the
        dicts `infer --json` prints (Result.to_dict), in item order."""
        from stexport.classify import Result, softmax

        clf = self.clf
        t = time.perf_counter()
        logits = clf.backend.run(np.concatenate([it.clips for it in items]))
        infer_s = (time.perf_counter() - t) / len(items)
        total = sum(len(it.clips) for it in items)
        if logits.shape != (total, clf.num_classes):
            raise StexportError(f"backend {clf.backend.name} returned logits of shape {logits.shape}, expected "
                                f"({total}, {clf.num_classes})")
        out, at = [], 0
        for it in items:
            probs = softmax(logits[at:at + len(it.clips)]).mean(axis=0)
            at += len(it.clips)
            out.append(Result(it.source, clf.top(probs), len(it.clips), it.frames, it.decode_s, infer_s,
                              list(it.notes), backend=clf.backend.name).to_dict())
        return out

    def close(self) -> None:
        self.clf.close()


# ------------------------------------------------------------------------------------------------------------
# the Ray Serve deployment


def metadata(bundle_path: str, described: dict, cfg: ServeConfig, labels: list[str]) -> dict:
    """What GET metadata answers: the manifest's model, labels, precision and sampling, the backend in use,
    the server's limits."""
    from stexport.bundle import Bundle

    m = Bundle.load(bundle_path).manifest
    return {
        "bundle": m.name,
        "model": {"backbone": m.model.backbone.name, "adapter": m.spec.layout, "positions": m.spec.positions,
                  "kernel": list(m.spec.kernel), "classes": m.output.classes},
        "precision": m.precision,
        "labels": labels,
        "input": m.input.model_dump(mode="json"),
        "sampling": described.get("sampling"),
        "backend": {k: v for k, v in described.items() if k not in ("sampling",)},
        "limits": {"max_upload_bytes": cfg.max_upload_bytes, "decode_timeout_s": cfg.decode_timeout_s,
                   "max_batch_videos": cfg.max_batch, "server_paths": bool(cfg.allow_paths),
                   "urls": False},
    }


def _json(status: int, body: dict):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status)


def deployment(cfg: ServeConfig):
    """The bound Ray Serve application for `cfg` (ray imported here)."""
    from ray import serve

    @serve.deployment(num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                      ray_actor_options={"num_cpus": cfg.replica_cpus})
    class StexportClassifier:
        def __init__(self, config: dict):
            import multiprocessing
            from concurrent.futures import ThreadPoolExecutor

            from pebble import ProcessPool

            self.cfg = ServeConfig.model_validate(config)
            opts = dict(self.cfg.options)
            if self.cfg.threads:
                opts["threads"] = self.cfg.threads
            self.model = ServingClassifier(self.cfg.bundle, self.cfg.backend, self.cfg.top_k, **opts)
            self.sampling = self.model.sampling.to_dict()
            self.views = self.model.sampling.views
            # decoding in processes that can be killed (time limit, crashes); spawned, never forked from a
            # threaded actor
            self.decoders = ProcessPool(max_workers=self.cfg.decode_workers, initializer=_warm_decoder,
                                        context=multiprocessing.get_context("spawn"))
            self.runner = ThreadPoolExecutor(1, thread_name_prefix="stexport-model")  # one backend call at a time
            self.tmp = tempfile.mkdtemp(prefix="stexport-serve-")
            self.meta = metadata(self.cfg.bundle, self.model.describe(), self.cfg, self.model.clf.labels)
            self.stats = {"requests": 0, "errors": 0, "batches": 0, "largest_batch": 0}
            self.run_batch.set_max_batch_size(self.cfg.max_batch)
            self.run_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_s)

        async def __call__(self, request):
            path = request.url.path
            prefix = self.cfg.route_prefix.rstrip("/")
            route = path[len(prefix):].strip("/") if path.startswith(prefix) else path.strip("/")
            routes = {"classify": "POST", "healthz": "GET", "metadata": "GET", "stats": "GET"}
            try:
                if route not in routes:
                    raise RequestError(404, f"no route {path!r}; routes: "
                                            + ", ".join(f"{m} {prefix}/{r}" for r, m in routes.items()))
                if request.method != routes[route]:
                    raise RequestError(405, f"{path} takes {routes[route]}, not {request.method}")
                if route == "healthz":
                    return _json(200, {"status": "ok"})
                if route == "metadata":
                    return _json(200, self.meta)
                if route == "stats":
                    return _json(200, self.stats)
                self.stats["requests"] += 1
                clips = await self.decode(request)
                return _json(200, await self.run_batch(clips))
            except RequestError as e:
                self.stats["errors"] += 1
                return _json(e.status, {"error": e.message})
            except Exception as e:  # noqa: BLE001 - a server bug must not leak a traceback to the caller
                import logging

                logging.getLogger("ray.serve").exception("stexport serve: %s %s failed", request.method, path)
                self.stats["errors"] += 1
                return _json(500, {"error": f"internal error ({type(e).__name__}); see the server log"})

        # -- reading the request ----------------------------------------------------------------------------

        async def body(self, request) -> bytes:
            limit = self.cfg.max_upload_bytes
            declared = request.headers.get("content-length")
            if declared is not None:
                if not declared.isdigit():
                    raise RequestError(400, "bad Content-Length")
                if int(declared) > limit:
                    raise RequestError(413, f"upload of {int(declared)} bytes is over this server's limit of "
                                            f"{limit} bytes")
            buf = io.BytesIO()
            async for chunk in request.stream():
                buf.write(chunk)
                if buf.tell() > limit:
                    raise RequestError(413, f"upload is over this server's limit of {limit} bytes")
            return buf.getvalue()

        async def decode(self, request) -> Clips:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "application/json":
                try:
                    req = json.loads(await self.body(request))
                except (ValueError, UnicodeDecodeError):
                    raise RequestError(400, "the body is not valid JSON") from None
                if not isinstance(req, dict):
                    raise RequestError(400, 'send {"path": "FILE"} (a JSON object)')
                if "url" in req:
                    raise RequestError(403, "fetching URLs is off on this server (it makes no requests on a "
                                            "caller's behalf); upload the video instead")
                if set(req) != {"path"}:
                    raise RequestError(400, 'send {"path": "FILE"}, or upload the video as the body')
                real = confine(req["path"], self.cfg.allow_paths)
                return await self.decode_file(real, req["path"])
            if ctype.startswith("video/") or ctype in RAW_TYPES:
                data, name = await self.body(request), request.headers.get("x-filename") or "upload"
            elif ctype == "multipart/form-data":
                data, name = self.multipart(request, await self.body(request))
            else:
                raise RequestError(415, f"content type {ctype or '(none)'!r}: send the video as the body "
                                        "(video/* or application/octet-stream), as a multipart/form-data file, or "
                                        + ('{"path": ...} as application/json' if self.cfg.allow_paths else
                                           "nothing else"))
            if not data:
                raise RequestError(400, "empty upload")
            fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".video")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return await self.decode_file(tmp, name)
            finally:
                os.unlink(tmp)

        def multipart(self, request, body: bytes) -> tuple[bytes, str]:
            from python_multipart import FormParser
            from python_multipart.exceptions import FormParserError
            from python_multipart.multipart import parse_options_header

            files = []
            _, params = parse_options_header(request.headers.get("content-type", ""))
            if not params.get(b"boundary"):
                raise RequestError(400, "multipart body without a boundary in its Content-Type")
            try:
                parser = FormParser("multipart/form-data", lambda field: None, files.append,
                                    boundary=params[b"boundary"],
                                    config={"MAX_MEMORY_FILE_SIZE": self.cfg.max_upload_bytes + 1})
                parser.write(body)
                parser.finalize()
            except (FormParserError, ValueError) as e:
                raise RequestError(400, f"malformed multipart body ({e})") from None
            if len(files) != 1:
                raise RequestError(400, f"multipart body with {len(files)} files; send exactly one (field 'video')")
            f = files[0]
            f.file_object.seek(0)
            name = (f.file_name or b"upload").decode("utf-8", "replace")
            return f.file_object.read(), name

        async def decode_file(self, path: str, name: str) -> Clips:
            from concurrent.futures import TimeoutError as FutureTimeout

            from pebble import ProcessExpired

            from stexport.video import VideoError

            t = time.perf_counter()
            future = self.decoders.schedule(_decode_worker, (path, self.sampling, name),
                                            timeout=self.cfg.decode_timeout_s)
            try:
                source, clips, frames, notes = await asyncio.wrap_future(future)
            except FutureTimeout:
                raise RequestError(422, f"{name}: decoding took longer than this server's limit of "
                                        f"{self.cfg.decode_timeout_s:g} s") from None
            except ProcessExpired as e:
                raise RequestError(422, f"{name}: the decoder crashed on this file (exit code {e.exitcode}); "
                                        "not a video it can read") from None
            except VideoError as e:
                raise RequestError(422, str(e).replace(path, name)) from None
            except StexportError as e:
                raise RequestError(422, str(e).replace(path, name)) from None
            return Clips(source, clips, frames, time.perf_counter() - t, notes)

        # -- batched classification -------------------------------------------------------------------------

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def run_batch(self, items: list[Clips]) -> list[dict]:
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.runner, self.model.classify, items)

        def __del__(self):
            try:
                self.decoders.stop()
                self.model.close()
            except Exception:  # noqa: BLE001 - shutting down
                pass

    return StexportClassifier.bind(cfg.model_dump(mode="json"))


# ------------------------------------------------------------------------------------------------------------
# starting and stopping


def start(cfg: ServeConfig, ray_address: str | None = None) -> str:
    """Start Ray (local, on 127.0.0.1, unless one is running or `ray_address` is given), Ray Serve's HTTP
    proxy on cfg.host:cfg.port, and the deployment; return the base URL once it answers. Raises StexportError
    for a bad config or a missing extra."""
    require_serve()
    cfg = check_config(cfg)
    import ray
    from ray import serve

    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    import logging

    # Ray Serve's INFO lines stay out of stderr unless stexport runs with -v
    level = "INFO" if logging.getLogger("stexport").isEnabledFor(logging.INFO) else "WARNING"
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": level})
    serve.run(deployment(cfg), name="stexport", route_prefix=cfg.route_prefix, logging_config={"log_level": level})
    host = cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def stop(shutdown_ray: bool = True) -> None:
    """Shut Ray Serve down (and Ray, when `shutdown_ray`)."""
    import ray
    from ray import serve

    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()


__all__ = ["ServeConfig", "ServingClassifier", "Clips", "RequestError", "confine", "check_config", "start",
           "stop", "deployment", "require_serve"]
