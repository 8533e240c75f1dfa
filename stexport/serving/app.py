"""`stexport serve`: an HTTP endpoint on Ray Serve that classifies uploaded videos.

Routes (under the route prefix, default "/"):

    POST classify     a video as the raw body (video/*, application/octet-stream), as a multipart/form-data
                      file field, or (only with allowed roots) {"path": "..."} as application/json naming a
                      server-side file. Answers the JSON object `stexport infer --json` prints for that video.
    GET  healthz      {"status": "ok"} once the model is loaded
    GET  metadata     the bundle's model, labels, precision, sampling, the backend in use and the server's limits
    GET  stats        requests, batches, the videos in them, the largest batch and the backend calls they made

Task packs (`tasks`: pack paths, `stexport serve BUNDLE --task PACK ...`): one backend holds the swappable
base and every pack (prepared once: ONNX Runtime adapters on one session, an OpenVINO compiled model per
task, a TorchScript module's forward_task tensors, a refittable TensorRT engine's weights; whichever backend
swaps tasks, see check_backend), and each request names its task by name: the query parameter `?task=NAME`, a "task" field of the JSON
body or of the multipart form, or Ray Serve's multiplexing header `serve_multiplexed_model_id: NAME` (what
`handle.options(multiplexed_model_id=NAME)` sends). Without one, a request runs the default task: `default_task`,
else the bundle's own (named after its adapter checkpoint's file stem, else the bundle's name). An unknown
name is a 404 naming the loaded tasks. Each task's video is decoded with the task's own default sampling and
named with its labels. On a server with task packs every answer carries "task" (the name of the task that
ran, the bundle's own included); without packs answers are exactly `infer --json`'s, with no "task" (as
`infer` and Result leave it out for the bundle's own task). A "task" that is not a string, or several names
that differ (repeated ?task=, form fields, header and body together), is a 400. GET metadata lists the tasks
(name, classes, labels, sampling, pack file).

A replica that fails to start (the backend cannot open the bundle, a pack cannot be prepared) fails `start`
with the replica's own one-line reason; backend options and task-pack support are checked before Ray starts.

A multi-task bundle (`stexport multitask`) serves its own tasks by the same names (no packs): a batch whose
requests name several tasks runs as one backend call (the graph takes each clip's task index), and GET stats
counts it as one backend call and one mixed batch.

Requests from different callers are batched (`serve.batch`): the views of up to `max_batch` clips run in one
backend call, one call per task in a batch (tasks are never mixed in a call, except on a multi-task bundle;
Ray Serve also splits batches by the multiplexing header). A server is an attack surface, so by default it binds 127.0.0.1, reads no
server-side path and fetches no URL; uploads over `max_upload_mb` are refused before they are read; every video is decoded in a
decoder process of the replica's stexport.runtime.decode_worker.DecoderPool (`decode_workers` of them), killed when
it reads no frame for `decode_timeout_s` or decodes longer than `max_decode_s` in all, and replaced when it dies
(a hostile file can neither hang nor crash the replica); server-side paths, when enabled with allowed roots, must resolve (symlinks followed) to a regular file
inside one of them and may not contain `..`. Every bad request gets a 4xx JSON `{"error": ...}` and the server
keeps serving.

The Open Inference Protocol (KServe v2: REST under the prefix's v2/, and gRPC with `grpc_port`), Prometheus
metrics (GET metrics) and the bearer token (`token_sha256`; required beyond loopback unless `insecure`) are
in oip.py, oip_routes.py (the deployment's base class, whose __call__ passes the routes above to
`serve_classic`), oip_grpc.py, metrics.py and auth.py.

Classification goes through `ServingClassifier`, the one place this module touches stexport.runtime.classify.
Ray Serve and python-multipart are the `stexport[serve]` extra, imported only when a server starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from stexport.errors import StexportError
from stexport.serving.requests import Clips, RequestError, UploadBudget, confine, json_type, read_body, unique_keys
from stexport.extras import missing
from stexport.runtime.decode_worker import DEFAULT_STALL_S, MAX_FRAMES, MAX_PIXELS, MEMORY_MB, SERVE_MAX_DECODE_S

JSON_BODY_LIMIT = 64 * 1024  # a {"path", "task"} request: a larger JSON body is refused (413) unread

SERVE_MODULES = ("ray", "python_multipart", "tritonclient", "prometheus_client")
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
    # per replica: requests reading their body, decoding or waiting for a batch (cheap while they wait: the
    # decoders and the one backend call bound the work; the upload budget bounds the memory)
    max_ongoing_requests: int = Field(128, ge=1)
    max_batch: int = Field(8, ge=1)  # videos per backend call
    batch_wait_s: float = Field(0.01, ge=0)
    max_upload_mb: float = Field(100.0, gt=0)
    min_upload_kbps: float = Field(64.0, ge=0)  # --min-upload-rate: slower bodies get 408 (0: no floor)
    upload_budget_mb: float = Field(1024.0, gt=0)  # request bodies one replica holds at once; past it 503
    decode_timeout_s: float = Field(DEFAULT_STALL_S, gt=0)  # --decode-timeout: seconds a decoder may read no frame
    max_decode_s: float = Field(SERVE_MAX_DECODE_S, gt=0)  # --max-decode-s: seconds one video may take to decode
    max_pixels: int = Field(MAX_PIXELS, ge=1)  # per frame, from the stream's header, before decoding
    max_frames: int = Field(MAX_FRAMES, ge=1)  # frames the header may claim
    decode_memory_mb: int = Field(MEMORY_MB, ge=64)  # each decoder process's address space
    decode_workers: int = Field(1, ge=1)  # decoding processes per replica
    allow_paths: tuple[str, ...] = ()  # roots server-side paths may be read from (realpaths)
    tasks: tuple[str, ...] = ()  # task pack paths, loaded beside the bundle's own task
    default_task: str | None = None  # a task name for requests that name none (None: the bundle's own)
    # the Open Inference Protocol and access control (oip_routes.py, auth.py)
    grpc_port: int | None = Field(None, ge=1, le=65535)  # the OIP gRPC service on Ray Serve's gRPC proxy
    token_sha256: str | None = None  # callers send the token whose SHA-256 this is (auth.read_token)
    insecure: bool = False  # serve beyond loopback without a token

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)


def own_task_name(bundle) -> str:
    """The name the bundle's own task goes by among task packs: its adapter checkpoint's file stem (as
    `stexport pack` names a pack), else the bundle's name."""
    adapter = bundle.manifest.model.adapter
    return Path(adapter.file).stem if adapter.file else bundle.manifest.name


