#!/usr/bin/env bash
# The GPU measurement of the fast path, in the two calls of a short device session (run from the
# repository root on a CUDA machine):
#
#   BUDGET=450 bench/gpu_check.sh first    # preflight; the phase table (bench/epoch_speed.py);
#                                          # round 0 at the released settings from epoch 0 on, up
#                                          # to epoch FAST-1, for as long as the budget lasts
#   BUDGET=300 bench/gpu_check.sh second   # FP32 epochs of the released arithmetic (fp32, cpu
#                                          # pipeline, no compile), to put next to the fast path's
#                                          # curve; then, with the time left, the fast run on
#                                          # (--resume last.t7) where the machine kept it
#
# BUDGET is the seconds the call may take (the device tool's timeout_s less a margin): 45 s
# before it, a SIGTERM stops the run at its next step with last.t7 written (SIGKILL 30 s later if
# it does not), so the call ends by itself with its logs whole. The console output of each part
# goes to $OUT as it comes, each run's log.jsonl every 10 s; the curves next to the published one
# follow at the end. The run folders are under $RUNS (git-ignored), which a warm machine keeps
# between the calls; a call run again continues its runs and never trains past their epochs. (A
# lent machine may go back after half a minute idle: the second call then finds no last.t7, and
# the fast run's curve is what the first call trained.)
#   DATA   an unpacked CIFAR-10 image-folder copy (default: .devdata/cifar10-jpeg.tar.gz, unpacked)
#   OUT    where the logs go (default /tmp/gpu_check)
#   RUNS   the run folders (default checkpoint/gpu_check)
#   FAST, FP32          round-0 epochs of each run, at most (default 40, 5)
#   BUDGET              seconds of this call (default: no limit)
#   BENCH_STEPS         steps timed per phase (default 100; the figures are per epoch)
#   WORKERS             loader processes of the fp32 run's cpu pipeline (default 12)
#   DEVICE, EXTRA, BENCH_EXTRA   --device (default cuda), more flags of main.py and of
#                       epoch_speed.py: for trying the script on a CPU at small sizes, e.g.
#   DEVICE=cpu DATA=/tmp/cifar FAST=3 FP32=1 BENCH_STEPS=2 BUDGET=100 \
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
FAST=${FAST:-40}
FP32=${FP32:-5}
BUDGET=${BUDGET:-}
STARTED=$(date +%s)
for number in FAST FP32 BUDGET; do
  if [ -n "${!number}" ] && ! [[ "${!number}" =~ ^[0-9]+$ ]]; then
    echo "error: $number=${!number} is not a whole number (of $( [ "$number" = BUDGET ] \
      && echo seconds || echo epochs))" >&2
    exit 2
  fi
done
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

# The command "$@", stopped by SIGTERM 45 s before the call's BUDGET runs out (main.py then
# stops at its next step, last.t7 written, and exits 0), and killed 30 s after that if it is
# still there; without a BUDGET, as it is.
within_budget() {
  if [ -z "$BUDGET" ]; then
    "$@"
    return
  fi
  local left=$((STARTED + BUDGET - 45 - $(date +%s)))
  if [ "$left" -le 0 ]; then
    echo "no time left in the budget for: $*"
    return 0
  fi
  timeout --preserve-status -s TERM -k 30 "$left" "$@"
}

# main.py at the released settings (its defaults), on the released absolute schedule.
train() {
  within_budget python3 main.py --data-root "$DATA" --device "$DEVICE" --schedule released \
    --no-tensorboard "${EXTRA[@]}" "$@"
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
  within_budget python3 bench/epoch_speed.py --data-root "$DATA" --device "$DEVICE" \
    --steps "${BENCH_STEPS:-100}" "${BENCH_EXTRA[@]}" 2>&1 | tee "$OUT/epoch_speed.txt" \
    || echo "the phase table failed (above); round 0 follows all the same"
  # -------------------------------------------------------------- round 0, from epoch 0
  train_to fast "$FAST" 2>&1 | tee "$OUT/round0_first.log"
  ;;
second)
  # -------------------------------------------------------------- fp32, then round 0 on
  train_to fp32 "$FP32" --precision fp32 --pipeline cpu --compile none \
    --workers "${WORKERS:-12}" 2>&1 | tee "$OUT/fp32.log" \
    || echo "the fp32 run failed (above); the fast run follows all the same"
  if [ -f "$RUNS/fast/last.t7" ]; then
    train_to fast "$FAST" 2>&1 | tee "$OUT/round0_more.log"
  else
    echo "no $RUNS/fast/last.t7 to continue (a fresh machine): the fast run's curve is the" \
      "first call's"
  fi
  ;;
esac
