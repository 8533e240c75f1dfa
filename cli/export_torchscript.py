"""`stexport export-torchscript`: add a TorchScript module of the deploy model to a bundle, for C++ hosts."""

from __future__ import annotations

from pathlib import Path

import typer

from stexport.cli.common import Flag, handle_errors, print_json, register as add_command

EXAMPLES = """
Examples:

  stexport export-torchscript ~/.cache/stexport/bundles/k400-ViT-B-16-fp32-8x224

  stexport export-torchscript BUNDLE --force --json        # re-export, print the record

  stexport export-torchscript BUNDLE --precision fp16      # for CUDA hosts

  stexport infer clip.mp4 -m BUNDLE --backend torchscript  # run it from Python

  stexport-host BUNDLE/model.ts clip.npy                   # or from C++ (examples/cpp)
"""


@handle_errors
def export_torchscript(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `stexport build`)."),
    precision: str = typer.Option(None, "--precision", "-p", help="fp32 or fp16 (CUDA hosts). Default: fp16 "
                                  "for an fp16 bundle, else fp32."),
    pretrained: str = typer.Option(None, "--pretrained", help="Backbone weights, if the file the bundle was "
                                   "built from has moved."),
    force: bool = Flag(False, "--force", "-f", help="Replace the bundle's existing model.ts."),
    as_json: bool = Flag(False, "--json", help="Print the TorchScript record as JSON."),
):
    """Add BUNDLE/model.ts, a frozen TorchScript module of the deploy model, for libtorch (C++) hosts.

    The folded deploy model is traced on uint8 (B, T, H, W, 3) RGB clips and frozen (weights as constants):
    float32 logits (B, classes) out, any batch size. The bundle's manifest, with the
    class names, is embedded as the extra file `stexport.json`, so a libtorch host reads labels, frames, size
    and sampling from the .ts file alone (see examples/cpp). The model is rebuilt from the bundle's deltas and
    backbone, and the traced module is checked against it before the file appears (in one rename).

    A swappable bundle's module takes task packs (`infer -b torchscript --task PACK`): its per-task tensors
    stay preserved attributes of the frozen module (forward: the bundle's own task, what a C++ host calls)
    and `forward_task(x, tensors)` runs any pack's, per call.
    """
    from stexport.bundle.store import Bundle
    from stexport.extras import require

    require("stexport export-torchscript", "torch", "torchvision", "open_clip", "safetensors")
    from stexport.build.torchscript import add_to_bundle

    b = add_to_bundle(Bundle.load(bundle), force=force, precision=precision, pretrained=pretrained)
    rec = b.manifest.torchscript
    path = b.file("torchscript")
    if as_json:
        print_json({"path": str(path), **rec.model_dump(mode="json")})
        return
    mt = b.manifest.multitask
    kind = f"{rec.precision}" + (" (libtorch has no INT8: the bundle's float model)" if b.precision == "int8" else "")
    inputs = f"uint8 (B, {b.frames}, {b.size}, {b.size}, 3)" + (f" + int64 {mt.input} (B,)" if mt else "")
    typer.echo(f"wrote {path}")
    typer.echo(f"  {kind}, {inputs} -> logits, {path.stat().st_size / 1e6:.1f} MB; traced module vs deploy model "
               f"max |Δ| {rec.trace_check_max_abs:.1e}")
    if mt is not None:  # forward(x, task): the C++ example host calls forward(x)
        typer.echo(f"next: stexport infer VIDEO -m {b.path} --backend torchscript --task NAME (tasks: "
                   f"{', '.join(t.name for t in mt.tasks)}); a C++ host calls forward(clips, task index per clip) "
                   "(examples/cpp's stexport-host runs one-task modules only)")
        return
    typer.echo(f"next: stexport infer VIDEO -m {b.path} --backend torchscript   |   "
               f"stexport dump-clip VIDEO -m {b.path} -o clip.npy && stexport-host {path} clip.npy")


def register(app: typer.Typer) -> None:
    add_command(app, "export-torchscript", export_torchscript, EXAMPLES)
