"""Bundles: a directory holding exported artifacts and a `stexport.json` manifest (stexport.bundle.manifest).

Every command speaks bundles. A bundle is written to a temporary sibling directory and renamed into place under
a lock on the parent directory, so a failed or killed build never leaves a half-written bundle at the target,
two builds of the same target never silently replace each other, and an existing bundle is only replaced with
force=True. A file the runtime opens is checked against the sha256 the manifest recorded (cached by size,
mtime and inode), so a changed model never runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stexport.bundle import manifest as mf
from stexport.errors import BundleChanged, StexportError
from stexport.fileutil import apply_umask, atomic_write_json, sha256_file
from stexport.bundle.manifest import MANIFEST, FileRecord, Manifest

log = logging.getLogger("stexport")

TEMP_MARK = ".bundle-"  # temporary build directories: .<name>.bundle-<pid>-<random>


def default_home() -> Path:
    """Where bundles go when --out is not given (and where `infer` looks for the newest one)."""
    return Path(os.environ.get("STEXPORT_HOME", Path.home() / ".cache" / "stexport")) / "bundles"


def file_records(root: Path) -> dict[str, FileRecord]:
    """sha256 and size of every file under `root` but the manifest (the verified-hash cache is primed too)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = FileRecord(sha256=sha256_file(p), bytes=p.stat().st_size)
    return out


# ------------------------------------------------------------------------------------------------------------
# verified-hash cache: hashing a 376 MB model on every start would cost a second; a file whose size, mtime and
# inode are unchanged since its hash was verified is taken as verified.


def _hash_cache_file(bundle_path: Path) -> Path:
    key = hashlib.sha256(str(bundle_path.resolve()).encode()).hexdigest()[:24]
    return default_home().parent / "verified" / f"{key}.json"


def _stamp(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]  # ctime: an mtime set back is still seen


def _read_cache(bundle_path: Path) -> dict:
    try:
        data = json.loads(_hash_cache_file(bundle_path).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(bundle_path: Path, data: dict) -> None:
    try:
        atomic_write_json(_hash_cache_file(bundle_path), data)
    except OSError:  # a read-only home only costs the next start a hash
        pass


@dataclass
class Bundle:
    """A bundle on disk. check_hashes=False lets `stexport verify` inspect a changed bundle as it is."""

    path: Path
    manifest: Manifest
    check_hashes: bool = True

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        """Read and validate a bundle directory (or its stexport.json). Raises StexportError, one line."""
        path = Path(path)
        if path.name == MANIFEST and path.is_file():
            path = path.parent
        if not path.exists():
            raise StexportError(f"{path}: no such bundle (build one with `stexport build --adapter FILE`)")
        if not path.is_dir():
            if (path.parent / MANIFEST).is_file():  # a file inside a bundle, e.g. -m BUNDLE/model.onnx
                raise StexportError(f"{path}: a file inside the bundle {path.parent}; pass the bundle directory: "
                                    f"{path.parent}")
            raise StexportError(f"{path}: not a bundle directory (build one with `stexport build --adapter FILE`)")
        return cls(path=path, manifest=mf.load(path))

    # -- artifacts ----------------------------------------------------------------------------------------------

    def has(self, role: str) -> bool:
        rel = self.manifest.artifacts.get(role)
        return bool(rel) and (self.path / rel).exists()

    def file(self, role: str, verify: bool = True) -> Path:
        """Path of the artifact `role` ('onnx', 'torchscript', 'labels', 'deltas', …). With `verify`, its sha256
        (and that of the ONNX external data with 'onnx') must match the manifest's record.

        Raises StexportError when the bundle has no such artifact, the file is gone, or it changed since the
        build."""
        rel = self.manifest.artifacts.get(role)
        if not rel:
            how = {"torchscript": f"`stexport export-torchscript {self.path}`",
                   "aoti": f"`stexport export-aoti {self.path}`",
                   "onnx": "`stexport build` (this bundle has no ONNX graph)"}.get(role)
            raise StexportError(f"{self.path}: bundle has no {role} artifact"
                                + (f"; make it with {how}" if how else ""))
        p = self.path / rel
        if not p.exists():
            raise StexportError(f"{p}: missing from the bundle; rebuild it with `stexport build --force`")
        if verify and self.check_hashes and rel not in self.manifest.files:
            raise BundleChanged(f"{self.path}: {rel} is not among the files the manifest recorded (stexport.json "
                                f"was edited?); rebuild the bundle with `stexport build --force`")
        if verify and self.check_hashes:
            self.verify_files([rel, *([self.manifest.artifacts["onnx_data"]]
                                     if role == "onnx" and "onnx_data" in self.manifest.artifacts else [])])
        return p

    def changed_files(self, names: list[str] | None = None) -> list[str]:
        """Which of `names` (default: every recorded file) are missing or no longer match their sha256."""
        names = list(self.manifest.files) if names is None else names
        cache = _read_cache(self.path)
        bad, dirty = [], False
        for rel in names:
            rec = self.manifest.files.get(rel)
            p = self.path / rel
            if rec is None or p.is_dir():
                continue
            if not p.is_file():
                bad.append(rel)
                continue
            stamp = _stamp(p)
            if cache.get(rel) == [*stamp, rec.sha256]:
                continue
            if sha256_file(p) != rec.sha256:
                bad.append(rel)
                continue
            cache[rel] = [*stamp, rec.sha256]
            dirty = True
        if dirty:
            _write_cache(self.path, cache)
        return bad

    def verify_files(self, names: list[str] | None = None) -> None:
        """Raise StexportError if any of `names` (default: all) changed since the build."""
        bad = self.changed_files(names)
        if bad:
            raise BundleChanged(f"{self.path}: {', '.join(bad)} changed since the bundle was built (sha256 differs "
                                f"from stexport.json); rebuild it with `stexport build --force`, or see what "
                                f"differs with `stexport verify {self.path} --clips VIDEOS`")

    # -- what the runtime reads -----------------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        """Class names, in class order: the bundle's labels file, else class_0 … class_{N-1} (only for a bundle
        built without one: a recorded labels file that is gone is an error)."""
        if "labels" not in self.manifest.artifacts:
            return [f"class_{i}" for i in range(self.manifest.output.classes)]
        return [ln.strip() for ln in self.file("labels").read_text(encoding="utf-8").splitlines() if ln.strip()]

    @property
    def frames(self) -> int:
        return self.manifest.input.frames

    @property
    def size(self) -> int:
        return self.manifest.input.size

    @property
    def precision(self) -> str:
        return self.manifest.precision

    def update(self, artifacts: dict[str, str] | None = None, written: tuple[str, ...] | list[str] = (),
               **fields) -> None:
        """Record new artifacts (already written into the bundle) and manifest fields; refresh the file hashes;
        write the manifest in one rename.

        written: bundle-relative files the caller (re)wrote or removed. Every other recorded file must still
        match its sha256 (BundleChanged otherwise): an update never records a changed model as built."""
        if self.check_hashes:
            self.verify_files([rel for rel in self.manifest.files if rel not in set(written)])
        m = self.manifest.with_(artifacts={**self.manifest.artifacts, **(artifacts or {})}, **fields)
        m = m.with_(files=file_records(self.path))
        mf.save(m, self.path)
        self.manifest = m
        self.changed_files()  # prime the verified-hash cache with the new files


# ------------------------------------------------------------------------------------------------------------
# writing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary build directories of `out` left by builds that were killed (their process is gone)."""
    removed = []
    pattern = re.compile(re.escape(f".{out.name}{TEMP_MARK}") + r"(\d+)-")
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.info("removed %s, left by an interrupted build", p)
    return removed


