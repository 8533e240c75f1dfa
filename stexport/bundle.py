"""Bundles: a directory holding exported artifacts and a `stexport.json` manifest.

Every command speaks bundles. A bundle is written to a temporary sibling directory and renamed into place, so a
failed build never leaves a half-written bundle, and an existing one is only replaced with force=True.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stexport import __version__
from stexport.errors import StexportError

MANIFEST = "stexport.json"
FORMAT = "stexport-bundle"
FORMAT_VERSION = 1


def default_home() -> Path:
    """Where bundles go when --out is not given (and where `infer` looks for the newest one)."""
    return Path(os.environ.get("STEXPORT_HOME", Path.home() / ".cache" / "stexport")) / "bundles"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_records(root: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        if path.is_file() and path.name == MANIFEST:
            path = path.parent
        mf = path / MANIFEST
        if not path.exists():
            raise StexportError(f"{path}: no such bundle (build one with `stexport build --adapter FILE`)")
        if not mf.is_file():
            raise StexportError(f"{path}: not a stexport bundle (no {MANIFEST}); build one with `stexport build`")
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StexportError(f"{mf}: unreadable manifest ({e}); rebuild the bundle with `stexport build --force`")
        if manifest.get("format") != FORMAT:
            raise StexportError(f"{mf}: not a stexport manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise StexportError(f"{mf}: bundle format {manifest['format_version']} is newer than this stexport "
                                f"({__version__}) understands; upgrade stexport")
        return cls(path=path, manifest=manifest)

    def file(self, key: str) -> Path:
        """Path of an artifact named in manifest['artifacts'] (e.g. 'onnx', 'torchscript', 'labels')."""
        rel = self.manifest.get("artifacts", {}).get(key)
        if not rel:
            raise StexportError(f"{self.path}: bundle has no {key} artifact")
        p = self.path / rel
        if not p.exists():
            raise StexportError(f"{p}: missing from the bundle; rebuild it with `stexport build --force`")
        return p

    def has(self, key: str) -> bool:
        rel = self.manifest.get("artifacts", {}).get(key)
        return bool(rel) and (self.path / rel).exists()

    def check_files(self) -> list[str]:
        """Names of files whose sha256 no longer matches the manifest."""
        bad = []
        for rel, rec in self.manifest.get("files", {}).items():
            p = self.path / rel
            if not p.is_file() or sha256_file(p) != rec["sha256"]:
                bad.append(rel)
        return bad

    @property
    def labels(self) -> list[str]:
        if not self.has("labels"):
            n = self.manifest["adapter"]["spec"]["num_classes"]
            return [f"class_{i}" for i in range(n)]
        return [ln.strip() for ln in self.file("labels").read_text().splitlines() if ln.strip()]

    @property
    def frames(self) -> int:
        return int(self.manifest["frames"])

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def update(self, artifacts: dict[str, str] | None = None, **fields) -> None:
        """Record new artifacts (already written into the bundle) and fields; refresh hashes atomically."""
        m = dict(self.manifest)
        m.setdefault("artifacts", {}).update(artifacts or {})
        m.update(fields)
        m["files"] = _file_records(self.path)
        atomic_write_json(self.path / MANIFEST, m)
        self.manifest = m


@contextlib.contextmanager
def writing(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces `out` in one rename, on failure it is removed."""
    out = Path(out)
    if out.exists() and not force:
        raise StexportError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise StexportError(f"{out}: exists and is not a stexport bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish_manifest(root: Path, manifest: dict) -> dict:
    """Stamp format, version, time and per-file sha256 into `manifest` and write it into `root`."""
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "stexport_version": __version__,
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
    m["files"] = _file_records(root)
    atomic_write_json(root / MANIFEST, m)
    return m


def newest(home: Path | None = None) -> Path | None:
    """The most recently built bundle under the default location, if any."""
    home = home or default_home()
    if not home.is_dir():
        return None
    found = [p.parent for p in home.glob(f"*/{MANIFEST}")]
    return max(found, key=lambda p: (p / MANIFEST).stat().st_mtime) if found else None
