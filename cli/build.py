"""`stexport build`: fold an ST-Adapter checkpoint onto its CLIP backbone and export a bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from stexport.bundle.precision import INPUT_FORMATS, choices_help, precision_help
from stexport.cli.common import Flag, handle_errors, print_json, rate_option, views_option
from stexport.cli.common import register as add_command
from stexport.cli.common import decode_timeout_option, max_decode_option

EXAMPLES = """
Examples:

  stexport build --adapter k400_vitb16_8f.pt --precision fp32

  stexport build --adapter ssv2.pt --precision fp16 --out bundles/ssv2-fp16

  stexport build --adapter k400.pt --precision int8 --calib val_list.txt --calib-clips 64 \
      --calib-method entropy

  stexport build --adapter demo.pt --backbone stexport-demo-vit --pretrained demo_vit.pt --force

  stexport build --adapter ssv2.pt --views 1x3 --rate 0         # sampling infer/verify use by default

  stexport build --adapter k400.pt --precision fp16 --engine    # + a TensorRT engine (now on a GPU host)

  stexport build --adapter k400.pt --precision int8 --calib val_list.txt --engine   # INT8 + FP16 float parts

  stexport build --adapter k400.pt --precision int8 --calib val_list.txt --min-agreement 0.98
      # the most sensitive GEMMs back to float until top-1 agreement with FP32 is >= 98%

  stexport build --adapter k400.pt --swappable --max-classes 400   # a base for task packs (stexport pack)

  stexport build --adapter k400.pt --torchscript                # + model.ts for C++ hosts (examples/cpp)

  stexport build --adapter k400.pt --aoti                       # + model.pt2 (AOTInductor) for C++ hosts
