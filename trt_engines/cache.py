"""The engine cache inside a bundle: `engines/<key>.engine`, a timing cache per GPU and TensorRT version, and
the records in the manifest ("engines": a list; artifacts["engines"] names the directory).

Engines are written to a temporary file and renamed into place, then the manifest is updated atomically, all
under a lock on the bundle directory, so two processes building at once never leave a half-written engine or
lose each other's record.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from stexport.trt_engines.record import (
    ENGINE_DIR,
    Host,
    make_request,
    replaces,
    timing_cache_file,
)

from stexport.bundle.store import Bundle, locked_dir
from stexport.errors import StexportError
from stexport.fileutil import atomic_write_bytes, sha256_file

log = logging.getLogger("stexport")


def records(bundle: Bundle) -> list[dict]:
    """The engine records (as dicts) whose engine file is still there."""
    return [r.model_dump(mode="json") for r in bundle.manifest.engines if (bundle.path / r.file).is_file()]


def onnx_identity(bundle: Bundle) -> dict:
    """sha256 of the bundle's ONNX file (and of its external data file, when it has one)."""
    ident = {}
    for key, field in (("onnx", "sha256"), ("onnx_data", "data_sha256")):
        rel = bundle.manifest.artifacts.get(key)
        if not rel:
            continue
        rec = bundle.manifest.files.get(rel)
        ident[field] = rec.sha256 if rec else sha256_file(bundle.file(key))
    if "sha256" not in ident:
        bundle.file("onnx")  # raises the standard "no onnx artifact" error
    return ident


def write_atomic(path: Path, data) -> None:
    """Write bytes (or any buffer) to `path` through a temporary sibling and one rename, synced to disk."""
    atomic_write_bytes(path, data, fsync=True)


def locked(bundle: Bundle):
    """Exclusive lock on the bundle directory (flock on its descriptor: no lock file lands in the bundle)."""
    return locked_dir(bundle.path)


def writable(bundle: Bundle) -> str | None:
    """None if engines can be written into the bundle, else why not."""
    target = bundle.path / ENGINE_DIR
    probe = target if target.exists() else bundle.path
    if not os.access(probe, os.W_OK) or not os.access(bundle.path / "stexport.json", os.W_OK):
        return f"{bundle.path} is not writable by this user"
    return None


def load_timing(bundle: Bundle, host: Host) -> bytes | None:
    p = bundle.path / timing_cache_file(host)
    return p.read_bytes() if p.is_file() else None


def save(bundle: Bundle, record: dict, plan, timing: bytes | None, host: Host) -> dict:
    """Store an engine and its record; drop the records (and files) it makes useless."""
    with locked(bundle):
        fresh = Bundle.load(bundle.path)  # another process may have added a record meanwhile
        write_atomic(bundle.path / record["file"], plan)
        if timing:
            write_atomic(bundle.path / timing_cache_file(host), timing)
        keep, drop = [], []
        for r in records(fresh):
            (drop if r["key"] == record["key"] or replaces(r, record) else keep).append(r)
        for r in drop:
            if r["file"] != record["file"]:
                (bundle.path / r["file"]).unlink(missing_ok=True)
        written = [record["file"], timing_cache_file(host), *(r["file"] for r in drop)]
        fresh.update(artifacts={"engines": ENGINE_DIR}, written=written, engines=[*keep, record])
        bundle.manifest = fresh.manifest
    return record


def refuse_unwritable(bundle: Bundle) -> None:
    """StexportError (one line, with the fix) when engines or settings cannot be written into the bundle."""
    why_not = writable(bundle)
    if why_not:
        raise StexportError(f"cannot store a TensorRT engine: {why_not}; copy the bundle somewhere writable")


def record_request(bundle: Bundle, **values) -> dict:
    """Remember build settings for a later first use on a GPU host (`stexport build --engine` without one)."""
    req = make_request(**values)
    with locked(bundle):
        fresh = Bundle.load(bundle.path)
        fresh.update(tensorrt_request=req)
        bundle.manifest = fresh.manifest
    return req
