"""`stexport verify`: check a bundle's runtime against the PyTorch reference on real videos."""

from __future__ import annotations

from pathlib import Path

import typer
from stexport.bundle.precision import PRECISIONS, gate_text, short
from stexport.cli.common import BACKEND_HELP, OPTION_HELP, TASK_BACKENDS, Flag, handle_errors, parse_options, print_json, register as add_command
from stexport.cli.common import decode_timeout_option, max_decode_option, rate_option, views_option

EXIT_GATE_FAILED = 1


def _gate_defaults(field: str, say) -> str:
    """'say(name, value)' for each precision whose default gate sets `field` (stexport.bundle.precision)."""
    return ", ".join(say(n, getattr(p, field)) for n, p in PRECISIONS.items() if getattr(p, field) is not None)


MAX_ABS = _gate_defaults("max_abs", lambda n, v: f"{short(v)} for {n}")
AGREEMENT = _gate_defaults("min_top1_agreement", lambda n, v: f"{v} {n}" + (
    " without labels" if PRECISIONS[n].max_accuracy_drop is not None else ""))
DROP = _gate_defaults("max_accuracy_drop", lambda n, v: f"{v} for {n} with labels")

EXAMPLES = """
Examples:

  stexport verify ~/.cache/stexport/bundles/k400-ViT-B-16-fp32-8x224 --clips val_list.txt

  stexport verify BUNDLE --clips videos/ --max-clips 20 --report report.json

  stexport verify BUNDLE --clips val_list.txt --json > report.json     # the report as JSON on stdout

  stexport verify BUNDLE --clips a.mp4 --clips b.mp4

  stexport verify BUNDLE --clips val_list.txt --backend onnxruntime --min-agreement 0.98

  stexport verify INT8_BUNDLE --clips val_list.txt --layers --top 10   # which GEMMs INT8 hurts most

Exit status: 0 all gates pass, 1 a gate failed, 2 bad input.
"""


