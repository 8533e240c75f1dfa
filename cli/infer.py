"""`stexport infer`: classify videos (files, globs, directories, streams) with a bundle."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import typer

from stexport.cli.common import EXIT_BAD_INPUT, OPTION_HELP, Flag, handle_errors, parse_options, register as add_command

EXAMPLES = """
Examples:

  stexport infer clip.mp4                          # newest bundle in ~/.cache/stexport/bundles

  stexport infer videos/ 'more/*.avi' -m BUNDLE --top-k 3 --json

  stexport infer clip.mp4 --views 1x3 --rate 0     # SSv2-style: whole video, 3 crops

  stexport infer match.mp4 --window 4 --stride 2   # timeline of 4 s windows every 2 s

  stexport infer rtsp://camera.local/stream --window 4 --backend onnxruntime
"""


def expand(inputs: list[str]) -> list[str]:
    """Files, directories (videos below them, sorted), globs and live sources, in the order given."""
    from stexport.video import is_live, read_clip_list

    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if is_live(item) or p.is_file():
            out.append(item)
        elif p.is_dir():
            out.extend(str(f) for f, _ in read_clip_list(p))
        elif any(c in item for c in "*?["):
            out.extend(sorted(glob.glob(item, recursive=True)) or [item])
        else:
            out.append(item)  # reported as missing in its turn, so the other videos still run
    return out


def pick_bundle(model: Path | None):
    from stexport.bundle import Bundle, default_home, newest
    from stexport.errors import StexportError

    if model is not None:
        return Bundle.load(model)
    found = newest()
    if found is None:
        raise StexportError(f"no --model given and no bundle built yet in {default_home()}; build one with "
                            "`stexport build --adapter CHECKPOINT` or pass --model BUNDLE")
    return Bundle.load(found)


def labels_note(bundle, labels: Path | None) -> str:
    """Where the class names come from, as a path that is right from any working directory."""
    if labels is not None:
        return str(labels.resolve())
    if not bundle.has("labels"):
        return "generic (class_0, class_1, …)"
    own = bundle.file("labels").resolve()
    source = bundle.manifest.output.labels_source or ""
    if source in ("", "generic"):
        return str(own)
    if "/" in source or "\\" in source or source.endswith(".txt"):  # the file build copied the names from
        return f"{own} (copied from {source})"
    return f"{own} ({source})"  # a shipped dataset list, e.g. kinetics-400


def show(result, as_json: bool, write) -> None:
    if as_json:
        write(json.dumps(result.to_dict()))
        return
    if result.start is not None:
        tops = ", ".join(f"{name} {p:.3f}" for _, name, p in result.top)
        write(f"{result.start:8.2f}-{result.end:<8.2f} {tops}")
        return
    write(f"{result.source}  ({result.views} views, {result.frames} frames; decode {result.decode_s:.2f} s, "
          f"model {result.infer_s:.2f} s)")
    for rank, (i, name, p) in enumerate(result.top, 1):
        write(f"  {rank}. {name:<40} {p:.4f}")


@handle_errors
def infer(
    videos: list[str] = typer.Argument(..., help="Video files, directories, globs ('clips/*.mp4'), stream "
                                       "URLs (rtsp://…) or camera indices (0)."),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle directory. Default: the newest bundle in "
                               "$STEXPORT_HOME/bundles (~/.cache/stexport/bundles)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="How many classes to show per video."),
    views: str = typer.Option(None, "--views", help="TEMPORALxSPATIAL views, e.g. 3x1 (Kinetics) or 1x3 "
                              "(SSv2). Default: the bundle's."),
    rate: int = typer.Option(None, "--rate", min=0, help="Take every N-th frame; 0 spreads the frames over "
                             "the whole video (or window). Default: the bundle's."),
    backend: str = typer.Option("auto", "--backend", "-b", help="auto (a TensorRT engine for this GPU, else "
                                "OpenVINO on an x86-64 CPU, else ONNX Runtime) or a backend name: openvino, "
                                "onnxruntime, tensorrt, torchscript, torch."),
    labels: Path = typer.Option(None, "--labels", help="Class names, one per line, in class order "
                                "(overrides the bundle's)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for the backend."),
    option: list[str] = typer.Option([], "--option", help=OPTION_HELP),
    window: float = typer.Option(None, "--window", help="Timeline mode: classify windows of this many "
                                 "seconds."),
    stride: float = typer.Option(None, "--stride", help="Timeline mode: seconds between window starts "
                                 "(default: --window, no overlap)."),
    task: Path = typer.Option(None, "--task", help="A task pack (`stexport pack`) to run on the swappable "
                              "bundle: its classes, labels and sampling."),
    as_json: bool = Flag(False, "--json", help="One JSON object per line: per video, or per window."),
):
    """Classify videos the way the official ST-Adapter evaluation does: sample each video's views (the
    bundle's frames, rate and TEMPORALxSPATIAL crops), softmax each view, average, and print the top classes.

    Every input gets one result, or one error line on stderr naming the file (missing, not a video, no \
decodable frames, …); the other videos still run, and the exit code is 2 if any failed. A video whose \
header claims frames that do not decode, or that is shorter than a clip, still gets a result, with a \
warning. The next video is decoded while the model runs on the current one.

    Timeline mode (--window, --stride) classifies consecutive windows of a long video or a live stream; \
