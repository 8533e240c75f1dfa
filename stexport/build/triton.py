"""A Triton Inference Server model repository from a bundle (`stexport export-triton`).

Layout written (one model per repository; MODEL defaults to the bundle's name):

    REPO/README.md                    how a client decodes, samples and scores (clips are decoded client-side)
    REPO/MODEL/config.pbtxt           Triton's ModelConfig, built with tritonclient's own protobuf schema
    REPO/MODEL/labels.txt             class names (the output's label_filename)
    REPO/MODEL/labels/INDEX.txt       instead, a multi-task bundle's: each task's class names
    REPO/MODEL/stexport.json          the bundle's manifest, for provenance
    REPO/MODEL/1/model.onnx           onnxruntime_onnx / openvino (+ its external data file, when it has one)
    REPO/MODEL/1/model.plan           tensorrt_plan: the bundle's engine, valid only for the GPU and TensorRT
                                      version its record names

The config's input and output come from the manifest (uint8 (T, H, W, 3) frames or float32 (T, 3, H, W);
float32 logits (classes,)), with the batch axis implicit (`max_batch_size` > 0). A multi-task bundle
(stexport.build.multitask) has a second input, the task index of each clip: its name and type are read from the
graph (int64 [B]); Triton describes a batched input of no other axis as dims [1] reshaped to [] (the model sees
[B]), so a client sends it as (V, 1). Its output is the head's rows (every task's logits padded to the
largest), a client keeps its task's first `classes`; each task's class names are MODEL/labels/INDEX.txt.
Dynamic batching prefers batches of the bundle's views, which is what one video sends. The repository is
written to a temporary sibling and renamed into place, so a failed export leaves nothing, and an existing
repository is only replaced with force (and only one this module wrote).

Imports no torch and nothing from the build stage; `tritonclient` (the `stexport[triton]` extra) is imported
when a config is built.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from stexport.bundle.store import Bundle, writing
from stexport.errors import StexportError
from stexport.extras import require

# stexport backend name -> (Triton platform or None, Triton backend, model file in the version folder)
PLATFORMS = {
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime", "model.onnx"),
    "openvino": (None, "openvino", "model.onnx"),
    "tensorrt": ("tensorrt_plan", "tensorrt", "model.plan"),
}
MARKER = "stexport-triton.json"  # in the repository root: what wrote it (lets --force replace only our own)
DEFAULT_MAX_BATCH = 32
DEFAULT_QUEUE_DELAY_US = 500
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TritonOptions:
    """What `export_repository` writes. `max_batch`: None takes the engine profile's maximum (tensorrt) or
    DEFAULT_MAX_BATCH; `instances`: model instances per device; `threads`: the backend's CPU threads (None:
    the backend's default); `device`: 'cpu' or 'gpu' (None: gpu for tensorrt, else cpu); `engine`: the key of
    the bundle's engine to export when it holds several."""

    backend: str = "onnxruntime"
    name: str | None = None
    max_batch: int | None = None
    instances: int = 1
    threads: int | None = None
    device: str | None = None
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    engine: str | None = None


def _config_pb2():
    require("export-triton", "tritonclient")
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:  # tritonclient without its grpc part
        raise StexportError(f"export-triton needs tritonclient's gRPC part ({e}); install it with: "
                            "pip install 'stexport[triton]'") from None
    return model_config_pb2


def _engine(bundle: Bundle, key: str | None):
    engines = bundle.manifest.engines
    if not engines:
        raise StexportError(f"{bundle.path}: no TensorRT engine in the bundle; build one on the target GPU with "
                            f"`stexport engine {bundle.path}` (the plan only runs on that GPU and TensorRT)")
    if key is None:
        if len(engines) > 1:
            raise StexportError(f"{bundle.path}: {len(engines)} TensorRT engines; pick one with --engine KEY: "
                                + "; ".join(f"{e.key} ({e.gpu}, TensorRT {e.tensorrt}, batch ≤ "
                                            f"{e.profile.max[0]})" for e in engines))
        return engines[0]
    for e in engines:
        if e.key == key:
            return e
    raise StexportError(f"--engine {key}: not in {bundle.path}; its engines: "
                        + ", ".join(e.key for e in engines))


