"""TensorRT engines: profiles, the engine record and cache, the compatibility decision, graceful absence, the
fallback to ONNX Runtime, the API names used, and (where TensorRT and a GPU exist) real FP16 / INT8 builds.

TensorRT cannot be installed on this project's machines. The tests marked `tensorrt` run only where it can.
Several CPU tests below drive the TensorRT-facing code with FakeTensorRT / FakeCuda: FAKES that record what
stexport asks of TensorRT and CUDA and compute nothing real. They check control flow only (flags, call order,
buffers, atomic writes); they say nothing about whether TensorRT builds or runs the graph.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from stexport.trt_engines import record as rec_mod
from stexport.trt_engines.build import strongly_typed_flags
from stexport.trt_engines.trt import version_major
from stexport.trt_engines.cache import onnx_identity, records, write_atomic
from stexport.trt_engines.engine import ensure_engine
from stexport.trt_engines.record import (
    Host,
    choose,
    engine_key,
    input_shape,
    make_record,
    mismatches,
    profile_for,
    replaces,
    settings,
    timing_cache_file,
)
from stexport.trt_engines.runtime import engine_input, io_names, spans

from stexport.bundle.store import Bundle
from stexport.errors import StexportError
from stexport.bundle.manifest import InputRecord

DATA = Path(__file__).parent / "data"
H100 = Host("10.16.1.11", "NVIDIA H100 80GB HBM3", "9.0")
INPUT = InputRecord(name="frames", dtype="uint8", layout="BTHWC", frames=8, size=224)
MANIFEST = INPUT  # profiles are made from the manifest's input record


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one tiny real bundle (ONNX Runtime runs it), copied per test.

@pytest.fixture(scope="module")
def tiny_bundle_src(tmp_path_factory):
    from stexport.build.backbone import random_backbone
    from stexport.build.pipeline import build_bundle
    from stexport.build.synthetic import random_deltas

    bb = random_backbone("stexport-tiny-vit")
    sd = random_deltas(bb.config, width=16, num_classes=5)
    out = tmp_path_factory.mktemp("trt") / "tiny-fp16"
    build_bundle(sd, backbone=bb, precision="fp16", frames=4, out=out)
    return out


@pytest.fixture
def bundle(tiny_bundle_src, tmp_path) -> Bundle:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_src, dst)
    return Bundle.load(dst)


# ---------------------------------------------------------------------------------------------------------
# Profiles, keys, records, the compatibility decision (pure functions).

def test_profile_over_batch_axis_only():
    p = profile_for(MANIFEST)
    assert p == {"input": "frames", "min": [1, 8, 224, 224, 3], "opt": [32, 8, 224, 224, 3],
                 "max": [32, 8, 224, 224, 3], "index": None}
    assert profile_for(MANIFEST, 4)["opt"][0] == profile_for(MANIFEST, 4)["max"][0] == 4
    float_in = InputRecord(name="x", dtype="float32", layout="BTCHW", frames=8, size=224)
    assert profile_for(float_in, 2) == {"input": "x", "min": [1, 8, 3, 224, 224], "opt": [2, 8, 3, 224, 224],
                                        "max": [2, 8, 3, 224, 224], "index": None}
    assert input_shape(float_in) == (8, 3, 224, 224)
    for bad in (0, -1, 1025):
        with pytest.raises(StexportError, match="--batch"):
            profile_for(MANIFEST, bad)
    with pytest.raises(ValueError, match="layout"):  # the manifest record refuses other layouts
        InputRecord(layout="BHWC", frames=8, size=224)


def test_settings_merge_explicit_saved_and_defaults():
    assert settings(None) == {"batch": 32, "workspace_gb": None, "opt_level": 3}
    saved = {"batch": 8, "workspace_gb": 2.0, "opt_level": 5}
    assert settings(saved) == saved
    assert settings(saved, batch=16, opt_level=0) == {"batch": 16, "workspace_gb": 2.0, "opt_level": 0}
    with pytest.raises(StexportError, match="--opt-level"):
        settings(None, opt_level=6)
    with pytest.raises(StexportError, match="--workspace-gb"):
        settings(None, workspace_gb=0)


def test_cache_key_depends_on_what_validity_depends_on():
    onnx, prof = {"sha256": "a" * 64}, profile_for(MANIFEST)
    key = engine_key(H100, onnx, prof, "fp16")
    assert key == engine_key(Host(*vars(H100).values()), dict(onnx), dict(prof), "fp16")  # stable
    variants = [
        engine_key(Host("10.16.1.12", H100.gpu, H100.capability), onnx, prof, "fp16"),
        engine_key(Host(H100.tensorrt, "NVIDIA A100-SXM4-80GB", "8.0"), onnx, prof, "fp16"),
        engine_key(Host(H100.tensorrt, H100.gpu, "9.1"), onnx, prof, "fp16"),
        engine_key(H100, {"sha256": "b" * 64}, prof, "fp16"),
        engine_key(H100, {**onnx, "data_sha256": "c" * 64}, prof, "fp16"),
        engine_key(H100, onnx, profile_for(MANIFEST, 8), "fp16"),
        engine_key(H100, onnx, prof, "int8"),
    ]
    assert len({key, *variants}) == 1 + len(variants)
    # build options are recorded but do not change which engine is valid
    a = make_record(H100, onnx, prof, "fp16", workspace_gb=None, opt_level=3, seconds=1, size=10)
    b = make_record(H100, onnx, prof, "fp16", workspace_gb=8, opt_level=5, seconds=2, size=11)
    assert a["key"] == b["key"] == key and a["file"] == f"engines/{key}.engine"


def test_compatibility_decision_names_every_mismatch():
    onnx = {"sha256": "a" * 64}
    r = make_record(H100, onnx, profile_for(MANIFEST), "fp16", workspace_gb=None, opt_level=3, seconds=1,
                    size=1)
    assert mismatches(r, H100, onnx) == []
    other = Host("10.3.0.26", "NVIDIA A100-SXM4-80GB", "8.0")
    why = mismatches(r, other, {"sha256": "b" * 64})
    assert len(why) == 3
    assert "TensorRT 10.16.1.11, this host has 10.3.0.26" in why[0]
    assert "NVIDIA H100 80GB HBM3 (compute 9.0), this host has NVIDIA A100-SXM4-80GB (compute 8.0)" in why[1]
    assert "another ONNX model" in why[2]
    # same GPU name, other compute capability (e.g. a MIG/driver report change) is still a mismatch
    assert mismatches(r, Host(H100.tensorrt, H100.gpu, "8.9"), onnx)

    chosen, reason = choose([r], other, onnx)
    assert chosen is None and reason.startswith("its engine was built with TensorRT 10.16.1.11")
    assert choose([], H100, onnx) == (None, "the bundle has no TensorRT engine yet")


def test_choose_prefers_the_smallest_engine_covering_the_batch():
    onnx = {"sha256": "a" * 64}

    def rec(batch, host=H100):
        return make_record(host, onnx, profile_for(MANIFEST, batch), "fp16", workspace_gb=None, opt_level=3,
                           seconds=1, size=1)

    small, big, foreign = rec(4), rec(32), rec(64, Host("10.3.0.26", "NVIDIA A100", "8.0"))
    recs = [big, small, foreign]
    assert choose(recs, H100, onnx, batch=2)[0] is small
    assert choose(recs, H100, onnx, batch=16)[0] is big
    best, note = choose(recs, H100, onnx, batch=100)  # nothing covers 100: the largest, run in chunks
    assert best is big and "chunks" in note
    assert choose(recs, H100, onnx)[0] is big


def test_a_new_engine_replaces_only_what_it_makes_useless():
    onnx = {"sha256": "a" * 64}
    new = make_record(H100, onnx, profile_for(MANIFEST), "fp16", workspace_gb=None, opt_level=3, seconds=1,
                      size=1)
    same = dict(new, tensorrt=H100.tensorrt)
    old_trt = make_record(Host("10.15.0.0", H100.gpu, "9.0"), onnx, profile_for(MANIFEST), "fp16",
                          workspace_gb=None, opt_level=3, seconds=1, size=1)
    other_batch = make_record(H100, onnx, profile_for(MANIFEST, 4), "fp16", workspace_gb=None, opt_level=3,
                              seconds=1, size=1)
    stale_onnx = make_record(H100, {"sha256": "z" * 64}, profile_for(MANIFEST, 4), "fp16", workspace_gb=None,
                             opt_level=3, seconds=1, size=1)
    assert replaces(same, new) and replaces(stale_onnx, new)
    assert not replaces(old_trt, new)  # another TensorRT install (venv, host) may still use it
    assert not replaces(other_batch, new)


def test_timing_cache_is_per_gpu_and_tensorrt_version():
    a = timing_cache_file(H100)
    assert a.startswith("engines/timing-") and a.endswith(".cache") and " " not in a
    assert a != timing_cache_file(Host("10.16.1.12", H100.gpu, "9.0"))
    assert a != timing_cache_file(Host(H100.tensorrt, "NVIDIA L4", "8.9"))


def test_network_flags_strongly_typed_on_10_and_11():
    assert strongly_typed_flags(10, 1) == 2
    assert strongly_typed_flags(11, 0) == 1  # 11 still accepts the (ignored) flag
    assert strongly_typed_flags(11, None) == 0  # a later 11.x without the flag: always strongly typed anyway
    with pytest.raises(StexportError, match="strongly typed"):
        strongly_typed_flags(10, None)
    assert version_major("10.16.1.11") == 10 and version_major("11.4.0.106") == 11 and version_major("x") == 0


def test_runtime_helpers():
    assert spans(0, 4) == [] and spans(5, 4) == [(0, 4), (4, 5)] and spans(8, 4) == [(0, 4), (4, 8)]
    clips = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    u8 = InputRecord(frames=3, size=8)
    assert engine_input(clips, u8, np.dtype(np.uint8)) is clips  # uint8 goes to the GPU as uint8
    with pytest.raises(StexportError, match="rebuild the engine"):
        engine_input(clips, u8, np.dtype(np.float32))
    float_in = InputRecord(dtype="float32", layout="BTCHW", frames=3, size=8, mean=(0.5, 0.4, 0.3),
                           std=(0.2, 0.25, 0.3))
    x = engine_input(clips, float_in, np.dtype(np.float32))
    assert x.shape == (2, 3, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[1, 2, 1, 5, 7], (clips[1, 2, 5, 7, 1] / 255 - 0.4) / 0.25, rtol=1e-6)
    m = SimpleNamespace(input=u8, output=SimpleNamespace(name="logits"), multitask=None)
    assert io_names(["frames"], ["logits"], m) == ("frames", "logits")
    with pytest.raises(StexportError, match="not the bundle's"):
        io_names(["input"], ["logits"], m)
    with pytest.raises(StexportError, match="not the bundle's"):  # a multi-task engine for a one-task bundle
        io_names(["frames", "task"], ["logits"], m)
    multi = SimpleNamespace(input=u8, output=SimpleNamespace(name="logits"), multitask=SimpleNamespace(input="task"))
    assert io_names(["task", "frames"], ["logits"], multi) == ("frames", "logits")  # the engine's order is its own
    with pytest.raises(StexportError, match=r"not the bundle's \['frames', 'task'\]"):
        io_names(["frames"], ["logits"], multi)


# ---------------------------------------------------------------------------------------------------------
# FAKES (see the module docstring): they record calls; nothing here is TensorRT or CUDA.

class FakeTensorRT:
    """A FAKE `tensorrt` module for control-flow tests. Version 10 has the precision builder flags (so a test
    can see they are never set); version 11 lacks them, as the real 11.x does."""

    def __init__(self, version: str = "10.16.1.11", memory: dict | None = None, fail_build: str | None = None,
                 fail_parse: str | None = None, strongly_typed: int | None = 1, timing_cache_reads: str = "all",
                 build_steps: int = 0, on_step=None):
        self.__version__ = version
        self.calls: list[tuple] = []
        self.memory = memory if memory is not None else {}
        fake = self

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            pass

        ILogger.Severity = Severity

        class IProgressMonitor:
            pass

        self.ILogger, self.IProgressMonitor = ILogger, IProgressMonitor
        self.NetworkDefinitionCreationFlag = SimpleNamespace(
            **({} if strongly_typed is None else {"STRONGLY_TYPED": strongly_typed}))
        if version.startswith("10."):
            self.BuilderFlag = SimpleNamespace(FP16=0, INT8=1, BF16=2)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
        self.TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")
        self.nptype = np.dtype

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return SimpleNamespace(name=self.inputs[i])

        class Parser:
            def __init__(self, network, logger):
                self.network, self.logger, self.errors = network, logger, []

            def parse(self, data):
                raise AssertionError("stexport must parse from the file (external data), not from bytes")

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                assert Path(path).is_file()
                if fail_parse:
                    self.errors.append(fail_parse)
                    return False
                import onnx  # the file's inputs, as the real parser's: less those with an initializer (weights)

                g = onnx.load(str(path), load_external_data=False).graph
                weights = {t.name for t in g.initializer}
                self.network.inputs = [i.name for i in g.input if i.name not in weights]
                return True

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, list(lo), list(opt), list(hi)))
                self.shapes[name] = (name, list(lo), list(opt), list(hi))

        class Config:
            def __init__(self):
                object.__setattr__(self, "profiles", [])

            def __setattr__(self, name, value):
                fake.calls.append(("config." + name, value))
                object.__setattr__(self, name, value)

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def add_optimization_profile(self, p):
                self.profiles.append(p)

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                # "all", "empty" (a stored cache is unreadable: None, as the real one does) or "none"
                if timing_cache_reads == "none" or (timing_cache_reads == "empty" and bytes(data)):
                    return None
                return SimpleNamespace(data=bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                object.__setattr__(self, "timing", cache.data)
                return True

            def get_timing_cache(self):
                return SimpleNamespace(serialize=lambda: self.timing + b"+1")

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network",))
                monitor = getattr(config, "progress_monitor", None)
                if build_steps and monitor is not None:  # drive the monitor as TensorRT's build does
                    monitor.phase_start("Building engine", None, build_steps)
                    for i in range(build_steps):
                        if on_step:
                            on_step(i)
                        if not monitor.step_complete("Building engine", i):
                            fake.calls.append(("cancelled", i))
                            return None
                    monitor.phase_finish("Building engine")
                if fail_build:
                    self.logger.log(Severity.ERROR, fail_build)
                    return None
                names = [n for n in network.inputs]
                assert all(set(p.shapes) == set(names) for p in config.profiles)  # every input in every profile
                ranges = [[p.shapes[names[0]][1][0], p.shapes[names[0]][3][0]] for p in config.profiles]
                return json.dumps({"fake-plan": fake.__version__, "inputs": names, "ranges": ranges}).encode()

        class Context:
            def __init__(self, plan):
                self.plan, self.shapes, self.addr, self.profile = plan, {}, {}, 0

            def set_optimization_profile_async(self, index, stream):
                fake.calls.append(("set_optimization_profile_async", index, stream))
                if not 0 <= index < len(self.plan["ranges"]):
                    return False
                self.profile, self.shapes, self.addr = index, {}, {}  # as documented: shapes/addresses reset
                return True

            def set_input_shape(self, name, shape):
                fake.calls.append(("set_input_shape", name, tuple(shape)))
                lo, hi = self.plan["ranges"][self.profile]
                ok = name in self.plan["inputs"] and lo <= shape[0] <= hi
                if ok:
                    self.shapes[name] = tuple(shape)
                return ok

            @property
            def shape(self):
                return self.shapes["frames"]

            def get_tensor_shape(self, name):
                return (self.shape[0], 5)

            def set_tensor_address(self, name, ptr):
                fake.calls.append(("set_tensor_address", name, ptr))
                self.addr[name] = ptr
                return True

            def execute_async_v3(self, stream):
                # "Inference": logits[b, k] = (k + 1) * mean(x[b]) (+ 100 * task[b] on a multi-task engine),
                # read from / written to fake device memory.
                fake.calls.append(("execute_async_v3", stream))
                assert set(self.shapes) == set(self.plan["inputs"])  # every input's shape was set
                n = int(np.prod(self.shape))
                x = fake.memory[self.addr["frames"]][:n].reshape(self.shape).astype(np.float64)
                y = x.reshape(len(x), -1).mean(1)[:, None] * np.arange(1, 6)
                if "task" in self.plan["inputs"]:
                    assert self.shapes["task"] == (len(x),)
                    y = y + 100 * fake.memory[self.addr["task"]][:8 * len(x)].view(np.int64)[:, None]
                y = y.astype(np.float32)
                fake.memory[self.addr["logits"]][:y.nbytes] = y.view(np.uint8).ravel()
                return True

        class Engine:
            def __init__(self, plan):
                self.plan = plan
                self.num_optimization_profiles = len(plan["ranges"])
                self.num_io_tensors = len(plan["inputs"]) + 1

            def get_tensor_name(self, i):
                return [*self.plan["inputs"], "logits"][i]

            def get_tensor_mode(self, name):
                return fake.TensorIOMode.INPUT if name in self.plan["inputs"] else fake.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return {"frames": "uint8", "task": "int64"}.get(name, "float32")

            def create_execution_context(self):
                return Context(self.plan)

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data):
                plan = json.loads(bytes(data))
                if plan["fake-plan"] != fake.__version__:  # as the real one: engines are version-locked
                    self.logger.log(Severity.ERROR, "version tag mismatch")
                    return None
                return Engine(plan)

        self.Builder, self.OnnxParser, self.Runtime = Builder, Parser, Runtime


class FakeCuda:
    """A FAKE CUDA binding: "device memory" is host numpy arrays keyed by fake pointers."""

    kind = "fake"

    def __init__(self, memory: dict, gpu=("NVIDIA H100 80GB HBM3", "9.0")):
        self.memory, self.gpu = memory, gpu
        self.mallocs = self.pinned_allocs = 0
        self.h2d_dtypes: list = []
        self.closed = False

    def info(self):
        return self.gpu

    def stream(self):
        return 7

    def malloc(self, nbytes):
        self.mallocs += 1
        ptr = 0x1000 * (len(self.memory) + 1)
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def pinned(self, nbytes):
        self.pinned_allocs += 1
        return np.zeros(nbytes, np.uint8)

    def h2d(self, dst, src, stream):
        self.h2d_dtypes.append(src.dtype)
        self.memory[dst][:src.nbytes] = src.view(np.uint8).ravel()

    def d2h(self, dst, src, stream):
        dst.view(np.uint8).ravel()[:] = self.memory[src][:dst.nbytes]

    def sync(self, stream):
        pass

    def close(self):
        self.closed = True


def build_with_fake(bundle, trt, host=H100, **kw):
    return ensure_engine(bundle, trt, host, **kw)


def test_build_is_strongly_typed_from_file_with_profile_workspace_level_and_timing_cache(bundle):
    trt = FakeTensorRT()
    rec, built = build_with_fake(bundle, trt, batch=8, workspace_gb=2, opt_level=5)
    assert built
    calls = trt.calls
    assert ("create_network", 1 << 1) in calls  # STRONGLY_TYPED
    assert not [c for c in calls if c[0] == "set_flag"]  # no FP16 / INT8 flags: precision is in the graph
    assert ("parse_from_file", str(bundle.path / "model.onnx")) in calls
    # two profiles: 1..3 tuned for the 3 views infer sends per video, 4..8 tuned for the largest batch
    assert [c for c in calls if c[0] == "set_shape"] == [
        ("set_shape", "frames", [1, 4, 32, 32, 3], [3, 4, 32, 32, 3], [3, 4, 32, 32, 3]),
        ("set_shape", "frames", [4, 4, 32, 32, 3], [8, 4, 32, 32, 3], [8, 4, 32, 32, 3])]
    assert ("set_memory_pool_limit", "workspace", 2 << 30) in calls
    assert ("config.builder_optimization_level", 5) in calls
    assert ("set_timing_cache", b"", False) in calls  # first build: an empty cache, mismatches refused

    # the engine and the timing cache are in the bundle, recorded and hashed; nothing half-written is left
    b = Bundle.load(bundle.path)
    assert b.manifest.artifacts["engines"] == "engines"
    assert records(b) == [rec] and rec["onnx"] == onnx_identity(b)
    assert (rec["tensorrt"], rec["gpu"], rec["capability"]) == (H100.tensorrt, H100.gpu, H100.capability)
    assert rec["profile"]["max"][0] == 8 and rec["precision"] == "fp16" and rec["workspace_gb"] == 2
    assert rec["profile"]["opt"][0] == 3 and [p["opt"][0] for p in rec["profiles"]] == [3, 8]
    assert [p.opt[0] for p in b.manifest.engines[0].profiles] == [3, 8]  # typed in the manifest
    assert (b.path / rec["file"]).read_bytes().startswith(b'{"fake-plan"')
    assert (b.path / timing_cache_file(H100)).read_bytes() == b"+1"
    assert b.changed_files() == [] and rec["file"] in b.manifest.files
    assert not [p for p in (b.path / "engines").iterdir() if p.name.startswith(".")]

    # a second build finds the cached engine; --force rebuilds and reuses the stored timing cache
    trt2 = FakeTensorRT()
    assert build_with_fake(b, trt2, batch=8) == (rec, False) and not trt2.calls
    _, built3 = build_with_fake(b, trt2, batch=8, force=True)
    assert built3 and ("set_timing_cache", b"+1", False) in trt2.calls
    assert len(records(Bundle.load(b.path))) == 1  # replaced, not added


def test_engines_for_several_batch_profiles_coexist(bundle):
    small, _ = build_with_fake(bundle, FakeTensorRT(), batch=2)
    big, _ = build_with_fake(bundle, FakeTensorRT(), batch=16)
    assert small["key"] != big["key"]
    trt = FakeTensorRT()
    assert build_with_fake(bundle, trt, batch=2) == (small, False) and not trt.calls  # not the largest
    assert {r["key"] for r in records(Bundle.load(bundle.path))} == {small["key"], big["key"]}


def test_build_on_tensorrt_11_sets_no_precision_flags(bundle):
    trt = FakeTensorRT(version="11.4.0.106", strongly_typed=0)
    assert not hasattr(trt, "BuilderFlag")  # like the real 11.x: no precision flags to set
    rec, built = build_with_fake(bundle, trt, host=Host("11.4.0.106", H100.gpu, "9.0"))
    assert built and ("create_network", 1) in trt.calls and rec["tensorrt"] == "11.4.0.106"


def test_build_failures_say_why_and_leave_the_bundle_as_it_was(bundle):
    before = (bundle.path / "stexport.json").read_text()
    with pytest.raises(StexportError, match="cannot parse it: Unsupported operator Foo"):
        build_with_fake(bundle, FakeTensorRT(fail_parse="Unsupported operator Foo"))
    with pytest.raises(StexportError, match="could not build an engine from model.onnx: out of memory"):
        build_with_fake(bundle, FakeTensorRT(fail_build="out of memory"))
    assert (bundle.path / "stexport.json").read_text() == before
    assert not (bundle.path / "engines").exists()


def test_unwritable_bundle_cannot_cache_an_engine(bundle, monkeypatch):
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(StexportError, match="not writable"):
        build_with_fake(bundle, FakeTensorRT())


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    class Boom:
        def __buffer__(self, flags):
            raise RuntimeError("disk on fire")

    target = tmp_path / "engines" / "x.engine"
    write_atomic(target, b"abc")
    assert target.read_bytes() == b"abc"
    with pytest.raises((RuntimeError, TypeError)):
        write_atomic(target, Boom())
    assert target.read_bytes() == b"abc" and [p.name for p in target.parent.iterdir()] == ["x.engine"]


def test_a_record_whose_engine_file_is_gone_is_ignored(bundle):
    rec, _ = build_with_fake(bundle, FakeTensorRT())
    (bundle.path / rec["file"]).unlink()
    b = Bundle.load(bundle.path)
    assert records(b) == [] and choose(records(b), H100, onnx_identity(b))[0] is None
    assert build_with_fake(b, FakeTensorRT())[1]  # rebuilt, not "up to date"


def open_fake_backend(bundle, monkeypatch, trt, cuda, **options):
    from stexport.trt_engines import runtime

    monkeypatch.setattr(runtime, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(runtime, "open_device", lambda kind, gpu: cuda)
    return runtime.TensorRTBackend(bundle, **options)


def test_backend_io_buffers_and_chunks_with_fakes(bundle, monkeypatch):
    memory: dict = {}
    trt, cuda = FakeTensorRT(memory=memory), FakeCuda(memory)
    build_with_fake(bundle, trt, batch=4)
    be = open_fake_backend(bundle, monkeypatch, trt, cuda)
    assert be.max_batch == 4 and cuda.mallocs == 2 and cuda.pinned_allocs == 2
    clips = np.random.default_rng(1).integers(0, 256, (10, 4, 32, 32, 3), dtype=np.uint8)
    want = clips.reshape(10, -1).mean(1)[:, None] * np.arange(1, 6)
    for _ in range(2):  # buffers are allocated once and reused
        np.testing.assert_allclose(be.run(clips), want, rtol=1e-6)
    assert cuda.mallocs == 2 and cuda.pinned_allocs == 2
    assert set(cuda.h2d_dtypes) == {np.dtype(np.uint8)}  # uint8 crosses to the GPU as uint8
    shapes = [c[2][0] for c in trt.calls if c[0] == "set_input_shape"]
    assert shapes == [4, 4, 4, 2, 4, 4, 2]  # sizing at open, then chunks of the profile's max batch
    # profiles 1..3 (tuned for infer's 3 views) and 4..4: each chunk runs on the profile made for it
    switches = [c[1] for c in trt.calls if c[0] == "set_optimization_profile_async"]
    assert switches == [1, 0, 1, 0] and all(c[2] == 7 for c in trt.calls if c[0].startswith("set_optim"))
    assert all(c[1] == 7 for c in trt.calls if c[0] == "execute_async_v3")  # one stream
    assert be.run(clips[:0]).shape == (0, 5)
    d = be.describe()
    assert d["backend"] == "tensorrt" and d["profile_batch"] == [1, 4] and d["tensorrt"] == "10.16.1.11"
    assert d["profiles"] == [[1, 3, 3], [4, 4, 4]]
    be.close()
    assert cuda.closed


def test_backend_rebuilds_a_mismatched_engine_with_a_message(bundle, monkeypatch, caplog):
    memory: dict = {}
    build_with_fake(bundle, FakeTensorRT(version="10.3.0.26"), host=Host("10.3.0.26", "NVIDIA A100", "8.0"))
    trt = FakeTensorRT(memory=memory)
    with caplog.at_level(logging.WARNING, logger="stexport"):
        be = open_fake_backend(bundle, monkeypatch, trt, FakeCuda(memory))
    assert ("building a TensorRT engine for NVIDIA H100 80GB HBM3 (compute 9.0) with TensorRT 10.16.1.11"
            in caplog.text)
    assert "built with TensorRT 10.3.0.26" in caplog.text
    assert be.record["tensorrt"] == "10.16.1.11"
    assert {r["tensorrt"] for r in records(Bundle.load(bundle.path))} == {"10.3.0.26", "10.16.1.11"}


def test_backend_without_build_says_exactly_why(bundle, monkeypatch):
    build_with_fake(bundle, FakeTensorRT(version="10.3.0.26"), host=Host("10.3.0.26", "NVIDIA A100", "8.0"))
    cuda = FakeCuda({})
    with pytest.raises(StexportError, match=r"no TensorRT engine for NVIDIA H100.*built for NVIDIA A100 "
                                            r"\(compute 8.0\).*stexport engine"):
        open_fake_backend(bundle, monkeypatch, FakeTensorRT(), cuda, build=False)
    assert cuda.closed  # a failed open releases what it took


def test_engine_that_tensorrt_rejects_is_reported(bundle, monkeypatch):
    rec, _ = build_with_fake(bundle, FakeTensorRT())
    (bundle.path / rec["file"]).write_bytes(b'{"fake-plan": "other"}')  # as if written by another TensorRT
    with pytest.raises(StexportError, match="cannot load this engine .version tag mismatch.*--force"):
        open_fake_backend(bundle, monkeypatch, FakeTensorRT(), FakeCuda({}))


def test_profiles_for_infer_calls_and_large_batches():
    from stexport.trt_engines.record import pick_profile, profiles_for, record_profiles

    s = [8, 224, 224, 3]
    two = profiles_for(MANIFEST, 32, views=3)
    assert two == [{"input": "frames", "min": [1, *s], "opt": [3, *s], "max": [3, *s], "index": None},
                   {"input": "frames", "min": [4, *s], "opt": [32, *s], "max": [32, *s], "index": None}]
    assert profile_for(MANIFEST, 32, views=3) == {"input": "frames", "min": [1, *s], "opt": [3, *s], "max": [32, *s],
                                                  "index": None}
    assert profiles_for(MANIFEST, 3, views=3) == [profile_for(MANIFEST, 3)]  # nothing past the views: one
    assert profiles_for(MANIFEST, 2, views=3) == [profile_for(MANIFEST, 2)]
    assert [pick_profile(two, n) for n in (1, 2, 3, 4, 17, 32)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(StexportError, match="batch 33 is outside the engine's profiles .1-3, 4-32."):
        pick_profile(two, 33)
    # overlapping profiles (another tool's engine): the one tuned nearest the batch
    over = [{"min": [1], "opt": [1], "max": [64]}, {"min": [1], "opt": [32], "max": [64]}]
    assert [pick_profile(over, n) for n in (1, 8, 16, 17, 40)] == [0, 0, 0, 1, 1]
    old = {"profile": profile_for(MANIFEST, 32)}  # a record from before multi-profile engines
    assert record_profiles(old) == [old["profile"]]
    a = make_record(H100, {"sha256": "a" * 64}, profile_for(MANIFEST, 32, 3), "fp16", workspace_gb=None,
                    opt_level=3, seconds=1, size=1, profiles=two)
    b = make_record(H100, {"sha256": "a" * 64}, profile_for(MANIFEST, 32, 3), "fp16", workspace_gb=None,
                    opt_level=3, seconds=1, size=1)
    assert a["key"] != b["key"] and a["profiles"] == two and b["profiles"] == [b["profile"]]


@pytest.fixture(scope="module")
def multitask_src(tmp_path_factory):
    """A tiny multi-task FP16 bundle: task 0 with 5 classes, task 1 with 3 (head rows: 5)."""
    from stexport.build.backbone import random_backbone
    from stexport.build.multitask import build_multitask
    from stexport.build.synthetic import random_deltas

    bb = random_backbone("stexport-tiny-vit")
    sds = [random_deltas(bb.config, width=16, num_classes=n, seed=n) for n in (5, 3)]
    return build_multitask(sds, out=tmp_path_factory.mktemp("trt") / "multi", backbone=bb, names=["five", "three"],
                           precision="fp16", frames=4).path


def test_multitask_engine_takes_the_task_index_as_a_second_input(multitask_src, tmp_path, monkeypatch):
    """The task is data: every profile sets the task input's shape (the clips' batch range), each chunk feeds
    its clips' indices beside them, one call mixes tasks, and nothing is refitted (FAKES: control flow only)."""
    shutil.copytree(multitask_src, tmp_path / "multi")
    multi = Bundle.load(tmp_path / "multi")
    memory: dict = {}
    trt, cuda = FakeTensorRT(memory=memory), FakeCuda(memory)
    rec, built = build_with_fake(multi, trt, batch=4)
    assert built and rec["refit"] is None and all(p["index"] == "task" for p in rec["profiles"])
    shapes = [c[1:] for c in trt.calls if c[0] == "set_shape"]
    frames = [s for s in shapes if s[0] == "frames"]
    assert [s for s in shapes if s[0] == "task"] == [("task", [f[1][0]], [f[2][0]], [f[3][0]]) for f in frames]
    assert Bundle.load(multi.path).manifest.engines[0].profile.index == "task"  # the manifest keeps it
    be = open_fake_backend(Bundle.load(multi.path), monkeypatch, trt, cuda)
    assert cuda.mallocs == 3 and cuda.pinned_allocs == 3  # clips, logits and task indices: once
    clips = np.random.default_rng(2).integers(0, 256, (10, 4, 32, 32, 3), dtype=np.uint8)
    tasks = ["three", "five", 1, 1, 0, "three", None, 0, 1, "five"]
    index = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 0])
    mean = clips.reshape(10, -1).mean(1)[:, None] * np.arange(1, 6)
    np.testing.assert_allclose(be.run_tasks(clips, tasks), mean + 100 * index[:, None], rtol=1e-6)
    assert np.int64 in {d.type for d in cuda.h2d_dtypes}  # the indices cross as the engine's int64
    got = be.run(clips, task="three")  # one task for the whole call: its 3 logits
    np.testing.assert_allclose(got, mean[:, :3] + 100, rtol=1e-6)
    assert be.run(clips[:0]).shape == (0, 5)
    be.set_task("three")
    np.testing.assert_allclose(be.run(clips[:2]), mean[:2, :3] + 100, rtol=1e-6)
    with pytest.raises(StexportError, match="holds tasks five, three"):
        be.run(clips, task="four")
    be.close()
    # Triton's tensorrt_plan model of it: the plan, and the task index as the second input ([1] → [] per clip)
    from stexport.build.triton import TritonOptions, export_repository

    out = export_repository(Bundle.load(multi.path), tmp_path / "repo", TritonOptions(backend="tensorrt"))
    assert f"{out['model']}/1/model.plan" in out["files"] and f"{out['model']}/labels/1.txt" in out["files"]
    assert 'name: "task"' in out["config"] and "TYPE_INT64" in out["config"] and "max_batch_size: 4" in out["config"]


