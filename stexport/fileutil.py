"""File helpers every stage shares: one sha256, one atomic write (bytes, text, JSON), the user's file modes.

Atomic writes go to a temporary sibling and one `os.replace`, so a reader never sees a half-written file and
a killed writer leaves at most a `.NAME.tmpPID` file that the next writer of the same name removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def umask() -> int:
    """This process's umask (reading it needs setting it: restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data, fsync: bool = False) -> None:
    """Write bytes (or any buffer) to `path` through a temporary sibling and one rename. The file gets the
    mode a plain open() would give it (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# what a write into a folder can meet that no retry fixes: the user must free space or choose another folder
WRITE_FAILURES = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM})


def write_cache(path: str | Path, data, what: str, setting: str) -> bool:
    """Write a cache file (bytes) atomically. Caches are an optimisation: when `path` cannot be written (a
    read-only or full disk, no permission) one warning names the folder and `setting` (the environment variable
    that moves the cache), nothing is left behind, and False is returned; True when written."""
    try:
        atomic_write_bytes(path, data)
        return True
    except OSError as e:
        logging.getLogger("stexport").warning(
            "%s cache not written (%s: %s); going on without it (set %s to a writable folder to keep it)",
            what, Path(path).parent, e.strerror or e, setting)
        return False


def as_os_error(e: Exception, path: str | Path) -> Exception:
    """An OSError for a library's write error that carries the OS's number only in its text (safetensors' Rust
    writer says "... (os error 28)"), so that callers meet one kind of error for a full disk; else `e`."""
    m = re.search(r"os error (\d+)", str(e))
    if isinstance(e, OSError) or not m:
        return e
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(data) -> bytes:
    """Strict JSON (NaN/Infinity refused: ValueError), indented, UTF-8, with a final newline."""
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | Path, data) -> None:
    """Strict JSON (NaN/Infinity refused: ValueError), indented, through one rename."""
    atomic_write_bytes(path, json_bytes(data))


def apply_umask(root: str | Path) -> None:
    """Give `root` and everything below it the modes a plain mkdir/open would (0777/0666 less the umask):
    tempfile.mkdtemp makes 0700 directories, which would otherwise leak into a finished bundle."""
    mask = umask()
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def python_child(module: str, function: str, *args: str) -> list[str]:
    """The command that runs `module.function(*args)` in a fresh interpreter. Not `python -m module`: that puts
    the working directory first on sys.path, so a folder named `stexport` there (a clone's parent directory)
    would shadow the installed package."""
    import sys

    call = f"import sys; del sys.path[0]; from {module} import {function}; {function}(*sys.argv[1:])"
    return [sys.executable, "-c", call, *args]


@contextlib.contextmanager
def private_torch_cache():
    """Point torch's compile caches (inductor, dynamo, triton) at a fresh temporary directory for the `with`
    block and remove it afterwards, unless the user chose one (TORCHINDUCTOR_CACHE_DIR set).

    Importing torch._dynamo (the ONNX exporter does) creates `$TMPDIR/torchinductor_$USER` and writes its path
    into os.environ; a command must not leave that behind. The variable is restored on exit."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        yield None
        return
    path = tempfile.mkdtemp(prefix="stexport-torch-cache-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        yield Path(path)
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        shutil.rmtree(path, ignore_errors=True)
