"""`stexport multitask`: several tasks' adapters and heads in one bundle whose graph mixes tasks in a batch."""

from __future__ import annotations

from pathlib import Path

import typer
from stexport.cli.common import Flag, check_adapter_file, handle_errors, print_json, rate_option, views_option
from stexport.cli.common import register as add_command

from stexport.bundle.precision import precision_help

EXAMPLES = """
Examples:

  stexport multitask -a k400.pt -a ssv2.pt -a diving.pt --pretrained openai --out bundles/three

  stexport multitask --base bundles/base --pack ssv2.stpack --pack diving.stpack --out bundles/three

  stexport multitask -a k400.pt -a ssv2.pt --precision int8 --calib clips_of_both.txt --out bundles/two-int8

  stexport infer clip.mp4 -m bundles/three --task ssv2
"""


@handle_errors
def multitask(
    adapter: list[Path] = typer.Option(None, "--adapter", "-a", help="A task's ST-Adapter checkpoint; repeat "
                                       "per task (the first is the bundle's own task)."),
    name: list[str] = typer.Option(None, "--name", help="Task names, one per --adapter in order (default: the "
                                   "checkpoints' file stems)."),
    labels: list[Path] = typer.Option(None, "--labels", help="Class names files, one per --adapter in order."),
    base: Path = typer.Option(None, "--base", help="Instead of --adapter: a swappable bundle (its own task "
                              "first) ..."),
    pack: list[Path] = typer.Option(None, "--pack", help="... and task packs made for it (`stexport pack`); "
                                    "their names, labels and sampling come along."),
    backbone: str = typer.Option(None, "--backbone", help="With --adapter: the open_clip ViT of every task "
                                 "(default ViT-B-16)."),
    pretrained: str = typer.Option(None, "--pretrained", help="Backbone weights: an open_clip tag, a file or "
                                   "'none' (default: openai; with --base, the base's)."),
    frames: int = typer.Option(None, "--frames", "-t", help="With --adapter: frames per clip (T; default 8). "
                               "With --base, the base's."),
    views: str = views_option("With --adapter: every task's default TEMPORALxSPATIAL views for infer/verify",
                              "each task's, from its adapter's layout, as `build`"),
    rate: int = rate_option("With --adapter: every task's default frame step", "each task's, as `build`"),
    precision: str = typer.Option(None, "--precision", "-p", help=precision_help() + " (default: fp32; with "
                                  "--base, the base's precision)."),
    calib: Path = typer.Option(None, "--calib", help="INT8 calibration videos of every task (a '<video> "
                               "<label>' list or a directory): clip i runs as task i mod the task count."),
    calib_clips: int = typer.Option(32, "--calib-clips", help="How many videos of --calib to use (a seeded "
                                    "choice)."),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax, percentile (99.999) or "
                                     "entropy."),
    out: Path = typer.Option(None, "--out", "-o", help="Bundle directory (default: "
                             "~/.cache/stexport/bundles/NAME)."),
    force: bool = Flag(False, "--force", "-f", help="Replace an existing bundle at --out."),
    as_json: bool = Flag(False, "--json", help="Print the bundle's path and its task table (each task's index, "
                         "name, classes, labels and sampling) as JSON; the whole manifest is BUNDLE/stexport.json."),
):
    """Build a multi-task bundle (FP32, FP16 or INT8): one graph with every task's adapters and head stacked and a second
    input, the task index of each clip (int64 [B]). The backbone runs once per batch; each clip gathers its
    task's adapters and head rows. Every runtime runs it as a plain model; `infer --task NAME` picks a task,
    and `Classifier.classify_batch` with (source, task) pairs mixes tasks in one backend call. Each task's
    logits equal those of its own full export. INT8 calibrates the shared backbone on clips of every task
    (round-robin task indices); the adapters stay float."""
    from stexport.errors import StexportError

    if pack and not base:
        raise StexportError("--pack needs the swappable --base the packs were made for (or build from "
                            "checkpoints: --adapter, repeated)")
    if bool(adapter) == bool(base):
        raise StexportError("pass the tasks' checkpoints with --adapter (repeated), or a swappable --base with "
                            "its --pack files" + (", not both" if adapter else ""))
    if base:
        given = [flag for flag, v in (("--name", name), ("--labels", labels), ("--backbone", backbone),
                                      ("--frames", frames), ("--views", views), ("--rate", rate))
                 if v not in (None, [], ())]
        if given:
            raise StexportError(f"{', '.join(given)}: with --base the tasks' names, labels, backbone, frames and "
                                "sampling are the base's and its packs'; drop them, or build from checkpoints with "
                                "--adapter")
    from stexport.extras import require

    require("stexport multitask", "torch", "torchvision", "open_clip", "onnx", "onnxscript", "safetensors")
    precision_options = dict(precision=precision, calib=calib, calib_clips=calib_clips, calib_method=calib_method,
                             progress=True)
    if base:
        from stexport.build.multitask import multitask_from_packs
        from stexport.bundle.store import Bundle

        base_bundle = Bundle.load(base)  # loaded once: its precision is the default, then the build reads it
        if precision is None:  # an FP16 base gave an FP32 bundle when the default was fp32 (new-user finding)
            precision_options["precision"] = base_bundle.manifest.precision
        bundle = multitask_from_packs(base_bundle, list(pack or []), out=out, pretrained=pretrained, force=force,
                                      **precision_options)
    else:
        for a in adapter:
            check_adapter_file(a)
        for f in labels or []:
            if not f.is_file():
                raise StexportError(f"{f}: no such labels file (--labels: one class name per line)")
        if labels and len(labels) != len(adapter):
            raise StexportError(f"{len(labels)} --labels for {len(adapter)} --adapter: give one per adapter")
        from stexport.build.multitask import build_multitask

        from stexport.runtime.video import sampling_overrides

        sampling = sampling_overrides(views, rate) or None
        bundle = build_multitask(list(adapter), out=out, backbone=backbone or "ViT-B-16",
                                 pretrained=pretrained or "openai", names=list(name) if name else None,
                                 labels=list(labels) if labels else None, frames=8 if frames is None else frames,
                                 samplings=[sampling] * len(adapter), force=force,
                                 **{**precision_options, "precision": precision or "fp32"})
    m = bundle.manifest
    if as_json:
        print_json({"path": str(bundle.path), **m.multitask.model_dump(mode="json", exclude_none=True)})
        return
    mt = m.multitask
    typer.echo(f"built {bundle.path}  ({len(mt.tasks)} task{'s' if len(mt.tasks) != 1 else ''}, head of {mt.head_rows} rows, {m.precision})")
    if m.calibration is not None:
        c = m.calibration
        typer.echo(f"  calibration: {c.method} on {c.clips} clips, task indices round-robin; {c.quantized_layers} "
                   "backbone layers quantized, adapters float")
    if m.fp16_check is not None:
        c = m.fp16_check
        typer.echo(f"  fp16 check: max |Δlogit| vs fp32 {c.max_abs_logit_diff:.3g} on {c.clips} {c.source}"
                   + (f", {len(c.fp32_nodes)} nodes kept in FP32" if c.fp32_nodes else ""))
    for t in mt.tasks:
        typer.echo(f"  task {t.index} {t.name}: {t.classes} classes")
    import shlex

    typer.echo(f"next: stexport infer VIDEO -m {shlex.quote(str(bundle.path))} --task {shlex.quote(mt.tasks[-1].name)}")


def register(app: typer.Typer) -> None:
    add_command(app, "multitask", multitask, EXAMPLES)
