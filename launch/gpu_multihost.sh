#!/usr/bin/env bash
# Runs one dasd_jax process per GPU host over ssh, wired together by JAX's coordinator.
#
#   launch/gpu_multihost.sh --hosts gpu01,gpu02 --workdir /shared/runs/math \
#       --config configs/math.py -- --config.train.steps=2000
#
# Host i (from 0, in --hosts order) runs, in --remote-dir (default: this checkout's path, as on a
# shared file system), `python -m dasd_jax.<stage> --config=... --config.workdir=...
# --config.distributed.coordinator=HOST0:PORT --config.distributed.num_processes=N
# --config.distributed.process_id=i` with --gpus-per-host GPUs visible. Output is streamed with a
# `[host]` prefix. When a host fails, the others are stopped (their ssh sessions closed, which
# hangs up the remote processes) and the script exits with the failed host's status.
# Before any host is contacted, the run is compiled for hosts x --gpus-per-host GPUs of model
# --gpu on this machine (dasd_jax.train --config.dry_run=True, no GPU needed); a run that does
# not fit stops here.
# --workdir must be one directory every host sees (NFS, or gs:// where supported): Orbax writes
# each checkpoint from all processes. --dry-run prints the ssh commands (`+ cmd`) and runs none.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
readonly ROOT
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$ROOT/launch/common.sh"

usage() {
  cat <<EOF
usage: $PROG [--dry-run] --hosts HOST1,HOST2[,...] --workdir DIR
       [--config configs/TASK.py[:VARIANT]] [--stage train|rewrite|evaluate|analyze]
       [--coordinator-port 1234] [--coordinator-host ADDRESS] [--gpus-per-host 8]
       [--remote-dir DIR] [--python PATH] [--gpu h100|h200|a100] [--local-python PATH]
       [--skip-fit-check] [-- EXTRA STAGE FLAGS...]

  --hosts LIST           ssh destinations ([user@]host), comma-separated; the first one hosts
                         the coordinator and is process 0
  --workdir DIR          --config.workdir, a directory every host shares
  --config PATH          task config relative to --remote-dir (default configs/math.py)
  --stage STAGE          dasd_jax module to run (default train)
  --coordinator-port P   port of the coordinator on the first host (default 1234)
  --coordinator-host A   address the other hosts reach the first one at (default: the first
                         host without its user@)
  --gpus-per-host G      CUDA_VISIBLE_DEVICES=0..G-1 on every host; 0 leaves it alone (default 8)
  --remote-dir DIR       the checkout on every host (default: $ROOT)
  --python PATH          interpreter, relative to --remote-dir or absolute (default .venv/bin/python)
  --gpu MODEL            the hosts' GPUs for the fit check: h100, h200 or a100 (default h100)
  --local-python PATH    this machine's interpreter with dasd_jax, for the fit check
                         (default: .venv/bin/python of this checkout, else python3)
  --skip-fit-check       start without compiling the run for the hosts' GPUs first
  --dry-run              print the ssh commands ('+ ' prefixed) instead of running them
  -- FLAGS...            passed on to every process, e.g. --config.train.steps=100
EOF
}

die_usage() {
  printf '%s: %s\n' "$PROG" "$1" >&2
  usage >&2
  exit 2
}

# ----------------------------------------------------------------------------- arguments

HOSTS_ARG="" WORKDIR="" CONFIG=configs/math.py STAGE=train PORT=1234 COORDINATOR_HOST=""
GPUS_PER_HOST=8 REMOTE_DIR=$ROOT PYTHON=.venv/bin/python GPU=h100 SKIP_FIT_CHECK=0
LOCAL_PYTHON=$(default_local_python)
EXTRA=()

while (($#)); do
  case $1 in
    --) shift; EXTRA=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
  esac
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-fit-check) SKIP_FIT_CHECK=1 ;;
    --hosts | --workdir | --config | --stage | --coordinator-port | --coordinator-host | \
      --gpus-per-host | --remote-dir | --python | --gpu | --local-python)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --hosts) HOSTS_ARG=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --config) CONFIG=$2 ;;
        --stage) STAGE=$2 ;;
        --coordinator-port) PORT=$2 ;;
        --coordinator-host) COORDINATOR_HOST=$2 ;;
        --gpus-per-host) GPUS_PER_HOST=$2 ;;
        --remote-dir) REMOTE_DIR=$2 ;;
        --python) PYTHON=$2 ;;
        --gpu) GPU=$2 ;;
        --local-python) LOCAL_PYTHON=$2 ;;
      esac
      shift ;;
    *) die_usage "unknown argument '$1' (stage flags go after --)" ;;
  esac
  shift
done

