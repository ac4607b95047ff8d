#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, prepared for a session lent a GPU (device tool: `run`
# with command `bash benchmarks/gpu_session.sh bench` and timeout_s 590, then, if time is left,
# `bash benchmarks/gpu_session.sh demo` for the demo_gpu pipeline, timeout_s 420).
# Each benchmark has its own time limit, so one that hangs or runs out of memory costs only its
# slot. Results: $OUT/results.jsonl (one JSON line per measurement, tagged "bench"), the logs in
# $OUT/log.txt. Needs jax, flax, optax, orbax, transformers on the machine (the device image has
# them); the package runs from this checkout.
set -u
OUT=${OUT:-/tmp/dasd_jax_gpu_session}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$ROOT/benchmarks" || exit 1

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

# bench NAME SECONDS ARGS...: runs `python ARGS...`, tags its JSON lines with NAME.
bench() {
  local name=$1 limit=$2
  shift 2
  log "start $name: python $*"
  timeout "$limit" python "$@" >"$OUT/$name.out" 2>>"$OUT/log.txt"
  log "end $name: exit $?"
  python - "$name" "$OUT/$name.out" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
for line in open(path):
    line = line.strip()
    if line.startswith("{"):
        print(json.dumps({"bench": name, **json.loads(line)}))
EOF
  rm -f "$OUT/$name.out"
}

log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
python -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/log.txt"

case "${1:-bench}" in
  bench)  # about 8 minutes
    ONE_B=(--shape=llama-3.2-1b --seq_len=2048 --batch=8)
    bench forward_cudnn 60 forward.py "${ONE_B[@]}" --dtype=bfloat16
    bench forward_xla 60 forward.py "${ONE_B[@]}" --dtype=bfloat16 --attention_impl=xla
    bench step 150 step.py "${ONE_B[@]}" --compute_dtype=bfloat16 --remat_policy=dots_no_batch
    bench step_lora16 120 step.py "${ONE_B[@]}" --compute_dtype=bfloat16 \
      --remat_policy=dots_no_batch --lora_rank=16
    bench decode 90 decode.py --shape=llama-3.2-1b --dtype=bfloat16 --batches=1,256
    ;;
  demo)  # the demo_gpu pipeline, at most 6.5 minutes
    log "start demo_gpu"
    cd "$ROOT" || exit 1
    timeout 390 python -m dasd_jax.demo --config=configs/demo.py:gpu \
      --config.workdir=/tmp/dasd_jax_demo_gpu >>"$OUT/log.txt" 2>&1
    log "end demo_gpu: exit $?"
    if [ -f /tmp/dasd_jax_demo_gpu/demo_results.json ]; then
      cp /tmp/dasd_jax_demo_gpu/demo_results.json "$OUT/demo_gpu_results.json"
    fi
    ;;
  *) echo "usage: $0 [bench|demo]" >&2; exit 2 ;;
esac
log "done"
