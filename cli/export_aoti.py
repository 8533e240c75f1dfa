"""`stexport export-aoti`: add an AOTInductor package of the deploy model to a bundle, for C++ hosts."""

from __future__ import annotations

from pathlib import Path

import typer

from stexport.cli.common import Flag, handle_errors, print_json, register as add_command

EXAMPLES = """
Examples:

  stexport export-aoti ~/.cache/stexport/bundles/k400-ViT-B-16-fp32-8x224

  stexport export-aoti BUNDLE --force --json               # re-compile, print the record

  stexport export-aoti BUNDLE --device cuda --precision fp16   # on a GPU host, for CUDA hosts

  stexport-host BUNDLE/model.pt2 clip.npy                  # run it from C++ (examples/cpp)
"""


@handle_errors
def export_aoti(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `stexport build`)."),
    device: str = typer.Option("cpu", "--device", help="Device kind to compile for: cpu or cuda (the package "
                               "runs only there)."),
    precision: str = typer.Option(None, "--precision", "-p", help="fp32 or fp16. Default: fp16 for an fp16 "
                                  "bundle compiled for cuda, else fp32."),
    pretrained: str = typer.Option(None, "--pretrained", help="Backbone weights, if the file the bundle was "
                                   "built from has moved."),
    force: bool = Flag(False, "--force", "-f", help="Replace the bundle's existing model.pt2."),
    as_json: bool = Flag(False, "--json", help="Print the AOTInductor record as JSON."),
):
    """Add BUNDLE/model.pt2, an AOTInductor package of the deploy model, for libtorch (C++) hosts: the
    successor torch 2.14 names for TorchScript.

    The folded deploy model is exported with torch.export (uint8 (B, T, H, W, 3) RGB clips in, float32 logits
    (B, classes) out, batch 1 to 1024) and compiled ahead of time by Inductor into a shared library plus
    weights, for the device kind given (and this CPU's instruction set). The bundle's manifest, with the class
    names, is in the package's metadata under `stexport.json`, so a host reads labels, frames and size from
    the .pt2 alone (examples/cpp: torch::inductor::AOTIModelPackageLoader). The compiled model is checked
    against the deploy model before the file appears (in one rename). Compiling takes ~40 s for the demo
    model and minutes for ViT-B/16 on a laptop CPU.
    """
    from stexport.build.aoti import add_to_bundle
    from stexport.bundle.store import Bundle

    b = add_to_bundle(Bundle.load(bundle), force=force, precision=precision, device=device,
                      pretrained=pretrained)
    rec = b.manifest.aoti
    path = b.file("aoti")
    if as_json:
        print_json({"path": str(path), **rec.model_dump(mode="json")})
        return
    typer.echo(f"wrote {path}")
    typer.echo(f"  {rec.precision} on {rec.device}, uint8 (B, {b.frames}, {b.size}, {b.size}, 3) -> logits, "
               f"{path.stat().st_size / 1e6:.1f} MB, compiled in {rec.compile_seconds:.0f} s; compiled vs "
               f"deploy model max |Δ| {rec.check_max_abs:.1e}")
    typer.echo(f"next: stexport dump-clip VIDEO -m {b.path} -o clip.npy && stexport-host {path} clip.npy")


def register(app: typer.Typer) -> None:
    add_command(app, "export-aoti", export_aoti, EXAMPLES)
