"""The OpenCV video pipeline: official evaluation sampling, lying headers, damaged files, bounded memory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tracemalloc

import cv2
import numpy as np
import pytest
import torch
from conftest import sequential_frames

from stexport.runtime import video
from stexport.errors import StexportError
from stexport.build.reference import CLIP_MEAN, CLIP_STD
from stexport.runtime.video import (
    Sampling,
    VideoError,
    decode,
    decode_clips,
    decode_windows,
    frame_indices,
    read_clip_list,
    with_views,
)

# ---------------------------------------------------------------------------------------------------------
# The official eval transform (linziyi96/st-adapter video_dataset/dataset.py, random_sample=False),
# transcribed onto tensors: normalise, bicubic short-side resize, spatial crops, then temporal crops of each.

MEAN, STD = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)


def official_temporal(frames, T, rate, views):
    if rate <= 0:
        assert views == 1
        seg = (frames.size(1) - 1) / T
        return [frames[:, [(round(seg * i) + round(seg * (i + 1))) // 2 for i in range(T)]]]
    seg_len = (T - 1) * rate + 1
    if frames.size(1) < seg_len:
        frames = torch.cat([frames, frames[:, -1:].repeat(1, seg_len - frames.size(1), 1, 1)], dim=1)
    slide = frames.size(1) - seg_len
    out = []
    for i in range(views):
        st = slide // 2 if views == 1 else round(slide / (views - 1) * i)
        out.append(frames[:, st: st + T * rate: rate])
    return out


def official_spatial(frames, S, views):
    if views == 1:
        h, w = (frames.size(-2) - S) // 2, (frames.size(-1) - S) // 2
        return [frames[:, :, h:h + S, w:w + S]]
    margin = max(frames.size(-2), frames.size(-1)) - S
    if frames.size(-2) > frames.size(-1):
        return [frames[:, :, st:st + S, :] for st in (0, margin // 2, margin)]
    return [frames[:, :, :, st:st + S] for st in (0, margin // 2, margin)]


def official_eval(rgb_frames: np.ndarray, s: Sampling) -> torch.Tensor:
    """(V, 3, T, S, S) normalised, in the official order."""
    x = (torch.as_tensor(rgb_frames).float() / 255.0 - MEAN) / STD
    x = x.permute(3, 0, 1, 2)
    H, W = x.shape[-2:]
    size = (s.size, W * s.size // H) if H < W else (H * s.size // W, s.size)
    x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)
    spatial = official_spatial(x, s.size, s.spatial_views)
    views = sum([official_temporal(c, s.frames, s.rate, s.temporal_views) for c in spatial], [])
    return torch.stack(views)


def all_frames(path) -> np.ndarray:
    return np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in sequential_frames(path)])


def to_pixels(official: torch.Tensor) -> np.ndarray:
    """Official normalised (V, 3, T, S, S) back to (V, T, S, S, 3) pixels, clipped as uint8 clips them."""
    return np.clip((official.permute(0, 2, 3, 4, 1) * STD + MEAN).numpy() * 255.0, 0, 255)


def assert_same(clips: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to uint8 rounding: cv2's bicubic and torch's agree to 1e-2 of a grey level."""
    assert clips.shape == ref.shape
    assert np.abs(clips.astype(np.float64) - ref).max() < 0.51


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 9, 30, 112, 113, 114, 300, 301])
@pytest.mark.parametrize("T,rate,views",
                         [(8, 0, 1), (8, 16, 1), (8, 16, 3), (16, 4, 2), (8, 2, 5), (4, 1, 3)])
def test_frame_indices_match_official(n, T, rate, views):
    idx = torch.arange(n).view(1, n, 1, 1)
    want = [v.flatten().tolist() for v in official_temporal(idx, T, rate, views)]
    assert frame_indices(n, Sampling(frames=T, rate=rate, temporal_views=views)) == want