"""


@handle_errors
def build(
    adapter: Path = typer.Option(..., "--adapter", "-a", readable=False,  # the loader names the fix
                                 help="ST-Adapter checkpoint (.pt/.pth/.safetensors)."),
    backbone: str = typer.Option("ViT-B-16", "--backbone",
                                 help="open_clip ViT the adapters were trained on (`stexport inspect` names the "
                                 "ones an adapter fits)."),
    pretrained: str = typer.Option("openai", "--pretrained", help="Backbone weights: an open_clip tag (from "
                                   "the local model-hub cache, else downloaded), a file, or 'none' (random, for "
                                   "smoke tests)."),
    precision: str = typer.Option("fp32", "--precision", "-p", help=precision_help() + "."),
    frames: int = typer.Option(8, "--frames", "-t", help="Frames per clip (T), fixed in the graph."),
    size: int = typer.Option(None, "--size", help="Input resolution; must be the backbone's (default: it)."),
    calib: Path = typer.Option(None, "--calib", help="INT8 calibration videos: a '<video> <label>' list or a "
                               "directory."),
    calib_clips: int = typer.Option(32, "--calib-clips", help="How many videos of --calib to use (a seeded "
                                    "choice)."),
    calib_method: str = typer.Option("minmax", "--calib-method",
                                     help="minmax, percentile (99.999) or entropy."),
    decode_timeout: float = decode_timeout_option(),
    max_decode_s: float = max_decode_option(None, "no limit"),
    views: str = views_option("Default TEMPORALxSPATIAL views for infer/verify", "from the adapter's layout"),
    rate: int = rate_option("Default frame step for infer/verify", "from the adapter's layout (16, or 0 for SSv2)"),
    labels: Path = typer.Option(None, "--labels", help="Class names, one per line (default: Kinetics-400 for "
                                "400 classes, SSv2 for 174, else class_i)."),
    out: Path = typer.Option(None, "--out", "-o",
                             help="Bundle directory (default: ~/.cache/stexport/bundles/NAME)."),
    force: bool = Flag(False, "--force", "-f", help="Replace an existing bundle at --out."),
    input_format: str = typer.Option("uint8", "--input", help=choices_help(f"{f.name} ({f.help})" for f in
                                                                         INPUT_FORMATS.values()) + "."),
    int8_attention: bool = Flag(False, "--int8-attention", help="INT8 also for the attention scores "
                                        "(q·kᵀ inputs; softmax stays float): a few % faster on CPU."),
    int8_float: str = typer.Option(None, "--int8-float", help="Float type of an INT8 graph's other layers: "
                                   "fp16 (what TensorRT then runs them in; LayerNorm/Softmax statistics stay "
                                   "FP32) or fp32. Default: fp16 with --engine, else fp32."),
    int8_migrate: str = typer.Option("auto", "--int8-migrate", help="Outlier migration folded into the INT8 "
                                     "graph (SmoothQuant-style per-channel scales into the GEMM weights): auto "
                                     "(chosen on the calibration clips), off, or an alpha in [0, 1]."),
    min_agreement: float = typer.Option(None, "--min-agreement", help="INT8 gate: top-1 agreement with the "
                                        "FP32 graph (0-1) on the gate clips; the most sensitive GEMMs return to "
                                        "float until it holds."),
    max_drop: float = typer.Option(None, "--max-drop", help="INT8 gate: top-1 accuracy drop against the FP32 "
                                   "graph in points, on labelled gate clips (a '<video> <label>' list)."),
    min_top5_agreement: float = typer.Option(None, "--min-top5-agreement", help="INT8 gate: the same top-5 set "
                                             "as the FP32 graph (0-1) on the gate clips."),
    max_float_layers: int = typer.Option(None, "--max-float-layers", help="With a gate: most GEMMs returned to "
                                         "float before the build fails (default: a quarter of them)."),
    gate_clips: Path = typer.Option(None, "--gate-clips", help="With a gate: the clips it is measured on "
                                    "(default: the calibration clips)."),
    fp16_overflow: str = typer.Option("fp32", "--fp16-overflow", help="FP16 builds whose activations leave "
                                      "FP16's range: fp32 (keep those layers in FP32 inside the FP16 graph, "
                                      "named in the manifest) or refuse (fail the build)."),
    engine: bool = Flag(False, "--engine", help="Also build a TensorRT engine: now on a GPU host "
                                "with stexport[tensorrt], else on first use on one (see `stexport engine`)."),
    swappable: bool = Flag(False, "--swappable", help="Keep the per-task tensors (adapters, head, INT8 adapter "
                           "scales) separate and overridable, so task packs (`stexport pack`) run on this "
                           "bundle without re-export."),
    max_classes: int = typer.Option(None, "--max-classes", help="With --swappable: head rows, the most "
                                    "classes a task pack may have (default: the adapter's)."),
    torchscript: bool = Flag(False, "--torchscript", help="Also write model.ts, a frozen TorchScript "
                                     "module for libtorch hosts (see `stexport export-torchscript`)."),
    aoti: bool = Flag(False, "--aoti", help="Also write model.pt2, an AOTInductor package (CPU) for "
                      "libtorch hosts (see `stexport export-aoti`)."),
    as_json: bool = Flag(False, "--json", help="Print the manifest as JSON."),
):
    """Build a bundle: load the CLIP backbone and the adapter deltas, fold them into a standard-operator
    graph (normalisation folded into the patch embedding, attention as MatMul/Softmax, adapters as GEMMs and a
    temporal conv), export ONNX (opset 18, dynamic batch) in the chosen precision, and write it with the
    deltas, class names and a stexport.json manifest. The bundle appears in one rename; nothing is
    overwritten without --force.

    INT8 quantizes the transformer's linear layers (symmetric, weights per output channel, activations per
    tensor) with ranges calibrated on real videos decoded exactly as `stexport infer` decodes them; results
    are cached by model and clip set.
    """
    from stexport.build.options import BuildOptions

    from stexport.runtime.video import sampling_overrides

    sampling = sampling_overrides(views, rate)
    options = BuildOptions(adapter=adapter, backbone=backbone, pretrained=pretrained, precision=precision,
                           frames=frames, size=size, out=out, force=force, calib=calib, labels=labels,
                           calib_clips=calib_clips, calib_method=calib_method, input_format=input_format,
                           int8_attention=int8_attention, int8_float=int8_float, int8_migrate=int8_migrate,
                           min_agreement=min_agreement, max_drop=max_drop, max_float_layers=max_float_layers,
                           min_top5_agreement=min_top5_agreement,
                           gate_clips=gate_clips,
                           fp16_overflow=fp16_overflow, for_tensorrt=engine,
                           sampling=sampling or None, swappable=swappable, max_classes=max_classes,
                           decode_timeout=decode_timeout, max_decode_s=max_decode_s, progress=True)
    from stexport.extras import require

    require("stexport build", "torch", "torchvision", "open_clip", "onnx", "onnxscript", "safetensors")
    from stexport.build.pipeline import build_bundle  # torch and open_clip load here, after every cheap check

    b = build_bundle(options=options)
    if torchscript:
        from stexport.build.torchscript import add_to_bundle

        add_to_bundle(b)
    if aoti:
        from stexport.build.aoti import add_to_bundle as add_aoti

        add_aoti(b)
    engine_note = None
    if engine:
        from stexport.trt_engines.engine import build_or_defer

        engine_note = build_or_defer(b, progress=True)
    m = b.manifest
    if as_json:
        note = {"engine_note": engine_note} if engine_note else {}
        print_json({"path": str(b.path), **m.model_dump(mode="json", exclude_none=True), **note})
        return
    size_mb = sum(r.bytes for r in m.files.values()) / 1e6
    typer.echo(f"built {b.path}")
    spec, bb = m.spec, m.model.backbone
    typer.echo(f"  {bb.name} + {spec.layout} adapters, {m.precision}, {m.frames}x{m.size}px, "
               f"{spec.num_classes} classes ({m.output.labels_source})")
    typer.echo(f"  activation: {bb.activation} ({bb.activation_reason or 'model config'})")
    if m.fp16_check is not None:
        c = m.fp16_check
        typer.echo(f"  fp16 check: largest activation {c.max_abs_activation:,.1f} ({c.layer}) of "
                   f"{c.fp16_max:,.0f} on {c.clips} {c.source}; max |Δlogit| vs fp32 {c.max_abs_logit_diff:.3g}")
        if c.fp32_nodes:
            layers = ", ".join(f"{r['layer']} ({r['max_abs_activation']:,.0f})" for r in c.overflow_layers[:4])
            typer.echo(f"  fp16 overflow: {len(c.fp32_nodes)} nodes kept in FP32 inside the FP16 graph, for "
                       f"{layers or 'activations beyond FP16'}{' …' if len(c.overflow_layers) > 4 else ''} "
                       "(stexport.json fp16_check.fp32_nodes; --fp16-overflow refuse fails instead)")
    s = m.sampling
    typer.echo(f"  sampling: rate {s.rate}, {s.temporal_views}x{s.spatial_views} views; "
               f"{len(m.files)} files, {size_mb:.1f} MB")
    if m.calibration is not None:
        c = m.calibration
        typer.echo(f"  calibration: {c.method} on {c.clips} clips{' (cached)' if c.cached else ''}, "
                   f"{c.quantized_layers} layers quantized, {c.float_precision} float parts")
        mig = c.migration
        if mig and mig.get("alpha") is not None:
            typer.echo(f"  outlier migration: alpha {mig['alpha']}, {mig['norm_sites']} LayerNorm and "
                       f"{mig['stream_sites']} residual-stream sites folded into the GEMM weights")
        elif mig:
            typer.echo(f"  outlier migration: none ({mig.get('why') or 'auto: no candidate beat the plain graph'})")
        fb = c.float_fallback
        if fb:
            typer.echo(f"  float fallback: {fallback_text(fb)}")
    if m.tasks is not None:
        typer.echo(f"  swappable: {len(m.tasks.tensors)} per-task tensors, head of {m.tasks.head_rows} rows "
                   f"(add tasks with `stexport pack --adapter CKPT --base {b.path}`)")
    if engine_note:
        typer.echo(f"  {engine_note}")
    if torchscript and m.torchscript is not None:
        ts = m.torchscript
        typer.echo(f"  torchscript: {ts.file} ({ts.precision}) for libtorch hosts (examples/cpp)")
    if aoti and m.aoti is not None:
        typer.echo(f"  aoti: {m.aoti.file} ({m.aoti.precision}, {m.aoti.device}) for libtorch hosts (examples/cpp)")
    typer.echo(f"next: stexport verify {b.path} --clips VIDEOS   |   stexport infer VIDEO -m {b.path}")


def fallback_text(fb: dict) -> str:
    """One line on a build gate's float layers (calibration.float_fallback, stexport.build.fallback)."""
    g = fb["gate"]
    gate = " and ".join(([f"top-1 agreement >= {g['min_top1_agreement']:.1%}"] if g["min_top1_agreement"]
                         is not None else []) + ([f"accuracy drop <= {g['max_accuracy_drop_pt']:g} pt"]
                                                 if g["max_accuracy_drop_pt"] is not None else [])
                         + ([f"top-5 agreement >= {g['min_top5_agreement']:.1%}"]
                            if g.get("min_top5_agreement") is not None else []))
    before, after, ms = fb["before"], fb["after"], fb["ms_per_clip"]
    layers = ", ".join(r["layer"] for r in fb["float_layers"]) or "none needed"
    outliers = sum(r.get("why") == "outlier" for r in fb["float_layers"])
    why = f", {outliers} of them for their error alone in INT8" if outliers else ""
    return (f"{len(fb['float_layers'])} GEMM(s) in {fb['float_type']} ({layers}) for {gate} on {fb['clips']} "
            f"clips{why}: top-1 agreement {before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}, mean "
            f"|dlogit| {before['mean_abs_logit_diff']:.3g} -> {after['mean_abs_logit_diff']:.3g}; ms/clip on "
            f"{ms['runtime']}: int8 {ms['int8']:.1f}, with fallback {ms['fallback']:.1f}, fp32 {ms['fp32']:.1f}")


def register(app: typer.Typer) -> None:
    add_command(app, "build", build, EXAMPLES)
