"""The Open Inference Protocol's routes, /metrics and access control on `stexport serve`'s deployment.

OIPRoutes is a base of the deployment class (app.deployment): its `__call__` takes every HTTP request, checks
the token (auth.py) on every route but the health checks (PREFIX/healthz, v2/health/live, v2/health/ready),
answers PREFIX/metrics (metrics.py) and PREFIX/v2/... itself, passes every other route to the deployment's own
`serve_classic`, and counts each answer. Its ServerLive … ModelInfer methods are the gRPC service's (oip_grpc.py).

REST (under the route prefix; tritonclient.http takes `url="HOST:PORT/PREFIX"`):

    GET  v2/health/live, v2/health/ready          200 once the replica has loaded its model
    GET  v2                                        server metadata
    GET  v2/models/{m}[/versions/1]                model metadata (oip.model_metadata)
    GET  v2/models/{m}[/versions/1]/ready          200 for a loaded task, 404 otherwise
    POST v2/models/{m}[/versions/1]/infer          inference (oip.py: JSON or binary tensors)

An infer request's videos are written each to a private temporary file and decoded by the deployment's
`decode_file` (the decoding `/classify` uses, with its time limit); its elements join the replica's batches
(serve.batch, across callers) and run one backend call per task in a batch (on a multi-task bundle one call
for the whole batch, its tasks mixed; the backend-seconds metric counts it under model "" when it mixed tasks).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time

import numpy as np
from ray import serve

from stexport.serving import auth, oip, oip_grpc  # noqa: F401 - oip_grpc: gRPC messages unpickle in replicas
from stexport.serving.requests import Clips, RequestError
from stexport.serving.metrics import CONTENT_TYPE, Metrics

HEALTH = ("healthz", "v2/health/live", "v2/health/ready")
MODEL_ROUTE = re.compile(r"v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<verb>ready|infer))?")
log = logging.getLogger("ray.serve")


def _response(status: int, body: dict | bytes, headers: dict | None = None, media_type: str = "application/json"):
    from starlette.responses import JSONResponse, Response

    if isinstance(body, dict):
        return JSONResponse(body, status_code=status, headers=headers)
    return Response(body, status_code=status, headers=headers, media_type=media_type)


class OIPRoutes:
    """Mixed into the deployment class, whose `cfg` (ServeConfig), `model` (ServingClassifier), `tmp`, `runner`,
    `uploads` (requests.UploadBudget), `body`, `decode_file` and `serve_classic` it uses. Call `oip_setup()` at the end of its __init__."""

    def oip_setup(self) -> None:
        import ray

        try:
            replica = ray.serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (never in a server)
            replica = str(os.getpid())
        self.metrics = Metrics(replica)
        self.oip_models = {
            name: oip.Model(name, t.labels, t.sampling.frames, t.sampling.size, t.sampling.to_dict(),
                            self.model.clf.backend.name, t.pack.path.name if t.pack else None,
                            name == self.model.default)
            for name, t in self.model.tasks.items()}
        self.run_oip.set_max_batch_size(self.cfg.max_batch)
        self.run_oip.set_batch_wait_timeout_s(self.cfg.batch_wait_s)

    # -- HTTP -----------------------------------------------------------------------------------------------

    async def __call__(self, request):
        path = request.url.path
        prefix = self.cfg.route_prefix.rstrip("/")
        route = path[len(prefix):].strip("/") if path.startswith(prefix) else path.strip("/")
        model, label = "", route if route in ("classify", "healthz", "metadata", "stats", "metrics", "v2") else "other"
        try:
            if route not in HEALTH and not auth.authorized(request.headers.get("authorization"),
                                                           self.cfg.token_sha256):
                response = _response(401, {"error": auth.refusal(request.headers.get("authorization"))},
                                     {"WWW-Authenticate": "Bearer"})
            elif route == "metrics" and request.method != "GET":
                response = _response(405, {"error": f"{path} takes GET, not {request.method}"})
            elif route == "metrics":
                response = _response(200, self.metrics.text(), media_type=CONTENT_TYPE)
            elif route == "v2" or route.startswith("v2/"):
                response, model, label = await self.oip_http(request, route)
            else:
                response, model = await self.serve_classic(request)
        except Exception as e:
            log.exception("stexport serve: %s %s failed", request.method, path)
            response = _response(500, {"error": f"internal error ({type(e).__name__}); see the server log"})
        finally:
            self.uploads.give(getattr(request.state, "held", 0))  # the body's bytes (requests.read_body)
        self.metrics.request(model, label, response.status_code)
        return response

    async def oip_http(self, request, route: str):
        """(response, model, route label) for a v2 route."""
        model, label = "", route
        try:
            match = MODEL_ROUTE.fullmatch(route)
            if match:
                model, verb = match["model"], match["verb"]
                label = "v2/models/" + (verb or "metadata")
            want = "POST" if match and match["verb"] == "infer" else "GET"
            if route not in ("v2", "v2/health/live", "v2/health/ready") and not match:
                label = "other"
                raise RequestError(404, f"no route {request.url.path!r}")
            if request.method != want:
                raise RequestError(405, f"{request.url.path} takes {want}, not {request.method}")
            if route == "v2/health/live":
                return _response(200, {"live": True}), model, label
            if route == "v2/health/ready":
                return _response(200, {"ready": True}), model, label
            if route == "v2":
                return _response(200, oip.server_metadata()), model, label
            if match["version"] not in (None, oip.VERSION):
                raise RequestError(404, f"model {model} has no version {match['version']!r}")
            m = self.oip_model(model)
            if verb == "ready":
                return _response(200, {"name": m.name, "ready": True}), model, label
            if verb is None:
                return _response(200, oip.model_metadata(m)), model, label
            body = await self.body(request, self.cfg.max_upload_bytes * self.cfg.max_batch + (1 << 20))
            # parsed off the event loop: a large JSON body must not stall /healthz and everyone else's answers
            req = await asyncio.get_running_loop().run_in_executor(
                None, oip.parse_http, body, request.headers.get(oip.HEADER_LENGTH), model)
            out = await self.oip_infer(req, m)
            data, head = oip.http_response(req, m, out)
            if head is None:
                return _response(200, data, media_type="application/json"), model, label
            return (_response(200, data, {"Inference-Header-Content-Length": str(head)},
                              media_type="application/octet-stream"), model, label)
        except RequestError as e:
            return _response(e.status, {"error": e.message}), model, label

    # -- gRPC (inference.GRPCInferenceService, called by Ray Serve's gRPC proxy) -----------------------------

    async def grpc_call(self, context, route: str, model: str, answer, empty, public: bool = False):
        """answer() (a coroutine function giving the response message), with the token checked (unless
        `public`), a RequestError turned into its gRPC status and message, and the call counted."""
        import grpc

        status = "OK"
        try:
            metadata = dict(context.invocation_metadata()) if context is not None else {}
            if not public and not auth.authorized(metadata.get("authorization"), self.cfg.token_sha256):
                raise RequestError(401, auth.refusal(metadata.get("authorization"),
                                                     "metadata 'authorization"))
            response = await answer()
        except RequestError as e:
            status = oip.GRPC_CODE.get(e.status, "INVALID_ARGUMENT")
            context.set_code(getattr(grpc.StatusCode, status))
            context.set_details(e.message)
            response = empty
        except Exception as e:
            log.exception("stexport serve: gRPC %s failed", route)
            status = "INTERNAL"
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(f"internal error ({type(e).__name__}); see the server log")
            response = empty
        self.metrics.request(model, "grpc/" + route, status)
        return response

    async def ServerLive(self, request, grpc_context=None):
        from tritonclient.grpc import service_pb2 as pb

        async def answer():
            return pb.ServerLiveResponse(live=True)

        return await self.grpc_call(grpc_context, "ServerLive", "", answer, pb.ServerLiveResponse(), public=True)

    async def ServerReady(self, request, grpc_context=None):
        from tritonclient.grpc import service_pb2 as pb

        async def answer():
            return pb.ServerReadyResponse(ready=True)

        return await self.grpc_call(grpc_context, "ServerReady", "", answer, pb.ServerReadyResponse(), public=True)

    async def ModelReady(self, request, grpc_context=None):
        from tritonclient.grpc import service_pb2 as pb

        async def answer():
            return pb.ModelReadyResponse(ready=request.name in self.oip_models
                                         and request.version in ("", oip.VERSION))

        return await self.grpc_call(grpc_context, "ModelReady", request.name, answer, pb.ModelReadyResponse())

    async def ServerMetadata(self, request, grpc_context=None):
        from tritonclient.grpc import service_pb2 as pb

        async def answer():
            return oip.grpc_server_metadata()

        return await self.grpc_call(grpc_context, "ServerMetadata", "", answer, pb.ServerMetadataResponse())

    async def ModelMetadata(self, request, grpc_context=None):
        from tritonclient.grpc import service_pb2 as pb

        async def answer():
            if request.version not in ("", oip.VERSION):
                raise RequestError(404, f"model {request.name} has no version {request.version!r}")
            return oip.grpc_model_metadata(self.oip_model(request.name))

        return await self.grpc_call(grpc_context, "ModelMetadata", request.name, answer,
                                    pb.ModelMetadataResponse())

    async def ModelInfer(self, request, grpc_context=None):
        from tritonclient.grpc import service_pb2 as pb

        async def answer():
            req = oip.from_grpc(request)
            m = self.oip_model(req.model)
            return oip.grpc_response(req, m, await self.oip_infer(req, m))

        return await self.grpc_call(grpc_context, "ModelInfer", request.model_name, answer,
                                    pb.ModelInferResponse())

    # -- inference ------------------------------------------------------------------------------------------

    def oip_model(self, name: str) -> oip.Model:
        if name not in self.oip_models:
            raise RequestError(404, f"no model {name[:100]!r} on this server; models: " + ", ".join(self.oip_models))
        return self.oip_models[name]

    async def oip_infer(self, req: oip.InferRequest, m: oip.Model) -> dict[str, np.ndarray]:
        """The outputs (oip.outputs) of request `req` for model `m`. RequestError for a bad request; a video
        that fails to decode fails the request with every bad element's error, each named `video[i]`."""
        kind, data = oip.check_request(req, m, self.cfg.max_batch, self.cfg.max_upload_bytes)
        k = oip.top_k(req, self.cfg.top_k, m.classes)
        task = self.model.task(m.name)
        if kind == oip.VIDEO:
            got = await asyncio.gather(*(self.decode_upload(blob, f"{oip.VIDEO}[{i}]", task)
                                         for i, blob in enumerate(data)), return_exceptions=True)
            for g in got:
                if isinstance(g, BaseException) and not isinstance(g, RequestError):
                    raise g
            bad = [g for g in got if isinstance(g, RequestError)]
            if bad:
                raise RequestError(max(e.status for e in bad), "; ".join(e.message for e in bad))
            items = got
        else:
            items = [Clips(f"{oip.FRAMES}[{i}]", data[i:i + 1], m.frames, 0.0, [], task.name)
                     for i in range(len(data))]
        probs = await asyncio.gather(*(self.run_oip(it) for it in items))
        broken = [it.source for it, p in zip(items, probs) if p is None]
        if broken:
            raise RequestError(500, f"{', '.join(broken)}: the model gave non-finite logits (NaN/Inf) on "
                                    f"{self.model.clf.backend.name}; check the bundle with `stexport verify`")
        return oip.outputs(m, np.stack(probs), k)

    async def decode_upload(self, blob: bytes, name: str, task) -> Clips:
        """An uploaded video (a /classify body, an OIP BYTES element) written to a private temporary file and
        decoded there by decode_video."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".video")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            return await self.decode_video(tmp, name, task)
        finally:
            os.unlink(tmp)

    async def decode_video(self, path: str, name: str, task) -> Clips:
        """The deployment's decode_file, counted in the metrics (decoding seconds, failures by reason)."""
        try:
            clips = await self.decode_file(path, name, task)
        except RequestError as e:
            if e.status == 422:
                self.metrics.decode_failed(e.reason or "invalid")
            raise
        self.metrics.decoded(task.name, clips.decode_s)
        return clips

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_oip(self, items: list[Clips]) -> list:
        """Per item its class probabilities (float64 (classes,), None where a logit was not finite), items
        from every caller batched together."""
        self.metrics.batched(items, time.perf_counter())
        return await asyncio.get_running_loop().run_in_executor(self.runner, self.oip_probs, items)

    def oip_probs(self, items: list[Clips]) -> list:
        from stexport.runtime.batch import mixed_probs, task_probs

        if self.model.mixes:  # a multi-task bundle: every item's task is data, one backend call for the batch
            tasks = {it.task for it in items}
            probs, spent = mixed_probs(self.model.clf, [it.clips for it in items],
                                       [self.model.task(it.task).pack for it in items])
            self.metrics.backend_call(items[0].task if len(tasks) == 1 else "", spent)
            return probs
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.task, []).append(i)
        out: list = [None] * len(items)
        for name, group in groups.items():
            probs, spent = task_probs(self.model.clf, [items[i].clips for i in group], self.model.tasks[name].pack)
            self.metrics.backend_call(name, spent)
            for i, p in zip(group, probs):
                out[i] = p
        return out