@pytest.mark.parametrize("shape", [(120, 160), (160, 120), (96, 96)])
@pytest.mark.parametrize("views", [(3, 1), (1, 3), (2, 3)])
def test_clips_match_official_eval(make_video, shape, views):
    h, w = shape
    path = make_video("v.avi", frames=50, width=w, height=h)
    s = Sampling(frames=4, size=64, rate=5, temporal_views=views[0], spatial_views=views[1])
    clips = decode_clips(path, s)
    assert clips.dtype == np.uint8 and clips.shape == (s.views, 4, 64, 64, 3)
    assert_same(clips, to_pixels(official_eval(all_frames(path), s)))


def test_rate_zero_covers_whole_video_and_views_order(make_video):
    path = make_video("v.avi", frames=33)
    s = Sampling(frames=8, size=64, rate=0, temporal_views=1, spatial_views=3)
    d = decode(path, s)
    assert d.frames == 33 and d.passes == 1 and not d.notes
    ref = to_pixels(official_eval(all_frames(path), s))
    assert_same(d.clips, ref)
    # spatial views are crops along the long (horizontal) side: left, middle, right
    left, mid, right = d.clips[:, 0, 0, 32, 2].astype(int)  # blue is a horizontal gradient
    assert left < mid < right


def test_sampling_from_manifest_and_overrides():
    from types import SimpleNamespace

    from stexport.bundle.manifest import InputRecord, SamplingRecord

    m = SimpleNamespace(input=InputRecord(frames=8, size=224),
                        sampling=SamplingRecord(rate=0, temporal_views=1, spatial_views=3))
    s = Sampling.from_manifest(m)
    assert (s.frames, s.size, s.rate, s.temporal_views, s.spatial_views, s.views) == (8, 224, 0, 1, 3, 3)
    assert Sampling.from_manifest(m, rate=None, frames=16).frames == 16
    assert with_views(s, "3x1", rate=16) == Sampling(8, 224, 16, 3, 1)
    k400 = SimpleNamespace(input=InputRecord(frames=8, size=96),
                           sampling=SamplingRecord(rate=16, temporal_views=3, spatial_views=1))
    assert Sampling.from_manifest(k400) == Sampling(8, 96, 16, 3, 1)
    with pytest.raises(StexportError, match="rate 0"):
        with_views(s, "3x1")
    with pytest.raises(StexportError, match="spatial views"):
        Sampling(spatial_views=2)
    with pytest.raises(StexportError, match="TEMPORALxSPATIAL"):
        with_views(s, "three")


