"""The bundle manifest (`stexport.json`): typed records, one `load()` that validates and migrates, one `save()`.

Every command and runtime reads a bundle through these records; nothing else digs into the JSON. Layout of
format 2 (format 1, written by stexport before the typed manifest, is migrated on load):

    format, format_version, name, created (UTC, ISO 8601)
    provenance   stexport version, Python, library versions at build time
    model        backbone (open_clip name, ViT config, weights source and sha256, activation and why)
                 adapter (spec read from the tensors, checkpoint sha256 and path)
    input        graph input: name, dtype, layout, frames, size, mean/std; `feed()` makes it from uint8 clips
    output       graph output: name, dtype, classes; where the class names came from
    sampling     default rate and views for infer/verify (linziyi96/st-adapter main.py evaluation)
    precision    the bundle's graph precision: fp32 | fp16 | int8 (not a runtime's compute precision)
    artifacts    role → file (onnx, onnx_data, deltas, labels, torchscript, aoti, engines)
    files        file → {sha256, bytes}, every file of the bundle
    calibration, torchscript, aoti, engines, tensorrt_request: records added by the stages that made them

Imports no torch and nothing from the build stage: runtime hosts read manifests with numpy and pydantic only.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from stexport.bundle.precision import FLOAT_PRECISIONS, INPUT_FORMATS, LIBTORCH_PRECISIONS, NAMES

from stexport.version import __version__
from stexport.errors import StexportError
from stexport.fileutil import atomic_write_text

MANIFEST = "stexport.json"
FORMAT = "stexport-bundle"
FORMAT_VERSION = 2

# CLIP's normalisation (open_clip OPENAI_DATASET_MEAN / _STD): what the graph or the host applies to RGB/255.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PosInt = Annotated[int, Field(gt=0)]
Precision = Literal[NAMES]  # stexport.bundle.precision
Activation = Literal["quick_gelu", "gelu"]


class Record(BaseModel):
    """Base of every manifest record: unknown fields are errors (a misspelt key never passes silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ViTConfig:
    """The CLIP vision tower's shape (open_clip model config, vision_cfg)."""

    width: PosInt
    layers: PosInt
    heads: PosInt
    patch_size: PosInt
    image_size: PosInt
    mlp_width: PosInt
    act: Activation = "gelu"
    ln_eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class AdapterSpec:
    """What an ST-Adapter checkpoint holds, read from its tensors (paper section 3; official
    linziyi96/st-adapter vit_clip.py: Linear d→w, depth-wise Conv3d over (T, H, W), Linear w→d)."""

    dim: PosInt  # backbone width d
    width: PosInt  # bottleneck w
    kernel: tuple[int, int, int]  # (kt, kh, kw)
    pre_attn: tuple[int, ...]  # block indices with an adapter before attention
    pre_mlp: tuple[int, ...]  # block indices with an adapter before the MLP
    num_classes: PosInt

    @field_validator("kernel")
    @classmethod
    def _positive_kernel(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(k < 1 for k in v):
            raise ValueError("kernel sizes must be ≥ 1")
        return v

    @property
    def num_adapters(self) -> int:
        return len(self.pre_attn) + len(self.pre_mlp)

    @property
    def layout(self) -> str:
        """The paper's name for it, e.g. '12x384'."""
        return f"{self.num_adapters}x{self.width}"

    @property
    def positions(self) -> str:
        """'pre_attn', 'pre_mlp' or 'pre_attn+pre_mlp'."""
        return "+".join(p for p in ("pre_attn", "pre_mlp") if getattr(self, p)) or "none"

    def num_params(self) -> int:
        """Trainable parameters: the adapters' fc1, conv, fc2 (weights and biases) and the head."""
        kt, kh, kw = self.kernel
        per = (self.dim * self.width + self.width) + (self.width * kt * kh * kw + self.width) \
            + (self.width * self.dim + self.dim)
        return self.num_adapters * per + self.num_classes * self.dim + self.num_classes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(kernel=list(self.kernel), pre_attn=list(self.pre_attn), pre_mlp=list(self.pre_mlp),
                 layout=self.layout)
        return d


class WeightsSource(Record):
    """Where the backbone's weights came from: an open_clip tag, a file (with its sha256), or seeded random."""

    pretrained: str  # the --pretrained value: a tag, a path, or "none"
    tag: str | None = None
    file: str | None = None
    sha256: str | None = None
    seed: int | None = None  # random weights (--pretrained none)
    openai: bool | None = None  # OpenAI's CLIP weights (trained with QuickGELU)

    @property
    def random(self) -> bool:
        """Seeded random weights (--pretrained none): a bundle of them predicts nothing meaningful."""
        return self.seed is not None or self.pretrained in ("", "none")


class BackboneRecord(Record):
    name: str  # open_clip model name, e.g. ViT-B-16
    config: ViTConfig
    weights: WeightsSource
    activation_reason: str | None = None  # why QuickGELU or GELU was chosen

    @property
    def activation(self) -> str:
        return self.config.act


class AdapterRecord(Record):
    spec: AdapterSpec
    sha256: str | None = None  # of the checkpoint file it was read from
    file: str | None = None


class ModelRecord(Record):
    backbone: BackboneRecord
    adapter: AdapterRecord


class InputRecord(Record):
    """The graph's input tensor. uint8 graphs take RGB clips (B, T, H, W, 3) and normalise inside; float
    graphs take (B, T, 3, H, W) already normalised by the host with `mean`/`std` (see `feed`)."""

    name: str = "frames"
    dtype: Literal[tuple(f.dtype for f in INPUT_FORMATS.values())] = "uint8"
    layout: Literal[tuple(f.layout for f in INPUT_FORMATS.values())] = "BTHWC"
    frames: int = Field(gt=0, le=4096, strict=True)
    size: int = Field(gt=0, le=8192, strict=True)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, v, info):
        if not all(np.isfinite(x) for x in v) or (info.field_name == "std" and min(v) <= 0):
            raise ValueError("must be finite" + (" and positive" if info.field_name == "std" else ""))
        return v

    @property
    def normalized_in_graph(self) -> bool:
        return next(f.normalized_in_graph for f in INPUT_FORMATS.values() if f.dtype == self.dtype)

    def shape(self, batch: int | str = "B") -> tuple:
        """The input's shape for `batch` clips, in the graph's layout (e.g. (B, 8, 224, 224, 3))."""
        dims = {"B": batch, "T": self.frames, "H": self.size, "W": self.size, "C": 3}
        return tuple(dims[c] for c in self.layout)

    def feed(self, clips: np.ndarray) -> np.ndarray:
        """uint8 clips (B, T, H, W, 3) RGB → what the graph takes: the same array for uint8 graphs, else
        float32 (B, T, 3, H, W) = (clips / 255 − mean) / std. Raises StexportError on a wrong shape or dtype."""
        want = (self.frames, self.size, self.size, 3)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != want:
            raise StexportError(f"clips must have shape (B, {', '.join(map(str, want))}), got {tuple(clips.shape)}")
        if clips.dtype != np.uint8:
            raise StexportError(f"clips must be uint8, got {clips.dtype}")
        if self.dtype == "uint8":
            return np.ascontiguousarray(clips)
        mean = np.asarray(self.mean, np.float32).reshape(1, 1, 3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, 1, 3, 1, 1)
        x = clips.transpose(0, 1, 4, 2, 3).astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray((x - mean) / std)


class OutputRecord(Record):
    name: str = "logits"
    dtype: Literal["float32"] = "float32"
    classes: int = Field(gt=0)
    labels_source: str = "generic"  # where the names in the labels artifact came from


class SamplingRecord(Record):
    """Default sampling for infer/verify: every `rate`-th frame (0: spread over the whole video), views."""

    rate: int = Field(ge=0)
    temporal_views: int = Field(ge=1)
    spatial_views: Literal[1, 3]


class FileRecord(Record):
    sha256: str
    bytes: int = Field(ge=0)


class Provenance(Record):
    stexport: str
    python: str | None = None
    libraries: dict[str, str] = {}


class CalibrationRecord(Record):
    """How an INT8 bundle's activation ranges were calibrated (stexport.calibration)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str
    clips: int
    source: str | None = None
    seed: int = 0
    percentile: float | None = None
    sampling: dict[str, int] = {}
    quantized_layers: int = 0
    activation_ranges: int = 0
    cache_key: str | None = None
    cached: bool = False
    scheme: str | None = None
    attention_scores_int8: bool = False
    # the float type around the Q/DQ pairs: fp32, or fp16 (dequantized tensors, scales and the float layers in
    # FP16; LayerNorm/Softmax statistics in FP32), what a strongly typed TensorRT network then runs them in
    float_precision: Literal[FLOAT_PRECISIONS] = "fp32"
    # outlier migration folded into the graph (stexport.calibration.smooth): alpha, sites, the candidates
    # compared on the calibration clips; None: none (bundles before it, or --int8-migrate off)
    migration: dict | None = None
    # GEMMs left in float to meet a build gate (stexport.build.fallback): the gate, each layer and the error it
    # removed, agreement before/after, ms/clip; None: no gate was asked for
    float_fallback: dict | None = None


class FP16CheckRecord(Record):
    """What `build --precision fp16` checked on the FP16 graph it wrote (stexport.build.fp16_check): the largest FP32
    activation against FP16's range, and the FP16 logits against FP32's."""

    clips: int
    source: str
    max_abs_activation: float
    layer: str
    fp16_max: float
    max_abs_logit_diff: float
    top1_agreement: float
    passed: bool = True
    overflow: str | None = None  # --fp16-overflow: "fp32" or "refuse" (None: built before the flag existed)
    # nodes kept in FP32 inside the FP16 graph: {node, op, max_abs_activation, why} each
    fp32_nodes: list[dict] = Field(default_factory=list)
    overflow_layers: list[dict] = Field(default_factory=list)  # modules beyond FP16: {layer, max_abs_activation}


class TorchScriptRecord(Record):
    model_config = ConfigDict(extra="allow", frozen=True)
    file: str
    precision: Literal[LIBTORCH_PRECISIONS]
    frozen: bool = True
    trace_check_max_abs: float | None = None
    torch: str | None = None
    # a swappable bundle's module: the per-task tensors (ONNX names, graph layout) its `forward_task(x, tensors)`
    # takes in this order, and `forward(x)` reads from the preserved attributes task_0, task_1, … (the base task)
    task_tensors: list[str] | None = None


class AOTIRecord(Record):
    """An AOTInductor package of the deploy model (stexport.build.aoti): `model.pt2` for libtorch hosts."""

    file: str
    precision: Literal[LIBTORCH_PRECISIONS]
    device: Literal["cpu", "cuda"]  # the device kind it was compiled for (it runs only there)
    batch: list[int] = [1, 1024]  # the dynamic batch axis' range
    torch: str | None = None
    check_max_abs: float | None = None  # compiled vs eager deploy model at batch 1 and 3
    compile_seconds: float | None = None


class EngineProfile(Record):
    """One TensorRT optimisation profile: the shapes of `input` (the clips) from min to max; `index`: a
    multi-task bundle's task input (int64 [B]), whose batch range is the clips' (None: no such input)."""

    input: str
    min: list[int]
    opt: list[int]
    max: list[int]
    index: str | None = None


class EngineRecord(Record):
    """A TensorRT engine in the bundle's cache and what it was built for (stexport.trt_engines.record)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    key: str
    file: str
    tensorrt: str
    gpu: str
    capability: str
    onnx: dict[str, str]
    precision: str
    profile: EngineProfile  # the whole batch range (min of the first profile .. max of the last)
    profiles: list[EngineProfile] = []  # TensorRT's optimisation profiles in index order (empty: [profile])
    workspace_gb: float | None = None
    opt_level: int | None = None
    build_seconds: float | None = None
    bytes: int | None = None
    built: str | None = None
    # the per-task tensors built refittable (ONNX initializer names) on a swappable bundle; None: not refittable
    refit: list[str] | None = None


class EngineRequest(Record):
    batch: int = Field(ge=1)
    workspace_gb: float | None = None
    opt_level: int = 3


class TaskTensor(Record):
    """One per-task tensor of a swappable graph: its ONNX initializer name, shape and numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: Literal["float32", "float16", "int8"]
    # also a graph input with this default (ONNX Runtime overrides it per run call); False: the INT8 backbone
    # GEMMs' activation scales, which runtimes that rebuild constants (OpenVINO) take from the pack but ONNX
    # Runtime keeps constant, since it fuses Q/DQ into integer GEMMs only around constant scales
    overridable: bool = True


class TasksRecord(Record):
    """A swappable bundle (`stexport build --swappable`): which tensors a task pack replaces (stexport.bundle.task_graph).

    head_rows: the head's output rows (≥ every task's classes; runtimes keep a task's first `classes` logits).
    structure: sha256 of the graph without its weights' values (a pack is built against an equal one)."""

    head_rows: int = Field(gt=0)
    structure: str
    tensors: list[TaskTensor]


class TaskEntry(Record):
    """One task of a multi-task bundle: its row of every stacked per-task tensor is `index`, the value the
    graph's task input takes for its clips (stexport.build.multitask)."""

    name: str
    index: int = Field(ge=0)
    classes: int = Field(gt=0)
    labels: list[str]
    labels_source: str = "generic"
    sampling: SamplingRecord
    adapter: AdapterRecord  # spec, checkpoint sha256 and path


class MultiTaskRecord(Record):
    """A multi-task bundle (`stexport multitask`): one graph with every task's adapters and head stacked and a
    second input, `input` (int64 [B]), the index of each clip's task. The output has `head_rows` logits per clip
    (≥ every task's classes); a clip's are its task's first `classes` (runtimes cut the rest)."""

    input: str = "task"
    dtype: Literal["int64"] = "int64"
    head_rows: int = Field(gt=0)
    tasks: list[TaskEntry]


class PackBase(Record):
    """What a task pack was built against: the base bundle's backbone, adapter layout and graph."""

    bundle: str  # the base bundle's name when the pack was built
    backbone: str
    weights_sha256: str | None = None
    weights_seed: int | None = None
    spec: AdapterSpec  # the base's adapter layout (its num_classes may differ from the pack's)
    precision: Precision
    frames: int = Field(gt=0)
    size: int = Field(gt=0)
    input_dtype: Literal["uint8", "float32"] = "uint8"
    head_rows: int = Field(gt=0)
    structure: str


class TaskPackRecord(Record):
    """The manifest of a task pack (a safetensors file of per-task tensors, stexport.bundle.taskpack)."""

    format: Literal["stexport-task-pack"] = "stexport-task-pack"
    format_version: int = 1
    name: str
    created: str = Field(default_factory=lambda: now())
    provenance: Provenance = Field(default_factory=lambda: provenance())
    adapter: AdapterRecord
    classes: int = Field(gt=0)
    labels: list[str]
    labels_source: str = "generic"
    sampling: SamplingRecord
    base: PackBase
    tensors: list[TaskTensor]
    calibration: CalibrationRecord | None = None


class Manifest(Record):
    format: Literal["stexport-bundle"] = FORMAT
    format_version: int = FORMAT_VERSION
    name: str
    created: str = Field(default_factory=lambda: now())
    provenance: Provenance = Field(default_factory=lambda: provenance())
    model: ModelRecord
    input: InputRecord
    output: OutputRecord
    sampling: SamplingRecord
    precision: Precision
    opset: int | None = None
    artifacts: dict[str, str] = {}
    files: dict[str, FileRecord] = {}
    calibration: CalibrationRecord | None = None
    fp16_check: FP16CheckRecord | None = None
    torchscript: TorchScriptRecord | None = None
    aoti: AOTIRecord | None = None
    engines: list[EngineRecord] = []
    tensorrt_request: EngineRequest | None = None
    tasks: TasksRecord | None = None
    multitask: MultiTaskRecord | None = None

    @field_validator("artifacts", "files")
    @classmethod
    def _inside_the_bundle(cls, v: dict, info) -> dict:
        for rel in (v.values() if info.field_name == "artifacts" else v.keys()):
            p = PurePosixPath(rel)
            if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
                raise ValueError(f"{rel!r} is not a path inside the bundle")
        return v

    @property
    def frames(self) -> int:
        return self.input.frames

    @property
    def size(self) -> int:
        return self.input.size

    @property
    def spec(self) -> AdapterSpec:
        return self.model.adapter.spec

    @property
    def num_classes(self) -> int:
        return self.output.classes

    @property
    def float_precision(self) -> str:
        """The float type the graph computes its non-INT8 parts in: fp32 or fp16."""
        if self.precision == "int8":
            return self.calibration.float_precision if self.calibration is not None else "fp32"
        return self.precision

    def with_(self, **fields: Any) -> "Manifest":
        """A copy with `fields` replaced, validated (model_copy alone would not validate)."""
        return Manifest.model_validate({**self.model_dump(mode="json"), **_dumped(fields)})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"


def now() -> str:
    """UTC now, ISO 8601 with microseconds (build times order bundles: `stexport infer` takes the newest)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def created_at(text: str) -> datetime | None:
    """A manifest's `created` as an aware datetime (None if unparsable)."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _dumped(fields: dict) -> dict:
    out = {}
    for k, v in fields.items():
        if isinstance(v, BaseModel):
            v = v.model_dump(mode="json")
        elif isinstance(v, list):
            v = [x.model_dump(mode="json") if isinstance(x, BaseModel) else x for x in v]
        out[k] = v
    return out


def provenance() -> Provenance:
    """stexport, Python and the versions of the libraries that shape a bundle, where they are imported."""
    import sys

    libs = {}
    for mod in ("torch", "open_clip", "onnx", "onnxruntime", "onnxscript", "openvino", "cv2", "numpy"):
        m = sys.modules.get(mod)
        v = getattr(m, "__version__", None) if m else None
        if v:
            libs[mod] = str(v)
    return Provenance(stexport=__version__, python=platform.python_version(), libraries=libs)


# ------------------------------------------------------------------------------------------------------------
# migration


def _v1_to_v2(m: dict) -> dict:
    """Format 1 (stexport 0.1.0 before the typed manifest): frames/size at the top, backbone and adapter
    records at the top, the output record without classes, the labels record separate."""
    m = dict(m)
    bb = dict(m.pop("backbone", None) or {})
    weights = {k: bb.pop(k) for k in ("pretrained", "tag", "file", "sha256", "seed", "openai") if k in bb}
    weights.setdefault("pretrained", "none" if "seed" in weights else "?")
    adapter = m.pop("adapter", None)
    inp = dict(m.get("input") or {})
    inp.pop("normalized_in_graph", None)
    if "frames" in m:
        inp["frames"] = m.pop("frames")
    if "size" in m:
        inp["size"] = m.pop("size")
    out = dict(m.get("output") or {})
    labels = m.pop("labels", None) or {}
    spec = (adapter or {}).get("spec") if isinstance(adapter, dict) else None
    if isinstance(spec, dict) and "num_classes" in spec:
        out.setdefault("classes", spec["num_classes"])
    if "source" in labels:
        out["labels_source"] = labels["source"]
    if isinstance(spec, dict):
        adapter = {**adapter, "spec": {k: v for k, v in spec.items() if k != "layout"}}
    sv = m.pop("stexport_version", None)
    model = {}
    if bb:
        model["backbone"] = {**bb, "weights": weights}
    if adapter is not None:
        model["adapter"] = adapter
    m.update(format_version=2, input=inp, output=out, model=model)
    m.setdefault("provenance", {"stexport": sv or "0.1.0"})
    ts = m.get("torchscript")
    if isinstance(ts, dict):  # v1 kept the traced module's input/output description in the record
        m["torchscript"] = {k: v for k, v in ts.items() if k not in ("extra_file", "input", "output")}
    return m


MIGRATIONS = {1: _v1_to_v2}


def migrate(data: dict) -> dict:
    """Bring a manifest dict of any known format_version up to FORMAT_VERSION (unchanged if it is)."""
    v = data.get("format_version", 1)
    while isinstance(v, int) and v in MIGRATIONS:
        data = MIGRATIONS[v](data)
        v = data.get("format_version")
    return data


# ------------------------------------------------------------------------------------------------------------
# load / save


def _where(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "(top level)"


def describe_error(e: ValidationError) -> str:
    """The first problem of a validation error as 'field: what is wrong'."""
    err = e.errors()[0]
    where = _where(err)
    if err["type"] == "missing":
        return f"field '{where}' is missing"
    if err["type"] == "extra_forbidden":
        return f"unknown field '{where}'"
    got = err.get("input")
    shown = json.dumps(got)[:60] if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"field '{where}' is wrong: {err['msg'].lower()}, got {shown}{more}"


def parse(data: Any, where: str | Path) -> Manifest:
    """Validate (after migrating) a manifest dict. Raises StexportError naming `where` and the field."""
    fix = "rebuild the bundle with `stexport build --force`"
    if not isinstance(data, dict):
        raise StexportError(f"{where}: not a stexport manifest (a JSON object is expected); {fix}")
    if data.get("format") != FORMAT:
        raise StexportError(f"{where}: not a stexport manifest (format is {data.get('format')!r}, not "
                            f"{FORMAT!r})")
    if "format_version" not in data:
        raise StexportError(f"{where}: field 'format_version' is missing; {fix}")
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StexportError(f"{where}: field 'format_version' is wrong: {version!r} is not a format (1 or more); "
                            f"{fix}")
    if version > FORMAT_VERSION:
        raise StexportError(f"{where}: bundle format {version} is newer than this stexport ({__version__}) "
                            "understands; upgrade stexport")
    try:
        return Manifest.model_validate(migrate(data))
    except ValidationError as e:
        raise StexportError(f"{where}: {describe_error(e)}; {fix}") from None


def _no_duplicates(pairs: list) -> dict:
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise json.JSONDecodeError(f"key {k!r} appears twice", "", 0)
        seen[k] = v
    return seen


def load(path: str | Path) -> Manifest:
    """Read and validate `path` (a bundle directory or its stexport.json). Raises StexportError, one line."""
    path = Path(path)
    mf = path if path.name == MANIFEST and not path.is_dir() else path / MANIFEST
    try:
        text = mf.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StexportError(f"{mf.parent}: not a stexport bundle (no {MANIFEST}); build one with "
                            "`stexport build --adapter FILE`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StexportError(f"{mf}: unreadable manifest ({getattr(e, 'strerror', None) or e}); "
                            "rebuild the bundle with `stexport build --force`") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise StexportError(f"{mf}: not valid JSON ({e}); rebuild the bundle with `stexport build --force`") \
            from None
    return parse(data, mf)


def save(manifest: Manifest, root: str | Path) -> Path:
    """Write `manifest` as root/stexport.json in one rename (never a half-written file)."""
    path = Path(root) / MANIFEST
    atomic_write_text(path, manifest.to_json())
    return path


__all__ = ["Manifest", "ModelRecord", "BackboneRecord", "WeightsSource", "ViTConfig", "AdapterSpec",
           "AdapterRecord", "InputRecord", "OutputRecord", "SamplingRecord", "FileRecord", "Provenance",
           "CalibrationRecord", "FP16CheckRecord", "TorchScriptRecord", "AOTIRecord", "EngineRecord",
           "EngineProfile", "EngineRequest", "TaskTensor", "TasksRecord", "TaskEntry", "MultiTaskRecord", "PackBase", "TaskPackRecord",
           "load", "save", "parse", "migrate", "MANIFEST", "FORMAT", "FORMAT_VERSION", "CLIP_MEAN", "CLIP_STD"]
