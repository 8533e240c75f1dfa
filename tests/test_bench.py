"""`stexport bench` smoke run on a tiny bundle; the FLOP count against a hand count and torch's counter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import installed_runtimes
from stexport.cli.app import app
from typer.testing import CliRunner

from stexport.runtime.bench import clip_flops, compute_precision, model_flops, summarize, time_runner

FRAMES = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from stexport.build.backbone import random_backbone
    from stexport.build.pipeline import build_bundle
    from stexport.build.synthetic import random_deltas

    bb = random_backbone("stexport-tiny-vit")
    sd = random_deltas(bb.config, width=32, num_classes=10, pre_attn=True)
    return build_bundle(sd, backbone=bb, precision="fp32", frames=FRAMES,
                        out=tmp_path_factory.mktemp("bench") / "tiny")


def test_flops_hand_count(tiny):
    # stexport-tiny-vit: 32 px, patch 8 -> N = 16 patches, L = 17 tokens; width D = 64, MLP 256, 2 layers;
    # adapters before attention and MLP in both layers (4), bottleneck 32, kernel 3x1x1; 10 classes; T = 4.
    hand = {
        "patch_embed": 2 * 4 * 16 * (3 * 8 * 8) * 64,
        "qkv": 2 * (2 * 4 * 17 * 64 * 192),
        "attn_scores": 2 * (2 * 4 * 17 * 17 * 64),
        "attn_values": 2 * (2 * 4 * 17 * 17 * 64),
        "attn_out": 2 * (2 * 4 * 17 * 64 * 64),
        "mlp": 2 * (2 * 2 * 4 * 17 * 64 * 256),
        "adapter_fc": 4 * (2 * 2 * 4 * 16 * 64 * 32),
        "adapter_conv": 4 * (2 * 4 * 16 * 32 * 3),
        "head": 2 * 64 * 10,
    }
    f = model_flops(tiny.manifest)
    assert f["parts"] == hand
    assert f["total"] == sum(hand.values()) == 17_681_664
    assert f["quantizable"] == hand["qkv"] + hand["attn_out"] + hand["mlp"] + hand["adapter_fc"]
    scores = model_flops(tiny.manifest.with_(calibration={"method": "minmax", "clips": 1,
                                                           "attention_scores_int8": True}))
    assert scores["quantizable"] == f["quantizable"] + hand["attn_scores"] and scores["total"] == f["total"]


@pytest.mark.parametrize("kernel", [(3, 1, 1), (3, 3, 3)])
def test_flops_match_torch_counter(kernel):
    """Independent check: torch's FlopCounterMode on the reference model counts the same GEMM/conv FLOPs."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from stexport.build.backbone import random_backbone
    from stexport.build.deltas import Deltas, infer_spec
    from stexport.build.reference import build_reference
    from stexport.build.synthetic import random_deltas

    bb = random_backbone("stexport-demo-vit")
    sd = random_deltas(bb.config, width=48, kernel=kernel, num_classes=7, pre_attn=True, blocks=[0, 2])
    spec = infer_spec(sd, "test")
    model = build_reference(bb, Deltas(spec=spec, state_dict=sd))
    x = torch.zeros(1, 3, 8, 96, 96)
    # the math kernel: the counter has no formula for the CPU flash-attention op, it does for matmuls
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    ours = clip_flops(bb.config.to_dict(), spec.to_dict(), frames=8, size=96)
    assert ours["total"] == counter.get_total_flops()


def test_summary_roofline_arithmetic():
    flops = {"total": 300e9, "quantizable": 280e9, "parts": {}}
    peaks = {"int8": {"gflops": 700.0}, "fp32": {"gflops": 175.0}, "bf16": {"gflops": 350.0}}
    res = {"latency_ms": {"p50": 500.0}, "throughput": {"clips_per_s": 2.0, "batch": 4},
           "described": {"precision": "int8", "inference_precision": "f32"}}
    s = summarize(res, flops, peaks, "int8")
    assert s["compute_precision"] == "int8"
    assert s["achieved_gflops"]["throughput"] == pytest.approx(600.0)
    assert s["fraction_of_peak"]["throughput"] == pytest.approx(600 / 700)
    roof_s = 280 / 700 + 20 / 175  # quantized GEMMs at the int8 rate, the rest at the fp32 rate
    assert s["roofline_clips_per_s"] == pytest.approx(1 / roof_s)
    assert s["fraction_of_roofline"]["latency"] == pytest.approx(2.0 * roof_s)
    assert compute_precision("fp32", {"precision": "fp32", "compute_precision": "bf16"}) == ("bf16", "bf16")
    assert compute_precision("fp16", {"precision": "fp16", "compute_precision": "fp16"}) == ("fp32", "fp32")
    assert compute_precision("int8", {"precision": "int8", "compute_precision": "bf16"}) == ("int8", "bf16")


