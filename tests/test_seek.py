"""Decoding by seeking (stexport.runtime.seek): every clip equals today's sequential OpenCV decode bit for bit,
or the result says it was decoded sequentially. One small generated video per kind of file that makes seeking
hard (issue 32): B-frames and open GOPs, VFR, edit lists, rotation, a lying header, missing or partial indexes,
and the codecs H.264, HEVC, VP9 and MPEG-4 part 2."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from conftest import sequential_frames

from stexport.runtime import seek, video
from stexport.runtime.video import Sampling, decode

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI "
                                "(apt-get install -y ffmpeg; .ci/run installs it)")

SRC = ["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-frames:v", "120", "-pix_fmt", "yuv420p"]
X264 = ["-c:v", "libx264", "-bf", "3", "-g", "12"]
OPEN264 = ["-c:v", "libx264", "-bf", "3", "-x264-params", "keyint=12:min-keyint=12:open-gop=1:scenecut=0"]
X265 = ["-c:v", "libx265", "-x265-params", "keyint=12:min-keyint=12:bframes=3:open-gop=1:scenecut=0:log-level=error"]
VFR = ["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8", "-frames:v", "80", "-pix_fmt", "yuv420p",
       "-vf", "setpts='if(lt(N,40),N/8,5+(N-40)*0.37)/TB'", "-fps_mode", "vfr"]

# name: (ffmpeg arguments after -y, or a derivation from another file; does it seek?)
KINDS = {
    "h264_bframes.mp4": ([*SRC, *X264], True),
    "h264_open_gop.mp4": ([*SRC, *OPEN264], True),
    "hevc_open_gop.mp4": ([*SRC, *X265], True),
    "hevc_10bit.mp4": ([*SRC[:-1], "yuv420p10le", *X265], True),
    "h264_bt709.mp4": ([*SRC, *X264, "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709"],
                       True),
    "vp9.webm": ([*SRC, "-c:v", "libvpx-vp9", "-g", "12", "-deadline", "realtime", "-cpu-used", "8"], True),
    "mpeg4_bframes.avi": ([*SRC, "-c:v", "mpeg4", "-bf", "2", "-g", "12"], True),
    "mpeg4.mp4": ([*SRC, "-c:v", "mpeg4", "-g", "12"], True),
    "h264.mkv": ([*SRC, *X264], True),
    "vfr.mp4": ([*VFR, *X264], True),
    "faststart.mp4": ([*SRC, *X264, "-movflags", "+faststart"], True),  # index before the data
    "fragmented.mp4": ([*SRC, *X264, "-movflags", "frag_keyframe+empty_moov"], True),  # index in fragments
    # an edit list starting mid-GOP: the packets before 1.3 s are decoded as references but are no frames
    "edit_list.mp4": (["-ss", "1.3", "-i", "h264_open_gop.mp4", "-c", "copy"], True),
    "rotate90.mp4": (["-i", "h264_open_gop.mp4", "-c", "copy", "-metadata:s:v:0", "rotate=90"], True),
    "rotate270.mp4": (["-i", "h264_bframes.mp4", "-c", "copy", "-metadata:s:v:0", "rotate=270"], True),
    "mpegts.ts": ([*SRC, *X264, "-f", "mpegts"], False),  # no index
}
SAMPLINGS = {"rate 0": Sampling(frames=8, size=32, rate=0, temporal_views=1),
             "3 views rate 4": Sampling(frames=8, size=32, rate=4, temporal_views=3),
             "3 views rate 16": Sampling(frames=8, size=32, rate=16, temporal_views=3)}


def has_encoder(name: str) -> bool:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, check=True)
    return f" {name} " in out.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("seek_corpus")
    have_x265 = has_encoder("libx265")
    for name, (args, _) in KINDS.items():
        if "libx265" in args and not have_x265:
            continue
        subprocess.run(["ffmpeg", "-v", "error", "-y", *args, name], cwd=d, check=True, timeout=120)
    return d


def decode_sequentially(path, s: Sampling, monkeypatch) -> video.Decoded:
    def no_seek(path, on_frame=None):
        raise seek.NotSeekable("test")

    with monkeypatch.context() as m:
        m.setattr(seek, "probe", no_seek)
        return decode(path, s)


@pytest.mark.parametrize("name", list(KINDS))
def test_clips_equal_the_sequential_decode(corpus, name, monkeypatch):
    path = corpus / name
    if not path.exists():
        pytest.skip(f"this ffmpeg cannot encode {name}")
    seeks = KINDS[name][1]
    decoded = []
    for label, s in SAMPLINGS.items():
        decoded.clear()
        d = decode(path, s, progress=lambda: decoded.append(1))
        count = len(decoded)
        ref = decode_sequentially(path, s, monkeypatch)
        assert (d.frames, d.header_frames) == (ref.frames, ref.header_frames), label
        assert np.array_equal(d.clips, ref.clips), f"{name}, {label}: max |diff| " \
            f"{np.abs(d.clips.astype(int) - ref.clips).max()}"
        said = [n for n in d.notes if n.startswith("decoded sequentially: ")]
        assert bool(said) != seeks, (label, d.notes)
        if seeks and label == "rate 0":  # 8 frames of 120 (GOPs of 12): only their GOPs and the last decode
            packets = len(seek.probe(str(path)).packet_pts)  # on_frame: once per packet probed, per frame decoded
            assert count - packets < d.frames, (count, packets)
    if seeks:  # every frame, in one forward pass: each frame decoded once
        decoded.clear()
        pr = seek.probe(str(path))
        frames = seek.read_frames(str(path), set(range(pr.frames)), lambda f: f, pr, on_frame=on_frame(decoded))
        ref = sequential_frames(path)
        assert pr.frames == len(ref) == len(frames) == len(decoded)
        assert all(np.array_equal(frames[i], ref[i]) for i in range(len(ref)))


def on_frame(calls: list):
    return lambda: calls.append(1)


def test_what_is_decoded_sequentially_says_why(corpus, tmp_path):
    """Files that cannot be sought exactly: no index (MPEG-TS); a truncated MP4 whose index promises frames that
    never decode (found by decoding the last GOP first)."""
    s = SAMPLINGS["rate 0"]
    d = decode(corpus / "mpegts.ts", s)
    assert d.notes[0] == "decoded sequentially: no index in the mpegts container"
    data = (corpus / "faststart.mp4").read_bytes()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(data[: len(data) - 2000])
    d = decode(cut, s)
    assert d.notes[0] == "decoded sequentially: the decoder gave a different number of frames than packets"
    assert d.frames == len(sequential_frames(cut)) < seek.probe(str(cut)).frames


def test_header_that_lies(make_video, tmp_path, monkeypatch):
    """An AVI cut short: its header says 40 frames, 21 are there (and its index is gone); sought all the same,
    the same clips as the sequential decode."""
    avi = make_video("full.avi", frames=40).read_bytes()
    chunks = [i for i in range(avi.find(b"movi"), len(avi)) if avi.startswith(b"00dc", i)]
    short = tmp_path / "short.avi"
    short.write_bytes(avi[: chunks[21]])
    for s in SAMPLINGS.values():
        d, ref = decode(short, s), decode_sequentially(short, s, monkeypatch)
        assert (d.header_frames, d.frames) == (40, 21)
        assert d.notes == ["header says 40 frames, 21 decode; sampled from those"]
        assert np.array_equal(d.clips, ref.clips)


def test_runs_never_seek_back_nor_decode_twice(corpus):
    """Frames needed in one GOP share one run; a frame shown before its GOP's keyframe (an open GOP's leading
    B-frame) is decoded from the keyframe before."""
    path = str(corpus / "h264_open_gop.mp4")
    pr = seek.probe(path)
    leading = [pr.frame_pts.index(p) for n, p in enumerate(pr.packet_pts)
               if n not in pr.keyframes and p < pr.packet_pts[max(k for k in pr.keyframes if k < n)]]
    assert leading, "x264 --open-gop made no leading frames"
    calls = []
    want = {leading[len(leading) // 2], 5, 6, 7}
    got = seek.read_frames(path, want, lambda f: f, pr, on_frame=on_frame(calls))
    ref = sequential_frames(path)
    assert all(np.array_equal(got[i], ref[i]) for i in want)
    assert len(calls) < pr.frames // 2  # two GOPs around the leading frame, the first one, the last one


@pytest.mark.parametrize("name", ["vfr.mp4", "h264_open_gop.mp4", "edit_list.mp4", "vp9.webm", "mpegts.ts"])
def test_windows_equal_the_sequential_decode(corpus, name, monkeypatch):
    """Timeline windows keep their times (presentation timestamps, from the demux-only pass when sought) and
    clips."""
    path = corpus / name
    s = Sampling(frames=4, size=32, rate=0, temporal_views=1)
    window, stride = (2.0, 1.5) if name == "vfr.mp4" else (1.0, 0.5)
    wins = list(video.decode_windows(path, s, window, stride))

    def no_seek(path, on_frame=None):
        raise seek.NotSeekable("test")

    with monkeypatch.context() as m:
        m.setattr(seek, "probe", no_seek)
        ref = list(video.decode_windows(path, s, window, stride))
    assert len(wins) == len(ref) > 3
    assert [(w.start, w.end, w.frames) for w in wins] == [(w.start, w.end, w.frames) for w in ref]
    assert all(np.array_equal(w.clips, r.clips) for w, r in zip(wins, ref, strict=True))
    said = [n for n in wins[0].notes if n.startswith("decoded sequentially: ")]
    assert bool(said) == (name == "mpegts.ts"), wins[0].notes
