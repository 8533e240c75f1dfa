"""`stexport pack`: one task's adapters and head as a small file that runs on a swappable bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from stexport.cli.common import Flag, check_adapter_file, handle_errors, print_json, rate_option, views_option
from stexport.cli.common import register as add_command

EXAMPLES = """
Examples:

  stexport build --adapter k400.pt --swappable --max-classes 400 --out bundles/base   # once per backbone

  stexport pack --adapter ssv2.pt --base bundles/base --out ssv2.stpack

  stexport pack --adapter task.pt --base bundles/base-int8 --calib val_list.txt    # INT8: adapter scales

  stexport infer clip.mp4 -m bundles/base --task ssv2.stpack

  stexport inspect --task ssv2.stpack --base bundles/base                          # what it fits
"""


@handle_errors
def pack(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="ST-Adapter checkpoint of the task "
                                 "(.pt/.pth/.safetensors)."),
    base: Path = typer.Option(..., "--base", help="The swappable bundle the pack runs on (`stexport build "
                              "--swappable`)."),
    out: Path = typer.Option(None, "--out", "-o", help="Pack file (default: <adapter>.<base>.stpack beside "
                             "the base)."),
    calib: Path = typer.Option(None, "--calib", help="INT8 bases: calibration videos for the adapter scales "
                               "(default: the base's calibration source)."),
    calib_clips: int = typer.Option(None, "--calib-clips", help="How many videos of --calib (default: the "
                                    "base's count)."),
    labels: Path = typer.Option(None, "--labels", help="Class names of the task, one per line."),
    pretrained: str = typer.Option(None, "--pretrained", help="The base's backbone weights, if the file it "
                                   "was built from has moved."),
    name: str = typer.Option(None, "--name", help="The task's name (default: the checkpoint's file stem)."),
    views: str = views_option("The task's default TEMPORALxSPATIAL views for infer/verify",
                              "as `build`, from the adapter's layout and classes (not the base's)"),
    rate: int = rate_option("The task's default frame step", "as `build`"),
    force: bool = Flag(False, "--force", "-f", help="Replace an existing pack at --out."),
    as_json: bool = Flag(False, "--json", help="Print the pack's record as JSON."),
):
    """Make a task pack: the per-task tensors (adapters, head; for INT8 also the adapters' INT8 weights, their
    scales and the adapter GEMMs' activation scales), labels and default sampling of one task, for a bundle
    built with --swappable. Every runtime that swaps tasks (ONNX Runtime per run call, OpenVINO per compiled
    model, TorchScript per call, TensorRT by refitting its engine; INT8 packs: ONNX Runtime and OpenVINO)
    then runs it on the base without re-export: `infer/verify/bench --task PACK`.

    The tensors come from the same fold, export (and calibration) `stexport build` runs; a checkpoint whose
    spec (adapter positions, widths, kernel) differs from the base's, or with more classes than the base's
    head has rows, is refused before any export.
    """
    check_adapter_file(adapter)
    from stexport.bundle.store import Bundle
    from stexport.errors import StexportError

    b = Bundle.load(base)
    if b.manifest.tasks is None:
        raise StexportError(f"{b.path}: not a swappable bundle; rebuild it with `stexport build --swappable`")
    if calib is not None and not calib.exists():
        raise StexportError(f"{calib}: no such clip list, directory or video (--calib)")
    if labels is not None and not labels.is_file():
        raise StexportError(f"{labels}: no such labels file (--labels: one class name per line)")
    from stexport.build.packing import build_pack

    from stexport.runtime.video import sampling_overrides

    sampling = sampling_overrides(views, rate)
    p = build_pack(adapter, b, out=out, sampling=sampling, calib=str(calib) if calib else None, calib_clips=calib_clips,
                   labels=str(labels) if labels else None, pretrained=pretrained, name=name, force=force,
                   progress=True)
    r = p.record
    if as_json:
        print_json({"path": str(p.path), "sha256": p.key, "bytes": p.path.stat().st_size,
                    **r.model_dump(mode="json", exclude_none=True)})
        return
    typer.echo(f"packed {p.path}  ({p.path.stat().st_size / 1e6:.2f} MB, {len(r.tensors)} tensors)")
    typer.echo(f"  task {r.name}: {r.adapter.spec.layout} adapters, {r.classes} classes, for base "
               f"{b.path.name} ({r.base.precision}, {r.base.backbone})")
    typer.echo(f"next: stexport infer VIDEO -m {b.path} --task {p.path}")


def register(app: typer.Typer) -> None:
    add_command(app, "pack", pack, EXAMPLES)