def task_names(bundle, packs) -> list[str]:
    """The bundle's own task name, then each pack's; StexportError (one line) when two are the same. A
    multi-task bundle's tasks are its own (stexport.bundle.multitask), in index order; it takes no packs."""
    from stexport.bundle.multitask import names as multitask_names

    own = multitask_names(bundle)
    if own and packs:
        raise StexportError(f"--task {packs[0].path}: {bundle.path.name} is a multi-task bundle (tasks "
                            f"{', '.join(own)}); it serves its own tasks, not packs: drop --task")
    if own:
        return own
    names = [own_task_name(bundle)]
    for p in packs:
        if p.name in names:
            raise StexportError(f"--task {p.path}: a task named '{p.name}' is already loaded ("
                                + ("the bundle's own" if p.name == names[0] else "another pack")
                                + "); give the pack another name with `stexport pack --name`")
        names.append(p.name)
    return names


def task_list(cfg: ServeConfig) -> tuple[list[str], str]:
    """(the names of the tasks `cfg` loads, the default one's) without starting anything."""
    from stexport.bundle.store import Bundle
    from stexport.bundle.taskpack import TaskPack

    names = task_names(Bundle.load(cfg.bundle), [TaskPack.load(t) for t in cfg.tasks])
    return names, cfg.default_task or names[0]


def check_config(cfg: ServeConfig) -> ServeConfig:
    """Checks before Ray starts: the bundle loads, task packs load and fit it, task names are distinct and the
    default one of them, the backend and its options (check_backend), allowed roots exist (stored as
    realpaths), the route prefix is a path. Returns the config with paths resolved. Raises StexportError, one
    line."""
    from stexport.bundle.store import Bundle
    from stexport.bundle.taskpack import TaskPack

    bundle = Bundle.load(cfg.bundle)
    if bundle.manifest.multitask is not None and cfg.tasks:
        names = ", ".join(t.name for t in bundle.manifest.multitask.tasks)
        raise StexportError(f"--task {cfg.tasks[0]}: {cfg.bundle} is a multi-task bundle that serves all its tasks "
                            f"({names}); requests name theirs (?task=NAME, a \"task\" field or the "
                            "serve_multiplexed_model_id header), and --default-task NAME picks the default")
    packs = [TaskPack.load(t) for t in cfg.tasks]
    for p in packs:
        p.check_fits(bundle)
    names = task_names(bundle, packs)
    check_backend(cfg, bundle, packs)
    if packs:
        cfg = cfg.model_copy(update={"tasks": tuple(str(p.path.resolve()) for p in packs)})
    if cfg.default_task is not None and cfg.default_task not in names:
        raise StexportError(f"--default-task {cfg.default_task}: no such task; loaded: {', '.join(names)}")
    if cfg.upload_budget_mb < cfg.max_upload_mb:
        raise StexportError(f"--upload-budget-mb {cfg.upload_budget_mb:g} is below --max-upload-mb "
                            f"{cfg.max_upload_mb:g}: the budget must hold one upload; raise it or lower the other")
    roots = []
    for r in cfg.allow_paths:
        p = Path(r)
        if not p.is_dir():
            raise StexportError(f"--allow-path {r}: no such directory (name directories whose files callers "
                                "may classify by path)")
        roots.append(os.path.realpath(p))
    from stexport.serving import auth

    auth.check_exposure(cfg.host, cfg.grpc_port, cfg.token_sha256, cfg.insecure)
    prefix = cfg.route_prefix
    if not prefix.startswith("/") or (len(prefix) > 1 and prefix.endswith("/")):
        raise StexportError(f"--route {prefix!r}: a path starting with '/' and not ending with one, e.g. /stexport")
    return cfg.model_copy(update={"allow_paths": tuple(roots), "bundle": str(Path(cfg.bundle).resolve())})