def test_engine_profile_follows_the_bundles_views(bundle):
    m = bundle.manifest.with_(sampling={"rate": 0, "temporal_views": 1, "spatial_views": 1})
    bundle.manifest = m
    trt = FakeTensorRT()
    rec, _ = build_with_fake(bundle, trt, batch=8)
    assert [(p["min"][0], p["opt"][0], p["max"][0]) for p in rec["profiles"]] == [(1, 1, 1), (2, 8, 8)]


def _vit_b16(manifest):
    d = manifest.model_dump(mode="json")
    d["model"]["backbone"]["name"] = "ViT-B-16"
    d["model"]["backbone"]["config"].update(width=768, layers=12, heads=12, patch_size=16, image_size=224,
                                            mlp_width=3072)
    d["input"].update(frames=8, size=224)
    return type(manifest).model_validate(d)


def test_batch_capped_by_the_models_largest_tensor(bundle):
    from stexport.trt_engines.record import batch_limit, check_batch, largest_tensor

    vit = _vit_b16(bundle.manifest)
    per, what = largest_tensor(vit)
    assert (per, what) == (8 * 197 * 3072, "the MLP's hidden layer")  # > the 8*12*197*197 attention scores
    assert batch_limit(vit) == (2**31 - 1) // per == 443
    check_batch(vit, 443)
    with pytest.raises(StexportError, match=r"--batch 1024: ViT-B-16 at 8x224 px holds 4.84 M elements per clip "
                                            r"in the MLP's hidden layer.*choose --batch 443 or less"):
        check_batch(vit, 1024)
    assert batch_limit(bundle.manifest) == rec_mod.MAX_BATCH  # the tiny model: the export's own limit
    bundle.manifest = vit
    trt = FakeTensorRT()
    with pytest.raises(StexportError, match="choose --batch 443"):
        build_with_fake(bundle, trt, batch=500)
    assert not trt.calls  # refused before TensorRT is asked anything


