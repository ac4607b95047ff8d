# Shared by the launch scripts (sourced, not run): messages, shell quoting, and `run`, which
# executes a command or, once the script sets DRY_RUN=1, prints it as `+ cmd` instead.
# shellcheck shell=bash

PROG=${0##*/}
DRY_RUN=0

log() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

die() {
  log "$@"
  exit 1
}

# One shell word that reads back as $1: safe words as they are, words with single quotes but
# nothing that double quotes expand in double quotes, everything else in single quotes.
quote() {
  local word=$1 safe='^[A-Za-z0-9_./:=,@%+-]+$' expands='[$`"\\!]' out="'"
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
    return
  fi
  if [[ $word == *"'"* && ! $word =~ $expands ]]; then
    printf '"%s"' "$word"
    return
  fi
  while [[ $word == *"'"* ]]; do
    out+="${word%%"'"*}'\\''"
    word=${word#*"'"}
  done
  printf '%s' "$out$word'"
}

# The arguments as one shell command line.
quote_words() {
  local word line=""
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s' "$line"
}

# Runs a command, or with DRY_RUN=1 prints it (shell-quoted, one line, `+ ` first) on stdout.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_words "$@")"
  else
    "$@"
  fi
}

# The local interpreter for the fit check: $ROOT/.venv/bin/python where `make` made it, else python3.
default_local_python() {
  if [[ -x $ROOT/.venv/bin/python ]]; then
    printf '%s' "$ROOT/.venv/bin/python"
  else
    printf 'python3'
  fi
}

# Compiles the run for target $1 with that hardware's own compiler, on this machine (no
# accelerator needed: dasd_jax/fit_check.py), and ends the script with the check's status when
# the run does not fit or the check fails. The remaining arguments are the stage flags.
# Uses CONFIG, LOCAL_PYTHON and ROOT.
fit_check() {
  local target=$1 status=0
  shift
  log "fit check: compiling the run for $target on this machine"
  run "$LOCAL_PYTHON" -m dasd_jax.train --config="$ROOT/$CONFIG" --config.dry_run=True \
    --config.compile_for="$target" "$@" || status=$?
  ((status == 0)) || die_with "$status" "the fit check for $target failed (exit $status; its" \
    "last line says why): fix the run, or pass --skip-fit-check to launch anyway"
}

die_with() {
  local status=$1
  shift
  log "$@"
  exit "$status"
}
