"""Shared CLI plumbing: one-line errors with exit code 2, Ctrl-C as exit 130, JSON output, logging, help text,
and the flag spellings kept for one release."""

from __future__ import annotations

import errno
import functools
import inspect
import json
import re
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup

from stexport import interrupt
from stexport.errors import StexportError
from stexport.fileutil import WRITE_FAILURES

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"stexport: error: {message}", err=True)
    raise typer.Exit(code)


def interrupted() -> None:
    typer.echo("stexport: interrupted", err=True)
    raise typer.Exit(EXIT_INTERRUPTED)


def cannot_write(e: OSError) -> str:
    """One line for a write the disk refused (read-only, full, no permission): what, why, and the fix."""
    from stexport.bundle.store import default_home

    where = Path(e.filename) if e.filename else None
    fix = ("free space on that disk or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT)
           else "choose a folder you can write")
    home = default_home().parent
    if where is not None and (where == home or home in where.parents):
        fix += " (set STEXPORT_HOME to a writable folder, or pass --out)"
    return f"cannot write {where or 'the output'}: {e.strerror or e}; {fix}"


def handle_errors(fn):
    """Turn StexportError (and a few OS errors) into one line on stderr and exit code 2, never a traceback;
    Ctrl-C, whatever exception a library wrapped it in, into "stexport: interrupted" and exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            interrupt.check()  # a library may have swallowed the KeyboardInterrupt and let the command finish
            return result
        except KeyboardInterrupt:
            interrupted()
        except typer.Exit:
            raise
        except Exception as e:
            if interrupt.interrupted() or interrupt.caused_by_interrupt(e):
                interrupted()
            if isinstance(e, StexportError):
                fail(str(e))
            if isinstance(e, OSError) and not isinstance(e, PermissionError) and e.errno in WRITE_FAILURES:
                fail(cannot_write(e))
            if isinstance(e, IsADirectoryError):
                fail(f"{e.filename}: is a directory, not a file")
            if isinstance(e, FileNotFoundError):
                fail(f"{e.filename}: no such file")
            if isinstance(e, PermissionError):
                fail(f"{e.filename}: permission denied")
            raise

    return wrapper


def check_adapter_file(path) -> None:
    """--adapter must name a checkpoint file (checked before torch is imported)."""
    if path.is_dir():
        raise StexportError(f"{path}: is a directory; --adapter takes the checkpoint file (.pt/.pth/.safetensors)")
    if not path.is_file():
        raise StexportError(f"{path}: no such file (--adapter takes the ST-Adapter checkpoint)")


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


# Help text naming backends is filled from the backend registry when help is shown (fill_help), so the CLI's
# start-up imports no backend module and a registered backend appears in every command's help.
BACKEND_HELP = "auto ({auto}) or a backend name: {backends}."
TASK_BACKENDS = "Backends that run packs: {task_backends}."
# The decoder's limits (stexport.runtime.decode_worker.DecodeLimits): one meaning in every command.
DECODE_TIMEOUT_S = 60.0  # = stexport.runtime.decode_worker.DEFAULT_STALL_S (tests/test_video.py checks)
DECODE_TIMEOUT_HELP = ("Seconds a video's decoder may go without reading a frame before that video is given up (a "
                       "stalled stream, a file the decoder blocks on): its decoder process is killed and the next "
                       "input goes on. The same meaning in infer, verify, build --calib and serve.")
MAX_DECODE_HELP = ("Seconds one video may take to decode in all before it is given up (its decoder process is "
                   "killed, the next input goes on).")


def decode_timeout_option():
    return typer.Option(DECODE_TIMEOUT_S, "--decode-timeout", min=0.01, help=DECODE_TIMEOUT_HELP)


def max_decode_option(default: float | None, what: str):
    return typer.Option(default, "--max-decode-s", min=0.01, help=f"{MAX_DECODE_HELP} Default: {what}.")


def views_option(what: str = "TEMPORALxSPATIAL views", default: str = "the bundle's"):
    """--views TxS (stexport.runtime.video.with_views applies it), for every command that samples clips."""
    return typer.Option(None, "--views", help=f"{what}, e.g. 3x1 (Kinetics) or 1x3 (SSv2). Default: {default}.")


def rate_option(what: str = "Take every N-th frame", default: str = "the bundle's"):
    """--rate N (0: the frames spread over the whole video), beside views_option."""
    return typer.Option(None, "--rate", min=0, help=f"{what}; 0 spreads the frames over the whole video. "
                        f"Default: {default}.")


# = stexport.runtime.decode_worker's MAX_PIXELS, MAX_FRAMES, MEMORY_MB (tests/test_decoding.py checks)
MAX_PIXELS, MAX_FRAMES, DECODE_MEMORY_MB = 36_000_000, 1_000_000, 4096


def header_limit_options() -> dict:
    """--max-pixels, --max-frames, --decode-memory-mb: what a video's header may claim before a frame is decoded,
    and the decoder process's memory cap."""
    return {
        "max_pixels": typer.Option(MAX_PIXELS, "--max-pixels", min=1, help="Pixels per frame the stream's header "
                                   "may claim (36 megapixels: 8K fits); larger videos are refused before any frame "
                                   "is decoded (a decode bomb: a tiny file of huge frames)."),
        "max_frames": typer.Option(MAX_FRAMES, "--max-frames", min=1, help="Frames the stream's header may claim; "
                                   "longer videos are refused before decoding."),
        "decode_memory_mb": typer.Option(DECODE_MEMORY_MB, "--decode-memory-mb", min=64, help="Address space of "
                                         "each decoder process (MB, RLIMIT_AS): a video that needs more is that "
                                         "video's error."),
    }