def test_corrupt_stored_timing_cache_starts_fresh(bundle, caplog):
    build_with_fake(bundle, FakeTensorRT(), batch=2)
    (bundle.path / timing_cache_file(H100)).write_bytes(b"\x00garbage")
    trt = FakeTensorRT(timing_cache_reads="empty")  # create_timing_cache(stored) returns None
    with caplog.at_level(logging.WARNING, logger="stexport"):
        _, built = build_with_fake(Bundle.load(bundle.path), trt, batch=2, force=True)
    assert built and "cannot use the stored timing cache" in caplog.text
    assert ("create_timing_cache", b"\x00garbage") in trt.calls and ("set_timing_cache", b"", False) in trt.calls
    assert (bundle.path / timing_cache_file(H100)).read_bytes() == b"+1"  # the fresh one, stored
    trt = FakeTensorRT(timing_cache_reads="none")  # not even an empty one: build without a cache
    with caplog.at_level(logging.WARNING, logger="stexport"):
        _, built = build_with_fake(Bundle.load(bundle.path), trt, batch=2, force=True)
    assert built and "building without one" in caplog.text
    assert not [c for c in trt.calls if c[0] == "set_timing_cache"]
    assert (bundle.path / timing_cache_file(H100)).read_bytes() == b"+1"  # kept, not overwritten by nothing


