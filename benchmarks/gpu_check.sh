#!/usr/bin/env bash
# stexport's GPU check, for a machine with an NVIDIA GPU (and TensorRT where it installs): what the project's
# CPU machines cannot run. In one go:
#   1. install stexport with the GPU extras matching the driver's CUDA major (tensorrt-cu12 / tensorrt-cu13)
#   2. run the GPU tests (pytest -m "tensorrt or gpu")
#   3. build FP16 and INT8 (FP16 float parts) bundles of the trained demo model, their TensorRT engines, and
#      verify them on TensorRT against the PyTorch reference (accuracy gates as exit codes)
#   4. the same for a ViT-B/16 bundle (random FP16-representable weights: nothing is downloaded; 12 adapters,
#      400 classes, 8 x 224 px): engines, verify (agreement with the reference), and
#   5. benchmark rows (ms/clip at batch 1, clips/s at batch 32): TensorRT FP16 and INT8, ONNX Runtime CUDA (FP16
#      bundle), PyTorch FP16 eager (the reference model in half precision) -> benchmarks/RESULTS-gpu.md
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--work DIR] [--out FILE] [--no-install] [--skip-vitb16]
#                                     [--iters N]
#   --dry-run      print the steps (commands) without running anything; works on any machine
#   --work DIR     bundles, clips and JSON results (default: gpu-check/, ignored by git)
#   --out FILE     the results table (default: benchmarks/RESULTS-gpu.md)
#   --no-install   use the venv as it is
#   --skip-vitb16  only the demo model (minutes instead of ~20-40 minutes)
#   --iters N      timed calls per batch size (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
WORK=gpu-check
OUT=benchmarks/RESULTS-gpu.md
INSTALL=1
VITB16=1
ITERS=20
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --work) WORK=${2:?--work needs a directory}; shift ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --no-install) INSTALL=0 ;;
        --skip-vitb16) VITB16=0 ;;
        --iters) ITERS=${2:?--iters needs a number}; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PY=.venv/bin/python
STEXPORT=.venv/bin/stexport
DEMO=examples/motion
STEP=0

step() {  # a numbered heading
    STEP=$((STEP + 1))
    echo "== [$STEP] $*"
}

run() {  # print a command; run it unless --dry-run
    printf '   $'
    printf ' %q' "$@"
    printf '\n'
    if [ "$DRY" -eq 0 ]; then
        "$@"
    fi
}

run_to() {  # FILE COMMAND...: as run, with the command's stdout into FILE
    local file=$1
    shift
    printf '   $'
    printf ' %q' "$@"
    printf ' > %q\n' "$file"
    if [ "$DRY" -eq 0 ]; then
        "$@" > "$file"
    fi
}

cuda_extra() {  # the TensorRT extra for this driver's CUDA major (from nvidia-smi), tensorrt-cu12 if unknown
    local cuda
    cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n1)
    if [ "${cuda:-12}" -ge 13 ]; then echo tensorrt-cu13; else echo tensorrt-cu12; fi
}

if [ "$DRY" -eq 0 ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi finds none); run it on a GPU host, or --dry-run" >&2
        exit 2
    fi
    mkdir -p "$WORK"
fi

EXTRA=$(cuda_extra)
step "install stexport with the GPU extras ($EXTRA: TensorRT and cuda-python for this driver)"
if [ "$INSTALL" -eq 1 ]; then
    [ -x "$PY" ] || run python3 -m venv .venv
    run "$PY" -m pip install -q -e ".[dev,gpu,$EXTRA]"
    # onnxruntime and onnxruntime-gpu share one module: the CPU wheel (a base dependency) must not shadow it
    run "$PY" -m pip uninstall -q -y onnxruntime
    run "$PY" -m pip install -q --force-reinstall --no-deps onnxruntime-gpu
else
    echo "   (skipped: --no-install)"
fi

step "GPU tests"
run "$PY" -m pytest -q -m "tensorrt or gpu" tests/

step "demo clips (seeded: the same files on every machine)"
run "$PY" "$DEMO/generate.py" --out "$WORK/motion" --splits train,val --count 90

build_demo() {  # PRECISION and extra build flags
    local p=$1
    shift
    run "$STEXPORT" build --adapter "$DEMO/motion_adapter.pt" --backbone stexport-demo-vit \
        --pretrained "$DEMO/backbone.safetensors" --labels "$DEMO/labels.txt" --views 1x1 --rate 0 \
        --precision "$p" --out "$WORK/demo-$p" --force "$@"
}

step "demo model: FP16 and INT8 (FP16 float parts) bundles"
build_demo fp16
build_demo int8 --calib "$WORK/motion/train.txt" --calib-clips 64 --int8-float fp16

step "demo model: TensorRT engines (profiles 1..1 and 2..32), verified on TensorRT"
for p in fp16 int8; do
    run "$STEXPORT" engine "$WORK/demo-$p" --batch 32 --json
    run "$STEXPORT" verify "$WORK/demo-$p" --clips "$WORK/motion/val.txt" --backend tensorrt \
        --report "$WORK/verify-demo-$p.json"