OPTION_HELP = ("Backend option KEY=VALUE (repeatable), checked against the backend's options: e.g. compute=bf16, "
               "hint=throughput or static=false for openvino; opt_level=extended for onnxruntime; threads=N for "
               "any. `stexport bench --list-options` lists them all.")


# ----------------------------------------------------------------------------------------------------------
# Logging: stexport's own records on stderr ("stexport: …", INFO with -v); other libraries' records (the model
# hub's download retries, the ONNX optimizer's notes) only with -v, and then named.

from stexport.logs import QUIET_LIBRARIES, setup_logging  # noqa: E402,F401 - the CLI's entry point sets it up


# ----------------------------------------------------------------------------------------------------------
# Help text

def command_help(doc: str | None) -> str:
    """A docstring as typer's rich help shows it well: paragraphs (blank-line separated) joined into one line
    each so the terminal wraps them, rich markup brackets escaped. A paragraph starting with a line holding
    only \\b keeps its line breaks (click's convention)."""
    text = inspect.cleandoc(doc or "").replace("\\\n", "")
    out = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("\b"):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in para.splitlines()))
    return escape("\n\n".join(out))


def escape(text: str) -> str:
    """Keep '[tensorrt]'-style text literal under rich markup."""
    return re.sub(r"(?<!\\)\[([A-Za-z0-9_,\- ]+)\]", r"\\[\1]", text)


def Flag(default: bool, *decls: str, help: str) -> bool:  # noqa: N802 - reads like typer.Option
    """An on/off option, shown without a value placeholder."""
    return typer.Option(default, *decls, help=escape(help), metavar="")


def _no_placeholder(option):
    if option is not None:
        option.metavar = ""  # -h/--help is a flag: no <bool> in the help table
    return option


def fill_help(text: str) -> str:
    """`text` with {backends}, {auto} and {task_backends} filled from the backend registry."""
    from stexport.runtime import backends

    fields = {"{backends}": lambda: ", ".join(backends.names(auto=False)),
              "{auto}": lambda: ", else ".join(backends.registration(n).auto_note for n in backends.auto_order()),
              "{task_backends}": lambda: backends.task_backends(conditions=True)}
    for key, value in fields.items():
        if key in text:
            text = text.replace(key, value())
    return text