def test_header_that_lies_samples_decodable_frames(make_video, tmp_path):
    full = make_video("full.avi", frames=40)
    data = full.read_bytes()
    chunks = [i for i in range(data.find(b"movi"), len(data)) if data.startswith(b"00dc", i)]
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: chunks[21]])  # the AVI header still says 40 frames; 21 are there
    s = Sampling(frames=8, size=64, rate=2, temporal_views=3)
    d = decode(cut, s)
    assert (d.header_frames, d.frames) == (40, 21)
    assert any("header says 40 frames, 21 decode" in note for note in d.notes)
    assert_same(d.clips, to_pixels(official_eval(all_frames(full)[:21], s)))  # the same frames, intact file
    mid = tmp_path / "mid.avi"
    mid.write_bytes(data[: (chunks[10] + chunks[11]) // 2])  # cut inside a frame
    assert 9 <= decode(mid, s).frames <= 11


@pytest.mark.parametrize("shift", [1, -1, 6, -6])
def test_wrong_frame_count_guess_is_corrected(make_video, monkeypatch, shift):
    """The sequential path (files that cannot be sought, see test_seek.py) counts the frames that decode."""
    path = make_video("v.avi", frames=45)
    s = Sampling(frames=8, size=64, rate=0, temporal_views=1)
    truth = decode(path, s)

    def no_index(path, on_frame=None):
        raise video.seek.NotSeekable("no index (test)")

    monkeypatch.setattr(video.seek, "probe", no_index)
    real = video._header
    monkeypatch.setattr(video, "_header", lambda cap: real(cap) + shift)
    d = decode(path, s)
    assert d.frames == 45 and np.array_equal(d.clips, truth.clips) and d.notes[0] == "decoded sequentially: no index (test)"
    assert d.passes == (1 if 0 < shift <= video.BAND else 2)  # a header claiming too many is covered


def test_short_video_repeats_frames(make_video):
    path = make_video("short.mp4", frames=3)
    for s in (Sampling(frames=8, size=64, rate=0, temporal_views=1), Sampling(frames=8, size=64, rate=16)):
        d = decode(path, s)
        assert d.clips.shape == (s.views, 8, 64, 64, 3) and d.frames == 3
        assert any("frames repeat" in note for note in d.notes)
        distinct = {0, 1, 2} if s.rate == 0 else {0, 2}  # rate 16: frame 0, then the last frame as padding
        assert set(frame_indices(3, s)[0]) == distinct
        assert len({d.clips[0, j].tobytes() for j in range(8)}) == len(distinct)


def test_single_frame_video(make_video):
    d = decode(make_video("one.avi", frames=1), Sampling(size=32))
    assert d.clips.shape == (3, 8, 32, 32, 3) and (d.clips == d.clips[0, 0]).all()


def test_frames_failing_mid_stream_end_the_video(make_video, tmp_path):
    full = make_video("full.mp4", frames=40)
    data = bytearray(full.read_bytes())
    a, b = len(data) * 45 // 100, len(data) * 55 // 100
    data[a:b] = np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    s = Sampling(frames=8, size=64, rate=0, temporal_views=1)
    d = decode(bad, s)
    assert 0 < d.frames < 40 and d.header_frames == 40
    good = all_frames(full)[: d.frames]
    assert_same(d.clips, to_pixels(official_eval(good, s)))


def test_bad_inputs_raise_one_line_errors(make_video, tmp_path):
    s = Sampling(size=32)
    cases = {}
    cases["missing"] = (tmp_path / "nope.mp4", "no such file")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    cases["junk"] = (junk, "not a video")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 200)  # FFmpeg's tty demuxer would "play" this as a 3-frame video
    cases["text"] = (text, "text file, not a video")
    mp4 = make_video("t.mp4", frames=20).read_bytes()
    trunc = tmp_path / "trunc.mp4"
    trunc.write_bytes(mp4[: len(mp4) // 2])  # the moov atom (index) is written last: gone
    cases["truncated mp4"] = (trunc, "truncated or corrupt")
    avi = make_video("z.avi", frames=20).read_bytes()
    empty = tmp_path / "empty.avi"
    empty.write_bytes(avi[: avi.find(b"movi") + 4])  # header for 20 frames, no frame data
    cases["zero frames"] = (empty, "no decodable video frames")
    cases["directory"] = (tmp_path, "directory")
    for what, (path, msg) in cases.items():
        with pytest.raises(VideoError, match=msg) as e:
            decode(path, s)
        assert str(path) in str(e.value) and "\n" not in str(e.value), what


def test_memory_bounded_by_needed_frames(make_video):
    path = make_video("long.avi", frames=600, width=320, height=240)
    s = Sampling(frames=8, size=112, rate=16, temporal_views=3)
    tracemalloc.start()
    d = decode(path, s)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    frame = 112 * 149 * 3
    assert d.frames == 600 and d.passes == 1
    # 24 needed frames (+ neighbours) and the clips; holding every frame would take 600 * frame ≈ 30 MB
    assert peak < 100 * frame, peak / 1e6


def test_windows_sample_each_window_like_a_video(make_video):
    path = make_video("w.avi", frames=100, fps=10)
    s = Sampling(frames=4, size=48, rate=0, temporal_views=1, spatial_views=1)
    wins = list(decode_windows(path, s, window=3.0, stride=2.0))
    assert [(w.start, w.end) for w in wins] == [(a / 10, (a + 30) / 10) for a in (0, 20, 40, 60, 70)]
    assert "the last window (7-10 s) is aligned to the end" in wins[-1].notes[0]
    rgb = all_frames(path)
    for w in wins:
        a = round(w.start * 10)
        ref = to_pixels(official_eval(rgb[a:a + 30], s))
        assert_same(w.clips, ref)
    short = list(decode_windows(path, s, window=60.0, stride=10.0))
    assert len(short) == 1 and short[0].end == 10.0
    exact = list(decode_windows(path, s, window=5.0, stride=5.0))  # no tail: no extra window
    assert [(w.start, w.end) for w in exact] == [(0.0, 5.0), (5.0, 10.0)]


@pytest.mark.parametrize("flag", ["window", "stride"])
def test_windows_shorter_than_a_frame_are_refused(make_video, flag):
    """--window 0.01 made 12,000 windows over 419 s of 30 fps video, most without a frame of their own
    (issue 29): a window or stride under the frame spacing is one error naming the spacing."""
    path = make_video("w.avi", frames=20, fps=10)
    s = Sampling(frames=4, size=48, rate=0, temporal_views=1, spatial_views=1)
    seconds = {"window": 1.0, "stride": 1.0, flag: 0.01}
    with pytest.raises(video.VideoError, match=rf"w.avi: --{flag} 0.01 is shorter than the time between frames "
                                               rf"\(0.1 s\); use --{flag} 0.1 or more"):
        list(decode_windows(path, s, **seconds))


def live(path, s):
    """A file's frames read the way a live source is read."""
    return video._decode_live(video.open_capture(str(path)), str(path), s)


def test_live_reads_consecutive_windows(make_video):
    path = make_video("live.avi", frames=60)
    s = Sampling(frames=4, size=48, rate=3, temporal_views=2)
    d = live(path, s)
    rgb = all_frames(path)
    span = 10
    idx = [[t * span + j * 3 for j in range(4)] for t in range(2)]
    ref = to_pixels(official_eval(rgb[idx[0][0]:idx[0][-1] + 1], Sampling(4, 48, 3, 1, 1)))
    assert_same(d.clips[:1], ref)
    assert d.frames == 20 and not d.notes
    ended = live(make_video("few.avi", frames=5), s)
    assert ended.frames == 5 and ended.notes and d.live and d.sampled.startswith("live stream: the first 20")


def test_read_clip_list(tmp_path, make_video):
    (tmp_path / "sub").mkdir()
    a = make_video("sub/a.mp4", frames=2)
    b = make_video("b.avi", frames=2)
    lst = tmp_path / "val.txt"
    lst.write_text("sub/a.mp4 3\n\nb.avi 17\nname with space.mp4\n")
    assert read_clip_list(lst) == [(a, 3), (b, 17), (tmp_path / "name with space.mp4", None)]
    assert read_clip_list(tmp_path) == [(b, None), (a, None)]
    with pytest.raises(StexportError, match="no such file"):
        read_clip_list(tmp_path / "missing.txt")

    # lists as people write them (issue 29): a byte-order mark, '#' comments, blank and indented lines
    (tmp_path / "bom.txt").write_bytes("\ufeff# validation clips\n\n  sub/a.mp4 3\n# b.avi 1\nb.avi\n".encode())
    assert read_clip_list(tmp_path / "bom.txt") == [(a, 3), (b, None)]
    (tmp_path / "urls.txt").write_text("b.avi 1\nhttp://127.0.0.1:9/x.mp4 2\n")
    with pytest.raises(StexportError, match=r"urls.txt: line 2 is a URL \(http://127.0.0.1:9/x.mp4\); clip lists "
                                            "hold local files"):
        read_clip_list(tmp_path / "urls.txt")


def test_url_to_a_file_is_sampled_as_a_file(make_video, http_dir):
    """An http:// link to a finite file is counted and sampled as the whole file, like the file itself."""
    path = make_video("stream.avi", frames=60)
    url = f"{http_dir}/stream.avi"
    s = Sampling(frames=4, size=48, rate=3, temporal_views=2)
    d, local = decode(url, s), decode(path, s)
    assert not d.live and d.sampled == "whole file" and d.header_frames == 60 and d.frames == 60
    assert np.array_equal(d.clips, local.clips)
    wins = list(decode_windows(url, Sampling(frames=4, size=48, rate=0, temporal_views=1), 1.0, 1.0))
    # 60 frames at 25 fps: 2.4 s, the last 0.4 s in a window aligned to the end
    assert [(w.start, w.end) for w in wins] == [(0.0, 1.0), (1.0, 2.0), (1.4, 2.4)]


needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI "
                                  "(apt-get install -y ffmpeg; .ci/run installs it)")


def ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *map(str, args)], check=True, timeout=120)


