"""`stexport infer`: classify videos (files, globs, directories, streams) with a bundle."""

from __future__ import annotations

import glob
import json
import re
import sys
from pathlib import Path

import typer

from stexport.cli.common import BACKEND_HELP, EXIT_BAD_INPUT, Flag, OPTION_HELP, TASK_BACKENDS, escape, handle_errors
from stexport.cli.common import decode_timeout_option, header_limit_options, max_decode_option, parse_options
from stexport.cli.common import rate_option, views_option

_HEADER = header_limit_options()
from stexport.cli.common import register as add_command

EXAMPLES = """
Examples:

  stexport infer clip.mp4                          # newest bundle in ~/.cache/stexport/bundles

  stexport infer videos/ 'more/*.avi' -m BUNDLE --top-k 3 --json

  stexport infer clip.mp4 --views 1x3 --rate 0     # SSv2-style: whole video, 3 crops

  stexport infer match.mp4 --window 4 --stride 2   # timeline of 4 s windows every 2 s

  stexport infer rtsp://camera.local/stream --window 4 --backend onnxruntime

  stexport infer corpus/ -m BUNDLE --output results.jsonl      # JSON Lines; rerun to resume

  stexport infer corpus/ -m BUNDLE --output results.jsonl --ray --workers 2   # local Ray cluster

  stexport infer 'corpus/**/*.mp4' -m BUNDLE --output r.jsonl --ray auto       # the running cluster

  stexport infer corpus/ -m BASE --task ssv2.stpack --output ssv2.jsonl --batch 32   # a task pack
"""

RAY_ADDRESS = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9_.\-]+:\d+)$")


def expand(inputs: list[str], problems: list[tuple[str, str]]) -> list[str]:
    """Files, directories (videos below them, sorted), globs and live sources, in the order given.

    A clip list (`is_clip_list`: '<video> [label]' lines, as `--clips`, `verify --clips` and `build --calib`
    read them) gives its videos; a line of it refused for itself (a URL, a class name for a label) is added to
    `problems` ((list, one-line message) each) and the others still run; StexportError for a list that cannot be read at all.
    Otherwise never raises for one input: what is not a video (a directory without videos, a FIFO, a missing
    file) stays in the list and is reported in its turn, so the other videos still run."""
    from stexport.errors import StexportError
    from stexport.runtime.video import is_clip_list, is_live, read_clip_list

    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if is_clip_list(p):
            out.extend(str(f) for f, _ in read_clip_list(p, problems))
        elif is_live(item) or p.is_file():
            out.append(item)
        elif p.is_dir():
            try:
                out.extend(str(f) for f, _ in read_clip_list(p))
            except (StexportError, OSError):
                out.append(item)  # no videos below it: reported as a directory in its turn
        elif any(c in item for c in "*?["):
            out.extend(sorted(glob.glob(item, recursive=True)) or [item])
        else:
            out.append(item)  # reported as missing in its turn, so the other videos still run
    return out


def pick_bundle(model: Path | None):
    from stexport.bundle.store import Bundle, default_home, newest
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


def strict_json(obj) -> str:
    """One line of strict JSON (RFC 8259: no NaN/Infinity; ValueError rather than write them)."""
    return json.dumps(obj, allow_nan=False)


RANDOM_WEIGHTS = "random weights: predictions are meaningless"  # a result's "weights": "random", in text


def show(result, as_json: bool, write) -> None:
    if as_json:
        write(strict_json(result.to_dict()))
        return
    random = f"  ({RANDOM_WEIGHTS})" if result.weights == "random" else ""
    if result.start is not None:
        tops = ", ".join(f"{name} {p:.3f}" for _, name, p in result.top)
        write(f"{result.start:8.2f}-{result.end:<8.2f} {tops}{random}")
        return
    live = f", {result.sampled}" if result.sampled != "whole file" else ""
    write(f"{result.source}  ({result.views} view{'s' * (result.views != 1)}, {result.frames} frames{live}; decode {result.decode_s:.2f} s, "
          f"model {result.infer_s:.2f} s){random}")
    for rank, (i, name, p) in enumerate(result.top, 1):
        write(f"  {rank}. {name:<40} {p:.4f}")


