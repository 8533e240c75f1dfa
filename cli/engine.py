"""`stexport engine`: build a TensorRT engine for a bundle on this GPU host and keep it in the bundle."""

from __future__ import annotations

from pathlib import Path

import typer
from stexport.cli.common import Flag, handle_errors, print_json, register as add_command

EXAMPLES = """
Examples:

  stexport engine ~/.cache/stexport/bundles/k400-ViT-B-16-fp16-8x224

  stexport engine BUNDLE --batch 8 --opt-level 5 --workspace-gb 8 --json

  stexport engine BUNDLE --force        # rebuild even if a matching engine is cached
"""


@handle_errors
def engine(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `stexport build`)."),
    batch: int = typer.Option(None, "--batch", help="Largest batch the engine takes. Two profiles: 1..V "
                              "tuned for V, the clips `infer` sends per video (its temporal x spatial views), "
                              "and V+1..BATCH tuned for BATCH. Default: the bundle's saved setting, else 32; "
                              "at most what keeps every tensor under 2^31 elements (443 for ViT-B/16 8x224)."),
    workspace_gb: float = typer.Option(None, "--workspace-gb", help="Scratch memory limit for the builder's "
                                       "tactics, GiB. Default: TensorRT's (all of the GPU's memory)."),
    opt_level: int = typer.Option(None, "--opt-level", min=0, max=5, help="Builder optimisation level 0-5: "
                                  "higher searches longer for faster kernels. Default: saved, else 3."),
    force: bool = Flag(False, "--force", "-f", help="Rebuild even if a matching engine is cached."),
    cuda: str = typer.Option(None, "--cuda", help="CUDA binding: cuda-python (default) or pycuda."),
    as_json: bool = Flag(False, "--json", help="Print the engine's record as JSON."),
):
    """Build a TensorRT engine from the bundle's typed ONNX (FP32, FP16 or INT8 Q/DQ: the precision is in the
    graph; networks are strongly typed) and store it in the bundle with a record of what it was built for.

    The record holds the TensorRT version, the GPU and its compute capability, the batch profile and the
    ONNX file's sha256: an engine only runs there. A matching cached engine is reused; `infer` and `verify`
    rebuild one that does not match on first use. Builds take minutes; a timing cache kept beside the engines
    makes later builds on the same GPU faster.

    A swappable FP32/FP16 bundle (`build --swappable`) gets a refittable engine: only its per-task tensors
    are refittable (REFIT_INDIVIDUAL), so task packs run on it by refitting them (`infer --task PACK`). An
    INT8 one gets a plain engine: TensorRT cannot refit Q/DQ scales, so its packs run on ONNX Runtime or
    OpenVINO.

    Needs TensorRT (pip install 'stexport[tensorrt]') and an NVIDIA GPU.
    """
    from stexport.trt_engines.engine import build_for_bundle

    from stexport.bundle.store import Bundle

    b = Bundle.load(bundle)
    rec, built = build_for_bundle(b, batch=batch, workspace_gb=workspace_gb, opt_level=opt_level, force=force,
                                  progress=True, cuda=cuda)
    if as_json:
        print_json({"built": built, **rec})
        return
    what = (f"built in {rec['build_seconds']:.0f} s" if built
            else "up to date (a matching engine is cached; --force rebuilds)")
    typer.echo(f"{b.path / rec['file']}: {what}")
    from stexport.trt_engines.engine import profile_opts

    typer.echo(f"  {rec['precision']}, batch {rec['profile']['min'][0]}-{rec['profile']['max'][0]} "
               f"(tuned for {profile_opts(rec)}), "
               f"{rec['bytes'] / 1e6:.1f} MB, {rec['gpu']} (compute {rec['capability']}), "
               f"TensorRT {rec['tensorrt']}")


def register(app: typer.Typer) -> None:
    add_command(app, "engine", engine, EXAMPLES)
