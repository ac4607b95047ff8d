#!/usr/bin/env bash
# Runs a dasd_jax stage on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh --name dasd-v5e --zone us-west4-a --accelerator v5litepod-16 \
#       --version v2-alpha-tpuv5-lite --create --spot --workdir gs://BUCKET/runs/math \
#       --config configs/math.py -- --config.train.steps=2000
#
# Steps: check on this machine that the run fits the slice (the TPU compiler compiles it for
# --accelerator with no TPU present: dasd_jax.train --config.dry_run=True; a run that does not
# fit stops here, before anything is created or paid for), create the TPU VM (--create; as a queued resource with --queued), copy `git archive
# HEAD` to every worker and install it with the jax[tpu] build of requirements.txt's jax, run
# `python -m dasd_jax.<stage>` on all workers (JAX finds its peers on a TPU slice by itself) and
# stream their output. With --spot, a run that ends because the VM was preempted is followed by
# delete + create + install + the same command, which resumes from the latest checkpoint in
# --workdir (keep it on gs://: the VM's disk goes with the VM), at most --max-restarts times.
# --dry-run prints each command as `+ cmd` (shell-quoted) and runs none; gcloud is not called.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
readonly ROOT
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$ROOT/launch/common.sh"

usage() {
  cat <<EOF
usage: $PROG [--dry-run] --name NAME --zone ZONE --workdir gs://BUCKET/RUN
       [--accelerator TYPE] [--version RUNTIME] [--spot] [--create] [--queued]
       [--stage train|rewrite|evaluate|analyze] [--config configs/TASK.py[:VARIANT]]
       [--project PROJECT] [--python python3.11] [--max-restarts N]
       [--local-python PATH] [--skip-fit-check]
       [--preemption-grace SECONDS] [--simulate-preemption] [-- EXTRA STAGE FLAGS...]

  --name NAME            TPU VM name (also the queued resource's id with --queued)
  --zone ZONE            its zone, e.g. us-west4-a
  --workdir DIR          --config.workdir of the run; use gs://... so checkpoints outlive the VM
  --accelerator TYPE     e.g. v5litepod-16 (needed with --create and --spot)
  --version RUNTIME      TPU software version (default tpu-ubuntu2204-base)
  --create               create the VM first (otherwise it must exist)
  --queued               create (and recreate) it through a queued resource
  --spot                 Spot VM: on preemption delete, recreate and resume
  --stage STAGE          dasd_jax module to run (default train)
  --config PATH          task config relative to the repository (default configs/math.py)
  --project PROJECT      gcloud project (default: gcloud's configured one)
  --python INTERPRETER   Python >= 3.11 on the workers, apt-installed when missing
                         (default python3.11)
  --local-python PATH    this machine's interpreter with dasd_jax, for the fit check
                         (default: .venv/bin/python of this checkout, else python3)
  --skip-fit-check       launch without compiling the run for --accelerator first
  --max-restarts N       recreate after at most N preemptions (default 5)
  --preemption-grace S   with --spot, how long after a run ends to watch for the VM turning
                         PREEMPTED before taking the end as final (default 90)
  --dry-run              print the commands ('+ ' prefixed) instead of running them
  --simulate-preemption  with --dry-run --spot: act as if the first run was preempted
  -- FLAGS...            passed on to python -m dasd_jax.STAGE, e.g. --config.train.steps=100
EOF
}

die_usage() {
  printf '%s: %s\n' "$PROG" "$1" >&2
  usage >&2
  exit 2
}

# ----------------------------------------------------------------------------- arguments

CREATE=0 QUEUED=0 SPOT=0 SIMULATE_PREEMPTION=0 SKIP_FIT_CHECK=0
NAME="" ZONE="" WORKDIR="" ACCELERATOR="" PROJECT=""
VERSION=tpu-ubuntu2204-base STAGE=train CONFIG=configs/math.py REMOTE_PYTHON=python3.11
LOCAL_PYTHON=$(default_local_python)
MAX_RESTARTS=5 PREEMPTION_GRACE=90
EXTRA=()

while (($#)); do
  case $1 in
    --) shift; EXTRA=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
  esac
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --create) CREATE=1 ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --simulate-preemption) SIMULATE_PREEMPTION=1 ;;
    --skip-fit-check) SKIP_FIT_CHECK=1 ;;
    --name | --zone | --workdir | --accelerator | --version | --stage | --config | --project | \
      --python | --max-restarts | --preemption-grace | --local-python)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --name) NAME=$2 ;;
        --zone) ZONE=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --accelerator) ACCELERATOR=$2 ;;
        --version) VERSION=$2 ;;
        --stage) STAGE=$2 ;;
        --config) CONFIG=$2 ;;
        --project) PROJECT=$2 ;;
        --python) REMOTE_PYTHON=$2 ;;
        --max-restarts) MAX_RESTARTS=$2 ;;
        --preemption-grace) PREEMPTION_GRACE=$2 ;;
        --local-python) LOCAL_PYTHON=$2 ;;
      esac
      shift ;;
    *) die_usage "unknown argument '$1' (stage flags go after --)" ;;
  esac
  shift