def test_tensorrt_warnings_reach_the_user_at_warning_level(caplog):
    from stexport.trt_engines.trt import logger_for

    trt = FakeTensorRT()
    logger = logger_for(trt)
    with caplog.at_level(logging.DEBUG, logger="stexport"):
        logger.log(trt.ILogger.Severity.WARNING, "Using a slower tactic: not enough workspace")
        logger.log(trt.ILogger.Severity.INFO, "loaded")
        logger.log(trt.ILogger.Severity.ERROR, "bad")
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["TensorRT: Using a slower tactic: not enough workspace"] == logging.WARNING
    assert levels["TensorRT: loaded"] == logging.DEBUG and logger.errors[-1] == "bad"


def test_ctrl_c_during_a_build_cancels_it_as_an_interruption(bundle, monkeypatch):
    """A SIGINT during build_serialized_network reaches Python inside TensorRT's callbacks, where the bindings
    would swallow the KeyboardInterrupt ("no message from TensorRT"). The monitor cancels the build instead and
    build_plan raises KeyboardInterrupt; the bundle is unchanged."""
    from stexport import interrupt

    before = (bundle.path / "stexport.json").read_text()
    monkeypatch.setattr(interrupt, "_seen", __import__("threading").Event())
    trt = FakeTensorRT(build_steps=5, on_step=lambda i: i == 2 and interrupt._seen.set())  # as the CLI's handler
    with pytest.raises(KeyboardInterrupt):
        build_with_fake(bundle, trt)
    assert ("cancelled", 2) in trt.calls
    interrupt._seen.clear()
    # the KeyboardInterrupt raised inside the callback itself (here in the progress bar's refresh, from step 1)
    import tqdm

    armed = []
    real_refresh = tqdm.tqdm.refresh

    def refresh(self, *a, **k):
        if armed:
            raise KeyboardInterrupt
        return real_refresh(self, *a, **k)

    monkeypatch.setattr(tqdm.tqdm, "refresh", refresh)
    trt = FakeTensorRT(build_steps=5, on_step=lambda i: i == 1 and armed.append(i))
    with pytest.raises(KeyboardInterrupt):
        build_with_fake(bundle, trt, progress=True)
    assert ("cancelled", 1) in trt.calls
    armed.clear()
    assert (bundle.path / "stexport.json").read_text() == before and not (bundle.path / "engines").exists()
    _, built = build_with_fake(bundle, FakeTensorRT(build_steps=5))  # nothing sticks: the next build runs
    assert built


