"""`stexport inspect`: what an ST-Adapter checkpoint holds, and whether it fits a backbone."""

from __future__ import annotations

from pathlib import Path

import typer

from stexport.cli.common import Flag, check_adapter_file, handle_errors, print_json, register as add_command

EXAMPLES = """
Examples:

  stexport inspect --adapter k400.pt

  stexport inspect --adapter ssv2.pt --backbone ViT-B-16 --json

  stexport inspect --task ssv2.stpack --base bundles/base      # what a task pack fits

  stexport inspect --adapter ssv2.pt --base bundles/base       # can `stexport pack` make it a pack of that base?
"""


@handle_errors
def inspect(
    adapter: Path = typer.Option(None, "--adapter", "-a", readable=False,  # the loader names the fix
                                 help="ST-Adapter checkpoint (.pt/.pth/.safetensors)."),
    backbone: str = typer.Option(None, "--backbone", help="open_clip ViT name to check the fit against "
                                 "(default: the --base bundle's backbone, else ViT-B-16)."),
    task: Path = typer.Option(None, "--task", help="A task pack (`stexport pack`): the base it was made for."),
    base: Path = typer.Option(None, "--base", help="With --task or --adapter: a swappable bundle to check the "
                              "fit against."),
    as_json: bool = Flag(False, "--json", help="Print JSON instead of a table."),
):
    """Print the adapter spec inferred from the checkpoint's tensors, delta vs backbone parameters, whether it
    fits --backbone, the accepted backbones whose width and depth it fits, and the activation and why. With
    --task: what the pack holds and the base bundle it fits (and, with --base, whether it fits that one). With
    --adapter and --base: also whether `stexport pack` can make a pack of it for that swappable bundle (same
    adapter positions, widths and kernel; no more classes than the base's head has rows). Exit 1 when it does
    not fit."""
    from stexport.errors import StexportError

    if task is not None:
        return _inspect_task(task, base, as_json)
    if adapter is None:
        raise StexportError("pass --adapter CHECKPOINT (or --task PACK)")
    from stexport.build.names import check_backbone, fitting_backbones

    base_bundle = None
    if base is not None:
        from stexport.bundle.store import Bundle

        base_bundle = Bundle.load(base)
    backbone = backbone or (base_bundle.manifest.model.backbone.name if base_bundle else "ViT-B-16")
    check_backbone(backbone)
    check_adapter_file(adapter)
    from stexport.extras import require

    require("stexport inspect (reading checkpoints)", "torch", "safetensors")
    from stexport.build.backbone import (config_activation_reason, model_config, official_layout_warning,
                                   register_configs)
    from stexport.build.deltas import check_fits, load_deltas

    deltas = load_deltas(adapter)
    spec = deltas.spec
    register_configs()
    cfg = model_config(backbone)
    bb_params, fit_error, vit = None, None, None
    try:
        from stexport.build.backbone import random_backbone

        bb = random_backbone(backbone, fp16_round=False)  # shapes only; nothing is downloaded
        vit, bb_params = bb.config, bb.num_params()
        check_fits(spec, vit, backbone)
    except StexportError as e:
        fit_error = str(e)
    report = {
        "adapter": str(adapter),
        "sha256": deltas.sha256,
        "spec": spec.to_dict(),
        "positions": ("pre_attn+pre_mlp" if spec.pre_attn and spec.pre_mlp
                      else "pre_attn" if spec.pre_attn else "pre_mlp"),
        "delta_params": spec.num_params(),
        "backbone": backbone,
        "backbone_params": bb_params,
        "delta_fraction": spec.num_params() / bb_params if bb_params else None,
        "fits": fit_error is None,
        "fit_error": fit_error,
        "fits_backbones": fitting_backbones(spec.dim, max(spec.pre_attn + spec.pre_mlp) + 1),
        "quick_gelu": bool(cfg.get("quick_gelu", False)),
        "activation": "quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
        "official_layout": deltas.official_layout,
    }
    report["activation_reason"] = (config_activation_reason(backbone, report["quick_gelu"]) + "; inspect reads no "
                                   "backbone weights: build also detects OpenAI files (JIT archive, OpenAI "
                                   "state-dict entries, the 'openai' tag) and then uses QuickGELU")
    base_error = None
    if base_bundle is not None:
        from stexport.build.packing import spec_mismatch

        m = base_bundle.manifest
        base_error = ("not a swappable bundle (rebuild it with `stexport build --swappable`)" if m.tasks is None
                      else spec_mismatch(spec, m.spec, m.tasks.head_rows))
        report.update(base=str(base), fits_base=base_error is None, base_error=base_error)
    report["warning"] = (official_layout_warning(backbone, report["activation"], report["activation_reason"])
                         if deltas.official_layout and fit_error is None else None)
    if as_json:
        print_json(report)
    else:
        k = "x".join(map(str, spec.kernel))
        typer.echo(f"adapter        {adapter}")
        typer.echo(f"layout         {spec.layout}  ({report['positions']}; blocks "
                   f"{list(spec.pre_attn) or '-'} / {list(spec.pre_mlp) or '-'})")
        typer.echo(f"bottleneck     {spec.dim} -> {spec.width} -> {spec.dim}, depth-wise kernel {k}")
        typer.echo(f"classes        {spec.num_classes}")
        typer.echo(f"delta params   {spec.num_params() / 1e6:.2f} M")
        if bb_params:
            typer.echo(f"backbone       {backbone}: {bb_params / 1e6:.2f} M frozen params "
                       f"(deltas are {100 * report['delta_fraction']:.1f}%)")
        typer.echo(f"activation     {report['activation']} ({report['activation_reason']})")
        typer.echo(f"fits backbone  {'yes' if fit_error is None else 'NO: ' + fit_error}")
        fits = report["fits_backbones"]
        typer.echo(f"fits           {', '.join(fits[:6]) + (' …' if len(fits) > 6 else '') if fits else 'no known backbone'}"
                   f"  (width {spec.dim}, {max(spec.pre_attn + spec.pre_mlp) + 1}+ blocks)")
        if base_bundle is not None:
            typer.echo(f"fits {base}  {'yes (`stexport pack` can make its pack)' if base_error is None else 'NO: ' + base_error}")
        if report["warning"]:
            import logging

            logging.getLogger("stexport").warning(report["warning"])
    if fit_error or base_error:
        raise typer.Exit(1)