def backend_options(cfg: ServeConfig) -> dict:
    """The options each replica opens its backend with (`threads` from cfg.threads)."""
    return {**cfg.options, **({"threads": cfg.threads} if cfg.threads else {})}


def check_backend(cfg: ServeConfig, bundle, packs) -> None:
    """What a replica would refuse, refused here before Ray starts (StexportError, one line): an unknown
    backend, an option it does not declare or a malformed value (its check_options, as `infer` checks them),
    no runtime here for `auto`, and task packs on a backend that cannot run them. A backend class that swaps
    tasks (SWAPS_TASKS) is trusted to; one whose ability depends on its model file (TorchScript: a module
    exported with forward_task; TensorRT: a refittable FP32/FP16 engine) is opened once here and asked to load
    every pack, so its own refusal (and what to do) is the message."""
    from stexport.runtime import backends

    opts = backend_options(cfg)
    if cfg.backend != "auto":
        chosen = cfg.backend
        cls = backends.load_class(chosen)
        cls.check_options(opts)
    else:
        backends.check_auto_options(opts)
        chosen = backends.resolve("auto", bundle)
        if chosen is None:
            backends.create("auto", bundle)  # raises, naming why no runtime here can run it
        cls = backends.load_class(chosen)
        known = {o.name for o in cls.OPTIONS} | set(cls.ALIASES)
        opts = cls.check_options({k: v for k, v in opts.items() if k in known})
    if bundle.manifest.multitask is not None and not cls.MULTITASK:
        raise StexportError(f"-b {chosen}: {bundle.path.name} is a multi-task bundle, which {chosen} cannot run; "
                            f"use -b {backends.multitask_backends()}")
    if packs and not cls.SWAPS_TASKS:
        try:
            with backends.create(chosen, bundle, **opts) as backend:
                for p in packs:
                    backend.load_task(p)
        except StexportError as e:
            raise StexportError(f"--task with -b {chosen}: {e}") from None


def app_name(cfg: ServeConfig) -> str:
    """The Ray Serve application's name: 'stexport', with the route prefix when there is one, so servers
    with different prefixes can share a Ray cluster."""
    return "stexport" + cfg.route_prefix.rstrip("/").replace("/", "-")


def replica_failure(serve, app: str, error: Exception, bundle_path) -> str:
    """One line for a deployment whose replicas failed to start: the StexportError a replica raised (the
    last one in Ray Serve's deployment status, which holds the replica's traceback), else the last exception
    line there, pointing at Ray's logs."""
    import re

    texts = []
    try:
        status = serve.status().applications.get(app)
        texts = [d.message for d in status.deployments.values() if d.message] + [status.message]
    except Exception:  # noqa: BLE001 - the status is a nicety; the error itself is still reported
        pass
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join([*texts, str(error)]))
    ours = re.findall(r"^stexport\.[\w.]+: (.+)$", text, re.MULTILINE)
    if ours:
        return ours[-1].strip()
    other = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", text, re.MULTILINE)
    cause = f"{other[-1][0].rsplit('.', 1)[-1]}: {other[-1][1].strip()}" if other else str(error).splitlines()[0]
    return (f"the server's replica failed to start ({cause[:300]}); the traceback is in Ray's logs "
            "(/tmp/ray/session_latest/logs/serve/)")


# ------------------------------------------------------------------------------------------------------------
# requests


# ------------------------------------------------------------------------------------------------------------
# the one place serving touches classification




@dataclass
class Task:
    """A task a server runs: its name, its TaskPack (None: the bundle's own), sampling and labels."""

    name: str
    pack: object
    sampling: object  # stexport.runtime.video.Sampling
    labels: list[str]

    def describe(self, default: bool) -> dict:
        return {"name": self.name, "classes": len(self.labels), "labels": self.labels,
                "sampling": self.sampling.to_dict(),
                "pack": self.pack.path.name if self.pack is not None and hasattr(self.pack, "tensors") else None,
                "default": default}