done

ROWS=()
bench() {  # NAME BUNDLE BACKEND [--option ...]: one results row (JSON in $WORK/bench-NAME.json)
    local name=$1 bundle=$2 backend=$3
    shift 3
    run_to "$WORK/bench-$name.json" "$STEXPORT" bench "$bundle" --backend "$backend" --batch 1,32 \
        --iters "$ITERS" --no-peaks --json "$@"
    ROWS+=("$name")
}

if [ "$VITB16" -eq 1 ]; then
    step "ViT-B/16 (random weights, 12 adapters, 400 classes, 8 x 224): FP16 and INT8 bundles"
    run "$PY" - "$WORK/vitb16_adapter.pt" <<'EOF'
import sys
from stexport.build.backbone import shape_config
from stexport.build.deltas import save_official
from stexport.build.synthetic import random_deltas
cfg = shape_config("ViT-B-16")
save_official(sys.argv[1], random_deltas(cfg, width=cfg.width // 2, num_classes=400, pre_attn=False, pre_mlp=True))
EOF
    for p in fp16 int8; do
        flags=()
        if [ "$p" = int8 ]; then flags=(--calib "$WORK/motion/train.txt" --calib-clips 8 --int8-float fp16); fi
        run "$STEXPORT" build --adapter "$WORK/vitb16_adapter.pt" --backbone ViT-B-16 --pretrained none \
            --precision "$p" --out "$WORK/vitb16-$p" --force "${flags[@]}"
    done

    step "ViT-B/16: TensorRT engines, verified on TensorRT"
    for p in fp16 int8; do
        run "$STEXPORT" engine "$WORK/vitb16-$p" --batch 32 --json
        run "$STEXPORT" verify "$WORK/vitb16-$p" --clips "$WORK/motion/val.txt" --backend tensorrt \
            --max-clips 30 --report "$WORK/verify-vitb16-$p.json"
    done

    step "ViT-B/16 benchmark rows: batch 1 latency, batch 32 throughput"
    bench tensorrt-fp16 "$WORK/vitb16-fp16" tensorrt
    bench tensorrt-int8 "$WORK/vitb16-int8" tensorrt
    bench ort-cuda-fp16 "$WORK/vitb16-fp16" onnxruntime --option device=cuda
    run "$PY" - "$WORK/vitb16-fp16" "$ITERS" "$WORK/bench-torch-fp16.json" <<'EOF'
# PyTorch FP16 eager: the reference model in half precision on the GPU, timed like `stexport bench`
import json, sys, time
import numpy as np, torch
from stexport.bundle.store import Bundle
from stexport.build.loaders import reference_for_bundle
from stexport.build.reference import normalize
b = Bundle.load(sys.argv[1])
iters = int(sys.argv[2])
model = reference_for_bundle(b).half().cuda().eval()
rows = {}
for batch in (1, 32):
    x = torch.randint(0, 256, (batch, b.frames, b.size, b.size, 3), dtype=torch.uint8).cuda()
    times = []
    with torch.inference_mode():
        for i in range(iters + 3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(normalize(x).half())
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
    rows[str(batch)] = {"ms_per_clip": {"p50": float(np.median(times)) * 1e3 / batch},
                        "clips_per_s": batch / float(np.median(times))}
json.dump({"backend": "torch (fp16 eager)", "batches": rows}, open(sys.argv[3], "w"))
EOF
    ROWS+=(torch-fp16)

    step "write $OUT"
    run "$PY" - "$WORK" "$OUT" "${ROWS[@]}" <<'EOF'
import json, subprocess, sys
from pathlib import Path
work, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
labels = {"tensorrt-fp16": "TensorRT FP16", "tensorrt-int8": "TensorRT INT8 (+ FP16 float parts)",
          "ort-cuda-fp16": "ONNX Runtime CUDA, FP16 bundle", "torch-fp16": "PyTorch FP16 eager"}
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
lines = ["# GPU benchmark (benchmarks/gpu_check.sh)", "",
         f"GPU: {gpu}. ViT-B/16 + 12 ST-Adapters (random weights), 8 x 224 px, 400 classes.", "",
         "| runtime | ms/clip, batch 1 | clips/s, batch 32 |", "|---|---|---|"]
for n in names:
    r = json.loads((work / f"bench-{n}.json").read_text())
    b = r["batches"]
    lines.append(f"| {labels.get(n, n)} | {b['1']['ms_per_clip']['p50']:.2f} | {b['32']['clips_per_s']:.1f} |")
for v in sorted(work.glob("verify-*.json")):
    rep = json.loads(v.read_text())
    lines.append(f"\n{v.stem}: gate {'pass' if rep['passed'] else 'FAIL'}, "
                 f"top-1 agreement {rep['metrics']['top1_agreement']:.1%}")
out.write_text("\n".join(lines) + "\n")
print(f"wrote {out}")
EOF
fi
echo "== done"