done

[[ -n $NAME ]] || die_usage "--name is required"
[[ -n $ZONE ]] || die_usage "--zone is required"
[[ -n $WORKDIR ]] || die_usage "--workdir is required: where checkpoints and metrics go (gs://...)"
if ((CREATE || SPOT)) && [[ -z $ACCELERATOR ]]; then
  die_usage "--accelerator is required with --create or --spot (e.g. --accelerator v5litepod-16)"
fi
case $STAGE in
  train | rewrite | evaluate | analyze) ;;
  *) die_usage "--stage must be train, rewrite, evaluate or analyze, not '$STAGE'" ;;
esac
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die_usage "--max-restarts must be a whole number, not '$MAX_RESTARTS'"
[[ $PREEMPTION_GRACE =~ ^[0-9]+$ ]] ||
  die_usage "--preemption-grace must be a whole number of seconds, not '$PREEMPTION_GRACE'"
if ((SIMULATE_PREEMPTION)) && ! ((DRY_RUN && SPOT)); then
  die_usage "--simulate-preemption needs --dry-run and --spot"
fi
[[ $CONFIG != /* ]] || die_usage "--config must be relative to the repository (configs/...), not '$CONFIG'"
[[ -f $ROOT/${CONFIG%%:*} ]] || die_usage "--config: no file ${CONFIG%%:*} in $ROOT"
if [[ $WORKDIR != gs://* ]]; then
  log "warning: --workdir $WORKDIR is not on gs://: every worker writes its own disk, and a" \
    "recreated VM starts without the checkpoints"
fi

JAX_VERSION=$(sed -n 's/^jax==\([^[:space:];]*\).*/\1/p' "$ROOT/requirements.txt")
[[ -n $JAX_VERSION ]] || die "no 'jax==VERSION' line in $ROOT/requirements.txt"
readonly JAX_VERSION

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=(--project="$PROJECT")
SPOT_FLAG=()
((!SPOT)) || SPOT_FLAG=(--spot)

# ----------------------------------------------------------------------------- VM life cycle

create_vm() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} ||
      return
    wait_until_active
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}
  fi
}

delete_vm() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

# Sets STATE to the queued resource's state (with --queued) or the VM's; NOT_FOUND when gone.
# A dry run prints the describe command and takes the VM to be up.
read_state() {
  local command=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)')
  if ((QUEUED)); then
    command=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}"
      --format='value(state.state)')
  fi
  if ((DRY_RUN)); then
    run "${command[@]}"
    STATE=READY
    ((!QUEUED)) || STATE=ACTIVE
    return
  fi
  STATE=$("${command[@]}" 2>/dev/null) || STATE=NOT_FOUND
  STATE=${STATE:-NOT_FOUND}
}

wait_until_active() {
  local shown=""
  while :; do
    read_state
    case $STATE in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED) log "queued resource $NAME is $STATE"; return 1 ;;
    esac
    [[ $STATE == "$shown" ]] || log "queued resource $NAME: $STATE; waiting for ACTIVE"
    shown=$STATE
    sleep 30
  done
}

