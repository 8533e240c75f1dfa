"""stexport: ship ST-Adapter video models (fold, export, classify, verify)."""

__version__ = "0.1.0"

from stexport.errors import StexportError  # noqa: E402

__all__ = ["StexportError", "__version__"]