def _inspect_task(task: Path, base: Path | None, as_json: bool) -> None:
    from stexport.bundle.taskpack import TaskPack

    p = TaskPack.load(task)
    r = p.record
    why = None
    if base is not None:
        from stexport.bundle.store import Bundle

        why = p.mismatch(Bundle.load(base))
    spec, b = r.adapter.spec, r.base
    report = {"task": str(task), "sha256": p.key, "bytes": task.stat().st_size, "name": r.name,
              "spec": spec.to_dict(), "classes": r.classes, "labels": r.labels,
              "sampling": r.sampling.model_dump(mode="json"), "tensors": len(r.tensors),
              "tensor_bytes": p.nbytes(), "fits_base": b.model_dump(mode="json", exclude_none=True),
              "base": str(base) if base else None, "fits": (why is None) if base else None, "fit_error": why}
    if as_json:
        print_json(report)
    else:
        typer.echo(f"task pack      {task}  ({report['bytes'] / 1e6:.2f} MB; {r.name})")
        typer.echo(f"adapter        {spec.layout}, kernel {'x'.join(map(str, spec.kernel))}, {r.classes} classes "
                   f"({', '.join(r.labels[:4])}{' …' if len(r.labels) > 4 else ''})")
        sm = r.sampling
        typer.echo(f"sampling       rate {sm.rate}, {sm.temporal_views}x{sm.spatial_views} views (infer/verify "
                   "default with this pack; --views/--rate override)")
        typer.echo(f"tensors        {len(r.tensors)} per-task tensors, {p.nbytes() / 1e6:.2f} MB")
        typer.echo(f"fits bases     {b.backbone} ({b.weights_sha256[:12] + '…' if b.weights_sha256 else 'seed ' + str(b.weights_seed)}), "
                   f"{b.precision}, {b.frames}x{b.size}px {b.input_dtype}, adapters {b.spec.layout} "
                   f"{b.spec.positions}, head rows {b.head_rows}, graph {b.structure[:12]}… (made on {b.bundle})")
        if base is not None:
            typer.echo(f"fits {base}  {'yes' if why is None else 'NO: ' + why}")
    if why:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    add_command(app, "inspect", inspect, EXAMPLES)