# After a spot run ends: whether the VM was preempted, or is still missing because recreating
# it failed. Watches the state for up to --preemption-grace seconds: the trainer saves on
# SIGTERM and exits, which may be before the VM reports PREEMPTED.
needs_recreation() {
  local waited=0
  while :; do
    read_state
    if ((SIMULATE_PREEMPTION && RESTARTS == 0)); then
      STATE=PREEMPTED
      ((!QUEUED)) || STATE=SUSPENDED
    fi
    case $STATE in
      PREEMPTED | SUSPENDING | SUSPENDED) return 0 ;;
      NOT_FOUND) ((!NEED_CREATE)) || return 0 ;;
    esac
    ((!DRY_RUN && waited < PREEMPTION_GRACE)) || return 1
    sleep 15
    waited=$((waited + 15))
  done
}

# ----------------------------------------------------------------------------- the run

if ((SKIP_FIT_CHECK)); then
  log "fit check skipped (--skip-fit-check)"
elif [[ -z $ACCELERATOR ]]; then
  log "no --accelerator: the fit check is skipped (the VM's type is not known here)"
else
  fit_check "$ACCELERATOR" ${EXTRA[@]+"${EXTRA[@]}"}
fi

if ((DRY_RUN)); then
  TARBALL="${TMPDIR:-/tmp}/dasd_jax.XXXXXX/dasd_jax.tar.gz"
else
  if ! git -C "$ROOT" diff --quiet HEAD --; then
    log "warning: uncommitted changes are not copied (the workers get git archive HEAD)"
  fi
  TMP_DIR=$(mktemp -d)
  trap 'rm -rf "$TMP_DIR"' EXIT
  TARBALL=$TMP_DIR/dasd_jax.tar.gz
fi

INSTALL_COMMAND="set -eu; \
command -v $(quote "$REMOTE_PYTHON") >/dev/null 2>&1 || { sudo apt-get update -qq \
&& sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
$(quote "$REMOTE_PYTHON") $(quote "$REMOTE_PYTHON-venv"); }; \
rm -rf dasd_jax; mkdir dasd_jax; tar -xzf dasd_jax.tar.gz -C dasd_jax; \
[ -x dasd_jax-venv/bin/python ] || $(quote "$REMOTE_PYTHON") -m venv dasd_jax-venv; \
dasd_jax-venv/bin/python -m pip install --quiet -r dasd_jax/requirements.txt -e ./dasd_jax \
$(quote "jax[tpu]==$JAX_VERSION")"

STAGE_ARGS=(--config="$CONFIG" --config.workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})
RUN_COMMAND="cd dasd_jax && PYTHONUNBUFFERED=1 exec ../dasd_jax-venv/bin/python -m dasd_jax.$STAGE \
$(quote_words "${STAGE_ARGS[@]}")"

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

# Creates the VM when asked, installs the package on every worker, runs the stage. Runs in an
# `||` context (no errexit), so every step checks its own status.
attempt() {
  if ((NEED_CREATE)); then
    create_vm || return
    NEED_CREATE=0
  fi
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:dasd_jax.tar.gz" "${GCLOUD_FLAGS[@]}" \
    --worker=all || return
  ssh_all "$INSTALL_COMMAND" || return
  ssh_all "$RUN_COMMAND"
}

run git -C "$ROOT" archive --format=tar.gz --output="$TARBALL" HEAD

NEED_CREATE=$CREATE RESTARTS=0
while :; do
  STATUS=0
  attempt || STATUS=$?
  ((SPOT)) || exit "$STATUS"
  if ! needs_recreation; then
    ((STATUS == 0)) || log "the $STAGE run failed (exit $STATUS) and $NAME was not preempted"
    exit "$STATUS"
  fi
  if ((RESTARTS >= MAX_RESTARTS)); then
    die "$NAME was preempted (state $STATE) and --max-restarts $MAX_RESTARTS are used up;" \
      "re-run this command to go on from the latest checkpoint in $WORKDIR"
  fi
  RESTARTS=$((RESTARTS + 1))
  log "$NAME is $STATE: recreating it and resuming from $WORKDIR (restart $RESTARTS of $MAX_RESTARTS)"
  ((!NEED_CREATE || DRY_RUN)) || sleep 60  # the last creation failed: give capacity time
  [[ $STATE == NOT_FOUND ]] || delete_vm || log "deleting $NAME failed; creating it anyway"
  NEED_CREATE=1
done
