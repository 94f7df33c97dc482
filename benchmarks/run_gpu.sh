#!/usr/bin/env bash
# Runs the benchmarks in their full configuration on a GPU machine, in one go.
#
#   OUT=/some/dir STAGES="qp step memory peer" bash benchmarks/run_gpu.sh
#
# Installs the wheels in .whl/ (jaxopt, torchjd) if present, prints versions,
# and writes JSON lines and logs under $OUT: qp.jsonl, step.jsonl,
# memory.jsonl, peer.jsonl, log.txt, hlo.tar.gz. Each stage has a time limit
# (seconds, STAGE_LIMITS) so that a slow one cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/grain_bench}
mkdir -p "$OUT"
# Wheels, PYTHONPATH, MINILM_DIR (benchmarks/_gpu_env.sh).
. benchmarks/_gpu_env.sh
export JAX_COMPILATION_CACHE_DIR=/tmp/grain_jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
PY=${PY:-python3}
# Stages in order of priority (a short lease may cut the last ones):
# check (the exact solver's Pallas kernel against XLA on this GPU; falls back
# to XLA for the rest if it fails), step (targets 1, 3, 4 at m = 4, 8: step
# time and the compiled program's peak memory for the default and lean
# modes), qp (target 2), peer (PyTorch / TorchJD), step2 (m = 2, 16),
# memory (peak memory measured in child processes).
# Short fine-tuning steps (issue 23; not in the default list): short (MiniLM
# bf16, full and LoRA, m = 4, 8, 16, fixed and streamed batches, device
# profile), short_state (the same with the metrics carried in the donated
# state), short_fp32 (fp32 compute), cbuf (XLA's command-buffer log of one
# mean step, GRAIN LoRA steps with the metrics in the state and as outputs,
# and a GRAIN full step: which graph updates happen per call), short_packed
# (bf16 full fine-tuning with the metrics packed into one output vector),
# hprof (host_profile.py of the bf16 full step at m = 4: the mean, GRAIN with
# its metrics as outputs, GRAIN packed), cbuf_hlo (XLA's command-buffer log
# and the compiled HLO of GRAIN's bf16 full step, metrics as outputs and
# packed, under $OUT/hlo_*.txt), short_nocbuf (bf16 full fine-tuning, metrics
# as outputs, with XLA's command buffers (CUDA graphs) off for the whole
# process, the mean included), short_table (issue 23's whole table in two
# processes, bf16 and fp32 (fp32 with row_sparse on), full and LoRA, m = 4,
# 8, 16, metrics packed, collector frozen, 9 repeats, fixed and streamed;
# with the GPU's clocks and the host's load sampled while it runs, in
# gpu_clocks_short_table.csv and host_load_short_table.txt).
# short_alone (TABLE_DTYPES, full and LoRA, m = 4, 8, 16, each
# configuration's 9 repeats of 100 steps back to back, --interleave off: does
# a step that follows another configuration's cost the host ~20 ms? On an
# H100, no: alone, every call costs the host as much; RESULTS.md, "Several
# steps a call"), with the samplers of short_table.
# short_scan (TABLE_DTYPES, SCAN_MODES, m = 4, 8, 16, 9 x 100 steps
# interleaved, each configuration once per K in SCAN_K, K steps a call in a
# lax.scan: make_train_step(steps_per_call=K), the pattern for host-bound
# short steps), with the samplers of short_table.
# suite: the whole test suite on this GPU (6 workers), its log in suite.txt.
STAGES=${STAGES:-"check step qp peer step2 memory"}
TABLE_DTYPES=${TABLE_DTYPES:-"bfloat16 float32"}  # short_table's processes
SCAN_K=${SCAN_K:-"1,10"}  # short_scan's steps a call
SCAN_MODES=${SCAN_MODES:-"full,lora"}
SHORT_ARGS=${SHORT_ARGS:-"--modes full,lora --batches 16 --groups 4,8,16 --steps 30 --repeats 5 --feed fixed,stream --profile"}
QP_ARGS=${QP_ARGS:-"--config full"}
STEP_ARGS=${STEP_ARGS:-"--config full --groups 4 8 --profile 4 8"}
STEP2_ARGS=${STEP2_ARGS:-"--config full --groups 2 16 --modes grain"}
MEM_ARGS=${MEM_ARGS:-"--config full --groups 4 8 2 16 --measure"}
PEER_ARGS=${PEER_ARGS:-"--config full --groups 4 8"}
declare -A LIMIT=([check]=60 [qp]=120 [step]=300 [step2]=200 [memory]=120 [peer]=150
                  [short]=240 [short_state]=240 [short_fp32]=240 [cbuf]=200
                  [short_packed]=200 [hprof]=240 [cbuf_hlo]=150 [short_nocbuf]=200 [short_table]=480 [short_alone]=540 [short_scan]=560
                  [suite]=420)