each window is sampled like a whole video of its length.
    """
    from tqdm import tqdm

    from stexport.classify import Classifier, Failure
    from stexport.errors import StexportError
    from stexport.video import Sampling, VideoError, with_views

    if stride is not None and window is None:
        raise StexportError("--stride needs --window (timeline mode)")
    bundle = pick_bundle(model)
    pack = None
    if task is not None:
        from stexport.taskpack import TaskPack

        pack = TaskPack.load(task)
        pack.check_fits(bundle)
        m = bundle.manifest
        sampling = with_views(Sampling(frames=m.input.frames, size=m.input.size,
                                       **pack.record.sampling.model_dump()), views, rate)
    else:
        sampling = with_views(Sampling.from_manifest(bundle.manifest), views, rate)
    options = parse_options(option)
    if threads:
        options["threads"] = threads
    sources = expand(videos)
    failed = 0
    with Classifier(bundle, backend=backend, labels=str(labels) if labels else None, sampling=sampling,
                    top_k=top_k, task=pack, **options) as clf:
        bar = tqdm(total=len(sources), desc="infer", unit="video", file=sys.stderr, disable=None, leave=False)

        def out(line: str) -> None:
            tqdm.write(line, file=sys.stdout)

        def err(line: str) -> None:
            tqdm.write(line, file=sys.stderr)

        d = clf.describe()
        where = ", ".join(str(x) for x in d.get("providers", [d.get("device", "")]) if x)
        on = f"task {pack.name} ({pack.path}) on {bundle.path}" if pack else str(bundle.path)
        names = labels_note(bundle, labels) if pack is None or labels else clf.labels_source
        err(f"stexport: {on} on {d['backend']}{f' ({where})' if where else ''}, "
            f"{clf.sampling.describe()}, labels: {names}")

        def report(item) -> None:
            nonlocal failed
            if isinstance(item, Failure):
                failed += 1
                err(f"stexport: error: {item.error}")
                if as_json:
                    out(json.dumps(item.to_dict()))
                return
            for note in item.notes:
                err(f"stexport: warning: {item.source}: {note}")
            show(item, as_json, out)

        if window is None:
            for item in clf.classify_many(sources):
                report(item)
                bar.update()
        else:
            for source in sources:
                if not as_json:
                    out(f"{source}  (windows of {window:g} s every {stride or window:g} s, "
                        f"{clf.sampling.describe()})")
                try:
                    for item in clf.timeline(source, window, stride or window):
                        report(item)
                except VideoError as e:
                    report(Failure(str(source), str(e)))
                bar.update()
        bar.close()
    if failed:
        err(f"stexport: {failed} of {len(sources)} input{'s' * (len(sources) != 1)} failed")
        raise typer.Exit(EXIT_BAD_INPUT)


def register(app: typer.Typer) -> None:
    add_command(app, "infer", infer, EXAMPLES)
