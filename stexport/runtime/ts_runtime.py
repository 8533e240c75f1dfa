"""Loading a bundle's TorchScript module (`model.ts`) and the manifest embedded in it: the runtime half of
TorchScript (the exporter, stexport.build.torchscript, needs the build stage; this needs only torch).

The manifest travels inside the archive as the extra file `stexport.json` (the bundle's manifest with the
class names added), so C++ hosts (examples/cpp) need nothing else.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from stexport.errors import StexportError
from stexport.bundle.manifest import InputRecord

EXTRA = "stexport.json"  # the extra file inside the .ts archive


@contextlib.contextmanager
def quiet():
    """torch 2.14 warns on every torch.jit call that TorchScript is deprecated; users need not see it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.*")
        yield


def load(path: str | Path, device="cpu"):
    """(module, embedded manifest dict): the module with its constants placed on `device`. Raises
    StexportError for a file that is not a loadable TorchScript archive or whose manifest is not JSON."""
    import torch

    path = Path(path)
    extra = {EXTRA: ""}
    try:
        with quiet():
            module = torch.jit.load(str(path), map_location=torch.device(device), _extra_files=extra)
    except (RuntimeError, ValueError) as e:
        raise StexportError(f"{path}: not a loadable TorchScript module ({str(e).splitlines()[0][:160]}); "
                            "re-export it with `stexport export-torchscript BUNDLE --force`") from e
    try:
        manifest = json.loads(extra[EXTRA] or b"{}")
    except json.JSONDecodeError as e:
        raise StexportError(f"{path}: its embedded {EXTRA} is not JSON ({e}); re-export it with "
                            "`stexport export-torchscript BUNDLE --force`") from e
    return module.eval(), manifest


def embedded_input(embedded: dict) -> InputRecord:
    """The input record of an embedded manifest: format 2 keeps it under 'input'; modules exported before
    the typed manifest described their input as torchscript.input.shape [B, T, S, S, 3]."""
    inp = embedded.get("input")
    if isinstance(inp, dict) and "frames" in inp:
        try:
            return InputRecord(**{k: v for k, v in inp.items() if k in InputRecord.model_fields})
        except ValueError as e:
            raise StexportError(f"its embedded input record is invalid ({str(e).splitlines()[0]})") from None
    shape = ((embedded.get("torchscript") or {}).get("input") or {}).get("shape") or []
    if len(shape) != 5:
        raise StexportError("its embedded manifest does not say what input it takes")
    return InputRecord(frames=int(shape[1]), size=int(shape[2]))
