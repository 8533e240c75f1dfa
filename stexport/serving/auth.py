"""Access control for `stexport serve`: a bearer token, and the rule for binding beyond loopback.

A server bound to anything but a loopback address needs a token (`--token-file`) or an explicit `--insecure`.
With a token, every route but the health checks wants `Authorization: Bearer TOKEN` (HTTP header or gRPC
metadata, RFC 6750 §2.1); the server keeps only the token's SHA-256, and compares digests with
hmac.compare_digest (constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path

from stexport.errors import StexportError

MIN_TOKEN = 16  # characters; shorter tokens are guessable


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_token(path) -> str:
    """The token in file `path` (surrounding whitespace stripped): its SHA-256 hex digest. StexportError (one
    line) when the file cannot be read, or holds fewer than MIN_TOKEN characters or more than one line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise StexportError(f"--token-file {p}: cannot read it ({type(e).__name__}); give a file holding one "
                            "token line") from None
    if len(text) < MIN_TOKEN or "\n" in text:
        raise StexportError(f"--token-file {p}: needs one line of at least {MIN_TOKEN} characters, e.g. "
                            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`")
    return digest(text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, grpc_port: int | None, token_sha256: str | None, insecure: bool) -> None:
    """StexportError (one line) for a server reachable beyond loopback with neither a token nor `insecure`.
    Ray Serve's gRPC proxy listens on every address whatever `host` says, so gRPC counts as exposed."""
    if token_sha256 or insecure:
        return
    if not is_loopback(host):
        raise StexportError(f"--host {host} exposes the server to other machines: give --token-file FILE (callers "
                            "send 'Authorization: Bearer TOKEN'), or --insecure to serve anyone who reaches it")
    if grpc_port:
        raise StexportError(f"--grpc-port {grpc_port}: Ray Serve's gRPC proxy listens on every address, not only "
                            f"{host}: give --token-file FILE (callers send 'authorization: Bearer TOKEN' "
                            "metadata), or --insecure to serve anyone who reaches it")


def authorized(header: str | None, token_sha256: str | None) -> bool:
    """Whether an Authorization value carries the token (always true on a server without one)."""
    if token_sha256 is None:
        return True
    scheme, _, given = (header or "").strip().partition(" ")
    ok = hmac.compare_digest(digest(given.strip()), token_sha256)
    return ok and scheme.lower() == "bearer"


def refusal(header: str | None, where: str = "header 'Authorization") -> str:
    """Why `authorized` said no, for the 401 answer: no token sent, another scheme than Bearer, or a token
    that is not this server's. `where`: how the caller sends it ("header 'Authorization" for HTTP, "metadata
    'authorization" for gRPC). Never echoes what was sent."""
    scheme, _, given = (header or "").strip().partition(" ")
    send = f"send {where}: Bearer TOKEN'"
    if not scheme:
        return f"this server needs a token: {send}"
    if scheme.lower() != "bearer" or not given.strip():
        return f"the authorization is not a bearer token: {send}"
    return f"wrong token: it is not the one this server was started with (--token-file); {send}"