@needs_ffmpeg
def test_uncountable_stream_is_sampled_live(make_video, http_dir, tmp_path):
    """An MPEG-TS stream served without a length reports no frame count: live, and the result says so."""
    src = make_video("src.avi", frames=60)
    ffmpeg("-i", src, "-c:v", "mpeg4", "-q:v", "2", "-f", "mpegts", tmp_path / "cam.ts")
    url = f"{http_dir}/live/cam.ts"
    s = Sampling(frames=4, size=48, rate=3, temporal_views=2)
    d = decode(url, s)
    assert d.live and d.header_frames is None and d.frames == 20  # two windows of 10 frames, no more read
    assert d.sampled == "live stream: the first 20 frames as they arrived, 0.8 s"
    wins = list(decode_windows(url, Sampling(frames=4, size=48, rate=0, temporal_views=1), 1.0, 1.0))
    assert [(w.start, w.end) for w in wins] == [(0.0, 1.0), (1.0, 2.0)]


@needs_ffmpeg
def test_timeline_times_are_presentation_timestamps(tmp_path):
    """Variable frame rate: 40 frames, the first 20 at 8 fps (0–2.5 s), the rest at 1 fps (2.5–22.5 s).
    frame / average fps (40 / 22.5 s = 1.78 fps, what OpenCV 5 reports; OpenCV 4.8 says 8) would put frame 20 at
    11.25 s (or 2.5 s and frame 39 at 4.9 s instead of 21.5 s)."""
    vfr = tmp_path / "vfr.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v", "40",
           "-vf", "setpts='if(lt(N,20),N/8,2.5+(N-20))/TB'", "-fps_mode", "vfr", "-c:v", "mpeg4", vfr)
    s = Sampling(frames=4, size=32, rate=0, temporal_views=1)
    wins = list(decode_windows(vfr, s, window=2.5, stride=2.5))
    # [0, 2.5): the 20 frames at 8 fps; then one frame a second (the frame on screen at each start counts)
    assert [(w.start, w.end, w.frames) for w in wins] == [
        (0.0, 2.5, 20), (2.5, 5.0, 3), (5.0, 7.5, 3), (7.5, 10.0, 3), (10.0, 12.5, 3), (12.5, 15.0, 3),
        (15.0, 17.5, 3), (17.5, 20.0, 3), (20.0, 22.5, 3)]
    rgb = all_frames(vfr)
    assert_same(wins[0].clips, to_pixels(official_eval(rgb[:20], s)))
    assert_same(wins[1].clips, to_pixels(official_eval(rgb[20:23], s)))  # frames at 2.5, 3.5, 4.5 s