@handle_errors
def infer(
    videos: list[str] = typer.Argument(None, help="Video files, directories, globs ('clips/*.mp4'), stream "
                                       "URLs (rtsp://…) or camera indices (0).", show_default=False),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle directory. Default: the newest bundle in "
                               "$STEXPORT_HOME/bundles (~/.cache/stexport/bundles)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="How many classes to show per video."),
    views: str = views_option(),
    rate: int = rate_option(default="the bundle's; in timeline mode, 0 spreads them over each window"),
    backend: str = typer.Option("auto", "--backend", "-b", help=BACKEND_HELP),
    labels: Path = typer.Option(None, "--labels", help="Class names, one per line, in class order "
                                "(overrides the bundle's)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for the backend."),
    option: list[str] = typer.Option([], "--option", help=OPTION_HELP),
    window: float = typer.Option(None, "--window", help="Timeline mode: classify windows of this many "
                                 "seconds."),
    stride: float = typer.Option(None, "--stride", help="Timeline mode: seconds between window starts "
                                 "(default: --window, no overlap)."),
    decode_timeout: float = decode_timeout_option(),
    max_decode_s: float = max_decode_option(None, "no limit"),
    max_pixels: int = _HEADER["max_pixels"],
    max_frames: int = _HEADER["max_frames"],
    decode_memory_mb: int = _HEADER["decode_memory_mb"],
    as_json: bool = Flag(False, "--json", help="One JSON object per line: per video, or per window; "
                         "an input that fails gets {\"path\", \"error\"}."),
    output: Path = typer.Option(None, "--output", help="Write the results as JSON Lines (--json's schema, one "
                                "line per input in input order, failures included) to this file instead of "
                                "stdout. Rerunning with the same file resumes: inputs already in it are "
                                "skipped."),
    batch: int = typer.Option(None, "--batch", min=1, help="Views per backend call, packing the views of "
                              "several videos into one call (same scores). Default: one video per call; 32 "
                              "with --ray."),
    decode_threads: int = typer.Option(None, "--decode-threads", min=1, help="Videos decoded at the same "
                                       "time (threads, one FFmpeg thread each). Default 1."),
    ray_address: str = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                    help=escape("Run as a Ray Data pipeline (decode tasks → an actor pool of "
                                    "backends). Alone: start a local Ray on 127.0.0.1; auto: join the running "
                                    "cluster; HOST:PORT or ray://HOST:PORT: that cluster. Needs pip install "
                                    "'stexport[ray]'.")),
    workers: int = typer.Option(1, "--workers", min=1, help="With --ray: inference actors, each loading the "
                                "backend once."),
    worker_cpus: float = typer.Option(1.0, "--worker-cpus", min=0.01, help="With --ray: CPUs each inference "
                                      "actor reserves (match the backend's threads); the rest decode."),
    ship_bundle: bool = Flag(False, "--ship-bundle", help="With --ray: send the bundle's files through Ray's "
                             "object store, for nodes that do not see the bundle's path."),
    task: Path = typer.Option(None, "--task", help="A task pack (`stexport pack`) to run on the swappable "
                              "bundle, or a task name of a multi-task bundle (`stexport multitask`): its "
                              "classes, labels and sampling; results carry its name. Works with "
                              "--output, --batch, --decode-threads and --ray (each worker loads it once). "
                              + TASK_BACKENDS),
    clips: list[Path] = typer.Option(None, "--clips", "-c", help="Clip lists ('<video> [label]' per line, as "
                                     "`verify --clips` and `build --calib` read them; '#' comments allowed): "
                                     "their videos are classified after the arguments'. Repeatable."),
):
    """Classify videos the way the official ST-Adapter evaluation does: sample each video's views (the
    bundle's frames, rate and TEMPORALxSPATIAL crops), softmax each view, average, and print the top classes.

    Every input gets one result, or one error line on stderr naming the file and the fix (missing, a \
directory, a FIFO or device, an unreadable file, a name that is not UTF-8, not a video, no decodable frames, \
a decoder that crashed or stalled, NaN logits, …); the other videos still run, and the exit code is 2 if any \
failed. Videos are decoded in a separate process, so no input can crash or block the others. Inputs that \
cannot be counted (cameras, live streams) are sampled live, and the output says so; an http:// link to a \
file is sampled as a file. A video whose \
header claims frames that do not decode, or that is shorter than a clip, still gets a result, with a \
warning. The next video is decoded while the model runs on the current one.

    Timeline mode (--window, --stride) classifies consecutive windows of a long video or a live stream; \
each window is sampled like a whole video of its length. Window times are the video's presentation \
timestamps, so variable-frame-rate files get true times.

    Corpora: --output FILE writes JSON Lines and resumes; --batch packs views of several videos per call; \
--ray runs the same classification on a Ray cluster (every node needs the videos and the bundle at the same \
paths, or --ship-bundle), with results identical to a local run.
    """
    from tqdm import tqdm

    from stexport.runtime.classify import Classifier, Failure, NonFiniteOutput
    from stexport.errors import StexportError
    from stexport.runtime.video import Sampling, VideoError, with_views

    videos = list(videos or [])
    if ray_address is not None and not RAY_ADDRESS.match(ray_address):
        raise StexportError(f"--ray {ray_address}: expected nothing (a local cluster), auto, HOST:PORT or "
                            "ray://HOST:PORT")
    if not videos and not clips:
        raise StexportError("no inputs: pass video files, directories or globs, e.g. stexport infer clip.mp4")
    problems: list[tuple[str, str]] = []  # clip-list lines refused for themselves: failed inputs, shown first
    sources = expand(videos, problems)  # an unreadable clip list is refused here, before the backend loads
    if clips:
        from stexport.runtime.video import read_clip_lists

        sources += [str(p) for p, _ in read_clip_lists(clips, problems)]
    if stride is not None and window is None:
        raise StexportError("--stride needs --window (timeline mode)")
    if window is not None:  # refused before the backend loads
        from stexport.runtime.video import check_seconds

        check_seconds(window, window if stride is None else stride)
    if window is not None and (output or ray_address or batch or decode_threads):
        raise StexportError("--window (timeline mode) runs one video at a time: drop --output, --ray, --batch "
                            "and --decode-threads, or --window")
    if ray_address is not None:
        from stexport.extras import require

        require("--ray", "ray")
    bundle = pick_bundle(model)
    from stexport.bundle.multitask import default_task, loaded_task, run_title

    pack = None
    task = default_task(bundle, task)
    if task is not None:
        pack = loaded_task(bundle, str(task))  # a task name of a multi-task bundle, else a pack file
        m = bundle.manifest
        sampling = with_views(Sampling(frames=m.input.frames, size=m.input.size,
                                       **pack.record.sampling.model_dump()), views, rate)
    else:
        sampling = with_views(Sampling.from_manifest(bundle.manifest), views, rate)
    options = parse_options(option)
    if threads:
        options["threads"] = threads
    for where, error in problems:  # failed inputs of their own; the other inputs still run
        typer.echo(f"stexport: error: {error}", err=True)
        if as_json:
            typer.echo(strict_json(Failure(where, error).to_dict()))
    if not sources:
        typer.echo(f"stexport: {len(problems)} of {len(problems)} inputs failed", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    if window is None and (output is not None or ray_address is not None or batch or decode_threads):
        return corpus(bundle, sources, backend, labels, sampling, top_k, options, as_json, output, batch,
                      decode_threads, ray_address, workers, worker_cpus, ship_bundle, decode_timeout, pack,
                      max_decode_s=max_decode_s, max_pixels=max_pixels, max_frames=max_frames,
                      decode_memory_mb=decode_memory_mb, refused=len(problems))
    failed = refused = len(problems)
    with Classifier(bundle, backend=backend, labels=str(labels) if labels else None, sampling=sampling,
                    top_k=top_k, decode_timeout=decode_timeout, max_decode_s=max_decode_s, task=pack,
                    max_pixels=max_pixels, max_frames=max_frames, decode_memory_mb=decode_memory_mb,
                    **options) as clf:
        bar = tqdm(total=len(sources), desc="infer", unit="video", file=sys.stderr, disable=None, leave=False)

        def out(line: str) -> None:
            tqdm.write(line, file=sys.stdout)

        def err(line: str) -> None:
            tqdm.write(line, file=sys.stderr)

        d = clf.describe()
        where = ", ".join(str(x) for x in d.get("providers", [d.get("device", "")]) if x)
        on = run_title(bundle, pack)
        names = labels_note(bundle, labels) if pack is None or labels else clf.labels_source
        err(f"stexport: {on} on {d['backend']}{f' ({where})' if where else ''}, "
            f"{clf.sampling.describe()}, labels: {names}")

        def report(item) -> None:
            nonlocal failed
            if isinstance(item, Failure):
                failed += 1
                err(f"stexport: error: {item.error}")
                if as_json:
                    out(strict_json(item.to_dict()))
                return
            for note in item.notes:
                err(f"stexport: warning: {item.source}: {note}")
            show(item, as_json, out)

        if window is None:
            for item in clf.classify_many(sources):
                report(item)
                bar.update()
        else:
            from stexport.runtime.video import display

            for source in sources:
                if not as_json:
                    out(f"{display(source)}  (windows of {window:g} s every {stride or window:g} s, "
                        f"{clf.sampling.describe()})")
                try:
                    for item in clf.timeline(source, window, stride or window):
                        report(item)
                except (VideoError, NonFiniteOutput) as e:
                    report(Failure(display(source), str(e)))
                bar.update()
        bar.close()
    if failed:
        total = len(sources) + refused
        err(f"stexport: {failed} of {total} input{'s' * (total != 1)} failed")
        raise typer.Exit(EXIT_BAD_INPUT)


def corpus(bundle, sources, backend, labels, sampling, top_k, options, as_json, output, batch, decode_threads,
           ray_address, workers, worker_cpus, ship_bundle, decode_timeout: float = 60.0, pack=None,
           max_decode_s: float | None = None, refused: int = 0, **limits) -> None:
    """infer over many inputs: batched locally or on Ray, to stdout or a resumable JSON Lines file. pack: a
    loaded TaskPack to run (every worker loads it once, by its path); refused: inputs already reported as
    failed (clip-list lines), counted in the exit status."""
    from tqdm import tqdm

    from stexport.runtime import backends
    from stexport.runtime.spec import DEFAULT_BATCH, ClassifierSpec
    from stexport.errors import StexportError
    from stexport.runtime.results import ResultsFile
    from stexport.bundle.multitask import run_title, task_label, task_ref

    spec = ClassifierSpec(str(bundle.path), backend=backend, options=options,
                          labels=str(labels.resolve()) if labels else None, sampling=sampling, top_k=top_k,
                          batch_size=batch or (DEFAULT_BATCH if ray_address else 1),
                          decode_threads=decode_threads or 1, decode_timeout=decode_timeout,
                          max_decode_s=max_decode_s, **limits,
                          task=task_ref(pack) if pack is not None else None)
    if ray_address is not None:  # what the workers would refuse, refused here before Ray starts
        if backend != "auto":
            backends.load_class(backend).check_options(options)
        elif backends.resolve("auto", bundle) is None:
            backends.create("auto", bundle)  # raises, naming why no runtime here can run it
        chosen = backends.resolve(backend, bundle)
        cls = backends.load_class(chosen) if chosen else None
        if pack is not None and cls and not (cls.MULTITASK if bundle.manifest.multitask else cls.SWAPS_TASKS):
            raise StexportError(f"--task: the {chosen} backend cannot run task packs; pass -b "
                                f"{backends.task_backends('or', conditions=True)} (or use a bundle built for the task)")
    results = None
    if output is not None:
        m = bundle.manifest
        model = m.files.get(m.artifacts.get("onnx", ""))  # every other artifact is made from this graph
        run = {"bundle": m.name, "model_sha256": model.sha256 if model else None,
               "task": pack.name if pack is not None else None,
               "task_sha256": pack.key if pack is not None else None, "sampling": sampling.describe(),
               "top_k": top_k, "labels": str(labels.resolve()) if labels else None}
        results = ResultsFile(output, task=run["task"], run=run)
    todo = results.remaining(sources) if results else list(enumerate(map(str, sources)))
    bar = tqdm(total=len(sources), initial=len(sources) - len(todo), desc="infer", unit="video",
               file=sys.stderr, disable=None, leave=False)

    def err(line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    if results and len(todo) < len(sources):
        err(f"stexport: {output}: {len(sources) - len(todo)} of {len(sources)} inputs already done; resuming")
    where = f"Ray ({ray_address if ray_address != 'local' else 'local cluster on 127.0.0.1'}, {workers} " \
            f"worker{'s' * (workers != 1)})" if ray_address else "this process"
    on = run_title(bundle, pack)
    names = labels_note(bundle, labels) if pack is None or labels else task_label(pack)
    shown = backend if backend != "auto" else f"{backends.resolve('auto', bundle) or 'auto'} (auto)"
    per_call = f"{spec.batch_size} view{'s' * (spec.batch_size != 1)} per call"
    err(f"stexport: {on} on {shown}, {sampling.describe()}, {per_call}, "
        f"in {where}, labels: {names}")
    failed = refused
    started = False
    try:
        if ray_address is not None:
            from stexport.serving import ray_data as ray_infer

            started = ray_infer.connect(None if ray_address == "local" else ray_address)
            items = (row for _, row in ray_infer.classify(spec, todo, workers, worker_cpus, ship_bundle))
        else:
            clf = spec.open()
            items = (item.to_dict() for item in _closing(clf, clf.classify_batch(s for _, s in todo)))
        for row in items:
            if "error" in row:
                failed += 1
                err(f"stexport: error: {row['error']}")
            for note in row.get("notes", []):
                err(f"stexport: warning: {row['path']}: {note}")
            if results:
                results.write(row)
            elif as_json:
                tqdm.write(json.dumps(row, allow_nan=False), file=sys.stdout)
            else:
                show_dict(row, tqdm.write)
            bar.update()
    finally:
        bar.close()
        if results:
            results.close()
        if started:
            import ray

            ray.shutdown()
    if results:
        lines = f"{results.lines} line{'s' * (results.lines != 1)}"
        err(f"stexport: {len(todo)} result{'s' * (len(todo) != 1)} written to {output} ({lines})")
    if failed:
        total = len(todo) + refused
        err(f"stexport: {failed} of {total} input{'s' * (total != 1)} failed")
        raise typer.Exit(EXIT_BAD_INPUT)


def _closing(clf, items):
    with clf:
        yield from items


def show_dict(row: dict, write) -> None:
    """The human-readable form of one result dict (as show() prints a Result)."""
    if "error" in row:
        return
    t = row["timing"]
    random = f"  ({RANDOM_WEIGHTS})" if row.get("weights") == "random" else ""
    write(f"{row['path']}  ({row['views']} view{'s' * (row['views'] != 1)}, {row['frames']} frames; decode {t['decode_s']:.2f} s, "
          f"model {t['infer_s']:.2f} s){random}")
    for rank, top in enumerate(row["top"], 1):
        write(f"  {rank}. {top['label']:<40} {top['score']:.4f}")


def register(app: typer.Typer) -> None:
    add_command(app, "infer", infer, EXAMPLES)
