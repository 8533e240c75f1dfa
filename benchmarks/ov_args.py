"""Command-line arguments the OpenVINO benchmark scripts share."""

from __future__ import annotations

import argparse
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    """BUNDLE, --precision (of the float parts) and --batch; the script adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--precision", default="bf16", help="OpenVINO inference precision for the float parts")
    ap.add_argument("--batch", type=int, default=4)
    return ap