@needs_ffmpeg
def test_timeline_windows_in_a_gap_are_skipped_not_invented(tmp_path):
    """Issue 29 kind 4, a variable-frame-rate file with a gap: 60 frames at 30 fps (0-2 s), then nothing until
    600 s, then 30 frames (600-601 s). --window 1: the 598 windows that hold no frame of their own were each
    classified from the frame left on screen (601 windows, the work growing with the duration); they are skipped
    and the next window's note says how many and where."""
    vfr = tmp_path / "gap.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=30", "-frames:v", "90",
           "-vf", "setpts='if(lt(N,60),N/30,600+(N-60)/30)/TB'", "-fps_mode", "vfr", "-c:v", "mpeg4", vfr)
    s = Sampling(frames=4, size=32, rate=0, temporal_views=1)
    wins = list(decode_windows(vfr, s, window=1.0, stride=1.0))
    assert [(w.start, w.end, w.frames) for w in wins] == [(0.0, 1.0, 30), (1.0, 2.0, 30), (600.0, 601.0, 30)]
    assert wins[2].notes[0] == ("598 windows from 2 to 600 s skipped: no frame starts in them (the frame shown "
                                "from 1.967 s is the video's only picture there)")
    assert not wins[0].notes and not wins[1].notes
    rgb = all_frames(vfr)
    assert_same(wins[2].clips, to_pixels(official_eval(rgb[60:], s)))


