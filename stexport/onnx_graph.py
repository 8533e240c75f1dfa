"""Small ONNX graph helpers shared by the export (stexport.export) and the INT8 rewrite (calibration.qdq)."""

from __future__ import annotations

import heapq

import onnx

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
