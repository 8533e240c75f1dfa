"""The error shape for answers Ray Serve's HTTP proxy writes itself, not the replica.

Every route of `stexport serve` answers errors as JSON `{"error": "one line"}` (requests.RequestError), but some
answers never reach a replica's code: a replica killed mid-request (Ray's proxy sees RayActorError and returns
no response, so uvicorn writes a plain-text "Internal Server Error"), no route for a path yet (404), a node being
drained, backpressure or a timeout (503/429/408, plain text). `JsonErrors` runs inside the proxy (Ray Serve's
documented proxy hook, RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, read by each proxy process at start) and
rewrites exactly those: a plain-text 4xx/5xx becomes `{"error": its text}` with the same status, and a request
the proxy left unanswered becomes 503 `{"error": ...}` with `Retry-After: 1` (Ray Serve replaces the dead
replica; the request may be retried). JSON answers and successful ones pass through untouched.

Ray Serve reads the hook from the environment of the cluster's processes, so `install()` works only before this
process starts a local cluster; a server joining a running cluster keeps that cluster's proxy as it is.
Imports nothing but Starlette (the proxy process loads this module).
"""

from __future__ import annotations

import json
import os

ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "stexport.serving.proxy_errors.middlewares"
UNANSWERED = ("the server's replica stopped before answering this request (Ray Serve replaces it); "
              "retry the request")


def install() -> bool:
    """Ask the Ray Serve proxies of a cluster this process is about to start to load `JsonErrors` (sets ENV).
    Returns False, changing nothing, when ENV already names another callback (the user's own stays)."""
    current = os.environ.get(ENV)
    if current and current != CALLBACK:
        return False
    os.environ[ENV] = CALLBACK
    return True


def middlewares() -> list:
    """The proxy callback Ray Serve calls (a list of Starlette middlewares)."""
    from starlette.middleware import Middleware

    return [Middleware(JsonErrors)]


def _header(headers, name: bytes) -> bytes:
    return next((v for k, v in headers if k.lower() == name), b"")


class JsonErrors:
    """ASGI middleware: plain-text error answers and unanswered requests become the JSON error shape."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        held: dict | None = None  # a plain-text error's start message while its body is collected
        body = b""

        async def rewrite(message):
            nonlocal started, held, body
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                kind = _header(headers, b"content-type")
                if message["status"] >= 400 and (not kind or kind.startswith(b"text/plain")):
                    held = {**message, "headers": headers}
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body += message.get("body", b"")
                if message.get("more_body", False):
                    return
                text = body.decode("utf-8", "replace").strip() or f"HTTP {held['status']}"
                await _send_json(send, held["status"], text,
                                 [(k, v) for k, v in held["headers"]
                                  if k.lower() not in (b"content-type", b"content-length")])
                held = None
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception:  # the proxy's own failure; Ray logged it
            if started:
                raise
            await _send_json(send, 500, "internal error in Ray Serve's proxy; see Ray's log (serve -v)", [])
            return
        if not started:
            await _send_json(send, 503, UNANSWERED, [(b"retry-after", b"1")])


async def _send_json(send, status: int, error: str, headers: list) -> None:
    data = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