def test_engine_cli_on_a_read_only_bundle_says_so_before_writing(bundle, monkeypatch):
    from stexport.cli.app import app
    from stexport.trt_engines import cache, engine
    from typer.testing import CliRunner

    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK)  # read-only (tests may run as root)

    def write(*a, **k):  # what writing into a read-only bundle does
        raise PermissionError(13, "Permission denied", str(bundle.path / "stexport.json"))

    monkeypatch.setattr(cache, "record_request", write)
    monkeypatch.setattr(engine, "record_request", write)
    for args in (["--batch", "4"], []):
        r = CliRunner().invoke(app, ["engine", str(bundle.path), *args])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [r.output.strip()] and "Traceback" not in r.output
        assert "is not writable by this user; copy the bundle somewhere writable" in r.output


def test_pycuda_releases_the_primary_context(monkeypatch):
    """FAKE pycuda.driver (pycuda needs a CUDA toolkit to install): close() pops the context and detaches it,
    so repeated opens do not leak retains; a failed push detaches too."""
    from stexport.trt_engines.cuda import PyCuda

    log_: list = []

    class Error(Exception):
        pass

    class Ctx:
        def push(self):
            log_.append("push")
            if fail_push:
                raise Error("push failed")

        def pop(self):
            log_.append("pop")

        def detach(self):
            log_.append("detach")

    class Device:
        @staticmethod
        def count():
            return 1

        def __init__(self, i):
            pass

        def retain_primary_context(self):
            log_.append("retain")
            return Ctx()

    drv = SimpleNamespace(Error=Error, init=lambda: None, Device=Device)
    monkeypatch.setitem(sys.modules, "pycuda", SimpleNamespace(driver=drv))
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    fail_push = False
    c = PyCuda(0)
    c.close()
    c.close()  # idempotent
    assert log_ == ["retain", "push", "pop", "detach"]
    log_.clear()
    fail_push = True
    with pytest.raises(StexportError, match="push failed"):
        PyCuda(0)
    assert log_ == ["retain", "push", "detach"]


