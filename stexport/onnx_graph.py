"""Small ONNX graph helpers (no torch) shared by the export (stexport.build.export), task graphs
(stexport.bundle.task_graph) and the INT8 rewrite (calibration.qdq): saving, checking, ordering."""

from __future__ import annotations

import heapq
from pathlib import Path

import onnx

from stexport import interrupt
from stexport.errors import StexportError


def perm_of(transpose: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [])


def swaps_last_axes(perm: list[int]) -> bool:
    return len(perm) >= 2 and perm == [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]


def stable_topo(nodes: list[onnx.NodeProto], rank: dict[int, float],
                 ready: set[str]) -> list[onnx.NodeProto]:
    """Topological order that follows `rank` wherever the dependencies allow (Kahn's algorithm on a heap)."""
    producer = {o: n for n in nodes for o in n.output}
    waiting = {id(n): {i for i in n.input if i and i not in ready and i in producer} for n in nodes}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in waiting[id(n)]:
            readers.setdefault(i, []).append(n)
    heap = [(rank[id(n)], k, n) for k, n in enumerate(nodes) if not waiting[id(n)]]
    order = {id(n): k for k, n in enumerate(nodes)}
    heapq.heapify(heap)
    out = []
    while heap:
        _, _, n = heapq.heappop(heap)
        out.append(n)
        for o in n.output:
            for r in readers.get(o, []):
                waiting[id(r)].discard(o)
                if not waiting[id(r)]:
                    heapq.heappush(heap, (rank[id(r)], order[id(r)], r))
    if len(out) != len(nodes):
        raise StexportError("graph rewrite left a cycle or a dangling input (a bug in stexport)")
    return out


def save(proto: onnx.ModelProto, path: Path, external_data: bool = False) -> None:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external_data:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def check(path: Path) -> None:
    """onnx.checker full check (with shape inference) on the saved file; raises StexportError on failure."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        interrupt.reraise(e)
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise StexportError(f"{path}: the exported graph fails onnx.checker ({why})") from e


def external_files(path: Path) -> list[str]:
    """Names of the external-data files `path` refers to (empty when the weights are inline)."""
    m = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                names.add(e.value)
    return sorted(names)
