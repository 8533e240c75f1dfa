"""Task packs on TensorRT (refittable engines) and TorchScript (swappable modules), issue 23.

TorchScript runs for real here: each pack's logits on the base's model.ts equal its own full export's (FP32,
1e-4), switching back and forth, from several threads, and the C++ host still runs the module.

TensorRT cannot be installed here. The CPU tests drive trt_engines with RefitFakeTensorRT: a FAKE that extends
tests/test_trt.py's FakeTensorRT with what refitting asks of TensorRT (REFIT_INDIVIDUAL, mark_weights_refittable,
Refitter). Its "engine" adds the refittable head bias to its logits, so a test can see which task's tensors it
holds; it checks control flow (which names are marked, which flag, when the engine is refitted and with
which arrays), never that TensorRT refits a real engine. The real test runs where `import tensorrt` works and a
GPU is visible.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import host, logits_of
from onnx import numpy_helper
from test_tasks import tasks  # noqa: F401 - the module fixture: a swappable tiny base, full exports, B's pack
from test_trt import H100, FakeCuda, FakeTensorRT, _tensorrt_and_gpu, build_with_fake, open_fake_backend

from stexport.runtime import backends
from stexport.bundle.store import Bundle
from stexport.errors import StexportError
from stexport.trt_engines.record import engine_key, mismatches
from stexport.trt_engines.refit import (INT8_REFUSED, check_missing, host_weights, needs_switch,
                                        no_tasks_reason, refit_engine, refit_names)


def copy_bundle(src: Bundle, dst) -> Bundle:
    shutil.copytree(src.path, dst)
    return Bundle.load(dst)


@pytest.fixture(scope="module")
def other_base(tasks, tmp_path_factory):  # noqa: F811
    """A second swappable base (a 9-row head) and task B's pack made for it: a pack for another base."""
    from stexport.build.pipeline import build_bundle
    from stexport.build.packing import build_pack

    root = tmp_path_factory.mktemp("other")
    base = build_bundle(tasks["a"], out=root / "base9", swappable=True, max_classes=10, backbone="stexport-tiny-vit",
                        pretrained="none", precision="fp32")
    return base, build_pack(tasks["b"], base, out=root / "b9.stpack")


# ---------------------------------------------------------------------------------------------------------
# FAKE TensorRT with refitting (see the module docstring)

