#!/usr/bin/env bash
# Bank-side cost against N on a CUDA machine (run from the repository root): the kNN pass
# (10,000 test images against an N-entry bank) and anchor discovery for the last round (every
# entry's entropy + a neighbour for every entry), for CIFAR-sized up to ImageNet-sized N.
# Synthetic data; no training. Logs to $OUT (default /tmp/gpu_scale).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_scale}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for n in ${SIZES:-50000 200000 1281167}; do
  python3 bench/epoch_speed.py --synthetic-n "$n" --phases knn,ans 2>&1 | tee "$OUT/scale_$n.txt"
done
