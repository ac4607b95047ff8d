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
