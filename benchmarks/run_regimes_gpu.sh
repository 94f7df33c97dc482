#!/usr/bin/env bash
# Runs the regimes study (issue 24; protocol in STABILITY.md) on one GPU:
# the conditions as processes side by side (their XLA compiles then overlap
# instead of queueing), each guarded by --budget-seconds and resumable. On
# an 80 GB H100 all three at once ran out of memory; noise and sources side
# by side, then imbalance alone, fit (CONDITIONS=...).
#
#   OUT=/some/dir RESUME=benchmarks/results/regimes_.../ BUDGET=500 \
#     bash benchmarks/run_regimes_gpu.sh
#
# RESUME (optional): a folder holding earlier regimes_*.jsonl files; each is
# copied to $OUT first, so that a condition skips the jobs it finished.
# Writes $OUT/regimes_{bbc_noise,tweets_sources,bbc_imbalance}.jsonl, one
# .log per condition and gpu.txt (device, memory in use every 30 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/grain_regimes}
BUDGET=${BUDGET:-470}
CONDITIONS=${CONDITIONS:-"noise sources imbalance"}
mkdir -p "$OUT"
if [ -n "${RESUME:-}" ]; then
  cp "$RESUME"/regimes_*.jsonl "$OUT"/ 2>/dev/null || true
fi
# Wheels, PYTHONPATH, MINILM_DIR (benchmarks/_gpu_env.sh).
. benchmarks/_gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
COMMON="--suite minilm --regimes full --stages regimes --val-seeds 3 \
  --seeds 20 --lanes 10 --max-eval 1000 --budget-seconds $BUDGET"
declare -A ARGS=(
  [noise]="--tasks bbc --conditions noise --noise 0 0.2 0.4 --regime-groups 16 4"
  [sources]="--tasks tweets --conditions sources --source-groups 1 2"
  [imbalance]="--tasks bbc --conditions imbalance --rare-shots 2 --imbalance-groups 16"
)
declare -A FILE=([noise]=regimes_bbc_noise [sources]=regimes_tweets_sources
                 [imbalance]=regimes_bbc_imbalance)
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import jax, optax, flax; print("jax", jax.__version__,
    "optax", optax.__version__, "flax", flax.__version__, jax.devices())'
} > "$OUT/gpu.txt" 2>&1
( while sleep 30; do
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader \
      >> "$OUT/gpu.txt" 2>&1
  done ) &
MON=$!
pids=()
for c in $CONDITIONS; do
  echo "python3 benchmarks/stability.py $COMMON ${ARGS[$c]} --out $OUT/${FILE[$c]}.jsonl" \
    > "$OUT/${FILE[$c]}.log"
  python3 benchmarks/stability.py $COMMON ${ARGS[$c]} \
    --out "$OUT/${FILE[$c]}.jsonl" >> "$OUT/${FILE[$c]}.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
kill "$MON" 2>/dev/null
exit $rc
