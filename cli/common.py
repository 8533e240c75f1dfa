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
    """Strict JSON (no NaN/Infinity: ValueError rather than write them)."""
    typer.echo(json.dumps(obj, indent=2, default=str, allow_nan=False))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="stexport: %(message)s",
                        stream=sys.stderr)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"stexport: warning: {msg}\n"
