"""`stexport bench`: latency, throughput, memory and the fraction of the device's GEMM roofline."""

from __future__ import annotations

from pathlib import Path

import typer

from stexport.cli.common import BACKEND_HELP, OPTION_HELP, TASK_BACKENDS, Flag, handle_errors, parse_options, print_json, register as add_command

EXAMPLES = """
Examples:

  stexport bench BUNDLE                                  # auto backend, batch 1 and one sized for this machine

  stexport bench BUNDLE --backend openvino --option compute=bf16 --batch 1,8 --iters 5

  stexport bench --list-options                          # every backend's --option settings

  stexport bench BUNDLE --backend onnxruntime --threads 2 --json > ort.json
"""


def parse_batches(text: str) -> list[int]:
    from stexport.errors import StexportError

    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise StexportError(f"--batch {text!r}: give batch sizes ≥1 separated by commas, e.g. 1,32")
    return out


def show(r: dict) -> None:
    d = r.get("described", {})
    typer.echo(f"bundle        {r['bundle']}  ({r['precision']}, {r['frames']}x{r['size']})")
    what = ", ".join(f"{k} {v}" for k, v in d.items() if k != "backend" and not isinstance(v, (dict, list)))
    typer.echo(f"backend       {r['backend']}  ({what})")
    if r.get("task"):
        typer.echo(f"task          {r['task']['name']}  ({r['task']['path']})")
    if r.get("latency_ms"):
        lat = r["latency_ms"]
        typer.echo(f"latency       p50 {lat['p50']:.1f} ms   p90 {lat['p90']:.1f} ms   "
                   f"p99 {lat['p99']:.1f} ms  per clip at batch 1")
    for b in r["batches"].values():
        first = f", first call {b['first_call_s']:.2f} s" if b.get("first_call_s") is not None else ""
        typer.echo(f"batch {b['batch']:<7} {b['clips_per_s']:.2f} clips/s   "
                   f"({b['ms_per_clip']['p50']:.1f} ms per clip, median of {b['iters']}{first})")
    typer.echo(f"memory        peak RSS {r['peak_rss_mb']:.0f} MiB ({r['rss_before_mb']:.0f} MiB before the "
               f"model loaded); load {r['load_s']:.1f} s")
    ach = r["achieved_gflops"]["throughput"]
    # INT8 GEMMs do integer operations: the rate and the peak are in GOP/s (same count: 2 per multiply-add)
    unit = "GOP/s" if r.get("compute_precision") == "int8" else "GFLOP/s"
    line = f"compute       {r['gflop_per_clip']:.1f} GFLOP per clip -> {ach:.0f} {unit} at batch " \
           f"{r['throughput']['batch']}"
    if r.get("peak_gflops"):
        peak, roof = r["fraction_of_peak"]["throughput"], r["fraction_of_roofline"]["throughput"]
        line += (f" = {100 * peak:.0f}% of this CPU's {r['compute_precision']} GEMM peak "
                 f"({r['peak_gflops']:.0f} {unit}); {100 * roof:.0f}% of the mixed-precision roofline "
                 f"({r['roofline_clips_per_s']:.2f} clips/s)")
    typer.echo(line)