class RefitFakeTensorRT(FakeTensorRT):
    """FakeTensorRT plus REFIT/REFIT_INDIVIDUAL, mark_weights_refittable (true for the ONNX's initializers, as
    the parser names weights after them) and a Refitter. The plan carries the marked weights' values; the
    engine adds head.bias[:5] to the fake logits when head.bias is one of them. `individual=False`: a
    TensorRT without REFIT_INDIVIDUAL; `missing`: names get_missing_weights reports whatever is set."""

    def __init__(self, individual: bool = True, missing: tuple = (), **kw):
        super().__init__(**kw)
        fake = self
        self.refits: list[dict] = []  # the arrays of every refit_cuda_engine, in order
        flags = dict(vars(self.BuilderFlag)) if hasattr(self, "BuilderFlag") else {}
        flags.update(REFIT=4, **({"REFIT_INDIVIDUAL": 22} if individual else {}))
        self.BuilderFlag = SimpleNamespace(**flags)
        self.Weights = lambda a: SimpleNamespace(array=a)
        Builder, Parser, Runtime = self.Builder, self.OnnxParser, self.Runtime

        class RefitParser(Parser):
            def parse_from_file(self, path):
                ok = super().parse_from_file(path)
                net = self.network
                net.weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
                net.marked = []

                def mark(name):
                    fake.calls.append(("mark_weights_refittable", name))
                    net.marked.append(name)
                    return name in net.weights

                net.mark_weights_refittable = mark
                return ok

        class RefitBuilder(Builder):
            def build_serialized_network(self, network, config):
                plan = super().build_serialized_network(network, config)
                if plan is None:
                    return None
                plan = json.loads(plan)
                plan["weights"] = {n: [str(network.weights[n].dtype), network.weights[n].tolist()]
                                   for n in getattr(network, "marked", [])}
                return json.dumps(plan).encode()

        class Refitter:
            def __init__(self, engine, logger):
                fake.calls.append(("Refitter",))
                self.engine, self.set = engine, {}

            def get_weights_prototype(self, name):
                w = self.engine.weights.get(name)
                return SimpleNamespace(size=-1 if w is None else w.size, dtype=None if w is None else w.dtype)

            def set_named_weights(self, name, weights):
                fake.calls.append(("set_named_weights", name))
                self.set[name] = weights.array
                return name in self.engine.weights

            def get_missing_weights(self):
                return [n for n in missing if n not in self.set]

            def refit_cuda_engine(self):
                fake.calls.append(("refit_cuda_engine",))
                fake.refits.append({n: a.copy() for n, a in self.set.items()})
                for n, a in self.set.items():
                    self.engine.weights[n] = a.copy()
                return True

        class RefitRuntime(Runtime):
            def deserialize_cuda_engine(self, data):
                engine = super().deserialize_cuda_engine(data)
                if engine is None:
                    return None
                engine.weights = {n: np.array(v, dtype) for n, (dtype, v) in engine.plan.get("weights", {}).items()}
                make = engine.create_execution_context

                def context():
                    ctx = make()
                    run = ctx.execute_async_v3

                    def execute(stream):  # the fake logits plus the task's head bias (from "device" memory)
                        ok = run(stream)
                        bias = engine.weights.get("head.bias")
                        if bias is not None:
                            out = fake.memory[ctx.addr["logits"]][:ctx.shape[0] * 20].view(np.float32)
                            out.reshape(ctx.shape[0], 5)[:] += bias[:5]
                        return ok

                    ctx.execute_async_v3 = execute
                    return ctx

                engine.create_execution_context = context
                return engine

        self.Builder, self.OnnxParser, self.Runtime, self.Refitter = RefitBuilder, RefitParser, RefitRuntime, Refitter


