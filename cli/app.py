"""`stexport`: build, check and run ST-Adapter video models."""

from __future__ import annotations

import sys

import typer

from stexport.version import __version__
from stexport.cli import bench as bench_cmd
from stexport.cli import build as build_cmd
from stexport.cli import dump_clip as dump_clip_cmd
from stexport.cli import engine as engine_cmd
from stexport.cli import export_aoti as export_aoti_cmd
from stexport.cli import export_torchscript as export_torchscript_cmd
from stexport.cli import export_triton as export_triton_cmd
from stexport.cli import infer as infer_cmd
from stexport.cli import inspect as inspect_cmd
from stexport.cli import multitask as multitask_cmd
from stexport.cli import pack as pack_cmd
from stexport.cli import serve as serve_cmd
from stexport.cli import verify as verify_cmd
from stexport.cli.common import EXIT_INTERRUPTED, Flag, Group

app = typer.Typer(
    name="stexport",
    cls=Group,
    help="Ship ST-Adapter video classifiers: fold a CLIP ViT + ST-Adapter deltas into ONNX (FP32/FP16/INT8), "
    "TensorRT or TorchScript bundles, classify videos, and verify every artifact against the PyTorch reference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for module in (inspect_cmd, build_cmd, pack_cmd, multitask_cmd, verify_cmd, engine_cmd, infer_cmd, bench_cmd,
               export_torchscript_cmd, export_aoti_cmd, dump_clip_cmd, export_triton_cmd, serve_cmd):
    module.register(app)


def _version(value: bool):
    if value:
        typer.echo(f"stexport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.",
                                 metavar=""),
    verbose: bool = Flag(False, "--verbose", "-v", help="Say what each stage does and how long it takes "
                         "(weights, activation, graph, calibration, backend and its options), on stderr; "
                         "also show other libraries' warnings."),
):
    from stexport.cli.common import setup_logging

    setup_logging(verbose)


def usage_error(e) -> None:
    """One line on stderr for a command-line mistake (click prints usage, a hint and the error on three):
    `stexport: error: <click's message>; see `stexport build -h``. Exit code stays click's (2). A bare
    `stexport` (no command) shows the help, as click does."""
    message = " ".join(e.format_message().split()).rstrip(".")
    if not message:  # click's NoArgsIsHelpError: the help is the answer
        e.show()
        return
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        where = ctx.command_path
    elif hasattr(e, "ctx"):  # a usage error click raised without its context (e.g. an option missing its value)
        import sys

        commands = typer.main.get_command(app).commands
        where = " ".join(["stexport", *[a for a in sys.argv[1:] if a in commands][:1]])
    else:
        where = None
    hint = f"; see `{where} -h`" if where else ""
    if where and where != "stexport" and message.split(": ")[-1] in ("-v", "--verbose"):
        hint = f"; -v goes before the command: `stexport -v {where.split()[-1]} …`"
    typer.echo(f"stexport: error: {message}{hint}", err=True)


def main() -> None:
    """The console script: Ctrl-C anywhere ends with one line and exit code 130."""
    try:
        import click
    except ImportError:  # typer 0.2x vendors click and no longer depends on it
        from typer import _click as click

    from stexport import interrupt
    from stexport.fileutil import private_torch_cache

    interrupt.install()
    with private_torch_cache():
        try:
            code = app(standalone_mode=False, prog_name="stexport")
            if code != EXIT_INTERRUPTED:
                interrupt.check()  # an interruption a library swallowed still ends the command as one
        except (KeyboardInterrupt, click.exceptions.Abort):
            typer.echo("stexport: interrupted", err=True)
            code = EXIT_INTERRUPTED
        except (click.exceptions.ClickException, getattr(typer, "_click", click).exceptions.ClickException) as e:
            usage_error(e)
            code = e.exit_code
        finally:
            interrupt.finish()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
