#!/usr/bin/env bash
# The GPU measurement of the fast path, in the two calls of a short device session (run from the
# repository root on a CUDA machine):
#
#   bench/gpu_check.sh first     # preflight; the phase table (bench/epoch_speed.py); round 0 at
#                                # the released settings from epoch 0 to epoch FIRST-1
#   bench/gpu_check.sh second    # the same run on to epoch FIRST+MORE-1 (--resume last.t7); then
#                                # FP32 epochs of the released arithmetic (fp32, cpu pipeline,
#                                # no compile), to put next to the fast path's curve
#
# The console output of each part goes to $OUT as it comes, each run's log.jsonl every 10 s;
# the curves next to the published one follow at the end. The run folders are under $RUNS
# (git-ignored), which a warm machine keeps between the calls; a call run again continues its
# runs and never trains past its epochs. (A lent machine may go back after half a minute idle:
# make the second call at once, or it finds no last.t7 and runs the fp32 part only.)
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
  if [ ! -f "$DATA/.unpacked" ] && [ ! -f .devdata/cifar10-jpeg.tar.gz ]; then
    echo "error: no .devdata/cifar10-jpeg.tar.gz: copy the CIFAR-10 image-folder tarball there" \
      "and carry .devdata to the device machine, or give DATA, an unpacked copy" >&2
    exit 2
  fi
  if [ ! -f "$DATA/.unpacked" ]; then         # (a call stopped while unpacking unpacks again)
    rm -rf "$DATA" && mkdir -p "$DATA" && tar xzf .devdata/cifar10-jpeg.tar.gz -C "$DATA"
    touch "$DATA/.unpacked"
  fi
fi

# main.py at the released settings (its defaults), on the released absolute schedule.
train() {
  python3 main.py --data-root "$DATA" --device "$DEVICE" --schedule released --no-tensorboard \
    "${EXTRA[@]}" "$@"
}

# The epochs run $1 ($RUNS/$1) has left before epoch $2 of round 0: all of them when it has not
# started, else what its last.t7 says (so that a call run again never trains past epoch $2 - 1).
left_to() {
  if [ ! -f "$RUNS/$1/last.t7" ]; then
    echo "$2"
    return
  fi
  python3 -c '
import sys, torch
at = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["next"]
print(max(0, int(sys.argv[2]) - at["epoch"]) if at["round"] == 0 else 0)' "$RUNS/$1/last.t7" "$2"
}

# Train run $1 to epoch $2 - 1 of round 0, continuing its last.t7 where there is one; the other
# arguments go to main.py.
train_to() {
  local run=$1 target=$2 left resume=()
  shift 2
  left=$(left_to "$run" "$target")
  if [ "$left" -le 0 ]; then
    echo "$run: round 0 is already trained to epoch $((target - 1))"
    return 0
  fi
  if [ -f "$RUNS/$run/last.t7" ]; then
    resume=(--resume last.t7)
  fi
  train --model_dir "$RUNS/$run" "${resume[@]}" --stop-after "$left" "$@"
}

# Each run's log.jsonl into $OUT: every 10 s while the call runs (a call killed at its time
# limit still brings its epochs back), and at its end with the curves next to the published one.
copy_logs() {
  for run in fast fp32; do
    if [ -f "$RUNS/$run/log.jsonl" ]; then
      cp "$RUNS/$run/log.jsonl" "$OUT/${run}_log.jsonl"
    fi
  done
}
(while sleep 10; do copy_logs; done) >/dev/null 2>&1 &
COPIER=$!
report() {
  kill "$COPIER" 2>/dev/null || true
  copy_logs
  for run in fast fp32; do
    if [ -f "$RUNS/$run/log.jsonl" ]; then
      python3 bench/compare_curve.py "$RUNS/$run" 2>&1 | tee "$OUT/${run}_vs_published.md" \
        || true
    fi
  done
}
trap report EXIT
trap 'exit 143' TERM INT

case "$STAGE" in
first)
  # -------------------------------------------------------------- preflight (seconds)
  # (Neither a failed preflight nor a failed phase table stops the call: main.py falls back to
  # a lower compile mode on its own, and its curve is the other half of the call.)
  if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
      | tee "$OUT/gpu.txt" || echo "nvidia-smi failed (above); the preflight follows"
  fi
  python3 - "$DEVICE" <<'PREFLIGHT' 2>&1 | tee "$OUT/preflight.txt" \
    || echo "the preflight failed (above); the phase table follows all the same"
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
PREFLIGHT
  # -------------------------------------------------------------- the phase table
  python3 bench/epoch_speed.py --data-root "$DATA" --device "$DEVICE" \
    --steps "${BENCH_STEPS:-100}" "${BENCH_EXTRA[@]}" 2>&1 | tee "$OUT/epoch_speed.txt" \
    || echo "the phase table failed (above); round 0 follows all the same"
  # -------------------------------------------------------------- round 0, epochs 0 to FIRST-1
  train_to fast "$FIRST" 2>&1 | tee "$OUT/round0_first.log"
  ;;
second)
  # -------------------------------------------------------------- round 0 on, then fp32
  if [ -f "$RUNS/fast/last.t7" ]; then
    train_to fast "$((FIRST + MORE))" 2>&1 | tee "$OUT/round0_more.log" \
      || echo "the continued run failed (above); the fp32 run follows all the same"
  else
    echo "no $RUNS/fast/last.t7 to continue (a fresh machine?); the fp32 run follows"
  fi
  train_to fp32 "$FP32" --precision fp32 --pipeline cpu --compile none \
    --workers "${WORKERS:-12}" 2>&1 | tee "$OUT/fp32.log"
  ;;
esac