def test_driver_cuda_mismatch_is_named():
    from stexport.trt_engines.cuda import cuda_mismatch

    cu13 = {"tensorrt-cu13 11.4.0.106": 13, "cuda-python 13.0.1": 13}
    why = cuda_mismatch(12040, cu13, "550.54.15")
    assert why == ("tensorrt-cu13 11.4.0.106 is built for CUDA 13, but this host's NVIDIA driver 550.54.15 "
                   "supports CUDA 12.4 at most: pip install 'stexport[tensorrt-cu12]' (TensorRT and cuda-python "
                   "for CUDA 12), or update the driver to 580.65.06 or newer")
    assert cuda_mismatch(13000, cu13) is None and cuda_mismatch(None, cu13) is None
    assert cuda_mismatch(12080, {"tensorrt-cu12 10.16.1.11": 12, "cuda-python 12.9.0": 12}) is None
    assert "cuda-python 13.0.1 is built for CUDA 13" in cuda_mismatch(12020, {"cuda-python 13.0.1": 13})
    assert cuda_mismatch(11080, {"tensorrt-cu12 10.1": 12}).endswith("update the driver to 525.60.13 or newer")


def test_driver_version_is_read_from_proc(tmp_path):
    from stexport.trt_engines.cuda import driver_version

    f = tmp_path / "version"
    f.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  "
                 "(dvs-builder@U16-I3-B03-4-3)  Tue Mar 25 2025\nGCC version:  gcc version 12.2.0\n")
    assert driver_version(f) == "570.133.20"
    f.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    assert driver_version(f) == "550.54.15"
    assert driver_version(tmp_path / "missing") is None


@pytest.fixture
def cuda13_on_a_cuda12_driver(monkeypatch):
    """TensorRT 'installed' (find_spec), a GPU 'visible', a CUDA 12.4 driver and CUDA 13 wheels: FAKE driver
    facts (nothing here has a GPU)."""
    from stexport.trt_engines import cuda

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, _real=importlib.util.find_spec: object() if name == "tensorrt"
                        else _real(name, *a))
    monkeypatch.setattr("stexport.runtime.device.gpu_visible", lambda: True)
    monkeypatch.setattr(cuda, "driver_cuda_version", lambda: 12040)
    monkeypatch.setattr(cuda, "driver_version", lambda: "550.54.15")
    monkeypatch.setattr(cuda, "wheel_cuda_majors", lambda: {"tensorrt-cu13 10.16.1.11": 13})


def test_cuda_mismatch_is_an_error_for_tensorrt_and_a_warning_for_auto(bundle, cuda13_on_a_cuda12_driver,
                                                                        caplog):
    from stexport.trt_engines import runtime

    from stexport.runtime.backends import create

    build_with_fake(bundle, FakeTensorRT())  # an engine, so only the driver stands in the way
    b = Bundle.load(bundle.path)
    runtime._said.clear()
    with pytest.raises(StexportError) as e:
        create("tensorrt", b)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("TensorRT cannot run here: tensorrt-cu13 10.16.1.11 is built for "
                                              "CUDA 13, but this host's NVIDIA driver 550.54.15 supports CUDA 12.4")
    assert "stexport[tensorrt-cu12]" in msg
    with caplog.at_level(logging.WARNING, logger="stexport"):
        be = create("auto", b)
        create("auto", b).close()  # said once per bundle and reason
    assert be.name in ("onnxruntime", "openvino")
    said = [r.getMessage() for r in caplog.records if "not using TensorRT" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"auto: not using TensorRT for {b.path.name}: tensorrt-cu13")
    be.close()


def test_auto_says_why_it_passed_tensorrt_over_on_a_gpu_host(bundle, monkeypatch, caplog):
    from stexport.trt_engines import runtime

    monkeypatch.setattr("stexport.runtime.device.gpu_visible", lambda: True)
    monkeypatch.setattr("stexport.trt_engines.cuda.host_mismatch", lambda: None)
    runtime._said.clear()
    with caplog.at_level(logging.WARNING, logger="stexport"):
        assert runtime.TensorRTBackend.usable(bundle) is False
    if importlib.util.find_spec("tensorrt") is None:
        assert "not using TensorRT for bundle: TensorRT is not installed (pip install 'stexport[tensorrt]')" \
            in caplog.text
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stexport"):
        assert runtime.TensorRTBackend.usable(bundle) is False
    assert "the bundle has no TensorRT engine yet (build one: stexport engine" in caplog.text
    monkeypatch.setattr("stexport.runtime.device.gpu_visible", lambda: False)  # a CPU host: nothing to fix, no warning
    runtime._said.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stexport"):
        assert runtime.TensorRTBackend.usable(bundle) is False
    assert "TensorRT" not in caplog.text
    runtime._said.clear()  # ... but `-v` (info) says why, once (new-user finding: it was debug only)
    with caplog.at_level(logging.INFO, logger="stexport"):
        assert runtime.TensorRTBackend.usable(bundle) is False
        assert runtime.TensorRTBackend.usable(bundle) is False
    said = [r.getMessage() for r in caplog.records if "not using TensorRT" in r.getMessage()]
    assert said == ["auto: not using TensorRT for bundle: no NVIDIA GPU is visible (TensorRT runs on NVIDIA GPUs "
                    "only)"], said


def test_build_engine_defers_with_the_mismatch(bundle, cuda13_on_a_cuda12_driver):
    from stexport.trt_engines.engine import build_for_bundle, build_or_defer

    msg = build_or_defer(bundle)
    assert msg.startswith("TensorRT engine: will be built on first use on a GPU host with stexport[tensorrt] "
                          "(tensorrt-cu13 10.16.1.11 is built for CUDA 13")
    with pytest.raises(StexportError, match="TensorRT cannot build here: tensorrt-cu13"):
        build_for_bundle(bundle)


def test_tensorrt_extras_for_both_cuda_majors():
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    cu12, cu13 = extras["tensorrt-cu12"], extras["tensorrt-cu13"]
    assert any(r.startswith("tensorrt-cu12") for r in cu12) and "cuda-python>=12.0,<13" in cu12
    assert any(r.startswith("tensorrt-cu13") for r in cu13) and any(r.startswith("cuda-python>=13") for r in cu13)
    assert extras["tensorrt"] == ["stexport[tensorrt-cu12]"]  # the alias: runs on 525+ drivers, 580+ included


# ---------------------------------------------------------------------------------------------------------
# Where TensorRT is absent (real: this machine has no TensorRT and no GPU; simulated where it has them).

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, _real=importlib.util.find_spec: None if name == "tensorrt"
                        else _real(name, *a))


