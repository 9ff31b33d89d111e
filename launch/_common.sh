# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): argument parsing, printing and running commands.
#
# Every script takes the same core arguments, from the command line or the environment:
#   --config=PATH | CONFIG=PATH      config file (default configs/glas_508.py)
#   --workdir=DIR | WORKDIR=DIR      run directory (checkpoints, logs, reports); required
#   --dry-run     | DRY_RUN=1        print the commands and start nothing
#   anything else                    passed to micronet_jax.main, e.g. --config.train.batch_size=16
# Why one shared file: the scripts must agree on what a flag means, and the tests check them all
# through the same --dry-run output.

set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=${MICRONET_REPO:-$(dirname "$LAUNCH_DIR")}
CONFIG=${CONFIG:-configs/glas_508.py}
WORKDIR=${WORKDIR:-}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}
# Compiled XLA programs survive restarts (jax_notes.md: 20-50 s per compile); one folder per user.
JAX_CACHE=${JAX_COMPILATION_CACHE_DIR:-${HOME:-/tmp}/.cache/micronet_jax/xla}
OVERRIDES=()

# --help: the script's header comment, then its USAGE_OPTIONS.
usage() {
  awk 'NR > 1 && /^#SBATCH/ { next } NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  printf '%s\n' "${USAGE_OPTIONS:-}"
}

# Parses the common arguments; anything unrecognised goes to OVERRIDES (micronet_jax.main flags).
# A script with its own options handles them first and passes the rest here.
parse_common_args() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --config) CONFIG=$2; shift ;;
      --config=*) CONFIG=${1#--config=} ;;
      --workdir) WORKDIR=$2; shift ;;
      --workdir=*) WORKDIR=${1#--workdir=} ;;
      -h | --help) usage; exit 0 ;;
      --) ;;  # Accepted for habit; --dry-run is honoured even after it (main has no such flag).
      *) OVERRIDES+=("$1") ;;
    esac
    shift
  done
}

# Checks the workdir is given and makes both paths absolute: the command runs from the repository
# root, so a path typed relative to the caller's folder must not silently move into the repository.
# A relative config that does not exist here is taken relative to the repository (configs/...).
require_workdir() {
  if [[ -z "$WORKDIR" ]]; then
    echo "error: set the run directory with --workdir=DIR (or WORKDIR=DIR); see --help" >&2
    exit 2
  fi
  case "$WORKDIR" in /* | gs://*) ;; *) WORKDIR="$PWD/$WORKDIR" ;; esac
  local file=${CONFIG%%:*}  # configs/default.py:tiny -> configs/default.py
  case "$CONFIG" in
    /*) ;;
    *) if [[ -f "$file" ]]; then CONFIG="$PWD/$CONFIG"; else CONFIG="$REPO_DIR/$CONFIG"; fi ;;
  esac
}

# The training command every launcher ends in; extra flags (distributed, platform) come first so
# that the user's overrides, last on the line, win.
train_command() {
  TRAIN_CMD=("$PYTHON" -m micronet_jax.main --mode=train "--config=$CONFIG" "--workdir=$WORKDIR" "$@"
    ${OVERRIDES[@]+"${OVERRIDES[@]}"})
}

# One line, shell-quoted, so it can be copied and pasted.
quote() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./=:,+@%~-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "  # Single quotes, each ' inside written as '\''.
    fi
  done
  printf '%s' "${out% }"
}

say() { printf '%s\n' "$*"; }

# Prints a command and runs it, or only prints it under --dry-run.
run() {
  say "+ $(quote "$@")"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

# Like run, but replaces the shell (signals reach the trainer directly, e.g. SLURM's SIGTERM).
run_exec() {
  say "+ $(quote "$@")"
  if [[ "$DRY_RUN" == 1 ]]; then
    say "(dry run: nothing was started)"
    exit 0
  fi
  exec "$@"
}

finish_dry_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    say "(dry run: nothing was started)"
  fi
}