def build_config(bundle: Bundle, opts: TritonOptions):
    """Triton's ModelConfig (tritonclient.grpc.model_config_pb2) for `bundle` served by `opts.backend`.

    Raises StexportError for an unknown backend, a batch size that cannot hold one video's views, a device
    the backend does not run on, or (tensorrt) a bundle without a fitting engine."""
    pb = _config_pb2()
    if opts.backend not in PLATFORMS:
        raise StexportError(f"--backend {opts.backend}: Triton serves stexport bundles with "
                            + ", ".join(PLATFORMS))
    platform, backend, model_file = PLATFORMS[opts.backend]
    m = bundle.manifest
    views = m.sampling.temporal_views * m.sampling.spatial_views
    device = opts.device or ("gpu" if opts.backend == "tensorrt" else "cpu")
    if device not in ("cpu", "gpu"):
        raise StexportError(f"--device {device}: choose cpu or gpu")
    if (opts.backend, device) in (("tensorrt", "cpu"), ("openvino", "gpu")):
        raise StexportError(f"--device {device}: Triton's {backend} backend runs on "
                            f"{'GPUs' if opts.backend == 'tensorrt' else 'CPUs'} only")
    max_batch = opts.max_batch
    if opts.backend == "tensorrt":
        profile_max = _engine(bundle, opts.engine).profile.max[0]
        if max_batch is not None and max_batch > profile_max:
            raise StexportError(f"--max-batch {max_batch}: the engine's profile takes at most {profile_max}; "
                                f"rebuild it with `stexport engine {bundle.path} --batch {max_batch}`")
        max_batch = max_batch or profile_max
    max_batch = max_batch or DEFAULT_MAX_BATCH
    if max_batch < views:
        raise StexportError(f"--max-batch {max_batch}: one video is {views} views ({m.sampling.temporal_views}x"
                            f"{m.sampling.spatial_views}), which a request sends as one batch; use at least {views}")
    if opts.instances < 1:
        raise StexportError(f"--instances {opts.instances}: must be at least 1")
    if opts.threads is not None and opts.threads < 1:
        raise StexportError(f"--threads {opts.threads}: must be at least 1")
    if opts.queue_delay_us < 0:
        raise StexportError(f"--queue-delay-us {opts.queue_delay_us}: must be ≥ 0")

    cfg = pb.ModelConfig(name=opts.name or default_name(bundle), backend=backend, max_batch_size=max_batch,
                         default_model_filename=model_file)
    if platform:
        cfg.platform = platform
    dtype = {"uint8": pb.TYPE_UINT8, "float32": pb.TYPE_FP32}[m.input.dtype]
    cfg.input.add(name=m.input.name, data_type=dtype, dims=list(m.input.shape(1)[1:]))
    if m.multitask is None:
        cfg.output.add(name=m.output.name, data_type=pb.TYPE_FP32, dims=[m.output.classes],
                       label_filename="labels.txt")
    else:  # the task index: per clip a scalar, which Triton's batched models describe as [1] reshaped to []
        name, onnx_type = task_input(bundle)
        cfg.input.add(name=name, data_type=getattr(pb, f"TYPE_{onnx_type}"), dims=[1],
                      reshape=pb.ModelTensorReshape(shape=[]))
        cfg.output.add(name=m.output.name, data_type=pb.TYPE_FP32, dims=[m.multitask.head_rows])
    preferred = [b for b in (views, 2 * views, 4 * views) if b <= max_batch]
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = opts.queue_delay_us
    cfg.instance_group.add(count=opts.instances,
                           kind=pb.ModelInstanceGroup.KIND_GPU if device == "gpu" else pb.ModelInstanceGroup.KIND_CPU)
    params = {}
    if opts.backend == "onnxruntime":
        if opts.threads:
            params.update(intra_op_thread_count=opts.threads, inter_op_thread_count=1)
        if m.precision == "fp16" and device == "cpu":
            # ORT_ENABLE_ALL crashes ONNX Runtime's CPU provider on FP16 graphs (checked on 1.32); Triton's
            # onnxruntime backend maps level 1 to ORT_ENABLE_EXTENDED
            cfg.optimization.graph.level = 1
    elif opts.backend == "openvino":
        params.update(PERFORMANCE_HINT="LATENCY" if opts.instances == 1 else "THROUGHPUT")
        if opts.threads:
            params.update(INFERENCE_NUM_THREADS=opts.threads)
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
    return cfg