def test_import_and_cli_work_without_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import stexport, stexport.trt_engines.runtime, stexport.trt_engines.engine, stexport.cli.app\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_backend_tensorrt_without_tensorrt_is_one_clear_error(bundle, no_tensorrt):
    from stexport.trt_engines.runtime import TensorRTBackend

    from stexport.runtime.backends import create

    assert TensorRTBackend.usable(bundle) is False
    with pytest.raises(StexportError) as e:
        create("tensorrt", bundle)
    assert str(e.value).startswith("TensorRT is not available here") and "stexport[tensorrt]" in str(e.value)
    assert "\n" not in str(e.value)


def test_usable_is_false_without_gpu_and_never_raises(bundle, monkeypatch):
    from stexport.trt_engines import runtime

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # pretend it is installed
    monkeypatch.setattr("stexport.runtime.device.gpu_visible", lambda: False)
    assert runtime.TensorRTBackend.usable(bundle) is False
    monkeypatch.setattr("stexport.runtime.device.gpu_visible", lambda: 1 / 0)
    assert runtime.TensorRTBackend.usable(bundle) is False
    monkeypatch.setattr("stexport.runtime.device.gpu_visible", lambda: True)
    assert runtime.TensorRTBackend.usable(bundle) is False  # no engine recorded and none requested
    build_with_fake(bundle, FakeTensorRT())
    assert runtime.TensorRTBackend.usable(Bundle.load(bundle.path)) is True


def test_cuda_python_without_gpu_is_a_clear_error():
    from stexport.trt_engines.cuda import CudaPython, cudart, open_device

    rt = cudart()  # the real cuda-python runtime module (cuda-bindings), either import layout
    for name in ("cudaGetDeviceCount", "cudaSetDevice", "cudaGetDeviceProperties", "cudaStreamCreate",
                 "cudaMalloc", "cudaMallocHost", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaFree",
                 "cudaFreeHost", "cudaStreamDestroy", "cudaGetErrorString"):
        assert hasattr(rt, name), name
    assert hasattr(rt.cudaMemcpyKind, "cudaMemcpyHostToDevice") and hasattr(rt.cudaError_t, "cudaSuccess")
    if rt.cudaGetDeviceCount()[0] == rt.cudaError_t.cudaSuccess and rt.cudaGetDeviceCount()[1] > 0:
        pytest.skip("a GPU is visible here; this checks the error path of GPU-less hosts")
    for make in (lambda: CudaPython(0), open_device):
        with pytest.raises(StexportError, match="no usable CUDA GPU here"):
            make()
    with pytest.raises(StexportError, match="unknown CUDA binding"):
        open_device("cupy")


def test_auto_falls_back_with_the_reason(bundle, monkeypatch, caplog):
    """A bundle with an engine for another GPU, on a host where TensorRT looks usable but cannot open or build
    (here: the real reason, no TensorRT / no GPU on this machine): `auto` says why and runs the next usable
    backend in auto's order (ONNX Runtime, or OpenVINO where it is installed)."""
    from stexport.trt_engines.runtime import TensorRTBackend

    from stexport.runtime.backends import create, resolve

    build_with_fake(bundle, FakeTensorRT(version="10.3.0.26"), host=Host("10.3.0.26", "NVIDIA A100", "8.0"))
    monkeypatch.setattr(TensorRTBackend, "usable", classmethod(lambda cls, b: True))
    if importlib.util.find_spec("tensorrt") is not None:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    with caplog.at_level(logging.WARNING, logger="stexport"):
        be = create("auto", Bundle.load(bundle.path))
    assert be.name == resolve("auto", bundle, skip=("tensorrt",)) and be.name in ("onnxruntime", "openvino")
    assert "tensorrt cannot run bundle: TensorRT is not available here" in caplog.text
    assert f"falling back to {be.name}" in caplog.text
    clips = np.random.default_rng(0).integers(0, 256, (1, 4, 32, 32, 3), dtype=np.uint8)
    assert be.run(clips).shape == (1, 5)
    with pytest.raises(StexportError, match="TensorRT is not available"):  # named explicitly: no fallback
        create("tensorrt", bundle)


def test_verify_auto_falls_back_too(bundle, monkeypatch, caplog, make_video):
    from stexport.trt_engines.runtime import TensorRTBackend

    from stexport.build.verify import verify

    build_with_fake(bundle, FakeTensorRT(version="10.3.0.26"), host=Host("10.3.0.26", "NVIDIA A100", "8.0"))
    monkeypatch.setattr(TensorRTBackend, "usable", classmethod(lambda cls, b: True))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    clips = make_video("a.mp4", frames=20, width=48, height=40).parent
    with caplog.at_level(logging.WARNING, logger="stexport"):
        report = verify(Bundle.load(bundle.path), clips, backend="auto")
    assert report["backend"]["backend"] in ("onnxruntime", "openvino") and "falling back" in caplog.text


def test_engine_cli_without_tensorrt(bundle, no_tensorrt):
    from stexport.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["engine", str(bundle.path), "--batch", "4"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [r.output.strip()]  # one line, no traceback
    assert "TensorRT is not available here" in r.output and "stexport[tensorrt]" in r.output


def test_build_or_defer_saves_the_request(bundle, no_tensorrt, monkeypatch):
    from stexport.trt_engines.engine import build_or_defer

    msg = build_or_defer(bundle, batch=8, opt_level=4)
    assert msg == ("TensorRT engine: will be built on first use on a GPU host with stexport[tensorrt] "
                   "(TensorRT is not available here)")
    b = Bundle.load(bundle.path)
    assert rec_mod.request(b.manifest) == {"batch": 8, "workspace_gb": None, "opt_level": 4}
    assert b.changed_files() == []
    # on a GPU host, first use builds with the saved settings
    memory: dict = {}
    trt = FakeTensorRT(memory=memory)
    be = open_fake_backend(b, monkeypatch, trt, FakeCuda(memory))
    assert be.max_batch == 8 and ("config.builder_optimization_level", 4) in trt.calls


def test_build_engine_flag_without_tensorrt_writes_the_bundle_and_says_so(tmp_path, no_tensorrt):
    from stexport.cli.app import app
    from typer.testing import CliRunner

    from stexport.build.backbone import random_backbone
    from stexport.build.deltas import save_official
    from stexport.build.synthetic import random_deltas

    save_official(tmp_path / "a.pt", random_deltas(random_backbone("stexport-tiny-vit").config, width=16,
                                                   num_classes=5))
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", "--adapter", str(tmp_path / "a.pt"), "--backbone",
                                 "stexport-tiny-vit", "--pretrained", "none", "--frames", "4", "--precision",
                                 "fp16", "--engine", "--out", str(out)])
    assert r.exit_code == 0, r.output
    notes = [ln.strip() for ln in r.output.splitlines() if "TensorRT engine" in ln]
    assert notes == ["TensorRT engine: will be built on first use on a GPU host with stexport[tensorrt] "
                     "(TensorRT is not available here)"]
    b = Bundle.load(out)
    assert b.has("onnx") and rec_mod.request(b.manifest)["batch"] == 32 and b.changed_files() == []


# ---------------------------------------------------------------------------------------------------------
# The TensorRT API names the code uses exist in TensorRT 10.16 and 11.4 (checked against the real wheels).

