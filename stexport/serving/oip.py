"""The Open Inference Protocol (KServe v2) for `stexport serve`: translation between the protocol's tensors and
stexport's inputs and results. Pure functions; the routes that use them are in oip_routes.py.

Protocol: https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol (REST and the
`inference.GRPCInferenceService` of grpc_service.proto, which tritonclient ships), with the binary tensor data
extension (https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md).

Every loaded task is a model (version "1"), answering:

    inputs (one per request)
      video    BYTES [N]               encoded video files, one whole file per element; decoded and sampled as
                                       `stexport infer` does, with the server's upload and decode limits
      frames   UINT8 [N, T, S, S, 3]   clips already sampled the bundle's way (RGB, T frames of S×S), one view
                                       per element (what `stexport dump-clip` writes, and a Triton client of
                                       `export-triton` sends)
    outputs
      probabilities  FP32 [N, classes]  per element the mean over its views of the softmax of the logits
                                        (`infer`'s scores)
      labels         BYTES [N, k]       the top k labels, best first (k: parameters.top_k, default the
                                        server's --top-k, at most the model's classes)

Errors take the protocol's form: HTTP status with {"error": "..."}, gRPC a status code with the message. A bad
element is named in it (`video[2]: ...`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from stexport.serving.requests import RequestError
from stexport.version import __version__

VIDEO, FRAMES = "video", "frames"
PROBABILITIES, LABELS = "probabilities", "labels"
EXTENSIONS = ["binary_tensor_data"]
VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"

# HTTP status of a RequestError -> the gRPC status code name (grpc.StatusCode.<name>)
GRPC_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
             405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
             500: "INTERNAL", 503: "UNAVAILABLE"}

NP_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
            "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
            "FP32": np.float32, "FP64": np.float64}  # and BYTES


@dataclass
class Model:
    """A loaded task as a protocol model."""

    name: str
    labels: list[str]
    frames: int  # T of a clip
    size: int  # S of a clip
    sampling: dict  # Sampling.to_dict()
    backend: str
    pack: str | None = None  # the task pack's file name (None: the bundle's own task)
    default: bool = False

    @property
    def classes(self) -> int:
        return len(self.labels)


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: object  # np.ndarray (numeric) or list[bytes] (BYTES)


@dataclass
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    outputs: dict[str, bool] | None = None  # requested output -> binary (HTTP); None: every output
    binary_default: bool = False  # parameters.binary_data_output (HTTP)
    parameters: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# metadata


def server_metadata() -> dict:
    return {"name": "stexport", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(m: Model) -> dict:
    """GET v2/models/{model}: the protocol's fields, and in "parameters" the labels and sampling."""
    return {"name": m.name, "versions": [VERSION], "platform": f"stexport_{m.backend}",
            "inputs": [{"name": VIDEO, "datatype": "BYTES", "shape": [-1]},
                       {"name": FRAMES, "datatype": "UINT8", "shape": [-1, m.frames, m.size, m.size, 3]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, m.classes]},
                        {"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]}],
            "parameters": {"labels": m.labels, "sampling": m.sampling, "task_pack": m.pack, "default": m.default}}


def grpc_model_metadata(m: Model):
    from tritonclient.grpc import service_pb2 as pb

    d = model_metadata(m)
    tensors = lambda ts: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in ts]
    return pb.ModelMetadataResponse(name=d["name"], versions=d["versions"], platform=d["platform"],
                                    inputs=tensors(d["inputs"]), outputs=tensors(d["outputs"]))


def grpc_server_metadata():
    from tritonclient.grpc import service_pb2 as pb

    return pb.ServerMetadataResponse(**server_metadata())


# ------------------------------------------------------------------------------------------------------------
# requests


def _bytes_elements(buf: bytes, where: str) -> list[bytes]:
    """BYTES tensor data in the protocol's binary form (each element a little-endian uint32 length, then the
    bytes)."""
    from tritonclient.utils import deserialize_bytes_tensor

    try:
        return list(deserialize_bytes_tensor(buf))
    except struct.error:
        raise RequestError(400, f"{where}: malformed BYTES data (each element is a 4-byte little-endian length "
                                "and that many bytes)") from None


def _numeric(buf: bytes, datatype: str, where: str) -> np.ndarray:
    dtype = NP_TYPES.get(datatype)
    if dtype is None:
        raise RequestError(400, f"{where}: unknown datatype {datatype!r}")
    if len(buf) % np.dtype(dtype).itemsize:
        raise RequestError(400, f"{where}: {len(buf)} bytes is not a whole number of {datatype} elements")
    return np.frombuffer(buf, dtype=dtype)