def test_special_files_are_refused_before_the_decoder(tmp_path, make_video):
    """Nothing but a regular, readable file with a UTF-8 name reaches OpenCV (which blocks forever on a FIFO
    and crashes on a non-UTF-8 name); each gets its own message naming the fix."""
    s = Sampling(size=32)
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    empty_dir = tmp_path / "x.mp4"
    empty_dir.mkdir()
    good = make_video("good.mp4", frames=10)
    bad_name = os.fsdecode(tmp_path.as_posix().encode() + b"/caf\xe9.mp4")
    os.rename(good, bad_name)
    (tmp_path / "zero.mp4").write_bytes(b"")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.mp4"))
    cases = {
        fifo: "pipe.mp4: is a FIFO (named pipe), not a regular file",
        empty_dir: "x.mp4: is a directory, not a video, and holds no video files",
        bad_name: "caf\\xe9.mp4: the file name is not valid UTF-8",
        tmp_path / "zero.mp4": "zero.mp4: empty file (0 bytes)",
        tmp_path / "sock.mp4": "sock.mp4: is a socket, not a regular file",
        "/dev/null": "/dev/null: is a character device, not a regular file",
    }
    for path, msg in cases.items():
        with pytest.raises(VideoError) as e:
            decode(path, s)
        assert msg in str(e.value) and "\n" not in str(e.value), (path, str(e.value))
        str(e.value).encode("utf-8")  # printable: no lone surrogates
    sock.close()
    # a file whose name FFmpeg would read as a protocol (stdin) is handed to it as an absolute path
    odd = tmp_path / "pipe:0"
    make_video("odd.mp4", frames=3).rename(odd)
    rel = os.path.relpath(odd)
    assert video.check_source(rel) == str(odd) and decode(rel, s).frames == 3


def without_root_powers(*cmd) -> list[str]:
    """`cmd` as root without the capabilities that let root read any file (tests run as root)."""
    if os.geteuid() != 0:
        return list(cmd)
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): cannot make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]


def test_unreadable_file_is_named(tmp_path, make_video):
    path = make_video("locked.mp4", frames=5)
    path.chmod(0)
    code = ("import sys; from stexport.runtime.video import check_source, VideoError\n"
            "try: check_source(sys.argv[1])\nexcept VideoError as e: print(e)")
    r = subprocess.run(without_root_powers(sys.executable, "-c", code, str(path)), capture_output=True,
                       text=True, timeout=120)
    assert f"{path}: permission denied: the file cannot be read; `chmod a+r` it" in r.stdout, r.stdout + r.stderr


@needs_ffmpeg
def test_codec_this_opencv_cannot_decode_is_named(tmp_path, make_video):
    av1 = tmp_path / "av1.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v", "10", "-c:v", "libaom-av1",
           "-cpu-used", "8", av1)
    try:
        d = decode(av1, Sampling(size=32))
    except VideoError as e:
        assert str(e).startswith(f"{av1}: no decodable video frames: its video is AV1 ('AV01'), which the FFmpeg "
                                 "inside this OpenCV build cannot decode; re-encode it (ffmpeg -i FILE -c:v libx264")
    else:  # an OpenCV build with an AV1 decoder: then it must decode all of it
        assert d.frames == 10
    avi = make_video("z.avi", frames=20).read_bytes()
    empty = tmp_path / "empty.avi"
    empty.write_bytes(avi[: avi.find(b"movi") + 4])
    with pytest.raises(VideoError, match=r"no decodable video frames \(codec 'MJPG', the header claims 20 frames\): "
                       r"the video data is missing or damaged"):
        decode(empty, Sampling(size=32))


def test_clip_lists_take_videos_and_refuse_what_is_not_text(tmp_path, make_video):
    a = make_video("a.mp4", frames=2)
    assert read_clip_list(a) == [(a, None)]
    assert video.read_clip_lists([a, tmp_path]) == [(a, None), (a, None)]
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a.mp4 1\ncaf\xe9.mp4 2\n".encode("latin-1"))
    with pytest.raises(StexportError, match=r"latin1.txt: line 2 is not UTF-8 text \(byte 0xe9\); save the list "
                       r"as UTF-8, e.g. `iconv -f latin1 -t utf-8"):
        read_clip_list(latin)
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(StexportError, match="weights.bin: binary data, not a clip list"):
        read_clip_list(blob)