def test_time_runner_percentiles():
    calls = []
    res = time_runner(lambda x: calls.append(len(x)), lambda b: np.zeros((b, 1)), batches=(1, 3), iters=4,
                      warmup=1)
    assert calls == [1] * 5 + [3] * 5
    lat = res["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert res["throughput"]["batch"] == 3 and res["throughput"]["clips_per_s"] > 0


def test_time_runner_keeps_the_first_call_apart(monkeypatch):
    """By construction, not by the host's speed: the runner reads a clock that only the fake backend moves
    (1 ms per clip, plus 5 s on its first call per batch size, as a backend compiling per shape)."""
    import types

    from stexport.runtime import bench

    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    seen = set()

    def slow_first(x):
        clock[0] += 0.001 * len(x)
        if len(x) not in seen:
            seen.add(len(x))
            clock[0] += 5.0

    res = time_runner(slow_first, lambda b: np.zeros((b, 1)), batches=(1, 2), iters=3, warmup=2)
    for b, r in res["batches"].items():
        assert r["first_call_s"] == pytest.approx(5.0 + 0.001 * int(b)), b
        assert r["iters"] == 3 and r["ms_per_clip"]["p99"] == pytest.approx(1.0), b  # the 5 s stays out
    assert time_runner(slow_first, lambda b: np.zeros((b, 1)), batches=(4,), iters=1,
                       warmup=0)["batches"]["4"]["first_call_s"] is None


def test_bench_cli_json(tiny):
    r = CliRunner().invoke(app, ["bench", str(tiny.path), "--backend", "onnxruntime", "--batch", "1,2",
                                 "--iters", "2", "--warmup", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["backend"] == "onnxruntime" and out["precision"] == "fp32"
    assert set(out["batches"]) == {"1", "2"} and out["batches"]["2"]["iters"] == 2
    assert 0 < out["latency_ms"]["p50"] <= out["latency_ms"]["p99"]
    assert out["throughput"]["batch"] == 2 and out["throughput"]["clips_per_s"] > 0
    assert out["rss_before_mb"] > 0 and out["peak_rss_mb"] >= out["rss_before_mb"]
    assert "only this measurement" in out["memory_method"]
    assert out["flops"]["total"] == model_flops(tiny.manifest)["total"]
    assert out["gflop_per_clip"] == pytest.approx(out["flops"]["total"] / 1e9)
    assert out["compute_precision"] == "fp32" and out["gemm_peaks"]["fp32"]["gflops"] > 1
    assert out["fraction_of_peak"]["throughput"] == pytest.approx(
        out["achieved_gflops"]["throughput"] / out["gemm_peaks"]["fp32"]["gflops"])
    assert out["machine"]["cpus"] >= 1


def test_bench_cli_text_and_errors(tiny):
    if not installed_runtimes("openvino"):
        pytest.skip("OpenVINO is installed on x86-64 only")
    r = CliRunner().invoke(app, ["bench", str(tiny.path), "--backend", "openvino", "--option", "precision=f32",
                                 "--batch", "1", "--iters", "2", "--no-peaks"])
    assert r.exit_code == 0, r.output
    assert "p50" in r.output and "peak RSS" in r.output and "GFLOP per clip" in r.output
    r = CliRunner().invoke(app, ["bench", str(tiny.path), "--batch", "0,x"])
    assert r.exit_code == 2 and "--batch" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["bench", str(tiny.path), "--option", "precision"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = CliRunner().invoke(app, ["bench", str(tiny.path), "--backend", "openvino", "--option", "hint=fast",
                                 "--iters", "1", "--no-peaks"])
    assert r.exit_code == 2 and "hint='fast': choose one of latency, throughput" in r.output


# --- long work says so (issue 30, kind 5): defaults sized for the machine, progress with an estimate ---------

def test_default_batches_are_sized_for_the_machine(monkeypatch):
    import stexport.runtime.device as device
    from stexport.runtime import bench

    monkeypatch.setattr(device, "gpu_visible", lambda: False)
    for cpus, big in ((1, 4), (2, 8), (4, 16), (8, 32), (64, 32)):
        monkeypatch.setattr(bench.os, "cpu_count", lambda cpus=cpus: cpus)
        assert bench.default_batches() == (1, big)
    monkeypatch.setattr(device, "gpu_visible", lambda: True)
    assert bench.default_batches() == (1, 32)


def test_timed_calls_fill_the_budget_within_bounds():
    from stexport.runtime.bench import AUTO_BUDGET_S, calls

    assert AUTO_BUDGET_S == 10.0
    assert calls(None, 8, None) == 10  # not yet known: the most
    assert calls(None, 1, 0.28) == 10 and calls(None, 8, 2.3) == 4 and calls(None, 32, 9.0) == 3
    assert calls(7, 8, 2.3) == 7 and calls({"8": 5}, 8) == 5


def test_progress_counts_clips_warm_up_included_and_resizes_the_total(monkeypatch):
    from stexport.runtime import bench

    from types import SimpleNamespace

    clock = [0.0]  # a call takes 0.05 s per clip on this clock

    def run(x):
        clock[0] += 0.05 * len(x)

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "AUTO_BUDGET_S", 0.21)
    seen = []
    res = time_runner(run, lambda b: np.zeros((b, 1)), batches=(1, 2), iters=None, warmup=2,
                      progress=lambda clips, total, what: seen.append((clips, total, what)))
    assert [b["iters"] for b in res["batches"].values()] == [4, 3]  # 0.21 s / 0.05 s; 0.21 / 0.1 -> at least 3
    assert sum(c for c, _, _ in seen) == seen[-1][1] == (2 + 4) * 1 + (2 + 3) * 2
    assert seen[0] == (1, (2 + 10) * 1 + (2 + 10) * 2, "batch 1 warm-up") and seen[-1][2] == "batch 2"


def test_bench_on_a_terminal_shows_progress_and_time_left(tiny):
    import os
    import pty
    import subprocess
    import sys

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # tqdm draws nothing at 0 columns
    p = subprocess.Popen([sys.executable, "-m", "stexport.cli.app", "bench", str(tiny.path), "-b", "onnxruntime",
                          "--no-peaks", "--batch", "1,2", "--warmup", "1"], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out, _ = p.communicate(timeout=300)
    os.close(master)
    text = err.decode(errors="replace")
    assert p.returncode == 0, text
    assert "bench onnxruntime" in text and "clip/s" in text and "batch 2" in text, text
    assert "<" in text  # tqdm's elapsed<remaining estimate
    assert "p50" in out.decode()
