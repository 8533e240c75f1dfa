"""`stexport dump-clip`: decode a video's clips exactly as `infer` does and write them to a file, for hosts
without Python (the C++ example) or for comparing runtimes on identical input."""

from __future__ import annotations

from pathlib import Path

import typer

from stexport.cli.common import Flag, decode_timeout_option, handle_errors, max_decode_option, print_json
from stexport.cli.common import rate_option, views_option
from stexport.cli.common import register as add_command

EXAMPLES = """
Examples:

  stexport dump-clip clip.mp4 -m BUNDLE -o clip.npy

  stexport dump-clip clip.mp4 -m BUNDLE -o clip.npy --views 1x3 --rate 0

  stexport dump-clip clip.mp4 -m BUNDLE -o clip.u8 --raw   # headerless bytes

  stexport-host BUNDLE/model.ts clip.npy                   # examples/cpp
"""


def write_clips(clips, out: Path, raw: bool = False) -> None:
    """.npy (or headerless with raw=True) written to a temporary sibling and renamed into place."""
    import io

    import numpy as np

    from stexport.fileutil import atomic_write_bytes

    if raw:
        atomic_write_bytes(out, np.ascontiguousarray(clips).tobytes())
        return
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(clips), allow_pickle=False)
    atomic_write_bytes(out, buf.getbuffer())


@handle_errors
def dump_clip(
    video: str = typer.Argument(..., help="Video file, stream URL or camera index."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (.npy unless --raw)."),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle whose frames, size and sampling to use. "
                               "Default: the newest bundle in $STEXPORT_HOME/bundles."),
    views: str = views_option(),
    rate: int = rate_option(),
    raw: bool = Flag(False, "--raw", help="Write headerless bytes instead of .npy."),
    decode_timeout: float = decode_timeout_option(),
    max_decode_s: float = max_decode_option(None, "no limit"),
    force: bool = Flag(False, "--force", "-f", help="Replace an existing --out file."),
    as_json: bool = Flag(False, "--json", help="Print what was written as JSON."),
):
    """Decode VIDEO into the uint8 RGB clips a bundle's model takes and write them to --out.

    The array is (V, T, S, S, 3): V views (spatial view outer, temporal view inner, as `infer` orders them),
    T frames, S×S pixels, RGB, uint8, C order. The default file is NumPy's .npy format (a short text header
    with dtype and shape, then the bytes: np.load reads it back); --raw writes only the V·T·S·S·3 bytes, which
    a host reads knowing T and S from the bundle. The model normalises pixels itself: nothing else is needed
    to run it.
    """
    from stexport.cli.infer import pick_bundle
    from stexport.errors import StexportError
    from stexport.runtime.decode_worker import decode_isolated, limits_of
    from stexport.runtime.video import Sampling, with_views

    if out.exists() and not force:
        raise StexportError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    limits = limits_of(decode_timeout, max_decode_s)
    bundle = pick_bundle(model)
    sampling = with_views(Sampling.from_manifest(bundle.manifest), views, rate)
    decoded = decode_isolated(video, sampling, limits=limits)  # a child process, as infer decodes
    for note in decoded.notes:
        typer.echo(f"stexport: warning: {decoded.source}: {note}", err=True)
    write_clips(decoded.clips, out, raw)
    shape = list(decoded.clips.shape)
    if as_json:
        print_json({"path": str(out), "format": "raw" if raw else "npy", "dtype": "uint8",
                    "layout": "VTHWC", "shape": shape, "bytes": out.stat().st_size,
                    "bundle": str(bundle.path),
                    "sampling": sampling.to_dict(), "frames_decoded": decoded.frames, "notes": decoded.notes})
        return
    v, t, s = shape[0], shape[1], shape[2]
    typer.echo(f"wrote {out}: {v} view{'s' * (v != 1)} x {t} frames x {s}x{s} RGB, uint8 (V, T, S, S, 3)"
               f"{', headerless' if raw else ''}, {out.stat().st_size / 1e6:.1f} MB  ({sampling.describe()})")
    if bundle.has("torchscript") and bundle.manifest.multitask is None:  # stexport-host runs one-task modules
        typer.echo(f"next: stexport-host {bundle.file('torchscript')} {out}")


def register(app: typer.Typer) -> None:
    add_command(app, "dump-clip", dump_clip, EXAMPLES)
