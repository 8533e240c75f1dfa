"""Optional parts of stexport and the `pip install` that brings each (see pyproject.toml's extras)."""

from __future__ import annotations

import importlib.util

from stexport.errors import StexportError

# module -> the extra that installs it
EXTRA_OF = {
    "torch": "export", "torchvision": "export", "open_clip": "export", "onnxscript": "export",
    "safetensors": "export", "onnx": "export", "tensorrt": "tensorrt", "ray": "ray", "tritonclient": "triton",
}


def missing(*modules: str) -> list[str]:
    """Which of `modules` cannot be imported here (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(what: str, *modules: str) -> None:
    """Raise StexportError naming the pip install that brings `modules` when any is missing."""
    gone = missing(*modules)
    if gone:
        extras = sorted({EXTRA_OF.get(m, m) for m in gone})
        raise StexportError(f"{what} needs {', '.join(gone)}, which this installation lacks; install it with: "
                            f"pip install 'stexport[{','.join(extras)}]'")