def _shape(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise RequestError(400, f"{where}: \"shape\" must be a list of non-negative integers")
    return value


def parse_http(body: bytes, header_length: str | None, model: str, version: str = "") -> InferRequest:
    """A REST infer request: JSON, or with the binary data extension (`Inference-Header-Content-Length`: the
    JSON's length; each input with parameters.binary_data_size takes that many bytes after it, in order).
    RequestError 400 for anything malformed, JSON nested deeper than Python can parse included."""
    try:
        return _parse_http(body, header_length, model, version)
    except RecursionError:
        raise RequestError(400, "the inference request's JSON is nested too deeply") from None


def _parse_http(body: bytes, header_length: str | None, model: str, version: str) -> InferRequest:
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {header_length!r}: not a length within "
                                    f"the body's {len(body)} bytes")
        split = int(header_length)
    try:
        head = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the inference request's header is not valid JSON") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise RequestError(400, 'the inference request needs "inputs": a list of tensors')
    params = head.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, '"parameters" must be an object')
    rest, at = memoryview(body)[split:], 0
    inputs = []
    for i, t in enumerate(head["inputs"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str):
            raise RequestError(400, f"inputs[{i}]: a tensor needs \"name\", \"datatype\" and \"shape\"")
        where = f"input {t['name']}"
        shape = _shape(t.get("shape"), where)
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(rest):
                raise RequestError(400, f"{where}: binary_data_size {size!r} runs past the body's end")
            raw, at = bytes(rest[at:at + size]), at + size
            data = _bytes_elements(raw, where) if t["datatype"] == "BYTES" else _numeric(raw, t["datatype"], where)
        elif "data" in t:
            data = _json_data(t["data"], t["datatype"], where)
        else:
            raise RequestError(400, f"{where}: no \"data\" and no binary_data_size")
        inputs.append(Tensor(t["name"], t["datatype"], shape, data))
    if at != len(rest):
        raise RequestError(400, f"{len(rest) - at} bytes after the binary inputs that no input claims")
    outputs = None
    if head.get("outputs") is not None:
        if not isinstance(head["outputs"], list):
            raise RequestError(400, '"outputs" must be a list')
        outputs = {}
        for o in head["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise RequestError(400, 'each of "outputs" needs a "name"')
            outputs[o["name"]] = bool((o.get("parameters") or {}).get("binary_data",
                                                                      params.get("binary_data_output", False)))
    rid = head.get("id", "")
    return InferRequest(model, version, rid if isinstance(rid, str) else "", inputs, outputs,
                        bool(params.get("binary_data_output", False)), params)


def _json_data(data, datatype: str, where: str):
    def flat(x):
        if isinstance(x, list):
            for y in x:
                yield from flat(y)
        else:
            yield x

    values = list(flat(data))
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise RequestError(400, f"{where}: BYTES data in JSON are strings")
        return [v.encode("utf-8") for v in values]
    dtype = NP_TYPES.get(datatype)
    if dtype is None:
        raise RequestError(400, f"{where}: unknown datatype {datatype!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) or datatype == "BOOL" for v in values):
        raise RequestError(400, f"{where}: {datatype} data must be numbers")
    try:
        arr = np.asarray(values, dtype=np.float64 if datatype.startswith("FP") else np.int64)
    except (TypeError, ValueError):
        raise RequestError(400, f"{where}: {datatype} data must be numbers") from None
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max or not np.all(arr == np.round(arr))):
            raise RequestError(400, f"{where}: values outside {datatype}")
    return arr.astype(dtype)


def from_grpc(req) -> InferRequest:
    """A gRPC ModelInferRequest: inputs from raw_input_contents (what tritonclient sends), else typed contents."""
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in req.parameters.items()
              if v.WhichOneof("parameter_choice")}
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise RequestError(400, f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs")
    inputs = []
    for i, t in enumerate(req.inputs):
        where = f"input {t.name}"
        if raw:
            data = _bytes_elements(raw[i], where) if t.datatype == "BYTES" else _numeric(raw[i], t.datatype, where)
        elif t.datatype == "BYTES":
            data = list(t.contents.bytes_contents)
        elif t.datatype in NP_TYPES:
            field_name = {"BOOL": "bool_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
                          "INT64": "int64_contents", "UINT64": "uint64_contents"}.get(
                t.datatype, "uint_contents" if t.datatype.startswith("UINT") else "int_contents")
            data = np.asarray(getattr(t.contents, field_name), dtype=NP_TYPES[t.datatype])
        else:
            raise RequestError(400, f"{where}: unknown datatype {t.datatype!r}")
        inputs.append(Tensor(t.name, t.datatype, list(t.shape), data))
    outputs = {o.name: True for o in req.outputs} or None
    return InferRequest(req.model_name, req.model_version, req.id, inputs, outputs, True, params)


def check_request(req: InferRequest, m: Model, max_elements: int, max_element_bytes: int):
    """The request's one input, checked against model `m`: (VIDEO, list of N encoded files) or (FRAMES, uint8
    (N, T, S, S, 3)). RequestError naming the input and what it should be: 400 (missing or extra input, wrong
    datatype, shape or element count, N over `max_elements`, an unknown output or version, a bad top_k), 413 (a
    BYTES element over `max_element_bytes`)."""
    if req.version not in ("", VERSION):
        raise RequestError(404, f"model {m.name} has no version {req.version!r}; it has version {VERSION}")
    names = [t.name for t in req.inputs]
    ours = [n for n in names if n in (VIDEO, FRAMES)]
    if len(ours) != 1 or len(names) != 1:
        raise RequestError(400, f"model {m.name} takes one input, {VIDEO!r} (BYTES [N], encoded videos) or "
                                f"{FRAMES!r} (UINT8 [N, {m.frames}, {m.size}, {m.size}, 3], sampled clips); got "
                                + (", ".join(repr(n) for n in names) or "none"))
    for o in req.outputs or {}:
        if o not in (PROBABILITIES, LABELS):
            raise RequestError(400, f"model {m.name} has no output {o!r}; outputs: {PROBABILITIES}, {LABELS}")
    top_k(req, 1, m.classes)
    t = req.inputs[0]
    n = t.shape[0] if t.shape else 0
    if t.name == VIDEO:
        if t.datatype != "BYTES":
            raise RequestError(400, f"input {VIDEO}: datatype BYTES (encoded video files), not {t.datatype}")
        if len(t.shape) != 1:
            raise RequestError(400, f"input {VIDEO}: shape [N] (one encoded file per element), not {t.shape}")
        if len(t.data) != n:
            raise RequestError(400, f"input {VIDEO}: shape {t.shape} but {len(t.data)} elements")
        for i, v in enumerate(t.data):
            if len(v) > max_element_bytes:
                raise RequestError(413, f"{VIDEO}[{i}]: {len(v)} bytes is over this server's limit of "
                                        f"{max_element_bytes} bytes per video")
            if not v:
                raise RequestError(400, f"{VIDEO}[{i}]: empty")
    else:
        want = [n, m.frames, m.size, m.size, 3]
        if t.datatype != "UINT8":
            raise RequestError(400, f"input {FRAMES}: datatype UINT8 (RGB clips), not {t.datatype}")
        if t.shape != want:
            raise RequestError(400, f"input {FRAMES}: shape [N, {m.frames}, {m.size}, {m.size}, 3] for model "
                                    f"{m.name}, not {t.shape}")
        if t.data.size != int(np.prod(want)):
            raise RequestError(400, f"input {FRAMES}: shape {t.shape} but {t.data.size} elements")
    if n < 1 or n > max_elements:
        raise RequestError(400, f"input {t.name}: {n} elements; this server takes 1 to {max_elements} per request")
    data = t.data if t.name == VIDEO else np.ascontiguousarray(t.data).reshape(t.shape)
    return t.name, data


def top_k(req: InferRequest, default: int, classes: int) -> int:
    """parameters.top_k (default `default`), at most `classes`; RequestError 400 unless a positive integer."""
    k = req.parameters.get("top_k", default)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RequestError(400, f"parameters.top_k {k!r}: a positive integer")
    return min(k, classes)


# ------------------------------------------------------------------------------------------------------------
# responses


def outputs(m: Model, probs: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """{probabilities: float32 (N, classes), labels: object (N, k) of UTF-8 bytes}; the labels are the top k by
    probability, ties in class order (as `infer` names them)."""
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    labels = np.array([[m.labels[i].encode("utf-8") for i in row] for row in best], dtype=np.object_)
    return {PROBABILITIES: probs.astype(np.float32), LABELS: labels.reshape(len(probs), k)}


def _datatype(a: np.ndarray) -> str:
    return "BYTES" if a.dtype == np.object_ else "FP32"


def _raw(a: np.ndarray) -> bytes:
    if a.dtype == np.object_:
        from tritonclient.utils import serialize_byte_tensor

        return serialize_byte_tensor(a).item() if a.size else b""
    return np.ascontiguousarray(a).tobytes()


def http_response(req: InferRequest, m: Model, out: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): the REST infer response with the outputs the request asked for
    (all when it named none), each binary where it asked so (binary_data, binary_data_output)."""
    wanted = req.outputs if req.outputs is not None else {name: req.binary_default for name in out}
    tensors, blobs = [], []
    for name, binary in wanted.items():
        a = out[name]
        t = {"name": name, "datatype": _datatype(a), "shape": list(a.shape)}
        if binary:
            blob = _raw(a)
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = ([v.decode("utf-8") for v in a.reshape(-1)] if a.dtype == np.object_
                         else [float(v) for v in a.reshape(-1)])
        tensors.append(t)
    head = {"model_name": m.name, "model_version": VERSION, "outputs": tensors}
    if req.id:
        head["id"] = req.id
    text = json.dumps(head, allow_nan=False).encode("utf-8")
    return (text + b"".join(blobs), len(text)) if blobs else (text, None)


def grpc_response(req: InferRequest, m: Model, out: dict[str, np.ndarray]):
    """The gRPC ModelInferResponse: the requested outputs (all when none named) in raw_output_contents."""
    from tritonclient.grpc import service_pb2 as pb

    resp = pb.ModelInferResponse(model_name=m.name, model_version=VERSION, id=req.id)
    for name in (req.outputs or out):
        a = out[name]
        resp.outputs.add(name=name, datatype=_datatype(a), shape=list(a.shape))
        resp.raw_output_contents.append(_raw(a))
    return resp