@contextlib.contextmanager
def locked_dir(path: Path):
    """Exclusive flock on a directory's descriptor for the `with` block (no lock file is created)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def refuse_existing(out: Path, force: bool) -> None:
    """The one "may `out` be written" rule: absent, or (with force) a stexport bundle or an empty folder."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise StexportError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    if not out.is_dir() or (not (out / MANIFEST).exists() and any(out.iterdir())):
        raise StexportError(f"{out}: exists and is not a stexport bundle; refusing to replace it")


@contextlib.contextmanager
def writing(out: str | Path, force: bool = False, refuse=refuse_existing) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out` in one rename, on failure (or
    an interrupt) it is removed.

    The "already exists" check (`refuse(out, force)`, raising StexportError) holds at the rename itself (made
    under a lock on the parent directory): of two writers of the same `out` without force, the second to finish
    is refused. Temporary directories of killed writers are removed first. The result gets the modes the
    user's umask gives any new folder and file."""
    out = Path(out)
    refuse(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARK}{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        with locked_dir(out.parent):
            try:
                refuse(out, force)
            except StexportError as e:
                raise StexportError(f"{e} (it was written by another process while this build ran)") from None
            if out.exists():
                old = out.with_name(f".{out.name}.old{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:  # a writer that names no file (onnx's): name the output
            raise OSError(e.errno, e.strerror, str(out)) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish(root: Path, manifest: Manifest) -> Manifest:
    """Record every file's sha256 in `manifest` and write it into `root` (a bundle being written)."""
    m = manifest.with_(files=file_records(root))
    mf.save(m, root)
    return m


def newest(home: Path | None = None) -> Path | None:
    """The bundle under `home` (default: default_home()) built last, by the build time in its manifest (not
    the folder's mtime, which later additions such as model.ts change). Unreadable manifests are passed over."""
    home = home or default_home()
    if not home.is_dir():
        return None
    best, found = None, None
    for m in home.glob(f"*/{MANIFEST}"):
        try:
            created = mf.created_at(json.loads(m.read_text(encoding="utf-8")).get("created"))
        except (OSError, ValueError, AttributeError):
            continue
        if created is None:
            continue
        key = (created, m.parent.name)
        if best is None or key > best:
            best, found = key, m.parent
    return found
