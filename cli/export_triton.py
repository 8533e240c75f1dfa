"""`stexport export-triton`: a Triton Inference Server model repository from a bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from stexport.cli.common import Flag, handle_errors, print_json, register as add_command

EXAMPLES = """
Examples:

  stexport export-triton BUNDLE --repo triton_repo                  # ONNX Runtime on CPU

  stexport export-triton BUNDLE --repo triton_repo -b openvino --threads 4

  stexport export-triton BUNDLE --repo triton_repo -b onnxruntime --device gpu --instances 2

  stexport engine BUNDLE --batch 32 && stexport export-triton BUNDLE --repo triton_repo -b tensorrt

  tritonserver --model-repository $(pwd)/triton_repo
"""


@handle_errors
def export_triton(
    bundle: Path = typer.Argument(..., help="Bundle directory (from `stexport build`)."),
    repo: Path = typer.Option(..., "--repo", help="Model repository folder to write (one model in it)."),
    backend: str = typer.Option("onnxruntime", "--backend", "-b", help="Triton backend: onnxruntime "
                                "(platform onnxruntime_onnx), openvino (the ONNX file on Intel CPUs) or tensorrt "
                                "(platform tensorrt_plan: the bundle's engine, from `stexport engine`)."),
    name: str = typer.Option(None, "--name", help="Model name in the repository. Default: the bundle's name."),
    max_batch: int = typer.Option(None, "--max-batch", min=1, help="max_batch_size (views of all requests "
                                  "batched together). Default: the engine profile's maximum for tensorrt, else 32."),
    instances: int = typer.Option(1, "--instances", min=1, help="Model instances (instance_group count)."),
    device: str = typer.Option(None, "--device", help="cpu or gpu (instance_group kind). Default: gpu for "
                               "tensorrt, else cpu."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads per instance (onnxruntime: "
                                "intra_op_thread_count; openvino: INFERENCE_NUM_THREADS). Default: the "
                                "backend's."),
    queue_delay_us: int = typer.Option(500, "--queue-delay-us", min=0, help="How long Triton's dynamic batcher "
                                       "waits to fill a batch (microseconds)."),
    engine: str = typer.Option(None, "--engine", help="tensorrt: the key of the engine to export when the "
                               "bundle holds several (`stexport engine` lists them)."),
    force: bool = Flag(False, "--force", "-f", help="Replace an existing repository written by export-triton."),
    as_json: bool = Flag(False, "--json", help="Print what was written as JSON."),
):
    """Write a Triton Inference Server model repository for BUNDLE: the model (model.onnx with its external
    data, or model.plan), config.pbtxt, labels.txt and a README on how clients decode and sample.

    The config is built with Triton's own ModelConfig schema (tritonclient, `pip install 'stexport[triton]'`):
    input and output names, types and dims from the bundle's manifest (batch axis implicit), max_batch_size,
    dynamic batching preferring batches of the bundle's views (one video), instance_group, the backend's thread
    parameters and the output's label file. Triton runs the model only: clients decode videos themselves,
    exactly as `stexport dump-clip` does (the repository's README spells out the sampling). The repository
    appears in one rename; an existing one is only replaced with --force.
    """
    from stexport.bundle.store import Bundle
    from stexport.build.triton import TritonOptions, export_repository

    b = Bundle.load(bundle)
    opts = TritonOptions(backend=backend, name=name, max_batch=max_batch, instances=instances, threads=threads,
                         device=device, queue_delay_us=queue_delay_us, engine=engine)
    out = export_repository(b, repo, opts, force=force)
    if as_json:
        print_json(out)
        return
    typer.echo(f"wrote {repo}: model {out['model']} ({out['platform'] or out['backend']}, max_batch_size "
               f"{out['max_batch_size']})")
    for f in out["files"]:
        typer.echo(f"  {f}")
    typer.echo(f"next: tritonserver --model-repository {repo.resolve()}   (clients decode videos as "
               f"`stexport dump-clip VIDEO -m {b.path}` does; see {repo / 'README.md'})")


def register(app: typer.Typer) -> None:
    add_command(app, "export-triton", export_triton, EXAMPLES)