class ServingClassifier:
    """Classify many decoded videos in few backend calls; results as `stexport infer --json` prints them.

    Built on stexport.runtime.classify.Classifier (same backend choice, labels, softmax-then-mean over views). tasks:
    task pack paths for a swappable bundle, loaded and prepared once beside the bundle's own task; `tasks`
    maps every task's name to its Task, `default` is the name a request without one gets. options: the
    backend's options (a dict, so that an option may share a name with a parameter here, e.g. onnxruntime's
    `tasks`). Raises StexportError when the backend cannot open the bundle or prepare a pack."""

    def __init__(self, bundle: str, backend: str = "auto", top_k: int = 5, tasks: tuple[str, ...] = (),
                 default_task: str | None = None, options: dict | None = None):
        from stexport.runtime.classify import Classifier

        self.clf = Classifier(bundle, backend=backend, top_k=top_k, **(options or {}))
        self.clf.top_k = top_k  # not capped at the bundle's own classes: a pack may have more
        self.sampling = self.clf.sampling
        packs = [self.clf.load_task(t) for t in tasks]
        names = task_names(self.clf.bundle, packs)
        # a multi-task bundle: every task is one of its own (BundleTask), and a batch mixes them in one call
        self.mixes = self.clf.bundle.manifest.multitask is not None
        self.named = bool(packs) or self.mixes  # answers carry "task" where a server runs several tasks
        if self.mixes:
            own = [self.clf.load_task(n) for n in names]
            self.tasks = {t.name: Task(t.name, t, self.clf.sampling_for(t), list(t.labels)) for t in own}
        else:
            self.tasks = {names[0]: Task(names[0], None, self.clf.sampling, self.clf.labels)}
        for p in packs:
            self.tasks[p.name] = Task(p.name, p, self.clf.sampling_for(p), p.labels)
        self.default = default_task or names[0]
        self.backend_calls = 0  # backend calls `classify` made (serve's /stats backend_calls)

    def task(self, name: str | None) -> Task:
        """The loaded task called `name` (None: the default); RequestError 404 naming the loaded ones."""
        if name is None:
            return self.tasks[self.default]
        if not isinstance(name, str) or name not in self.tasks:
            shown = name if isinstance(name, str) else json.dumps(name)
            raise RequestError(404, f"no task {shown[:100]!r} on this server; loaded: "
                                    + ", ".join(f"{n} (default)" if n == self.default else n for n in self.tasks))
        return self.tasks[name]

    def describe(self) -> dict:
        return self.clf.describe()

    def classify(self, items: list[Clips]) -> list[dict]:
        """One backend call per task over the views of that task's items (stexport.runtime.batch.run_decoded
        with no view limit; tasks never share a call, except on a multi-task bundle: one call); per item, softmax each view's logits, average over its
        views, name the top k with its task's labels. Returns the dicts `infer --json` prints
        (Result.to_dict, with "task" where packs are loaded), in item order."""
        from stexport.runtime.batch import Decoding, run_decoded

        tasks = [self.task(it.task) for it in items]
        decoded = [Decoding(it.source, decoded=it, decode_s=it.decode_s, task=t.pack)
                   for it, t in zip(items, tasks)]
        before = self.clf.backend_calls
        out = run_decoded(self.clf, decoded, max_views=sum(len(it.clips) for it in items))
        self.backend_calls += self.clf.backend_calls - before
        for row, t in zip(out, tasks):
            row.task = t.name if self.named else None  # on a server with packs the bundle's own task is named
        return [row.to_dict() for row in out]

    def close(self) -> None:
        self.clf.close()


# ------------------------------------------------------------------------------------------------------------
# the Ray Serve deployment


def metadata(bundle_path: str, described: dict, cfg: ServeConfig, labels: list[str],
             tasks: list[dict] | None = None) -> dict:
    """What GET metadata answers: the manifest's model, labels, precision and sampling (the bundle's own
    task), the backend in use, the server's limits, and the tasks requests may name (Task.describe)."""
    from stexport.bundle.store import Bundle

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
                   "max_decode_s": cfg.max_decode_s, "max_pixels": cfg.max_pixels, "max_frames": cfg.max_frames,
                   "decode_memory_mb": cfg.decode_memory_mb,
                   "max_batch_videos": cfg.max_batch, "server_paths": bool(cfg.allow_paths),
                   "urls": False},
        "tasks": tasks or [],
        "default_task": next((t["name"] for t in tasks or [] if t["default"]), None),
    }


def _json(status: int, body: dict):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status)