@handle_errors
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory (or its stexport.json)."),
    clips: list[Path] = typer.Option(..., "--clips", "-c", help="Videos: a '<video> <label>' list (labels "
                                     "give accuracy), a directory, or a video file; repeat for more (the same "
                                     "inputs as build --calib)."),
    backend: str = typer.Option("auto", "--backend", "-b", help="Runtime to check: "
                                + BACKEND_HELP.replace("auto (", "auto (the one `infer` picks: ")),
    max_clips: int = typer.Option(None, "--max-clips", help="Use only the first N videos of the list."),
    as_json: bool = Flag(False, "--json", help="Print the full report as JSON (stdout) instead of the table."),
    report_path: Path = typer.Option(None, "--report", help="Also write the full report as JSON to this file."),
    max_abs: float = typer.Option(None, "--max-abs", help=f"Gate: max |Δlogit| (default: {MAX_ABS})."),
    min_agreement: float = typer.Option(None, "--min-agreement", min=0.0, max=1.0, help="Gate: top-1 agreement, 0–1 "
                                        f"(default: {AGREEMENT})."),
    max_drop: float = typer.Option(None, "--max-drop", min=0.0, max=100.0, help="Gate: top-1 accuracy drop in points "
                                   f"(default: {DROP})."),
    no_cache: bool = Flag(False, "--no-cache", help="Run the PyTorch reference even if its logits for this "
                          "model, sampling and these videos are cached."),
    pretrained: str = typer.Option(None, "--pretrained", help="Backbone weights for the reference if the "
                                   "file the bundle was built from has moved."),
    device: str = typer.Option(None, "--device", help="Backend device (e.g. cpu, cuda, tensorrt)."),
    threads: int = typer.Option(None, "--threads", help="Backend CPU threads."),
    option: list[str] = typer.Option([], "--option", help=OPTION_HELP),
    decode_timeout: float = decode_timeout_option(),
    max_decode_s: float = max_decode_option(None, "no limit"),
    task: Path = typer.Option(None, "--task", help="Verify a task pack (`stexport pack`) on this swappable "
                              "bundle, or a task (by name) of a multi-task bundle: the reference is the backbone "
                              "with that task's deltas. " + TASK_BACKENDS),
    layers: bool = Flag(False, "--layers", help="Layerwise precision report of an INT8 or FP16 bundle instead "
                        "of the gate: each quantized (FP16) GEMM alone in INT8 (FP16), the rest in float, ranked "
                        "by the |Δlogit| against the reference it adds (ONNX Runtime)."),
    top: int = typer.Option(None, "--top", help="With --layers: show the N most sensitive layers (default: "
                            "10 in the table, all in --json)."),
    views: str = views_option("TEMPORALxSPATIAL views to check (as `infer --views` runs them)",
                              "the bundle's, or the task's with --task"),
    rate: int = rate_option("Frame step to check (as `infer --rate`)", "the bundle's, or the task's with --task"),
    allow_failed: bool = Flag(False, "--allow-undecodable", help="Let the gate pass on the videos that decoded "
                              "when some could not be (by default such a run fails: it did not check what was "
                              "asked). The report says how many failed either way."),
):
    """Decode each video as `infer` does, run the bundle's backend and the PyTorch reference on the same
    clips, and report max/mean |Δlogit|, cosine similarity, top-1 and top-5 agreement and, when the list has
    labels, top-1/top-5 accuracy of both and the difference. A per-precision gate sets the exit status:
    {gates}.
    """
    import dataclasses
    import json

    from stexport.bundle.store import Bundle
    from stexport.errors import StexportError
    from stexport.extras import require

    require("stexport verify (the PyTorch reference)", "torch", "torchvision", "open_clip", "safetensors")
    from stexport.build.verify import GATES, format_report
    from stexport.build.verify import verify as run_verify

    if report_path is not None and report_path.is_dir():
        raise StexportError(f"{report_path}: is a directory; --report takes a file name, e.g. report.json")
    if top is not None and not layers:
        raise StexportError("--top needs --layers (it limits the layer report)")
    if layers:
        bad = [f for f, v in (("--backend", backend != "auto" and backend != "onnxruntime"),
                              ("--device", device), ("--option", option), ("--max-abs", max_abs),
                              ("--min-agreement", min_agreement), ("--max-drop", max_drop),
                              ("--allow-undecodable", allow_failed)) if v]
        if bad:
            raise StexportError(f"--layers runs the graph on ONNX Runtime (CPU) and checks no gate; drop {bad[0]}")
        from stexport.build.verify import format_layers, layer_report

        report = layer_report(bundle, clips if len(clips) != 1 else clips[0], max_clips=max_clips, top=top,
                              pretrained=pretrained, progress=True, use_cache=not no_cache, threads=threads,
                              decode_timeout=decode_timeout, max_decode_s=max_decode_s, views=views, rate=rate,
                              task=task)
        text = format_layers({**report, "layers": report["layers"][:top or 10]})
    else:
        b = Bundle.load(bundle)
        gate = GATES.get(b.precision, GATES["fp32"])
        changes = {k: v for k, v in {"max_abs": max_abs, "min_top1_agreement": min_agreement,
                                     "max_accuracy_drop": max_drop}.items() if v is not None}
        gate = dataclasses.replace(gate, **changes)
        options = parse_options(option)
        options.update({k: v for k, v in {"device": device, "threads": threads}.items() if v is not None})
        report = run_verify(b, clips if len(clips) != 1 else clips[0], backend=backend, max_clips=max_clips,
                            gate=gate, pretrained=pretrained, progress=True, use_cache=not no_cache, task=task,
                            decode_timeout=decode_timeout, max_decode_s=max_decode_s, allow_failed=allow_failed,
                            views=views, rate=rate, **options)
        text = format_report(report)
    if report_path is not None:
        from stexport.fileutil import atomic_write_json

        atomic_write_json(report_path, json.loads(json.dumps(report, default=str, allow_nan=False)))
    if as_json:
        print_json(report)
    else:
        typer.echo(text)
    if not report.get("passed", True):  # the layer report checks no gate
        raise typer.Exit(EXIT_GATE_FAILED)


# the default gates, in words, from the precision table
verify.__doc__ = verify.__doc__.replace("{gates}", ", ".join(f"{n} needs {gate_text(n)}" for n in PRECISIONS))


def register(app: typer.Typer) -> None:
    add_command(app, "verify", verify, EXAMPLES)