def test_clip_list_lines_as_other_tools_write_them(tmp_path):
    """New-user findings: a quoted path, a comma before the label, a file:// URL, mmaction's '<video> <frames>
    <label>', a UTF-16 list (Windows Notepad's "Unicode") are read; a negative label, a URL and a class name are
    refused naming the line, and with `problems` the other lines still come back."""
    (tmp_path / "v").mkdir()
    for name in ("a.mp4", "my clip.mp4", "c,d.mp4"):
        (tmp_path / "v" / name).write_bytes(b"x")
    v = tmp_path / "v"
    lst = tmp_path / "l.txt"
    text = (f'"v/my clip.mp4" 3\nv/a.mp4,4\nfile://{v}/my%20clip.mp4 5\nv/a.mp4 120 6\nv/c,d.mp4 7\n'
            "'v/my clip.mp4'\n")
    want = [(v / "my clip.mp4", 3), (v / "a.mp4", 4), (v / "my clip.mp4", 5), (v / "a.mp4", 6), (v / "c,d.mp4", 7),
            (v / "my clip.mp4", None)]
    lst.write_text(text)
    assert read_clip_list(lst) == want
    assert video.is_clip_list(lst)
    lst.write_bytes(text.encode("utf-16"))
    assert read_clip_list(lst) == want
    lst.write_text("v/a.mp4 -1\n")
    with pytest.raises(StexportError, match=r"l.txt: line 1: label -1 is negative; labels are class numbers from 0"):
        read_clip_list(lst)
    lst.write_text("v/a.mp4 1\nhttps://x/y.mp4\nv/a.mp4,static\nv/a.mp4 2\n")
    problems: list = []
    assert read_clip_list(lst, problems) == [(v / "a.mp4", 1), (v / "a.mp4", 2)]
    assert [(where, msg.split(" is ")[0].split(":")[0:2]) for where, msg in problems] == [
        (str(lst), [str(lst), " line 2"]), (str(lst), [str(lst), " line 3"])]


def test_cv2_without_utils_logging_still_decodes(make_video, monkeypatch):
    """opencv-python-headless 4.11.0.86 has no cv2.utils.logging: decoding must not depend on it."""
    monkeypatch.delattr(cv2.utils, "logging", raising=False)  # OpenCV 4.8 has none either
    d = decode(make_video("c.mp4", frames=9), Sampling(frames=4, size=32, rate=0, temporal_views=1))
    assert d.frames == 9


def test_pixel_limits_are_written_in_units_that_read(make_video):
    """--max-pixels 1000 said "0 megapixels" for both the frame and the limit (new-user finding)."""
    path = make_video("small.avi", frames=2, width=96, height=72)
    with pytest.raises(video.VideoError, match=r"small.avi: its frames are 96x72 \(6,912 pixels\), over the "
                                               r"decoder's limit of 1,000 pixels \(--max-pixels\)"):
        video.open_capture(path, max_pixels=1000)
    assert [video.pixels(n) for n in (1, 999_999, 1_000_000, 2_073_600, 63_999_999)] == [
        "1 pixel", "999,999 pixels", "1 megapixels", "2.07 megapixels", "64 megapixels"]