[[ -n $HOSTS_ARG ]] || die_usage "--hosts is required, e.g. --hosts gpu01,gpu02"
[[ -n $WORKDIR ]] || die_usage "--workdir is required: a directory all hosts share"
IFS=, read -r -a HOSTS <<<"$HOSTS_ARG"
for host in "${HOSTS[@]}"; do
  [[ -n $host && $host != *[[:space:]]* ]] || die_usage "--hosts '$HOSTS_ARG' has an empty or blank entry"
done
[[ $HOSTS_ARG != *, ]] || die_usage "--hosts '$HOSTS_ARG' has an empty entry"
case $STAGE in
  train | rewrite | evaluate | analyze) ;;
  *) die_usage "--stage must be train, rewrite, evaluate or analyze, not '$STAGE'" ;;
esac
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
  die_usage "--coordinator-port must be a port number (1-65535), not '$PORT'"
fi
[[ $GPUS_PER_HOST =~ ^[0-9]+$ ]] || die_usage "--gpus-per-host must be a whole number, not '$GPUS_PER_HOST'"
case $GPU in
  h100 | h200 | a100) ;;
  *) die_usage "--gpu must be h100, h200 or a100, not '$GPU'" ;;
esac
COORDINATOR_HOST=${COORDINATOR_HOST:-${HOSTS[0]#*@}}
NUM_PROCESSES=${#HOSTS[@]}

VISIBLE_DEVICES=""
if ((GPUS_PER_HOST > 0)); then
  VISIBLE_DEVICES=CUDA_VISIBLE_DEVICES=0
  for ((gpu = 1; gpu < GPUS_PER_HOST; gpu++)); do
    VISIBLE_DEVICES+=",$gpu"
  done
  VISIBLE_DEVICES+=" "
fi

# The command host `$1` (process id) runs, one shell line. The progress bar is off: ssh -tt
# gives the process a terminal, and carriage-return redraws would garble the prefixed stream.
remote_command() {
  local args=(-m "dasd_jax.$STAGE" --config="$CONFIG" --config.workdir="$WORKDIR"
    --config.distributed.coordinator="$COORDINATOR_HOST:$PORT"
    --config.distributed.num_processes="$NUM_PROCESSES" --config.distributed.process_id="$1")
  args+=(--config.metrics.progress_bar=False)
  printf 'cd %s && %sPYTHONUNBUFFERED=1 exec %s %s' "$(quote "$REMOTE_DIR")" "$VISIBLE_DEVICES" \
    "$(quote "$PYTHON")" "$(quote_words "${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"})"
}

if ((SKIP_FIT_CHECK)); then
  log "fit check skipped (--skip-fit-check)"
elif ((GPUS_PER_HOST == 0)); then
  log "--gpus-per-host 0: the GPU count is not known here, so the fit check is skipped"
else
  fit_check "${GPU}x$((NUM_PROCESSES * GPUS_PER_HOST))" ${EXTRA[@]+"${EXTRA[@]}"}
fi

# -tt: a terminal on the remote side, so closing the session (on failure or Ctrl-C) hangs up
# the remote process instead of leaving it running.
SSH=(ssh -tt -o BatchMode=yes)

if ((DRY_RUN)); then
  for i in "${!HOSTS[@]}"; do
    run "${SSH[@]}" "${HOSTS[$i]}" "$(remote_command "$i")"
  done
  exit 0
fi

# ----------------------------------------------------------------------------- the run

# Copies stdin to stdout, each line prefixed with `[$1] ` (a terminal's \r removed).
prefix_lines() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "${line%$'\r'}"
  done
}

PIDS=()
stop_all() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for i in "${!HOSTS[@]}"; do
  "${SSH[@]}" "${HOSTS[$i]}" "$(remote_command "$i")" </dev/null > >(prefix_lines "${HOSTS[$i]}") 2>&1 &
  PIDS+=("$!")
done
log "started $NUM_PROCESSES processes; coordinator $COORDINATOR_HOST:$PORT"

# Polls (no `wait -n`: bash 3.2 has none) until every host has ended; the first failure stops
# the rest.
FINISHED=() STATUS=0 remaining=$NUM_PROCESSES
while ((remaining > 0)); do
  for i in "${!HOSTS[@]}"; do
    [[ -z ${FINISHED[$i]:-} ]] || continue
    ! kill -0 "${PIDS[$i]}" 2>/dev/null || continue
    host_status=0
    wait "${PIDS[$i]}" || host_status=$?
    FINISHED[i]=$host_status
    remaining=$((remaining - 1))
    if ((host_status != 0 && STATUS == 0)); then
      STATUS=$host_status
      log "${HOSTS[$i]} (process $i) exited with status $host_status; stopping the others"
      stop_all
    fi
  done
  ((remaining == 0)) || sleep 0.2
done
wait  # the output prefixers
if ((STATUS == 0)); then
  log "all $NUM_PROCESSES processes finished"
fi
exit "$STATUS"