def _api_module():
    spec = importlib.util.spec_from_file_location("tensorrt_api", DATA / "tensorrt_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tensorrt_names_used_exist_in_both_wheels():
    api = _api_module()
    used = api.used_names(api.trt_engine_files())
    # the scan sees what it should (a sample, so a broken scanner cannot pass vacuously)
    assert {"STRONGLY_TYPED", "parse_from_file", "build_serialized_network", "set_input_shape",
            "set_tensor_address", "execute_async_v3", "deserialize_cuda_engine", "ignore_mismatch",
            "step_complete", "log"} <= used
    lines = [ln.split() for ln in (DATA / "tensorrt-api-names.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    table = {name: tuple(cols) for name, *cols in lines}
    versions = next(ln for ln in (DATA / "tensorrt-api-names.txt").read_text().splitlines()
                    if ln.startswith("# name")).split()[2:]
    assert versions == ["10.16.1.11", "11.4.0.106"]
    missing = sorted(used - table.keys())
    assert not missing, (f"names not in tests/data/tensorrt-api-names.txt: {missing}; regenerate it "
                         "(tests/data/tensorrt_api.py says how) and check them")
    absent = {n: table[n] for n in used if "no" in table[n]}
    assert not absent, f"TensorRT names used by trt_engines/ that a wheel lacks: {absent}"
    # a "tail" only says the name ends a longer string of tensorrt.so: the bindings' source must register it
    source = {name: col for name, col in (ln.split() for ln in (DATA / "tensorrt-source-names.txt").read_text()
                                          .splitlines() if ln.strip() and not ln.startswith("#"))}
    assert set(source) == set(table)
    tails = sorted((n for n in used if "tail" in table[n]), key=str.lower)
    assert len(tails) == 13, tails  # Builder, dtype, ERROR, INPUT, name, Runtime, size, ...
    unregistered = [n for n in tails if source[n] != "yes"]
    assert not unregistered, f"only as string tails in the wheels and not registered in the source: {unregistered}"
    # the wheels do tell versions apart: the weak-typing APIs are in 10.16 and gone from 11.4
    for removed in ("int8_calibrator", "EXPLICIT_BATCH", "platform_has_fast_fp16"):
        assert table[removed] == ("exact", "no") and removed not in used
    assert table["FP16"][0] == "exact" and table["FP16"][1] != "exact" and "FP16" not in used


TRT_WHEELS = os.environ.get("STEXPORT_TRT_WHEELS")  # a directory holding the two bindings wheels


@pytest.mark.skipif(not TRT_WHEELS, reason="set STEXPORT_TRT_WHEELS to a directory holding the two TensorRT "
                    "bindings wheels (tests/data/tensorrt_api.py has the pip download commands)")
def test_committed_names_match_the_wheels():
    """The committed table is what the wheels say. Run where the wheels can be downloaded; the wheels must be
    the very files the table was made from (their sha256 are in its header), else this fails."""
    api = _api_module()
    text = (DATA / "tensorrt-api-names.txt").read_text()
    want = dict(re.findall(r"^# wheel ([0-9.]+): sha256 ([0-9a-f]{64})$", text, re.M))
    wheels = [w for w in sorted(Path(TRT_WHEELS).glob("tensorrt_cu1*_bindings-*.whl"))
              if api.wheel_api(w)[0] in want]
    assert [api.wheel_api(w)[:2] for w in wheels] == list(want.items()), f"{TRT_WHEELS}: not the wheels {want}"
    table = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines()
             if ln.strip() and not ln.startswith("#")}
    for col, wheel in enumerate(wheels):
        _, _, strings, py = api.wheel_api(wheel)
        for name, cols in table.items():
            assert api.presence(name, strings, py) == cols[col], (name, wheel.name)


# ---------------------------------------------------------------------------------------------------------
# Integration: real TensorRT on a real GPU (skipped here, with the reason).

def _tensorrt_and_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"TensorRT is not importable ({type(e).__name__}: {e})"
    try:
        from stexport.trt_engines.cuda import open_device

        open_device().close()
    except StexportError as e:
        return f"no GPU visible: {e}"
    return None


SKIP = _tensorrt_and_gpu()


@pytest.fixture(scope="module")
def demo_clips(tmp_path_factory):
    from conftest import write_video

    d = tmp_path_factory.mktemp("clips")
    for i in range(6):
        write_video(d / f"v{i}.mp4", frames=24 + 4 * i, width=128, height=112)
    (d / "list.txt").write_text("".join(f"v{i}.mp4 {i % 3}\n" for i in range(6)))
    return d


def _demo_bundle(tmp_path, precision, clips):
    from stexport.build.backbone import random_backbone
    from stexport.build.pipeline import build_bundle
    from stexport.build.synthetic import random_deltas

    bb = random_backbone("stexport-demo-vit")
    sd = random_deltas(bb.config, width=96, num_classes=9, seed=1)
    return build_bundle(sd, backbone=bb, precision=precision, frames=8, out=tmp_path / precision,
                        calib=clips / "list.txt" if precision == "int8" else None, calib_clips=6)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.tensorrt
@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
def test_real_engine_builds_runs_and_passes_verify(tmp_path, demo_clips, precision):
    from stexport.cli.app import app
    from typer.testing import CliRunner

    from stexport.runtime.backends import create

    b = _demo_bundle(tmp_path, precision, demo_clips)
    r = CliRunner().invoke(app, ["engine", str(b.path), "--batch", "4", "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output[r.output.index("{"):])
    assert rec["built"] and rec["precision"] == precision and rec["profile"]["max"][0] == 4
    b = Bundle.load(b.path)
    assert b.changed_files() == []
    clips = np.random.default_rng(0).integers(0, 256, (6, 8, 96, 96, 3), dtype=np.uint8)
    with create("tensorrt", b) as trt_be, create("onnxruntime", b, device="cpu") as ort_be:
        got, ref = trt_be.run(clips), ort_be.run(clips)
        assert trt_be.describe()["backend"] == "tensorrt"
    assert got.shape == ref.shape == (6, 9)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 5 / 6
    r = CliRunner().invoke(app, ["verify", str(b.path), "--clips", str(demo_clips / "list.txt"),
                                 "--backend", "tensorrt"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.tensorrt
@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
def test_real_multitask_engine_mixes_tasks_in_one_call(tmp_path, demo_clips, precision):
    """A multi-task bundle's engine: the task index is its second input; a mixed batch gives each clip what
    ONNX Runtime gives it (the same graph), INT8 included (no refit)."""
    from stexport.build.backbone import random_backbone
    from stexport.build.multitask import build_multitask
    from stexport.build.synthetic import random_deltas
    from stexport.runtime.backends import create
    from stexport.trt_engines.engine import build_for_bundle

    bb = random_backbone("stexport-demo-vit")
    sds = [random_deltas(bb.config, width=96, num_classes=n, seed=n) for n in (9, 5)]
    b = build_multitask(sds, out=tmp_path / precision, backbone=bb, precision=precision, frames=8,
                        calib=demo_clips / "list.txt" if precision == "int8" else None, calib_clips=6)
    rec, built = build_for_bundle(b, batch=4)
    assert built and all(p["index"] == "task" for p in rec["profiles"])
    clips = np.random.default_rng(0).integers(0, 256, (6, 8, 96, 96, 3), dtype=np.uint8)
    tasks = [0, 1, 1, 0, 1, 0]
    with create("tensorrt", Bundle.load(b.path)) as trt_be, create("onnxruntime", b, device="cpu") as ort_be:
        got, ref = trt_be.run_tasks(clips, tasks), ort_be.run_tasks(clips, tasks)
        alone = np.concatenate([trt_be.run_tasks(clips[i:i + 1], [t]) for i, t in enumerate(tasks)])
    assert got.shape == ref.shape == (6, 9)
    np.testing.assert_allclose(got, alone, atol=2e-2)  # a clip's answer does not depend on its batch-mates
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 5 / 6


@pytest.mark.tensorrt
@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
def test_real_engine_rebuilt_on_mismatched_record(tmp_path, demo_clips, caplog):
    from stexport.trt_engines.engine import build_for_bundle

    from stexport.runtime.backends import create

    b = _demo_bundle(tmp_path, "fp16", demo_clips)
    rec, built = build_for_bundle(b, batch=2)
    assert built and build_for_bundle(b, batch=2) == (rec, False)  # cached
    m = json.loads((b.path / "stexport.json").read_text())
    m["engines"][0]["tensorrt"] = "0.0.0"  # as if built by another TensorRT
    (b.path / "stexport.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="stexport"):
        be = create("tensorrt", Bundle.load(b.path))
    assert "built with TensorRT 0.0.0" in caplog.text and be.record["tensorrt"] != "0.0.0"
    assert be.run(np.zeros((3, 8, 96, 96, 3), np.uint8)).shape == (3, 9)
    be.close()