def deployment(cfg: ServeConfig):
    """The bound Ray Serve application for `cfg` (ray imported here)."""
    from ray import serve

    from stexport.serving.oip_routes import OIPRoutes  # its __call__ routes OIP, /metrics, tokens; then ours

    @serve.deployment(num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                      ray_actor_options={"num_cpus": cfg.replica_cpus})
    class StexportClassifier(OIPRoutes):
        def __init__(self, config: dict):
            from concurrent.futures import ThreadPoolExecutor

            from stexport.runtime.decode_worker import DecodeLimits, DecoderPool

            self.cfg = ServeConfig.model_validate(config)
            opts = backend_options(self.cfg)
            self.model = ServingClassifier(self.cfg.bundle, self.cfg.backend, self.cfg.top_k, self.cfg.tasks,
                                           self.cfg.default_task, options=opts)
            # decoding in child processes (stalls, the time limit and crashes cost one request; a dead child is
            # replaced), started now so that no request waits for their imports; a thread per child drives it
            c = self.cfg
            self.decoders = DecoderPool(c.decode_workers, threads=1, limits=DecodeLimits(
                c.decode_timeout_s, c.max_decode_s, c.max_pixels, c.max_frames, c.decode_memory_mb))
            self.decoders.start()
            self.decoding = ThreadPoolExecutor(self.cfg.decode_workers, thread_name_prefix="stexport-decode")
            self.runner = ThreadPoolExecutor(1, thread_name_prefix="stexport-model")  # one backend call at a time
            self.tmp = tempfile.mkdtemp(prefix="stexport-serve-")
            self.uploads = UploadBudget(int(self.cfg.upload_budget_mb * 1e6))
            tasks = [t.describe(t.name == self.model.default) for t in self.model.tasks.values()]
            self.meta = metadata(self.cfg.bundle, self.model.describe(), self.cfg, self.model.clf.labels, tasks)
            # batched_videos: videos in all batches; backend_calls: the backend calls those batches made (one
            # per task in a batch, one per batch on a multi-task bundle); mixed_batches: batches of several tasks
            self.stats = {"requests": 0, "errors": 0, "batches": 0, "largest_batch": 0, "batched_videos": 0,
                          "backend_calls": 0, "mixed_batches": 0, "tasks": {name: 0 for name in self.model.tasks}}
            self.run_batch.set_max_batch_size(self.cfg.max_batch)
            self.run_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_s)
            self.oip_setup()

        async def serve_classic(self, request):
            """(response, model): model is the task a /classify request ran (its Open Inference Protocol
            model name, for the metrics' model label), "" before one is known."""
            path = request.url.path
            prefix = self.cfg.route_prefix.rstrip("/")
            route = path[len(prefix):].strip("/") if path.startswith(prefix) else path.strip("/")
            routes = {"classify": "POST", "healthz": "GET", "metadata": "GET", "stats": "GET"}
            model = ""
            try:
                if route not in routes:
                    raise RequestError(404, f"no route {path!r}; routes: "
                                            + ", ".join(f"{m} {prefix}/{r}" for r, m in routes.items())
                                            + f", GET {prefix}/metrics (Prometheus), {prefix}/v2/... (Open "
                                              "Inference Protocol)")
                if request.method != routes[route]:
                    raise RequestError(405, f"{path} takes {routes[route]}, not {request.method}")
                if route == "healthz":
                    return _json(200, {"status": "ok"}), model
                if route == "metadata":
                    return _json(200, self.meta), model
                if route == "stats":
                    return _json(200, self.stats), model
                self.stats["requests"] += 1
                clips = await self.decode(request)
                self.stats["tasks"][clips.task] += 1
                model = clips.task or self.model.default
                answer = await self.run_batch(clips)
                # a model that gave NaN: a server fault
                return _json(500 if "error" in answer else 200, answer), model
            except RequestError as e:
                self.stats["errors"] += 1
                return _json(e.status, {"error": e.message}), model
            except Exception as e:  # noqa: BLE001 - a server bug must not leak a traceback to the caller
                import logging

                logging.getLogger("ray.serve").exception("stexport serve: %s %s failed", request.method, path)
                self.stats["errors"] += 1
                error = f"internal error ({type(e).__name__}); see the server log"
                return _json(500, {"error": error}), model

        # -- tasks --------------------------------------------------------------------------------------------

        @serve.multiplexed(max_num_models_per_replica=max(1, len(cfg.tasks) + 1))
        async def get_task(self, name: str) -> Task:
            """Ray Serve's multiplexed loader: every task is loaded when the replica starts (none is ever
            evicted), so this names the task to Serve, which routes requests carrying its header here."""
            return self.model.task(name)

        async def request_task(self, request, body_tasks: list | None = None,
                               body_where: str = "the body's \"task\"") -> Task:
            """The task a request names, else the default. Every name given counts: the
            serve_multiplexed_model_id header, each ?task= and each of `body_tasks` (a JSON body's "task", the
            multipart form's "task" fields); they must be strings and all the same. RequestError 400 for a
            name that is not a string or names that differ, 404 for an unknown one."""
            given = [("the serve_multiplexed_model_id header", v)
                     for v in request.headers.getlist("serve_multiplexed_model_id")]
            header = serve.get_multiplexed_model_id()
            if header and not given:
                given.append(("the serve_multiplexed_model_id header", header))
            given += [("?task=", v) for v in request.query_params.getlist("task")]
            given += [(body_where, v) for v in body_tasks or []]
            for where, v in given:
                if not isinstance(v, str):
                    raise RequestError(400, f"{where} must be a string naming a task, not {json_type(v)}")
            if len({v for _, v in given}) > 1:
                raise RequestError(400, "the request names different tasks: " + ", ".join(
                    f"{json.dumps(v)[:60]} ({where})" for where, v in given))
            task = self.model.task(given[0][1] if given else None)
            return await self.get_task(task.name)

        # -- reading the request ----------------------------------------------------------------------------

        async def body(self, request, limit: int | None = None) -> bytes:
            return await read_body(request, self.cfg.max_upload_bytes if limit is None else limit,
                                   self.cfg.min_upload_kbps * 1e3, self.uploads)

        async def decode(self, request) -> Clips:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "application/json":
                try:
                    req = json.loads(await self.body(request, JSON_BODY_LIMIT), object_pairs_hook=unique_keys)
                except (ValueError, UnicodeDecodeError):
                    raise RequestError(400, "the body is not valid JSON") from None
                except RecursionError:
                    raise RequestError(400, "the JSON body is nested too deeply; send {\"path\": \"FILE\"}") from None
                if not isinstance(req, dict):
                    raise RequestError(400, 'send {"path": "FILE"} (a JSON object)')
                if "url" in req:
                    raise RequestError(403, "fetching URLs is off on this server (it makes no requests on a "
                                            "caller's behalf); upload the video instead")
                if "path" not in req or not set(req) <= {"path", "task"}:
                    raise RequestError(400, 'send {"path": "FILE"} or {"path": "FILE", "task": "NAME"}, or '
                                            "upload the video as the body")
                task = await self.request_task(request, [req["task"]] if "task" in req else [])
                real = confine(req["path"], self.cfg.allow_paths)
                return await self.decode_video(real, req["path"], task)
            form_tasks: list[str] = []
            if ctype.startswith("video/") or ctype in RAW_TYPES:
                data, name = await self.body(request), request.headers.get("x-filename") or "upload"
            elif ctype == "multipart/form-data":
                data, name, form_tasks = self.multipart(request, await self.body(request))
            else:
                raise RequestError(415, f"content type {ctype or '(none)'!r}: send the video as the body "
                                        "(video/* or application/octet-stream), as a multipart/form-data file, or "
                                        + ('{"path": ...} as application/json' if self.cfg.allow_paths else
                                           "nothing else"))
            task = await self.request_task(request, form_tasks, "the form's \"task\" field")
            if not data:
                raise RequestError(400, "empty upload")
            return await self.decode_upload(data, name, task)

        def multipart(self, request, body: bytes) -> tuple[bytes, str, list[str]]:
            """(the one file's bytes, its name, the values of its "task" fields)."""
            from python_multipart import FormParser
            from python_multipart.exceptions import FormParserError
            from python_multipart.multipart import parse_options_header

            files, fields = [], []
            _, params = parse_options_header(request.headers.get("content-type", ""))
            if not params.get(b"boundary"):
                raise RequestError(400, "multipart body without a boundary in its Content-Type")
            try:
                parser = FormParser("multipart/form-data", fields.append, files.append,
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
            tasks = [(x.value or b"").decode("utf-8", "replace") for x in fields if x.field_name == b"task"]
            return f.file_object.read(), name, tasks

        async def decode_file(self, path: str, name: str, task: Task) -> Clips:
            t = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                d = await loop.run_in_executor(self.decoding, self.decoders.decode, path, task.sampling)
            except StexportError as e:  # this video's VideoError: a crash, a stall, the time limit, not a video
                raise RequestError(422, str(e).replace(path, name), getattr(e, "reason", "invalid")) from None
            return Clips(name, d.clips, d.frames, time.perf_counter() - t, d.notes, task.name)

        # -- batched classification -------------------------------------------------------------------------

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def run_batch(self, items: list[Clips]) -> list[dict]:
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
            self.stats["batched_videos"] += len(items)
            tasks = len({it.task for it in items})
            self.stats["mixed_batches"] += tasks > 1
            loop = asyncio.get_running_loop()
            self.metrics.batched(items, t := time.perf_counter())
            answers = await loop.run_in_executor(self.runner, self.model.classify, items)
            self.stats["backend_calls"] = self.model.backend_calls  # counted where the backend is called
            self.metrics.backend_call(items[0].task if tasks == 1 else "", time.perf_counter() - t)
            return answers

        def __del__(self):
            try:
                self.decoders.close()
                self.decoding.shutdown(wait=False)
                self.model.close()
            except Exception:  # noqa: BLE001 - shutting down
                pass

    return StexportClassifier.bind(cfg.model_dump(mode="json"))


# ------------------------------------------------------------------------------------------------------------
# starting and stopping


def check_address(host: str, port: int) -> None:
    """Bind host:port once (as the HTTP proxy will, with SO_REUSEADDR) and close it, so a server that cannot
    listen there is refused in one line before Ray starts instead of after it (Ray reports a failed bind only
    when its proxy actor dies, ~30 s later). Raises StexportError naming the cause and the fix: a port in
    use, an address that is not this machine's, a privileged port (< 1024) for a user that may not bind it."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise StexportError(f"--host {host}: not an address or a name this machine can resolve ({e}); pass one "
                            "of its addresses (127.0.0.1 for this machine only, 0.0.0.0 for every interface)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StexportError(f"--port {port}: already in use on {host} (another server listens there); "
                                    "stop it or pass another --port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise StexportError(f"--host {host}: not an address of this machine; pass one of its addresses "
                                    "(127.0.0.1 for this machine only, 0.0.0.0 for every interface)") from None
            if e.errno == errno.EACCES and port < 1024:
                raise StexportError(f"--port {port}: ports below 1024 need root (or CAP_NET_BIND_SERVICE); pass "
                                    "--port 1024 or higher, e.g. --port 8000") from None
            raise StexportError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pass "
                                "another --host or --port") from None


def check_cluster(address: str, timeout_s: float = 3.0) -> None:
    """A `--ray-address HOST:PORT` (or ray://HOST:PORT) that nothing answers on is refused in one line at once,
    before `ray.init` spends its retries on it. `auto` and addresses without a port are left to Ray."""
    import socket

    where = address.split("://", 1)[-1]
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise StexportError(f"--ray-address {address}: cannot reach a Ray cluster there ({why}); check the "
                            "address and that `ray start --head` runs there, or leave --ray-address out for a "
                            "local one") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def proxy_failure(e: BaseException, host: str, port: int) -> str:
    """The one line for Ray Serve's HTTP proxy failing to start with `e`, its fix by the cause: Ray's memory
    monitor killed the proxy (the node ran low on memory: its message says so after the first line, as
    ray.exceptions.ActorDiedError carries the raylet's reason), else the address (taken since it was checked)."""
    text = str(e).lower()
    if any(w in text for w in ("out_of_memory", "out of memory", "low on memory", "memory pressure")):
        fix = ("the machine ran low on memory and Ray stopped the proxy to free some: close other work or free "
               "memory, then start serve again")
    else:
        fix = "pass another --port, or see `stexport -v serve ...`"
    return f"Ray Serve could not start its HTTP proxy on {host}:{port} ({type(e).__name__}: {_first_line(e)}); {fix}"


def start(cfg: ServeConfig, ray_address: str | None = None, checked: bool = False) -> str:
    """Start Ray (local, on 127.0.0.1, unless one is running or `ray_address` is given), Ray Serve's HTTP
    proxy on cfg.host:cfg.port, and the deployment (Ray Serve application `app_name(cfg)`); return the base URL
    once it answers. Ray's and Ray Serve's own log lines stay out of stderr unless stexport's logger is at INFO
    (-v); their errors stay visible. Raises StexportError (one line) for a bad config, a missing extra, an
    address it cannot listen on (check_address, before Ray starts), a cluster it cannot reach or join
    (check_cluster first), Ray or Ray Serve failing to start, or replicas that fail to start (the replica's reason; what was deployed is
    removed again). checked: `cfg` came from check_config already (its checks may open a backend once)."""
    import logging

    require_serve()
    if not checked:
        cfg = check_config(cfg)
    verbose = logging.getLogger("stexport").isEnabledFor(logging.INFO)
    quiet = logging.INFO if verbose else logging.ERROR
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        if ray_address:
            check_cluster(ray_address)
        else:
            check_address(cfg.host, cfg.port)
        if not ray_address:  # settings Ray's processes read from the environment, before it starts them
            from stexport.serving.proxy_errors import install

            install()
        if cfg.grpc_port and not ray_address:
            from stexport.serving.oip_grpc import limit_messages

            limit_messages(cfg.max_upload_bytes * cfg.max_batch + (1 << 20))  # before Ray starts its proxy
        kw = {"include_dashboard": False, "log_to_driver": verbose, "logging_level": quiet}
        on_term = signal.getsignal(signal.SIGTERM)
        try:
            if ray_address:
                ray.init(address=ray_address, **kw)
            else:
                ray.init(_node_ip_address="127.0.0.1", **kw)
                _LOCAL_RAY = True
            if callable(on_term) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_term)  # Ray's core worker installs its own (it aborts, exit 134)
        except ConnectionError as e:
            raise StexportError(f"--ray-address {ray_address}: cannot connect to a Ray cluster ({_first_line(e)}); "
                                "start one with `ray start --head`, or leave --ray-address out for a local "
                                "one") from None
        except Exception as e:  # noqa: BLE001 - whatever Ray raised, one line: its first, and where to look
            if ray_address:
                raise StexportError(f"--ray-address {ray_address}: Ray could not join the cluster "
                                    f"({type(e).__name__}: {_first_line(e)}); `stexport -v serve ...` shows "
                                    "Ray's log") from None
            raise StexportError(f"Ray could not start a local cluster ({type(e).__name__}: {_first_line(e)}); "
                                "check free memory and space in Ray's temporary directory ($RAY_TMPDIR, "
                                "default /tmp/ray); `stexport -v serve ...` shows Ray's log") from None
    for name in ("ray", "ray.serve"):  # the driver's loggers (importing ray.serve set its own to INFO)
        logging.getLogger(name).setLevel(quiet)
    level = "INFO" if verbose else "WARNING"
    app = app_name(cfg)
    grpc = {}
    if cfg.grpc_port:
        from stexport.serving.oip_grpc import grpc_options

        grpc = {"grpc_options": grpc_options(cfg.grpc_port)}
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": level},
                    **grpc)
    except Exception as e:  # noqa: BLE001 - e.g. the port taken between check_address and the proxy's bind
        if started:  # nothing was deployed: disconnect (a local cluster this call started stops with it)
            _LOCAL_RAY = False
            ray.shutdown()
        raise StexportError(proxy_failure(e, cfg.host, cfg.port)) from None
    try:
        serve.run(deployment(cfg), name=app, route_prefix=cfg.route_prefix, logging_config={"log_level": level})
    except RuntimeError as e:
        why = replica_failure(serve, app, e, cfg.bundle)
        joined = ray_address is not None or not started
        try:
            stop(shutdown_ray=started, app=app if joined else None)
        except Exception:  # noqa: BLE001 - the replica's reason is the error to report
            pass
        raise StexportError(why) from None
    port = cfg.port
    try:  # a Serve instance already running on a joined cluster keeps its own HTTP options
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
    except Exception:  # noqa: BLE001 - a private API; cfg.port is right whenever this call started Serve
        pass
    if port == 0:  # Serve started with --port 0 (by this call or an earlier one): the port its proxy got
        port = bound_http_port()
    if cfg.port not in (0, port):
        logging.getLogger("stexport").warning("Ray Serve already runs on this cluster with its HTTP proxy on port "
                                              "%d; --port %d does not apply", port, cfg.port)
    if cfg.grpc_port:
        from stexport.serving.oip_grpc import check_running

        check_running(cfg.grpc_port)
    host = cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{port}{cfg.route_prefix.rstrip('/')}"


def bound_http_port() -> int:
    """The TCP port Ray Serve's HTTP proxy on this node listens on, read from its socket: what `--port 0` got
    from the kernel (Ray Serve binds port 0 but keeps 0 in its config). Asked of the proxy actor with
    `__ray_call__`, reading the uvicorn server its start task returned (Ray Serve 2.60's ProxyActor; private
    names). Raises StexportError (one line) when it cannot be read."""
    import ray

    def ports(proxy) -> list[int]:
        server = proxy._start_http_server_task.result()[1]
        return [sock.getsockname()[1] for srv in server.servers for sock in srv.sockets]

    name = f"SERVE_PROXY_ACTOR-{ray.get_runtime_context().get_node_id()}"
    try:
        found = ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(ports), timeout=60)
    except Exception as e:  # noqa: BLE001 - private names of Ray Serve's proxy: say what to do instead
        found, why = [], f"{type(e).__name__}: {_first_line(e)}"
    else:
        why = f"its proxy listens on {found or 'no socket'}"
    if len(set(found)) != 1:
        raise StexportError(f"--port 0: cannot read the port Ray Serve's HTTP proxy bound ({why}); pass a "
                            "port, e.g. --port 8000")
    return found[0]


def stop(shutdown_ray: bool = True, app: str | None = None) -> None:
    """Remove application `app` from Ray Serve (None: shut Ray Serve down, every application), then
    disconnect from Ray when `shutdown_ray` (a local cluster this process started stops with it)."""
    import ray
    from ray import serve

    global _LOCAL_RAY
    if not ray.is_initialized():  # start() did not get as far as Ray (stopped during start-up)
        return
    if shutdown_ray and _LOCAL_RAY:
        # the cluster goes with Serve's actors; shutting Serve down first only makes Ray print the retried
        # graceful-shutdown task of the controller it kills
        _LOCAL_RAY = False
        ray.shutdown()
        return
    if app is None:
        serve.shutdown()
    else:
        serve.delete(app)
    if shutdown_ray:
        ray.shutdown()


_LOCAL_RAY = False  # whether start() started a local Ray cluster in this process


__all__ = ["ServeConfig", "ServingClassifier", "Clips", "Task", "RequestError", "confine", "check_config",
           "own_task_name", "start", "stop", "deployment", "require_serve", "app_name"]
