"""Streaming calibration (calibration.ranges, calibration.quantize.collect): the in-graph statistics give the
same ranges as whole tensors did, and the memory a calibration run holds does not grow with the clips."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
import torch
from conftest import smooth_clips, trained_like
from stexport.calibration import RangeCollector, choose, smooth
from stexport.calibration.qdq import quant_targets
from stexport.calibration.quantize import collect

from stexport.build.backbone import random_backbone
from stexport.build.deltas import Deltas, infer_spec
from stexport.build.export import export_onnx
from stexport.build.fold import fold
from stexport.build.reference import build_reference
from stexport.build.synthetic import random_deltas
from stexport.bundle.manifest import InputRecord
from stexport.runtime.video import Sampling

SAMPLING = Sampling(frames=8, size=32, rate=0, temporal_views=1, spatial_views=1)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """The tiny model's FP32 graph, its quantized layers' activation tensors and the migration sites' ones."""
    bb = trained_like(random_backbone("stexport-tiny-vit"))
    sd = random_deltas(bb.config, width=32, num_classes=10, pre_attn=True, pre_mlp=True)
    path = tmp_path_factory.mktemp("calib") / "model.onnx"
    export_onnx(fold(build_reference(bb, Deltas(infer_spec(sd), sd)), "uint8", torch.float32), path, 8)
    proto = onnx.load(str(path))
    targets = quant_targets(proto)
    inits = {t.name for t in proto.graph.initializer}
    tensors = sorted({t for n in targets for t in n.input[:2] if t not in inits})
    channels = {site.tensor for site in smooth.sites(proto, [n.name for n in targets])}
    assert channels and len(tensors) > len(channels)
    return proto, tensors, channels


def whole_tensors(proto, tensors, clips, method, channels):
    """The old path: every tensor an output of the graph, its statistics computed from the arrays."""
    import onnxruntime as ort

    aug = onnx.ModelProto()
    aug.CopyFrom(proto)
    aug.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    ranges = RangeCollector(method, channels=channels)
    for clip in clips:
        outs = s.run(None, {"frames": clip[None]})
        ranges.add({n: o for n, o in zip(names, outs) if n in tensors})
    return ranges.amax(), ranges.channel_range


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_streamed_ranges_equal_whole_tensor_ranges(graph, method):
    proto, tensors, channels = graph
    clips = smooth_clips(5, 32, seed=4)
    before = proto.SerializeToString(deterministic=True)
    amax, per_channel, _ = collect(proto, tensors, choose(clips, 5), SAMPLING, method,
                                   InputRecord(frames=8, size=32), channels=channels)
    assert proto.SerializeToString(deterministic=True) == before  # the graph is left as it came
    old_amax, old_channels = whole_tensors(proto, tensors, clips, method, channels)
    assert amax == old_amax and set(amax) == set(tensors)  # bit-equal thresholds
    assert set(per_channel) == channels
    for t in channels:
        np.testing.assert_array_equal(per_channel[t][0], old_channels[t][0])
        np.testing.assert_array_equal(per_channel[t][1], old_channels[t][1])


def test_calibration_memory_does_not_grow_with_clips(graph):
    """Python-side allocations (numpy arrays included) of collect() over 8 and over 32 clips, side by side:
    the peak is the same, and far below one clip's activations (what the graph's outputs used to hold)."""
    proto, tensors, channels = graph
    clips = smooth_clips(32, 32, seed=5)
    spec = InputRecord(frames=8, size=32)
    collect(proto, tensors, choose(clips[:2], 2), SAMPLING, "minmax", spec, channels=channels)  # warm-up
    peaks = {}
    for n in (8, 32):
        tracemalloc.start()
        collect(proto, tensors, choose(clips[:n], n), SAMPLING, "minmax", spec, channels=channels)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    one_clip = sum(a.nbytes for a in _activations(proto, tensors, clips[0]))
    assert peaks[32] < 1.1 * peaks[8], peaks
    assert peaks[8] - proto.ByteSize() < one_clip, (peaks, one_clip, proto.ByteSize())


def _activations(proto, tensors, clip):
    import onnxruntime as ort

    aug = onnx.ModelProto()
    aug.CopyFrom(proto)
    aug.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    return ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        tensors, {"frames": clip[None]})