def fake_logits(clips: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return clips.reshape(len(clips), -1).mean(1)[:, None] * np.arange(1, 6) + bias[:5]


def names_of(bundle: Bundle) -> list[str]:
    return [t.name for t in bundle.manifest.tasks.tensors]


# ---------------------------------------------------------------------------------------------------------
# TensorRT: building refittable engines (fake TensorRT)

def test_refittable_engine_marks_exactly_the_task_tensors(tasks, tmp_path):  # noqa: F811
    b = copy_bundle(tasks["base"], tmp_path / "base")
    trt = RefitFakeTensorRT()
    rec, built = build_with_fake(b, trt, batch=4)
    names = names_of(b)
    assert built and rec["refit"] == names == refit_names(b.manifest) and len(names) == 34
    assert [c[1] for c in trt.calls if c[0] == "mark_weights_refittable"] == names
    flags = [c[1] for c in trt.calls if c[0] == "set_flag"]
    assert flags == [trt.BuilderFlag.REFIT_INDIVIDUAL]  # only the task tensors: never REFIT, REFIT_IDENTICAL
    marked = [i for i, c in enumerate(trt.calls) if c[0] == "mark_weights_refittable"]
    assert marked[0] > [i for i, c in enumerate(trt.calls) if c[0] == "parse_from_file"][0]  # after parsing
    # the record is typed, and the cache key depends on it
    assert Bundle.load(b.path).manifest.engines[0].refit == names
    plain = engine_key(H100, rec["onnx"], rec["profile"], "fp32", rec["profiles"])
    assert rec["key"] != plain == engine_key(H100, rec["onnx"], rec["profile"], "fp32", rec["profiles"], None)
    # cached: the same engine again, no build
    trt2 = RefitFakeTensorRT()
    assert build_with_fake(Bundle.load(b.path), trt2, batch=4) == (rec, False) and not trt2.calls


def test_older_tensorrt_falls_back_to_refit_all(tasks, tmp_path):  # noqa: F811
    b = copy_bundle(tasks["base"], tmp_path / "base")
    trt = RefitFakeTensorRT(individual=False)
    rec, _ = build_with_fake(b, trt, batch=2)
    assert [c[1] for c in trt.calls if c[0] == "set_flag"] == [trt.BuilderFlag.REFIT]
    assert not [c for c in trt.calls if c[0] == "mark_weights_refittable"] and rec["refit"] == names_of(b)


def test_a_tensor_tensorrt_will_not_mark_is_named(tasks, tmp_path):  # noqa: F811
    b = copy_bundle(tasks["base"], tmp_path / "base")
    proto = onnx.load(str(b.file("onnx")))  # as if the parser did not name the head's weight after it
    next(t for t in proto.graph.initializer if t.name == "head.weight").name = "head.weight.renamed"
    trt = RefitFakeTensorRT()
    real = trt.OnnxParser

    class Renamed(real):
        def parse_from_file(self, path):
            ok = super().parse_from_file(path)
            self.network.weights = {t.name: None for t in proto.graph.initializer}
            return ok

    trt.OnnxParser = Renamed
    with pytest.raises(StexportError) as e:
        build_with_fake(b, trt)
    assert "cannot make per-task tensor 'head.weight' refittable" in str(e.value) and "\n" not in str(e.value)
    assert Bundle.load(b.path).manifest.engines == []  # nothing written


def test_a_plain_engine_of_a_swappable_bundle_is_rebuilt(tasks, tmp_path):  # noqa: F811
    b = copy_bundle(tasks["base"], tmp_path / "base")
    rec, _ = build_with_fake(b, RefitFakeTensorRT(), batch=2)
    old = dict(rec, refit=None)  # as an engine built before refittable engines existed
    why = mismatches(old, H100, rec["onnx"], refit_names(b.manifest))
    assert why == ["built without refittable task tensors (the bundle is swappable)"]
    assert mismatches(rec, H100, rec["onnx"]) == ["built refittable for task packs (the bundle is not swappable)"]
    b.update(engines=[old])
    trt = RefitFakeTensorRT()
    new, built = build_with_fake(Bundle.load(b.path), trt, batch=2)
    assert built and new["refit"] == names_of(b) and any(c[0] == "mark_weights_refittable" for c in trt.calls)


# ---------------------------------------------------------------------------------------------------------
# TensorRT: the backend switches task by refitting (fake TensorRT, fake CUDA)

def test_backend_refits_when_the_task_changes(tasks, tmp_path, monkeypatch):  # noqa: F811
    b = copy_bundle(tasks["base"], tmp_path / "base")
    memory: dict = {}
    trt = RefitFakeTensorRT(memory=memory)
    build_with_fake(b, trt, batch=4)
    be = open_fake_backend(b, monkeypatch, trt, FakeCuda(memory))
    assert be.SWAPS_TASKS and be.describe()["refittable"] == 34
    pack = tasks["pack_b"]
    own_bias = numpy_helper.to_array(next(t for t in onnx.load(str(b.file("onnx"))).graph.initializer
                                          if t.name == "head.bias"))
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(be.run(x), fake_logits(x, own_bias), rtol=1e-5)
    assert trt.refits == []  # the engine holds the bundle's own task already
    got = be.run(x, task=pack)
    np.testing.assert_allclose(got, fake_logits(x, pack.tensors["head.bias"]), rtol=1e-5)
    assert len(trt.refits) == 1 and set(trt.refits[0]) == set(names_of(b))
    for name, a in trt.refits[0].items():  # every pack tensor, by its ONNX name, in the engine's type
        np.testing.assert_array_equal(a, pack.tensors[name])
        assert a.dtype == np.float32 and a.flags.c_contiguous
    be.run(x, task=pack.path)  # same task (by path): no refit
    assert len(trt.refits) == 1
    np.testing.assert_allclose(be.run(x), fake_logits(x, own_bias), rtol=1e-5)  # back: the ONNX's own tensors
    assert len(trt.refits) == 2 and np.array_equal(trt.refits[1]["head.bias"], own_bias)
    be.set_task(pack)
    np.testing.assert_allclose(be.run(x), fake_logits(x, pack.tensors["head.bias"]), rtol=1e-5)
    assert len(trt.refits) == 3
    be.set_task(None)

    # calls for two tasks from four threads: each gets its own task's logits (runs and refits take turns)
    want = {None: fake_logits(x, own_bias), "b": fake_logits(x, pack.tensors["head.bias"])}
    got: list = []

    def work(t):
        for _ in range(5):
            got.append((t, be.run(x, task=pack if t else None)))

    threads = [threading.Thread(target=work, args=(t,)) for t in (None, "b", None, "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 20 and all(np.allclose(out, want[t], rtol=1e-5) for t, out in got)
    be.close()


def test_backend_refusals(tasks, other_base, tmp_path, monkeypatch):  # noqa: F811
    b = copy_bundle(tasks["base"], tmp_path / "base")
    memory: dict = {}
    trt = RefitFakeTensorRT(memory=memory, missing=("blocks.0.attn.qkv.weight",))
    build_with_fake(b, trt, batch=2)
    be = open_fake_backend(b, monkeypatch, trt, FakeCuda(memory))
    x = np.zeros((1, 8, 32, 32, 3), np.uint8)
    with pytest.raises(StexportError) as e:  # a pack for another base
        be.run(x, task=other_base[1])
    assert "does not fit" in str(e.value) and "head rows 10 (pack) vs 12" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(StexportError, match=r"TensorRT wants weights 'blocks.0.attn.qkv.weight' refitted"):
        be.run(x, task=tasks["pack_b"])  # get_missing_weights is checked before refitting
    assert trt.refits == []
    be.close()
    # a plain bundle's engine: the refusal says why
    plain = copy_bundle(tasks["full_a"], tmp_path / "plain")
    build_with_fake(plain, RefitFakeTensorRT(memory=memory), batch=2)
    be = open_fake_backend(plain, monkeypatch, RefitFakeTensorRT(memory=memory), FakeCuda(memory))
    with pytest.raises(StexportError, match="TensorRT runs no task packs here: the bundle is not swappable"):
        be.run(x, task=tasks["pack_b"])
    be.close()


def test_refit_plan_pure_functions(tasks):  # noqa: F811
    pack = tasks["pack_b"]
    wanted = {t.name: (tuple(t.shape), t.dtype) for t in tasks["base"].manifest.tasks.tensors}
    got = host_weights(pack.tensors, wanted)
    assert list(got) == list(wanted) and all(got[n].dtype == np.float32 for n in got)
    fp16 = {n: (s, "float16") for n, (s, _) in wanted.items()}  # an FP16 engine: floats converted
    assert all(a.dtype == np.float16 for a in host_weights(pack.tensors, fp16).values())
    cases = [
        ({**pack.tensors, "blocks.9.extra": np.zeros(3, np.float32)}, wanted,
         "tensor 'blocks.9.extra' is not a refittable weight of the TensorRT engine"),
        ({k: v for k, v in pack.tensors.items() if k != "head.bias"}, wanted, "no tensor 'head.bias'"),
        ({**pack.tensors, "head.bias": np.zeros(13, np.float32)}, wanted,
         "tensor 'head.bias' has shape [13], the engine's [12]"),
        (pack.tensors, {**wanted, "head.bias": ((12,), "int8")}, "tensor 'head.bias' is float32, the engine's int8"),
    ]
    for tensors, want, msg in cases:
        with pytest.raises(StexportError) as e:
            host_weights(tensors, want, "b.stpack")
        assert msg in str(e.value) and str(e.value).startswith("b.stpack: ") and "\n" not in str(e.value)
    assert needs_switch(None, "k") and needs_switch("k", None) and not needs_switch("k", "k")
    assert needs_switch("?", None)  # after a failed refit the engine holds no task
    check_missing([], "e")
    with pytest.raises(StexportError, match=r"'a' \(and 1 more\)"):
        check_missing(["a", "b"], "e")
    # INT8 swappable bundles: plain engines, packs refused naming the fix
    m = tasks["base"].manifest
    int8 = m.model_copy(update={"precision": "int8"})
    assert refit_names(int8) is None and no_tasks_reason(int8) == INT8_REFUSED
    assert "FP16 or FP32 swappable base" in INT8_REFUSED and "onnxruntime or openvino" in INT8_REFUSED
    assert refit_names(tasks["full_a"].manifest) is None
    assert "not swappable" in no_tasks_reason(tasks["full_a"].manifest)


def test_refit_engine_checks_what_tensorrt_reports():
    """refit_engine against the fake Refitter: a name or size the engine does not have is named."""
    trt = RefitFakeTensorRT()
    engine = SimpleNamespace(weights={"w": np.zeros(4, np.float32)})
    logger = SimpleNamespace(errors=[])
    with pytest.raises(StexportError, match="'v' is not a refittable weight"):
        refit_engine(trt, engine, logger, {"v": np.zeros(4, np.float32)})
    with pytest.raises(StexportError, match=r"tensor 'w' is float32\[3\], the engine's float32\[4\]"):
        refit_engine(trt, engine, logger, {"w": np.zeros(3, np.float32)})
    with pytest.raises(StexportError, match=r"tensor 'w' is float16\[4\], the engine's float32\[4\]"):
        refit_engine(trt, engine, logger, {"w": np.zeros(4, np.float16)})
    refit_engine(trt, engine, logger, {"w": np.arange(4, dtype=np.float32)})
    assert engine.weights["w"].tolist() == [0, 1, 2, 3]


@pytest.mark.tensorrt
@pytest.mark.skipif(_tensorrt_and_gpu() is not None, reason=str(_tensorrt_and_gpu()))
def test_real_refit_matches_full_exports(tasks, tmp_path):  # noqa: F811
    """Real TensorRT: the base's refittable engine runs B's pack as B's own engine does, and back."""
    base = copy_bundle(tasks["base"], tmp_path / "base")
    full_a, full_b = (copy_bundle(tasks[k], tmp_path / k) for k in ("full_a", "full_b"))
    x = tasks["clips"]
    with backends.create("tensorrt", full_a) as fa, backends.create("tensorrt", full_b) as fb:
        want_a, want_b = fa.run(x), fb.run(x)
    with backends.create("tensorrt", base) as be:
        assert be.SWAPS_TASKS
        for _ in range(2):
            assert np.abs(be.run(x) - want_a).max() <= 1e-3  # TF32 GEMMs on both sides
            assert np.abs(be.run(x, task=tasks["pack_b"]) - want_b).max() <= 1e-3


# ---------------------------------------------------------------------------------------------------------
# TorchScript (real)

@pytest.fixture(scope="module")
def ts_tasks(tasks, tmp_path_factory):  # noqa: F811
    """model.ts of the swappable base and of the two full exports (copies of the tasks fixture's bundles)."""
    from stexport.build.torchscript import add_to_bundle

    root = tmp_path_factory.mktemp("ts")
    return {k: add_to_bundle(copy_bundle(tasks[k], root / k)) for k in ("base", "full_a", "full_b")}


def test_torchscript_packs_equal_their_full_exports(tasks, ts_tasks):  # noqa: F811
    x = tasks["clips"]
    base = ts_tasks["base"]
    rec = base.manifest.torchscript
    assert rec.frozen and rec.task_tensors == names_of(base)
    with backends.create("torchscript", ts_tasks["full_a"], device="cpu") as fa, \
            backends.create("torchscript", ts_tasks["full_b"], device="cpu") as fb, \
            backends.create("onnxruntime", tasks["full_b"]) as ob:
        want_a, want_b, ort_b = fa.run(x), fb.run(x), ob.run(x)
    assert np.abs(want_a[:, :7] - want_b).max() > 0.1  # the two tasks really differ
    with backends.create("torchscript", base, device="cpu") as be:
        assert be.SWAPS_TASKS and be.describe()["task_tensors"] == 34
        for _ in range(2):  # back and forth
            own, swapped = be.run(x), be.run(x, task=tasks["pack_b"])
            assert own.shape == (4, 10) and swapped.shape == (4, 7)
            assert np.abs(own - want_a).max() <= 1e-4 and np.abs(swapped - want_b).max() <= 1e-4
        assert np.abs(swapped - ort_b).max() <= 1e-4
        be.set_task(tasks["pack_b"].path)
        assert np.abs(be.run(x) - want_b).max() <= 1e-4
        be.set_task(None)

        # calls for both tasks from four threads on one module, each with its own task
        got: list = []

        def work(t):
            for _ in range(4):
                got.append((t, be.run(x, task=tasks["pack_b"] if t else None)))

        threads = [threading.Thread(target=work, args=(t,)) for t in (None, "b", None, "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 16
        assert all(np.abs(out - (want_b if t else want_a)).max() <= 1e-4 for t, out in got)


def test_torchscript_pack_refusals(tasks, ts_tasks, other_base):  # noqa: F811
    x = tasks["clips"][:1]
    with backends.create("torchscript", ts_tasks["base"], device="cpu") as be:
        with pytest.raises(StexportError) as e:
            be.run(x, task=other_base[1])
        assert "does not fit" in str(e.value) and "head rows 10 (pack) vs 12" in str(e.value)
        assert "\n" not in str(e.value)
        pack = tasks["pack_b"]
        bad = dataclasses.replace(pack, tensors={**pack.tensors, "head.bias": np.zeros(5, np.float32)})
        with pytest.raises(StexportError, match=r"tensor 'head.bias' has shape \[5\], the module's \[12\]"):
            be.prepare_task(bad)
        odd = dataclasses.replace(pack, tensors={**pack.tensors, "blocks.7.x": np.zeros(1, np.float32)})
        with pytest.raises(StexportError, match="tensor 'blocks.7.x' is not a per-task tensor"):
            be.prepare_task(odd)
    with backends.create("torchscript", ts_tasks["full_a"], device="cpu") as be:
        assert not be.SWAPS_TASKS
        with pytest.raises(StexportError, match="TorchScript runs no task packs here: the bundle is not swappable"):
            be.run(x, task=pack)


def test_cpp_host_runs_the_swappable_module(cpp_host, tasks, ts_tasks, tmp_path):  # noqa: F811
    """The C++ host calls forward: the base task's logits, its classes only."""
    clip = tmp_path / "clip.npy"
    np.save(clip, tasks["clips"][:2])
    with backends.create("onnxruntime", tasks["full_a"]) as fa:
        want = fa.run(tasks["clips"][:2])
    p = host(cpp_host, ts_tasks["base"].file("torchscript"), clip, "--logits", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    got = logits_of(p.stdout)
    assert got.shape == (2, 10) and np.abs(got - want).max() <= 1e-4



def _cuda():
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_packs_on_cuda_equal_their_full_exports(tasks, ts_tasks):  # noqa: F811
    """TorchScript (forward_task) and the torch reference run a pack on the GPU: the pack's full export's
    logits (ONNX Runtime, CPU) within 1e-3, back and forth, the task per call."""
    x = tasks["clips"]
    with backends.create("onnxruntime", tasks["full_a"], device="cpu") as fa, \
            backends.create("onnxruntime", tasks["full_b"], device="cpu") as fb:
        want_a, want_b = fa.run(x), fb.run(x)
    for name, bundle in (("torchscript", ts_tasks["base"]), ("torch", tasks["base"])):
        with backends.create(name, bundle, device="cuda") as be:
            assert be.describe()["device"].startswith("cuda"), be.describe()
            for _ in range(2):
                own, swapped = be.run(x), be.run(x, task=tasks["pack_b"])
                assert np.abs(own - want_a).max() <= 1e-3, (name, np.abs(own - want_a).max())
                assert np.abs(swapped - want_b).max() <= 1e-3, (name, np.abs(swapped - want_b).max())
