#!/usr/bin/env bash
# The GPU measurement of the fast path, in one go (run from the repository root on a CUDA
# machine): per-phase seconds per epoch on CIFAR-10, then EPOCHS (default 40) epochs of round
# 0 at the released settings with the kNN curve next to the published row 0 (docs/ALGORITHM.md 8).
#   Needs the CIFAR-10 image-folder tarball at .devdata/cifar10-jpeg.tar.gz, or DATA set to
#   an unpacked copy. Writes its logs to $OUT (default /tmp/gpu_check).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
EPOCHS=${EPOCHS:-40}
mkdir -p "$OUT"
if [ -z "${DATA:-}" ]; then
  DATA=/tmp/cifar10
  mkdir -p "$DATA" && tar xzf .devdata/cifar10-jpeg.tar.gz -C "$DATA"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUT/gpu.txt"
python3 bench/epoch_speed.py --data-root "$DATA" --steps "${BENCH_STEPS:-200}" 2>&1 \
  | tee "$OUT/epoch_speed.txt"
# --schedule released: the first EPOCHS epochs of a 200-epoch round, as published (lr 0.03, UE
# weight 0 up to epoch 79), not a whole round of EPOCHS epochs.
python3 main.py --data-root "$DATA" --rounds 1 --epochs "$EPOCHS" --schedule released \
  --model_dir /tmp/gpu_check_ckpt --no-tensorboard 2>&1 | tee "$OUT/round0.log"
cp /tmp/gpu_check_ckpt/log.jsonl "$OUT/round0_log.jsonl"
python3 bench/compare_curve.py /tmp/gpu_check_ckpt | tee "$OUT/round0_vs_published.md"