def test_window_plan_tail_rule():
    """The end-aligned last window replaces a window that would start inside the video and run past its end;
    a gap the user chose (stride longer than window) stays a gap; the note's figures are the tail it adds and
    its real overlap (cases a new user met: --window 7 --stride 10, --window 0.07 --stride 29.95)."""
    from stexport.runtime.video import _plan

    times = [i / 30 for i in range(900)]  # 30 s at 30 fps

    def spans(window, stride):
        plan = _plan(times, 30.0, window, stride)
        return [(round(float(a), 3), round(float(b), 3)) for a, b, *_ in plan], plan[-1][4]

    assert spans(7, 10) == ([(0, 7), (10, 17), (20, 27)], None)
    assert spans(1, 0.5)[0][-1] == (29.0, 30.0) and spans(1, 0.5)[1] is None  # fits exactly: nothing added
    got, note = spans(0.07, 29.95)
    assert got == [(0, 0.07), (29.93, 30.0)]
    assert note == "the last window (29.93-30 s) is aligned to the end of the video so that its last 0.05 s are " \
                   "classified too"
    got, note = spans(4, 4)
    assert got[-2:] == [(24, 28), (26.0, 30.0)]
    assert note.endswith("its last 2 s are classified too, overlapping the one before by 2 s")
    # a gap in the file: skipped windows are counted on the next window (here the end-aligned one), and the
    # plan jumps over them (50 frames 10,000 s apart with 1 s windows: 50 windows, not 490,000)
    gap = [i / 30 for i in range(300)] + [500.0, 500.0 + 1 / 30]
    plan = _plan(gap, 30.0, 2, 1)
    assert [(round(float(a), 3), round(float(b), 3)) for a, b, *_ in plan][-3:] == [
        (8, 10), (9, 11), (498.067, 500.067)]
    assert plan[-1][4] == ("489 windows from 10 to 500 s skipped: no frame starts in them (the frame shown from "
                           "9.967 s is the video's only picture there); the last window (498.067-500.067 s) is "
                           "aligned to the end of the video so that its last 1.07 s are classified too")
    assert plan[-1][2:4] == (300, 2)  # the end-aligned window reaches into the gap: only its own two frames
    # new-user cases: a window reaching back over a gap holds no frame from before it (8 frames after a 8 s gap,
    # not 8 + the one shown since 1.967 s), and a timestamp rounding's sliver (a 30 fps MKV's millisecond
    # times) adds no extra end-aligned window
    rb = [i / 30 for i in range(60)] + [10 + i / 30 for i in range(8)]
    assert [(round(float(a), 3), lo, count) for a, _, lo, count, _ in _plan(rb, 30.0, 1, 1)] == [
        (0, 0, 30), (1, 30, 30), (9.267, 60, 8)]
    mkv = [round(i / 30, 3) for i in range(300)]
    assert [(a, b) for a, b, *_ in _plan(mkv, 30.0, 2, 2)] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert _plan([i * 1e6 for i in range(8)], None, 2e6, 2e6)[-1][4] is None
    # a window of fewer frames than a clip samples says so, as a whole file does (new-user finding)
    plan, *_ = video._window_plan([i / 30 for i in range(30)], 30.0, Sampling(frames=8, size=32), 0.1, 0.1)
    assert plan[0][4] == ["only 3 frames, fewer than the 8 a clip needs; frames repeat"]
    sparse = _plan([i / 30 for i in range(60)] + [2 + 10_000.0 * i for i in range(50)], None, 1, 1)
    assert len(sparse) == 2 + 50 and sparse[-1][4] == (
        "9999 windows from 480003 to 490002 s skipped: no frame starts in them (the frame shown from 480002 s is "
        "the video's only picture there); 9999 windows from 490003 to 500002 s skipped: no frame starts in them "
        "(the frame shown from 490002 s is the video's only picture there)")


def test_clip_lists_as_people_write_them(tmp_path):
    """Comments after a label, class names where indices go (one error naming the line and the fix), hidden
    files in directories (macOS's '._x.mp4') left out (new-user findings, issue 29 kind 5)."""
    from stexport.errors import StexportError
    from stexport.runtime.video import read_clip_list

    (tmp_path / "v1.mp4").write_bytes(b"x")
    (tmp_path / "my clip.mp4").write_bytes(b"x")
    lst = tmp_path / "list.txt"
    lst.write_text("v1.mp4\t1  # second\nmy clip.mp4 # no label\n# whole line\n\n")
    assert read_clip_list(lst) == [(tmp_path / "v1.mp4", 1), (tmp_path / "my clip.mp4", None)]
    lst.write_text("v1.mp4 1\nv1.mp4 static\n")
    with pytest.raises(StexportError, match=r"line 2: label 'static' is not a class index; .* e.g. 'v1.mp4 0'"):
        read_clip_list(lst)
    (tmp_path / "._v1.mp4").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "v9.mp4").write_bytes(b"x")
    assert [f.name for f, _ in read_clip_list(tmp_path)] == ["my clip.mp4", "v1.mp4"]
