#!/usr/bin/env bash
# The GPU measurement of the fast path, in the two calls of a short device session (run from the
# repository root on a CUDA machine):
#
#   bench/gpu_check.sh first     # preflight; the phase table (bench/epoch_speed.py); round 0 at
#                                # the released settings from epoch 0 to epoch FIRST-1
#   bench/gpu_check.sh second    # the same run on to epoch FIRST+MORE-1 (--resume last.t7); then
#                                # FP32 epochs of the released arithmetic (fp32, cpu pipeline,
#                                # no compile) for the equality check
#
# Every log is written to $OUT as it comes (a call cut short still reports); the run folders
# are under $RUNS (git-ignored), which a warm machine keeps between the two calls.
#   DATA   an unpacked CIFAR-10 image-folder copy (default: .devdata/cifar10-jpeg.tar.gz, unpacked)
#   OUT    where the logs go (default /tmp/gpu_check)
#   RUNS   the run folders (default checkpoint/gpu_check)
#   FIRST, MORE, FP32   epochs of each part (default 10, 30, 5)
#   BENCH_STEPS         steps timed per phase (default 100; the figures are per epoch)
#   WORKERS             loader processes of the fp32 run's cpu pipeline (default 12)
#   DEVICE, EXTRA, BENCH_EXTRA   --device (default cuda), more flags of main.py and of
#                       epoch_speed.py: for trying the script on a CPU at small sizes, e.g.
#   DEVICE=cpu DATA=/tmp/cifar FIRST=2 MORE=1 FP32=1 BENCH_STEPS=2 \
#     EXTRA='--subset 64 --batch_size 16 --network alexnet --knn-k 5' WORKERS=2 \
#     BENCH_EXTRA='--synthetic-n 256 --synthetic-test 100 --network alexnet --batch_size 16' \
#     bench/gpu_check.sh first
set -euo pipefail
export PYTHONUNBUFFERED=1
STAGE=${1:-}
if [ "$STAGE" != first ] && [ "$STAGE" != second ]; then
  echo "error: say which call: bench/gpu_check.sh first, or bench/gpu_check.sh second" >&2
  exit 2
fi
OUT=${OUT:-/tmp/gpu_check}
RUNS=${RUNS:-checkpoint/gpu_check}
FIRST=${FIRST:-10}
MORE=${MORE:-30}
FP32=${FP32:-5}
DEVICE=${DEVICE:-cuda}
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a BENCH_EXTRA <<< "${BENCH_EXTRA:-}"
mkdir -p "$OUT" "$RUNS"
if [ -z "${DATA:-}" ]; then
  DATA=/tmp/cifar10
  [ -d "$DATA/train" ] || { mkdir -p "$DATA" && tar xzf .devdata/cifar10-jpeg.tar.gz -C "$DATA"; }
fi
# main.py at the released settings (its defaults), on the released absolute schedule.
train() {
  python3 main.py --data-root "$DATA" --device "$DEVICE" --schedule released --no-tensorboard \
    "${EXTRA[@]}" "$@"
}

case "$STAGE" in
first)
  # -------------------------------------------------------------- preflight (seconds)
  python3 - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/preflight.txt"
import platform, sys, time
import torch, torchvision
print('python', platform.python_version(), '| torch', torch.__version__, '| torchvision',
      torchvision.__version__, '| CUDA', torch.version.cuda)
if sys.argv[1] == 'cuda':
    import triton
    props = torch.cuda.get_device_properties(0)
    print(f'{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, triton {triton.__version__}')
    started = time.time()
    double = torch.compile(lambda x: (2 * x).sin())
    value = double(torch.ones(4, device='cuda')).sum().item()
    print(f'torch.compile on CUDA: {value:.4f} in {time.time() - started:.1f} s')
EOF
  # -------------------------------------------------------------- the phase table
  python3 bench/epoch_speed.py --data-root "$DATA" --device "$DEVICE" \
    --steps "${BENCH_STEPS:-100}" "${BENCH_EXTRA[@]}" 2>&1 | tee "$OUT/epoch_speed.txt"
  # -------------------------------------------------------------- round 0, epochs 0 to FIRST-1
  train --model_dir "$RUNS/fast" --stop-after "$FIRST" 2>&1 | tee "$OUT/round0_first.log"
  ;;
second)
  # -------------------------------------------------------------- round 0 on, then fp32
  train --model_dir "$RUNS/fast" --resume last.t7 --stop-after "$MORE" 2>&1 \
    | tee "$OUT/round0_more.log"
  train --model_dir "$RUNS/fp32" --precision fp32 --pipeline cpu --compile none \
    --workers "${WORKERS:-12}" --stop-after "$FP32" 2>&1 | tee "$OUT/fp32.log"
  ;;
esac
for run in fast fp32; do
  if [ -f "$RUNS/$run/log.jsonl" ]; then
    cp "$RUNS/$run/log.jsonl" "$OUT/${run}_log.jsonl"
    python3 bench/compare_curve.py "$RUNS/$run" | tee "$OUT/${run}_vs_published.md"
  fi
done
