#!/usr/bin/env bash
# stexport's main job, end to end on the default CPU runtime (auto: OpenVINO on x86-64, else ONNX Runtime;
# INT8 bundles on a CPU without VNNI: ONNX Runtime, whose INT8 sums do not saturate there):
#   install → generate the demo's videos → build an INT8 bundle of the shipped motion adapter (calibrated on
#   train clips) → classify one clip → verify the bundle against the PyTorch reference on the val set.
# Usage: bash examples/motion/run_demo.sh [WORKDIR]   (default: demo-data/, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-demo-data}
DEMO=examples/motion

echo "== install"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e ".[export]"   # build and verify need torch; infer alone needs only `pip install .`
PY=.venv/bin/python
STEXPORT=.venv/bin/stexport

echo "== generate the demo videos (seeded: the same files on every machine) into $WORK/"
$PY $DEMO/generate.py --out "$WORK" --splits train,val

echo "== build an INT8 bundle of the shipped adapter"
$STEXPORT build --adapter $DEMO/motion_adapter.pt --backbone stexport-demo-vit \
    --pretrained $DEMO/backbone.safetensors --labels $DEMO/labels.txt --views 1x1 --rate 0 \
    --precision int8 --calib "$WORK/train.txt" --calib-clips 64 --out "$WORK/motion-int8" --force

CLIP="$WORK/val/00010_move_left.mp4"   # the file name carries the true class
echo "== classify $CLIP"
$STEXPORT infer "$CLIP" -m "$WORK/motion-int8" --top-k 3
top=$($STEXPORT infer "$CLIP" -m "$WORK/motion-int8" --top-k 1 --json \
      | $PY -c 'import json, sys; print(json.loads(sys.stdin.readline())["top"][0]["label"])')
[ "$top" = move_left ] || { echo "expected move_left, got $top" >&2; exit 1; }
echo "predicted: $top (right)"

echo "== verify the bundle against the PyTorch reference on $WORK/val.txt"
$STEXPORT verify "$WORK/motion-int8" --clips "$WORK/val.txt" --report "$WORK/verify-int8.json"