@handle_errors
def bench(
    bundle: Path = typer.Argument(None, help="Bundle directory (from `stexport build`)."),
    backend: str = typer.Option("auto", "--backend", "-b", help=BACKEND_HELP),
    batch: str = typer.Option(None, "--batch", help="Batch sizes, comma-separated: batch 1 gives latency "
                              "percentiles, the largest gives throughput. Default: 1 and 4 clips per CPU core "
                              "(at most 32; 1,8 on 2 cores; 1,32 with an NVIDIA GPU)."),
    iters: int = typer.Option(None, "--iters", "-n", help="Timed calls per batch size. Default: as many as "
                              "fill ~10 s (at least 3, at most 10)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed calls per batch size first."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for the backend."),
    option: list[str] = typer.Option([], "--option", help=OPTION_HELP),
    list_options: bool = Flag(False, "--list-options", help="List every backend's options and exit."),
    peaks: bool = typer.Option(True, "--peaks/--no-peaks", metavar="", help="Measure this CPU's GEMM peak for the "
                               "precision in use (a few seconds) and report the fraction reached."),
    in_process: bool = Flag(False, "--in-process", help="Measure in this process instead of a fresh "
                                    "one (peak memory then includes whatever ran before)."),
    task: Path = typer.Option(None, "--task", help="Time a task pack (`stexport pack`) on this swappable "
                              "bundle, or a task (name or index) of a multi-task bundle. " + TASK_BACKENDS),
    as_json: bool = Flag(False, "--json", help="Print every figure as JSON."),
):
    """Measure a bundle on one backend: warm-up, then per-clip latency at batch 1 (p50/p90/p99), clips/s at
    the largest batch, peak memory, model FLOPs and the achieved rate as a fraction of this CPU's GEMM peak.

    Inputs are random uint8 clips of the bundle's shape; video decoding is not included (`stexport infer` \
reports decode and model time separately). The measurement runs in a fresh Python process, so the peak \
memory (the process's RSS high-water mark, VmHWM) is that of this backend alone, imports included.

    FLOPs are counted from the manifest's shapes (2 per multiply-add: patch embedding, attention, MLP, \
adapters, head). The GEMM peak is measured here on square 2048 matrices in the precision the backend runs \
(FP32, BF16 or INT8), the faster of torch and OpenVINO. For INT8 bundles the roofline also counts the GEMMs \
that stay float (patch embedding, attention, head) at the float rate.

    What it costs: per batch size, --warmup calls plus the timed calls, each as long as one backend call at \
that batch (with the defaults, ~10 s of timed calls, more when 3 calls take longer); then the GEMM peak: ~1 s \
per precision once torch and OpenVINO are loaded, which takes seconds to tens of seconds on a busy machine \
(--no-peaks skips it). A ViT-B/16 INT8 bundle at ~0.28 s per clip (ONNX Runtime, 2 cores) runs ~2.3 s per \
call at batch 8: about 6 calls, ~15 s; --batch 1,32 --iters 10 costs 12 calls of ~9 s there. On a terminal \
progress bars (stderr) show the clips done and, after the first calls, the time left.

    Timings on a shared machine are noisy: compare backends in one run, quote medians.
    """
    if list_options:
        from stexport.runtime.backends import options_help, registrations

        if as_json:
            print_json({r.name: [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help,
                                  "choices": list(o.choices) if o.choices else None, "minimum": o.minimum}
                                 for o in r.cls.OPTIONS] for r in registrations()})
        else:
            typer.echo(options_help())
        return
    from stexport.runtime.bench import bench as run
    from stexport.errors import StexportError

    if bundle is None:
        raise StexportError("missing BUNDLE: pass a bundle directory (from `stexport build`)")
    opts = parse_options(option)
    if threads:
        opts["threads"] = threads
    task_arg = None
    if task is not None:  # refused here, in one line, before the child
        from stexport.bundle.store import Bundle
        from stexport.bundle.taskpack import TaskPack

        b = Bundle.load(bundle)
        if b.manifest.multitask is not None:  # a task of the bundle itself, by name or index
            from stexport.bundle.multitask import task_of

            task_arg = task_of(b, str(task)).name
        else:
            TaskPack.load(task).check_fits(b)
            task_arg = str(task.resolve())
    import logging

    batches = parse_batches(batch) if batch is not None else None  # None: sized for this machine
    result = run(bundle, backend, opts, batches, iters, warmup, peaks=peaks,
                 isolated=not in_process, progress=not as_json,
                 verbose=logging.getLogger("stexport").isEnabledFor(logging.INFO),
                 task=task_arg)
    if as_json:
        print_json(result)
    else:
        show(result)


def register(app: typer.Typer) -> None:
    add_command(app, "bench", bench, EXAMPLES)