class Command(TyperCommand):
    def get_help_option(self, ctx):
        return _no_placeholder(super().get_help_option(ctx))

    def format_help(self, ctx, formatter):
        for param in self.params:
            if param.help and "{" in param.help:
                param.help = fill_help(param.help)
        return super().format_help(ctx, formatter)


def register(app: typer.Typer, name: str, fn, examples: str = "") -> None:
    app.command(name, cls=Command, help=command_help(fn.__doc__), epilog=examples or None)(fn)


# ----------------------------------------------------------------------------------------------------------
# Old spellings, kept for one release: (command, token) -> new token, and the verify --json FILE form.

LEGACY_FLAGS = {
    ("build", "-b"): "--backbone",
    ("inspect", "-b"): "--backbone",
    ("engine", "-b"): "--batch",
    ("bench", "-o"): "--option",
}
MEANINGS = "-b means --backend in every command"


def modernize(args: list[str], commands) -> tuple[list[str], list[str]]:
    """Rewrite old flag spellings in `args` (the words after `stexport`); returns (args, deprecation notes)."""
    args = list(args)
    cmd_at = next((i for i, a in enumerate(args) if a in commands), None)
    if cmd_at is None:
        return args, []
    cmd = args[cmd_at]
    notes = []
    i = cmd_at + 1
    while i < len(args):
        a = args[i]
        if a == "--":
            break
        new = LEGACY_FLAGS.get((cmd, a))
        if new:
            args[i] = new
            why = MEANINGS if a == "-b" else "-o means --out in every command"
            notes.append(f"`{cmd} {a}` is deprecated ({why}); use {new}")
        elif cmd == "verify" and a == "--json" and i + 1 < len(args):
            nxt = args[i + 1]
            if nxt == "-":
                del args[i + 1]
                notes.append("`verify --json -` is deprecated; --json alone prints the report as JSON")
            elif _looks_like_report_path(nxt):
                args[i] = "--report"
                notes.append(f"`verify --json FILE` is deprecated (--json is an on/off flag in every command); "
                             f"use --report {nxt}")
        i += 1
    return args, notes


def _looks_like_report_path(word: str) -> bool:
    from pathlib import Path

    if word.startswith("-"):
        return False
    p = Path(word)
    if p.is_dir() or p.name == "stexport.json":  # a bundle: the positional argument
        return False
    return p.suffix.lower() == ".json"


# Options whose value may be left out (click cannot parse that here): (command, flag) -> (value when left
# out, pattern a given value matches). `infer --ray` alone means a local cluster; `--ray auto`, `--ray HOST:PORT`.
OPTIONAL_VALUES = {("infer", "--ray"): ("local", re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9_.\-]+:\d+)$"))}


def optional_values(args: list[str], commands) -> list[str]:
    """`--ray` followed by no value (the end, another option, an input) becomes `--ray=local`."""
    cmd = next((a for a in args if a in commands), None)
    out = list(args)
    for i, a in enumerate(out):
        if a == "--":
            break
        spec = OPTIONAL_VALUES.get((cmd, a))
        if spec and (i + 1 == len(out) or not spec[1].match(out[i + 1])):
            out[i] = f"{a}={spec[0]}"
    return out


class Group(TyperGroup):
    """The stexport command group: rewrites old flag spellings (with a deprecation line) before parsing."""

    def get_help_option(self, ctx):
        return _no_placeholder(super().get_help_option(ctx))

    def parse_args(self, ctx, args):
        args, notes = modernize(args, self.commands)
        args = optional_values(args, self.commands)
        for note in notes:
            typer.echo(f"stexport: warning: {note}", err=True)
        return super().parse_args(ctx, args)
