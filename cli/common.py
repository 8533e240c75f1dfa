"""Shared CLI plumbing: one-line errors with exit code 2, JSON output, logging."""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings

import typer

from stexport.errors import StexportError

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"stexport: error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn StexportError (and a few OS errors) into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StexportError as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(f"{e.filename}: no such file")
        except PermissionError as e:
            fail(f"{e.filename}: permission denied")
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def print_json(obj) -> None:
    """Strict JSON on stdout (NaN/Infinity would not be JSON: they raise instead of printing)."""
    typer.echo(json.dumps(obj, indent=2, default=str, allow_nan=False))


def parse_options(items: list[str]) -> dict[str, str]:
    """`-o KEY=VALUE` pairs; each backend checks and types them against the options it declares."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StexportError(f"--option {item!r}: expected KEY=VALUE, e.g. threads=2 or compute=bf16")
        out[key.strip()] = value.strip()
    return out


OPTION_HELP = ("Backend option KEY=VALUE (repeatable), checked against the backend's options: e.g. compute=bf16, "
               "hint=throughput or static=false for openvino; opt_level=extended for onnxruntime; threads=N for "
               "any. `stexport bench --list-options` lists them all.")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="stexport: %(message)s",
                        stream=sys.stderr)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"stexport: warning: {msg}\n"