def task_input(bundle: Bundle) -> tuple[str, str]:
    """A multi-task bundle graph's task input, as the graph declares it: (name, Triton's type name without
    TYPE_, e.g. 'INT64'). StexportError when the graph's second input is not the manifest's rank-1 [batch]
    integer task input (a bundle edited by hand)."""
    import onnx

    mt = bundle.manifest.multitask
    g = onnx.load(str(bundle.file("onnx", verify=False)), load_external_data=False).graph
    inp = g.input[1] if len(g.input) > 1 else None
    types = {onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32"}
    t = inp.type.tensor_type if inp is not None else None
    if inp is None or inp.name != mt.input or t.elem_type not in types or len(t.shape.dim) != 1:
        raise StexportError(f"{bundle.path}: its graph's second input is not the task index '{mt.input}' (int64 "
                            "[batch]) its manifest names; rebuild it with `stexport multitask --force`")
    return inp.name, types[t.elem_type]


def config_text(cfg) -> str:
    """The config as Triton reads it (protobuf text format)."""
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def default_name(bundle: Bundle) -> str:
    """The bundle's name as a Triton model name (letters, digits, '_', '.', '-')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", bundle.manifest.name or bundle.path.name).strip("-.") or "model"
    return name if name[0].isalnum() else f"m{name}"


def _readme(bundle: Bundle, cfg, opts: TritonOptions, model_file: str) -> str:
    m = bundle.manifest
    s = m.sampling
    inp, out = cfg.input[0], cfg.output[0]
    dims = ", ".join(map(str, inp.dims))
    views = s.temporal_views * s.spatial_views
    if s.rate == 0:
        temporal = (f"rate 0: one temporal view of {m.input.frames} frames spread over the whole video: with n "
                    f"frames that decode, seg = (n-1)/{m.input.frames} and frame i is "
                    f"(round(seg*i) + round(seg*(i+1))) // 2")
    else:
        span = (m.input.frames - 1) * s.rate + 1
        temporal = (f"rate {s.rate}: windows of {span} frames taking every {s.rate}-th ({m.input.frames} frames); "
                    + ("one window, centred (start = (max(n, span) - span) // 2)" if s.temporal_views == 1 else
                       f"{s.temporal_views} windows spread evenly from the first frame to the last (start_i = "
                       f"round(slide / {s.temporal_views - 1} * i), slide = max(n, {span}) - {span})")
                    + "; frames past the end repeat the last one")
    spatial = ("the center crop" if s.spatial_views == 1 else
               "3 crops along the long side: its start, middle and end")
    if m.input.dtype == "uint8":
        feed = (f"uint8 RGB, (V, {dims}) in (T, H, W, C) order: the model casts, scales by 1/255 and normalises "
                f"with CLIP's mean/std itself")
    else:
        feed = (f"float32 (V, {dims}) in (T, C, H, W) order, RGB/255 normalised with mean {list(m.input.mean)} "
                f"and std {list(m.input.std)}")
    engine = ""
    if opts.backend == "tensorrt":
        e = _engine(bundle, opts.engine)
        engine = (f"\n`{model_file}` is the bundle's TensorRT engine {e.key}: built for {e.gpu} (compute "
                  f"{e.capability}) with TensorRT {e.tensorrt}, batch 1…{e.profile.max[0]}. Triton loads it only "
                  f"where its TensorRT is that version and the GPU that model; elsewhere build one there with "
                  f"`stexport engine BUNDLE` and export again.\n")
    mt = m.multitask
    classes = f"{len(mt.tasks)} tasks" if mt else f"{m.output.classes} classes"
    sends = f"""- input `{inp.name}`: {feed};
- output `{out.name}`: float32 logits (V, {m.output.classes}); class names in `{cfg.name}/labels.txt`."""
    client = f"""x = grpcclient.InferInput("{inp.name}", list(clips.shape), "{'UINT8' if m.input.dtype == 'uint8' else 'FP32'}")
x.set_data_from_numpy(clips)
logits = c.infer("{cfg.name}", [x]).as_numpy("{out.name}")
labels = open("{cfg.name}/labels.txt").read().split("\\n")"""
    tasks = ""
    if mt:
        task = cfg.input[1]
        sends = f"""- input `{inp.name}`: {feed};
- input `{task.name}`: {pb_type(task.data_type).lower()} (V, 1), every row the index of the video's task (below):
  one scalar per clip (the model sees ({task.name},) = (V,)), so one request, and one batch, may mix tasks;
- output `{out.name}`: float32 logits (V, {mt.head_rows}), every task's head padded to the largest: keep the
  first `classes` of the request's task; its class names are `{cfg.name}/labels/INDEX.txt`."""
        rows = "\n".join(f"| {t.index} | `{t.name}` | {t.classes} | `labels/{t.index}.txt` | rate {t.sampling.rate}, "
                          f"{t.sampling.temporal_views}x{t.sampling.spatial_views} views |" for t in mt.tasks)
        tasks = f"""
## Tasks

One graph runs every task (a multi-task bundle, `stexport multitask`): the backbone once per batch, each clip
with its own task's adapters and head. Decode and sample each video with its task's sampling (the steps below
give the first task's; the others' rate and views are in this table).

| index | task | classes | class names | sampling |
|---|---|---|---|---|
{rows}
"""
        names = {t.name: [t.index, t.classes] for t in mt.tasks}
        client = f"""TASKS = {names}  # name: [index, classes]
index, classes = TASKS["{mt.tasks[-1].name}"]
x = grpcclient.InferInput("{inp.name}", list(clips.shape), "{'UINT8' if m.input.dtype == 'uint8' else 'FP32'}")
x.set_data_from_numpy(clips)
t = grpcclient.InferInput("{task.name}", [len(clips), 1], "{pb_type(task.data_type)}")
t.set_data_from_numpy(np.full((len(clips), 1), index, np.{pb_type(task.data_type).lower()}))
logits = c.infer("{cfg.name}", [x, t]).as_numpy("{out.name}")[:, :classes]
labels = open(f"{cfg.name}/labels/{{index}}.txt").read().split("\\n")"""
    return f"""# Triton model repository for `{cfg.name}`

Written by `stexport export-triton` from the bundle `{m.name}` ({m.model.backbone.name}, {m.precision},
{classes}). Serve it with

    tritonserver --model-repository $(pwd)

Model `{cfg.name}`: backend `{cfg.backend}`{f", platform `{cfg.platform}`" if cfg.platform else ""}, file
`{cfg.name}/1/{model_file}`, `max_batch_size` {cfg.max_batch_size}, dynamic batching preferring batches of
{", ".join(map(str, cfg.dynamic_batching.preferred_batch_size))}.
{engine}
## What a client sends

Triton runs the model only: **videos are decoded and sampled by the client**, exactly as `stexport infer` does,
or the scores will not match. One video is one request of V = {views} views (a batch of {views}):

{sends}
{tasks}
## How to decode and sample (the official ST-Adapter evaluation)

1. Decode every frame of the video (OpenCV/FFmpeg); count the n frames that actually decode (container headers
   lie).
2. Temporal views ({s.temporal_views}): {temporal}.
3. Each chosen frame: resize the short side to {m.input.size} px (bicubic; the long side becomes
   long * {m.input.size} // short), BGR → RGB, uint8.
4. Spatial views ({s.spatial_views}): {spatial}, {m.input.size}×{m.input.size}.
5. Stack the views spatial view outer, temporal view inner: view v = s * {s.temporal_views} + t.
6. Score: softmax each view's logits, average the probabilities over the {views} views, take the top classes.

The reference decoder is `stexport dump-clip` (the same code as `stexport infer`): it writes exactly the
array to send.

    stexport dump-clip video.mp4 -m BUNDLE -o clip.npy      # (V, {m.input.frames}, {m.input.size}, {m.input.size}, 3) uint8

```python
import numpy as np, tritonclient.grpc as grpcclient
clips = np.load("clip.npy")
c = grpcclient.InferenceServerClient("127.0.0.1:8001")
{client}
p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
print([(labels[i], float(p.mean(0)[i])) for i in np.argsort(-p.mean(0))[:5]])
```

(`tritonclient.http` clients fail when shared between threads: use one per thread, its async calls, or gRPC.)
"""


def pb_type(data_type: int) -> str:
    """Triton's name of a ModelConfig data type without TYPE_ ('INT64'), as tritonclient's InferInput takes it."""
    return _config_pb2().DataType.Name(data_type)[len("TYPE_"):]


def _copy_model(bundle: Bundle, opts: TritonOptions, version_dir: Path, model_file: str) -> list[str]:
    version_dir.mkdir(parents=True)
    if opts.backend == "tensorrt":
        e = _engine(bundle, opts.engine)
        src = bundle.path / e.file
        if not src.is_file():
            raise StexportError(f"{src}: engine {e.key} is missing from the bundle; rebuild it with "
                                f"`stexport engine {bundle.path}`")
        bundle.verify_files([e.file])
        shutil.copyfile(src, version_dir / model_file)
        return [model_file]
    src = bundle.file("onnx")  # verifies the sha256 of the model and its external data
    shutil.copyfile(src, version_dir / model_file)
    copied = [model_file]
    data = bundle.manifest.artifacts.get("onnx_data")
    if data:  # the graph names its external data file: keep that name, beside the model
        shutil.copyfile(bundle.path / data, version_dir / Path(data).name)
        copied.append(Path(data).name)
    return copied


def refuse_existing(repo: Path, force: bool) -> None:
    """An existing --repo is replaced only with force, and only if it is empty or one export-triton wrote."""
    if not repo.exists() and not repo.is_symlink():
        return
    if not force:
        raise StexportError(f"{repo}: already exists; pass --force to replace it, or choose another --repo")
    if repo.is_symlink() or not repo.is_dir() or (not (repo / MARKER).is_file() and any(repo.iterdir())):
        raise StexportError(f"{repo}: exists and is not a repository written by `stexport export-triton`; "
                            "refusing to replace it")


def export_repository(bundle: Bundle, repo: str | Path, opts: TritonOptions = TritonOptions(),
                      force: bool = False) -> dict:
    """Write a Triton model repository for `bundle` at `repo` (see the module docstring) in one rename.

    Returns a summary dict (repo, model, backend, files, max_batch_size, config text). Raises StexportError
    for an existing `repo` without `force`, a bad option, a bundle file that changed since the build, or a
    missing `tritonclient`."""
    repo = Path(repo)
    if opts.name is not None and not NAME_RE.match(opts.name):
        raise StexportError(f"--name {opts.name!r}: use letters, digits, '_', '.' and '-' (a folder name)")
    refuse_existing(repo, force)
    cfg = build_config(bundle, opts)  # every check before any file is written
    _, _, model_file = PLATFORMS[opts.backend]
    with writing(repo, force, refuse=refuse_existing) as tmp:
        model_dir = tmp / cfg.name
        _copy_model(bundle, opts, model_dir / "1", model_file)
        text = config_text(cfg)
        (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
        mt = bundle.manifest.multitask
        if mt is None:
            (model_dir / "labels.txt").write_text("\n".join(bundle.labels) + "\n", encoding="utf-8")
        else:  # one class-names file per task, by index: the output has no single label file
            (model_dir / "labels").mkdir()
            for t in mt.tasks:
                (model_dir / "labels" / f"{t.index}.txt").write_text("\n".join(t.labels) + "\n", encoding="utf-8")
        (model_dir / "stexport.json").write_text(bundle.manifest.to_json(), encoding="utf-8")
        (tmp / "README.md").write_text(_readme(bundle, cfg, opts, model_file), encoding="utf-8")
        summary = {"repo": str(repo), "model": cfg.name, "backend": cfg.backend, "platform": cfg.platform or None,
                   "max_batch_size": cfg.max_batch_size, "bundle": str(bundle.path),
                   "files": sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()) + [MARKER]}
        (tmp / MARKER).write_text(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2) + "\n")
    summary["files"] = sorted(summary["files"])
    summary["config"] = text
    return summary


__all__ = ["TritonOptions", "PLATFORMS", "build_config", "config_text", "export_repository", "default_name"]