for kv in ${STAGE_LIMITS:-}; do LIMIT[${kv%%=*}]=${kv#*=}; done
# The head of the short_* table stages: one process per dtype of
# TABLE_DTYPES ($d; fp32 with row_sparse on), MiniLM batch 16 x 128,
# m = 4, 8, 16, 9 repeats, metrics packed, collector frozen. Each stage adds
# its options, the JSON file, and closes the loop with "; done".
PER_DTYPE="for d in $TABLE_DTYPES; do r=off; [ \$d = float32 ] && r=on; $PY benchmarks/finetune_step_time.py --dtype \$d --batches 16 --groups 4,8,16 --repeats 9 --profile --stats packed --gc frozen --row-sparse \$r"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv 2>/dev/null
  $PY - <<'PYEOF'
import importlib, importlib.metadata
for name in ('jax', 'jaxlib', 'optax', 'flax', 'chex', 'jaxopt', 'torch',
             'torchjd', 'numpy'):
  try:
    mod = importlib.import_module(name)
    try:
      version = importlib.metadata.version(name)
    except Exception:  # pylint: disable=broad-except
      version = getattr(mod, '__version__', '?')
    print(name, version)
  except Exception as e:  # pylint: disable=broad-except
    print(name, 'missing', type(e).__name__)
import jax
print('devices', jax.devices())
PYEOF
} 2>&1 | tee "$OUT/env.txt"
for stage in $STAGES; do
  echo "=== $stage (limit ${LIMIT[$stage]} s) $(date -u +%T)" | tee -a "$OUT/log.txt"
  case $stage in
    check) cmd="$PY benchmarks/check_kernel.py" ;;
    step2) cmd="$PY benchmarks/step_overhead.py $STEP2_ARGS --json $OUT/step.jsonl" ;;
    qp) cmd="$PY benchmarks/qp_solvers.py $QP_ARGS --json $OUT/qp.jsonl" ;;
    step) cmd="$PY benchmarks/step_overhead.py $STEP_ARGS --json $OUT/step.jsonl --dump_hlo /tmp/grain_hlo" ;;
    memory) cmd="$PY benchmarks/memory.py $MEM_ARGS --json $OUT/memory.jsonl" ;;
    peer) cmd="$PY benchmarks/peer_torchjd.py $PEER_ARGS --json $OUT/peer.jsonl" ;;
    suite) cmd="$PY -m pytest -q -n 6 -p no:cacheprovider --durations=10 tests > $OUT/suite.txt 2>&1; tail -n 15 $OUT/suite.txt" ;;
    short) cmd="$PY benchmarks/finetune_step_time.py --dtype bfloat16 $SHORT_ARGS --json $OUT/short.jsonl" ;;
    short_state) cmd="$PY benchmarks/finetune_step_time.py --dtype bfloat16 $SHORT_ARGS --metrics-in-state --json $OUT/short_state.jsonl" ;;
    short_packed) cmd="$PY benchmarks/finetune_step_time.py --dtype bfloat16 $SHORT_ARGS --modes full --stats packed --json $OUT/short_packed.jsonl" ;;
    short_nocbuf) cmd="env XLA_FLAGS='--xla_gpu_enable_command_buffer=' $PY benchmarks/finetune_step_time.py --dtype bfloat16 $SHORT_ARGS --modes full --json $OUT/short_nocbuf.jsonl" ;;
    short_table) cmd="$PER_DTYPE --modes full,lora --steps 30 --feed fixed,stream --json $OUT/short_table_\$d.jsonl; done" ;;
    short_alone) cmd="$PER_DTYPE --modes full,lora --steps 100 --feed fixed --interleave off --json $OUT/short_alone_\$d.jsonl; done" ;;
    short_scan) cmd="$PER_DTYPE --modes $SCAN_MODES --steps 100 --warmup 10 --feed fixed --steps-per-call $SCAN_K --json $OUT/short_scan_\$d.jsonl; done" ;;
    hprof) cmd="for v in 'mean' 'grain' 'grain --stats packed'; do $PY benchmarks/host_profile.py --mode full --dtype bfloat16 --groups 4 --method \$v --label \"\$v\" --json $OUT/hprof.jsonl; done" ;;
    cbuf_hlo) cmd="for s in metrics packed; do env TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0 $PY benchmarks/command_buffers.py --mode full --dtype bfloat16 --method grain --groups 4 --stats \$s --label \$s --json $OUT/cbuf_hlo.jsonl --dump-hlo $OUT/hlo_\$s.txt; done" ;;
    short_fp32) cmd="$PY benchmarks/finetune_step_time.py --dtype float32 $SHORT_ARGS --json $OUT/short_fp32.jsonl" ;;
    cbuf) cmd="env TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0 bash -c '$PY benchmarks/command_buffers.py --mode lora --method mean --groups 1 --json $OUT/cbuf.jsonl; $PY benchmarks/command_buffers.py --mode lora --method grain --groups 4 --metrics-in-state --json $OUT/cbuf.jsonl; $PY benchmarks/command_buffers.py --mode lora --method grain --groups 4 --json $OUT/cbuf.jsonl; $PY benchmarks/command_buffers.py --mode full --method grain --groups 4 --json $OUT/cbuf.jsonl'" ;;
    *) echo "unknown stage $stage"; continue ;;
  esac
  echo "\$ $cmd" | tee -a "$OUT/log.txt"
  samplers=()
  if [[ $stage == short_table || $stage == short_alone || $stage == short_scan ]]; then
    # Alongside the timed steps: the GPU's clocks, power and throttle
    # reasons every 200 ms, and the host's CPU counters (/proc/stat's first
    # line: user nice system idle iowait irq softirq steal) and load every
    # 0.5 s, with Unix times, to line slow repeats up with (the rows carry
    # each repeat's start time, repeat_start_unix_by_feed).
    for field in clocks_event_reasons.active clocks_throttle_reasons.active; do
      q="timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,$field"
      if nvidia-smi --query-gpu=$q --format=csv >/dev/null 2>&1; then
        nvidia-smi --query-gpu=$q --format=csv -lms 200 > "$OUT/gpu_clocks_$stage.csv" 2>&1 &
        samplers+=($!)
        break
      fi
    done
    ( while :; do echo "$(date +%s.%N | cut -c1-14) $(head -n 1 /proc/stat) $(cut -d' ' -f1-3 /proc/loadavg)"; sleep 0.5; done ) > "$OUT/host_load_$stage.txt" 2>&1 &
    samplers+=($!)
  fi
  timeout "${LIMIT[$stage]}" bash -c "$cmd" 2>&1 | grep -v '^{' | tee -a "$OUT/log.txt"
  rc=${PIPESTATUS[0]}
  if [ ${#samplers[@]} -gt 0 ]; then kill "${samplers[@]}" 2>/dev/null; fi
  echo "=== $stage rc=$rc $(date -u +%T)" | tee -a "$OUT/log.txt"
  if [ "$stage" = check ] && [ "$rc" != 0 ]; then
    echo "kernel check failed: exact solver under XLA from here on" | tee -a "$OUT/log.txt"
    export GRAIN_OPTAX_EXACT_BACKEND=xla
  fi
done
if [ -d /tmp/grain_hlo ]; then tar czf "$OUT/hlo.tar.gz" -C /tmp grain_hlo; fi
