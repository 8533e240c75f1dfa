"""Where an OpenVINO run of a bundle spends its time: OpenVINO's per-layer PERF_COUNT, summed by layer kind.

    .venv/bin/python benchmarks/openvino_profile.py BUNDLE [--precision bf16|f32] [--batch 4] [--iters 3] [--dynamic]

Prints ms per call and share per (layer type, kernel), the quantized GEMMs' own rate against the model's FLOPs
in them (in all and per layer role, against the square INT8 GEMM peak measured here), and how many activation
quantizations run as standalone FakeQuantize layers (the ones OpenVINO could not fuse into the layer before
them). Profiling adds a little overhead; time with run_all.py, not this.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ov_args import parse, parser

from stexport.runtime import bench
from stexport.runtime.backends.openvino import import_openvino
from stexport.bundle.store import Bundle


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dynamic", action="store_true", help="keep the ONNX's dynamic batch (stexport compiles "
                    "for the batch it runs)")
    args = parse(ap)

    bundle = Bundle.load(args.bundle)
    ov = import_openvino()
    cfg = {"INFERENCE_PRECISION_HINT": args.precision, "PERF_COUNT": "YES", "PERFORMANCE_HINT": "LATENCY"}
    core = ov.Core()
    model = core.read_model(str(bundle.file("onnx")))
    if not args.dynamic:  # the backend's default: a model compiled for the batch it runs
        model.reshape({model.inputs[0].get_any_name(): [args.batch, *model.inputs[0].get_partial_shape()[1:]]})
    compiled = core.compile_model(model, "CPU", cfg)
    req = compiled.create_infer_request()
    x = bench.clips_for(bundle, args.batch)
    for _ in range(2):
        req.infer({0: x})
    times, per_call = [], []
    for _ in range(args.iters):
        t = time.perf_counter()
        req.infer({0: x})
        times.append(time.perf_counter() - t)
        layers: dict = defaultdict(float)
        for p in req.profiling_info:
            if p.status == p.Status.EXECUTED:
                layers[(p.node_type, p.exec_type, p.node_name)] += p.real_time.total_seconds()
        per_call.append(layers)
    med = float(np.median(times))
    flops = bench.model_flops(bundle.manifest)
    print(f"{bundle.path.name}, {args.precision} float parts, batch {args.batch}: {med * 1e3:.0f} ms per call, "
          f"{med * 1e3 / args.batch:.1f} ms/clip, {flops['total'] * args.batch / med / 1e9:.0f} GOP/s")

    mid = per_call[int(np.argsort(times)[len(times) // 2])]
    kinds: dict = defaultdict(lambda: [0.0, 0])
    for (ntype, etype, _), s in mid.items():
        kinds[(ntype, etype)][0] += s
        kinds[(ntype, etype)][1] += 1
    total = sum(v[0] for v in kinds.values())
    print(f"{'ms':>8} {'share':>6} {'layers':>6}  layer type / kernel")
    for (ntype, etype), (s, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        if s / total >= 0.002:
            print(f"{s * 1e3:8.1f} {100 * s / total:5.1f}% {n:6d}  {ntype} / {etype}")
    int_fc = {name: t for (ntype, etype, name), t in mid.items() if ntype.startswith("FullyConnected")
              and "i8" in etype}
    gemm = sum(int_fc.values())
    cal = bundle.manifest.calibration
    quant = flops["quantizable"] - (flops["parts"]["attn_scores"] if cal and cal.attention_scores_int8 else 0)
    print(f"integer GEMM layers: {gemm * 1e3:.0f} ms of {total * 1e3:.0f} ({100 * gemm / total:.0f}%), "
          f"{quant * args.batch / gemm / 1e9:.0f} GOP/s over their {quant / 1e9:.1f} GOP per clip")
    fq = [name for (ntype, _, name), _ in mid.items() if ntype == "FakeQuantize"]
    print(f"standalone FakeQuantize layers: {len(fq)}")

    # per role: OpenVINO renames and fuses layers, so a runtime layer's role is that of the ONNX GEMM among the
    # layers it came from, matched by exact node name (ops added around GEMMs, such as outlier migration's
    # `<fc1>.smooth_scale` or Q/DQ pairs, are not GEMMs and claim no role)
    graph = onnx.load(str(bundle.file("onnx")), load_external_data=False).graph
    onnx_gemms = {n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")}
    origin = {op.get_friendly_name(): {o.split("/")[0] for o in
                                       op.get_rt_info()["originalLayersNames"].astype(str).split(",")} & onnx_gemms
              for op in compiled.get_runtime_model().get_ops()}
    parts = flops["parts"]
    roles = [("q, k, v", ("attn.q", "attn.k", "attn.v"), parts["qkv"]),
             ("mlp fc (+GELU)", ("fc",), parts["mlp"] / 2), ("mlp proj", ("proj",), parts["mlp"] / 2),
             ("adapter fc1", ("fc1",), parts["adapter_fc"] / 2), ("adapter fc2", ("fc2",), parts["adapter_fc"] / 2),
             ("attention out", ("attn.out",), parts["attn_out"])]

    def claims(name: str, ends: tuple[str, ...]) -> bool:
        return any(g.endswith(tuple("." + e for e in ends)) for g in origin.get(name, ()))

    peak, method, _ = bench.gemm_peak("int8")
    footnote = False
    print(f"integer GEMMs by role (square INT8 GEMM peak here: {peak:.0f} GOP/s, {method}):")
    for role, ends, role_flops in roles:
        mine = [name for name in int_fc if claims(name, ends)]
        if role == "attention out" and not mine:  # OpenVINO's fusion may drop its name; the one role left
            mine = [name for name in int_fc if not any(claims(name, e) for _, e, _ in roles)]
            role += "*"
            footnote = True
        ms = sum(int_fc[name] for name in mine)
        if ms:
            rate = role_flops * args.batch / ms / 1e9
            print(f"  {role:16s} {len(mine):3d} layers {ms * 1e3:7.1f} ms {rate:6.0f} GOP/s {100 * rate / peak:4.0f}% "
                  "of peak")
    if footnote:
        print("  (* the integer GEMMs no other role claims: OpenVINO's fusion dropped their names)")

if __name__ == "__main__":
    main()
