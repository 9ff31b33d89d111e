#!/usr/bin/env bash
# GlaS speedrun on one GPU: full-width Micro-Net-508 for a fixed budget (configs/glas_speedrun.py),
# in one command that ends inside a deadline (default 9.5 minutes), with one summary to copy back.
#
#   launch/speedrun.sh --data-root=$HOME/glas --out=$OUT [--torch] [--fit]
#   launch/speedrun.sh --data-root=$HOME/glas --dry-run        # print every command, run nothing
#   launch/speedrun.sh --smoke --out=/tmp/speedrun_smoke        # the same stages on the CPU, ~2 min
#
# Stages, each logged to OUT/logs/STAGE.log and timed in OUT/stages.tsv:
#   machine   nvidia-smi and the JAX devices and library versions (OUT/machine.json)
#   torch     with --torch: the PyTorch peer ../shared/bench/torch_baseline.py BATCH 10 compiled_bf16,
#             when that file exists, first, so both use the same card alone (OUT/torch_baseline.jsonl)
#   bench     the bare train step, 20 steps: python -m micronet_jax.benchmark (OUT/bench.json)
#   budget    the training time limit: the config's, lowered so the whole command ends by the deadline
#             (a reserve is kept for start-up, tuning and scoring); with --fit also a smaller step
#             budget that the measured step rate fits in it, with the same schedule shape
#   train     python -m micronet_jax.main --mode=train into WORKDIR (checkpoints stay there)
#   tune      --mode=tune on the validation split (OUT/tune/best.json, tuning.csv)
#   evaluate  --mode=evaluate on the validation split with the tuned post-processing (OUT/eval_val_tuned/)
#   summary   OUT/summary.json and OUT/summary.md, read from the files the stages wrote
# OUT holds no checkpoint (a few MB): copy it back. WORKDIR defaults to a new folder under /tmp.
# A stage that fails stops the run; the summary is still written, naming it, and the exit status
# is that stage's.
USAGE_OPTIONS="Options:
  --data-root=DIR   GlaS folder: train_N.{bmp,png} + train_N_anno.* (+ Grade.csv for the patient
                    split), e.g. ~/glas staged by ../shared/tools/stage_glas.sh (env DATA_ROOT).
                    Required unless --smoke (which then uses synthetic glands)
  --out=DIR         output folder to copy back (env SPEEDRUN_OUT; default runs/speedrun-UTCSTAMP)
  --workdir=DIR     run directory with the checkpoints (default /tmp/micronet_speedrun/UTCSTAMP)
  --config=SPEC     default configs/glas_speedrun.py (configs/glas_speedrun.py:smoke with --smoke)
  --smoke           CPU, width 1/64, a few steps: tests the stages, not the recipe
  --torch           run the PyTorch peer first (skipped with a note when absent or with --smoke);
                    env TORCH_BASELINE overrides its path
  --fit             shrink the step budget to what fits before the deadline (same schedule shape)
  --no-bench        skip the bare-step benchmark (no MFU or peak memory in the summary)
  --deadline=MIN    minutes from start by which the command should end (default 9.5; 60 with --smoke)
  --reserve=S       seconds kept for train start-up, final validation, tune and evaluate (default 180)
  --bench-steps=N   timed steps of the bare-step benchmark (default 20; 2 with --smoke)
  --peak-tflops=X   the device peak for MFU (default: the benchmark's 800, an H100's dense bf16)
  --dry-run         print the plan and every command, run nothing
  --config.KEY=V    passed to every stage's config (the benchmark gets it as --set KEY=V)
  env GPU (default 0), PYTHON (default python), JAX_COMPILATION_CACHE_DIR."
# The whole script is one brace group, so bash reads all of it before running any: editing the file
# while a run is under way (a 10-minute run) cannot change what that run does next.
{
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
# Images without a "python" take python3 (PYTHON=... chooses).
if ! command -v "$PYTHON" > /dev/null && command -v python3 > /dev/null; then
  PYTHON=python3
fi

STAMP=$(date -u +%Y%m%d-%H%M%S)
SMOKE=0 TORCH=0 FIT=0 BENCH=1
DATA_ROOT=${DATA_ROOT:-}
OUT_DIR=${SPEEDRUN_OUT:-}
CONFIG_GIVEN=""
WORKDIR=""
DEADLINE_MIN=""
RESERVE_S=180
BENCH_STEPS=""
PEAK_TFLOPS=""
ARGV=("$@")
while (($#)); do
  case "$1" in
    --data-root=*) DATA_ROOT=${1#*=} ;;
    --data-root) DATA_ROOT=$2; shift ;;
    --out=*) OUT_DIR=${1#*=} ;;
    --out) OUT_DIR=$2; shift ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --workdir) WORKDIR=$2; shift ;;
    --config=*) CONFIG_GIVEN=${1#*=} ;;
    --config) CONFIG_GIVEN=$2; shift ;;
    --smoke) SMOKE=1 ;;
    --torch) TORCH=1 ;;
    --fit) FIT=1 ;;
    --no-bench) BENCH=0 ;;
    --deadline=*) DEADLINE_MIN=${1#*=} ;;
    --reserve=*) RESERVE_S=${1#*=} ;;
    --bench-steps=*) BENCH_STEPS=${1#*=} ;;
    --peak-tflops=*) PEAK_TFLOPS=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --config.data.root=*) DATA_ROOT=${1#*=} ;;  # The same as --data-root (checked below).
    --config.*=*) OVERRIDES+=("$1") ;;
    *) echo "error: unknown argument '$1' (config overrides look like --config.KEY=VALUE); see --help" >&2
       exit 2 ;;
  esac
  shift
done

die() { echo "error: $*" >&2; exit 2; }
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
[[ "$RESERVE_S" =~ ^[0-9]+$ ]] || die "--reserve=$RESERVE_S is not a whole number of seconds"

if [[ "$SMOKE" == 1 ]]; then
  MODE=smoke
  CONFIG=${CONFIG_GIVEN:-configs/glas_speedrun.py:smoke}
  BENCH_STEPS=${BENCH_STEPS:-2}
  DEADLINE_MIN=${DEADLINE_MIN:-60}  # A loaded CPU is slow; the smoke run is not about time.
  PLATFORM_FLAGS=()
else
  MODE=gpu
  CONFIG=${CONFIG_GIVEN:-configs/glas_speedrun.py}
  BENCH_STEPS=${BENCH_STEPS:-20}
  DEADLINE_MIN=${DEADLINE_MIN:-9.5}
  PLATFORM_FLAGS=(--config.platform=gpu)
fi
[[ "$DEADLINE_MIN" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--deadline=$DEADLINE_MIN is not a number of minutes"
[[ "$BENCH_STEPS" =~ ^[1-9][0-9]*$ ]] || die "--bench-steps=$BENCH_STEPS is not a positive number"
[[ -z "$PEAK_TFLOPS" || "$PEAK_TFLOPS" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--peak-tflops=$PEAK_TFLOPS is not a number"

# The config: relative paths are taken from the caller's folder if the file is there, else the repository.
file=${CONFIG%%:*}
case "$CONFIG" in
  /*) ;;
  *) if [[ -f "$file" ]]; then CONFIG="$PWD/$CONFIG"; else CONFIG="$REPO_DIR/$CONFIG"; fi ;;
esac
[[ -f "${CONFIG%%:*}" ]] || die "config file not found: ${CONFIG%%:*}"

# The data: a GPU run trains on GlaS and says which folder is wrong before anything starts.
DATA_FLAGS=()
if [[ -n "$DATA_ROOT" ]]; then
  DATA_ROOT=$(abspath "${DATA_ROOT/#\~/$HOME}")
  [[ -d "$DATA_ROOT" ]] || die "--data-root: no such folder: $DATA_ROOT"
  shopt -s nullglob nocaseglob
  masks=("$DATA_ROOT"/train_*_anno.*)
  shopt -u nullglob nocaseglob
  [[ ${#masks[@]} -gt 0 ]] || die "--data-root $DATA_ROOT holds no GlaS training pairs (train_N.bmp/png with
  train_N_anno.bmp/png); on the GPU machine stage them with ../shared/tools/stage_glas.sh and copy both halves there"
  if [[ ${#masks[@]} -ne 85 ]]; then
    say "warning: $DATA_ROOT holds ${#masks[@]} GlaS training masks, not the 85 of the official set" \
      "(stage_glas.sh carries them in two halves: was the second copied?)"
  fi
  DATA_FLAGS=(--config.data.source=glas "--config.data.root=$DATA_ROOT")
elif [[ "$MODE" == gpu ]]; then
  die "the speedrun trains on GlaS: give --data-root=DIR (or DATA_ROOT), the folder with
  train_N.bmp/png, train_N_anno.bmp/png and Grade.csv; on the GPU machine ../shared/tools/stage_glas.sh
  stages it in two carries that you copy to ~/glas, then --data-root=\$HOME/glas"
fi

OUT_DIR=$(abspath "${OUT_DIR:-runs/speedrun-$STAMP}")
WORKDIR=$(abspath "${WORKDIR:-/tmp/micronet_speedrun/$STAMP}")
case "$WORKDIR/" in "$OUT_DIR"/*) die "--workdir must not be inside --out (the checkpoints would be copied back)" ;; esac
TORCH_BASELINE=${TORCH_BASELINE:-$(cd "$REPO_DIR/.." && pwd)/shared/bench/torch_baseline.py}
HELPER=("$PYTHON" -m micronet_jax.tools.speedrun_summary)
CONFIG_ARGS=("--config=$CONFIG" "${PLATFORM_FLAGS[@]+"${PLATFORM_FLAGS[@]}"}"
  "${DATA_FLAGS[@]+"${DATA_FLAGS[@]}"}" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
# The benchmark takes the same keys as --set KEY=VALUE.
BENCH_SETS=()
for a in "${PLATFORM_FLAGS[@]+"${PLATFORM_FLAGS[@]}"}" "${DATA_FLAGS[@]+"${DATA_FLAGS[@]}"}" \
         ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  BENCH_SETS+=(--set "${a#--config.}")
done
BATCH_HINT=8
for a in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  case "$a" in --config.train.batch_size=*) BATCH_HINT=${a#*=} ;; esac
done

export JAX_COMPILATION_CACHE_DIR="$JAX_CACHE"  # The benchmark's compile is reused by the trainer.
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}  # Progress bars every 10 s: small logs.
if [[ "$MODE" == gpu ]]; then
  export CUDA_VISIBLE_DEVICES=${GPU:-0}
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
fi

T0=$(date +%s)
DEADLINE_S=$(awk -v m="$DEADLINE_MIN" 'BEGIN { printf "%d", m * 60 }')
TRAIN_CMD=("$PYTHON" -m micronet_jax.main --mode=train "${CONFIG_ARGS[@]}" "--workdir=$WORKDIR")
TUNE_CMD=("$PYTHON" -m micronet_jax.main --mode=tune "${CONFIG_ARGS[@]}" "--checkpoint=$WORKDIR"
  --config.eval.split=val "--output=$OUT_DIR/tune")
EVAL_CMD=("$PYTHON" -m micronet_jax.main --mode=evaluate "${CONFIG_ARGS[@]}" "--checkpoint=$WORKDIR"
  --config.eval.split=val "--output=$OUT_DIR/eval_val_tuned")
BENCH_CMD=("$PYTHON" -m micronet_jax.benchmark "--config=$CONFIG" ${BENCH_SETS[@]+"${BENCH_SETS[@]}"}
  --steps "$BENCH_STEPS" --skip-inference --json "$OUT_DIR/bench.json")
[[ -n "$PEAK_TFLOPS" ]] && BENCH_CMD+=(--peak-tflops "$PEAK_TFLOPS")
TORCH_CMD=("$PYTHON" "$TORCH_BASELINE" "$BATCH_HINT" 10 compiled_bf16)
BUDGET_CMD=("${HELPER[@]}" budget --config "$CONFIG" --seconds SECONDS_LEFT)
((FIT)) && BUDGET_CMD+=(--fit --bench "$OUT_DIR/bench.json")
BUDGET_CMD+=("${PLATFORM_FLAGS[@]+"${PLATFORM_FLAGS[@]}"}" "${DATA_FLAGS[@]+"${DATA_FLAGS[@]}"}"
  ${OVERRIDES[@]+"${OVERRIDES[@]}"})

say "micronet-jax GlaS speedrun ($MODE): $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
say "  config:   $CONFIG ${OVERRIDES[*]+${OVERRIDES[*]}}"
say "  data:     ${DATA_ROOT:-synthetic glands (the :smoke config)}"
say "  output:   $OUT_DIR (summary.json, summary.md, logs; no checkpoint)"
say "  workdir:  $WORKDIR (checkpoints; an existing checkpoint there is resumed)"
say "  deadline: $DEADLINE_MIN min from start; $RESERVE_S s reserved after training"
say "plan:"
say "+ nvidia-smi"
say "+ $(quote "${HELPER[@]}" machine --json "$OUT_DIR/machine.json")"
if ((TORCH)); then
  if [[ "$MODE" == smoke ]]; then say "  (torch: skipped, --smoke runs on the CPU and the peer needs CUDA)"
  elif [[ -f "$TORCH_BASELINE" ]]; then say "+ $(quote "${TORCH_CMD[@]}") > $OUT_DIR/torch_baseline.jsonl"
  else say "  (torch: skipped, $TORCH_BASELINE not found)"; fi
fi
((BENCH)) && say "+ $(quote "${BENCH_CMD[@]}")"
say "+ $(quote "${BUDGET_CMD[@]}")"
say "    SECONDS_LEFT = deadline - elapsed - $RESERVE_S s reserve; prints --config.train.time_limit_seconds=..."
((FIT)) && say "    and, when the budget does not fit, --config.train.max_steps=... --config.train.warmup_steps=..."
say "+ $(quote "${TRAIN_CMD[@]}") BUDGET_FLAGS"
say "+ $(quote "${TUNE_CMD[@]}")"
say "+ $(quote "${HELPER[@]}" tune-flags "$OUT_DIR/tune/best.json")"
say "+ $(quote "${EVAL_CMD[@]}") TUNED_FLAGS"
say "+ $(quote "${HELPER[@]}" summarize --out "$OUT_DIR" --workdir "$WORKDIR")"
if [[ "$DRY_RUN" == 1 ]]; then
  say "(dry run: nothing was started)"
  exit 0
fi

mkdir -p "$OUT_DIR/logs" "$WORKDIR"
: > "$OUT_DIR/stages.tsv"
cd "$REPO_DIR"
"${HELPER[@]}" plan --out "$OUT_DIR" --mode "$MODE" --config "$CONFIG" --start "$T0" \
  --command "launch/speedrun.sh $(quote ${ARGV[@]+"${ARGV[@]}"})" -- \
  "${PLATFORM_FLAGS[@]+"${PLATFORM_FLAGS[@]}"}" "${DATA_FLAGS[@]+"${DATA_FLAGS[@]}"}" \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"}

summarize() {
  "${HELPER[@]}" summarize --out "$OUT_DIR" --workdir "$WORKDIR" > "$OUT_DIR/logs/summary.log" 2>&1 \
    || { echo "error: the summary could not be written (see $OUT_DIR/logs/summary.log)" >&2; return 1; }
  cat "$OUT_DIR/summary.md"
}

# stage [--optional] NAME CMD...: runs CMD (a command, or a function that prints its own commands)
# with its output shown and kept in logs/NAME.log, and records name, start, end and status in
# stages.tsv. A failure writes the summary and stops with CMD's status, unless --optional.
stage() {
  local optional=0 name start end rc
  if [[ "$1" == --optional ]]; then optional=1; shift; fi
  name=$1
  shift
  say "== $name"
  declare -F "$1" > /dev/null || say "+ $(quote "$@")"
  start=$(date +%s.%N)
  set +e
  "$@" 2>&1 | tee "$OUT_DIR/logs/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\n' "$name" "$start" "$end" "$([[ $rc == 0 ]] && echo ok || echo "exit $rc")" \
    >> "$OUT_DIR/stages.tsv"
  if [[ $rc != 0 ]]; then
    echo "error: stage '$name' failed with exit status $rc (log: $OUT_DIR/logs/$name.log)" >&2
    if ((optional)); then
      say "(optional stage: the run goes on without it)"
      return 0
    fi
    summarize || true
    exit "$rc"
  fi
}
skipped() {
  local now
  now=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\n' "$1" "$now" "$now" skipped >> "$OUT_DIR/stages.tsv"
  say "== $1: skipped ($2)"
}
show() { say "+ $(quote "$@")"; "$@"; }

# A signal (the device's time limit, SIGTERM from a scheduler) still leaves a summary of what
# finished; the trainer itself saves a checkpoint on SIGTERM (rerun with --workdir to resume).
on_signal() {
  trap - TERM INT
  echo "error: stopped by SIG$1" >&2
  summarize || true
  exit $((128 + $2))
}
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT

machine() {
  if command -v nvidia-smi > /dev/null; then
    show nvidia-smi || true
  else
    echo "nvidia-smi: not found"
  fi
  show "${HELPER[@]}" machine --json "$OUT_DIR/machine.json"
}
stage machine machine

if ((TORCH)); then
  if [[ "$MODE" == smoke ]]; then skipped torch "--smoke runs on the CPU; the peer needs CUDA"
  elif [[ ! -f "$TORCH_BASELINE" ]]; then skipped torch "$TORCH_BASELINE not found"
  else
    torch_peer() { say "+ $(quote "${TORCH_CMD[@]}") > $OUT_DIR/torch_baseline.jsonl"
                   "${TORCH_CMD[@]}" > "$OUT_DIR/torch_baseline.jsonl"; local rc=$?
                   cat "$OUT_DIR/torch_baseline.jsonl"; return $rc; }
    stage --optional torch torch_peer
  fi
fi
if ((BENCH)); then stage bench "${BENCH_CMD[@]}"; else skipped bench "--no-bench"; fi

left=$((DEADLINE_S - ($(date +%s) - T0) - RESERVE_S))
BUDGET_CMD=("${BUDGET_CMD[@]/#SECONDS_LEFT/$left}")
budget() {
  say "+ $(quote "${BUDGET_CMD[@]}") > $OUT_DIR/budget_flags.txt"
  "${BUDGET_CMD[@]}" > "$OUT_DIR/budget_flags.txt" && cat "$OUT_DIR/budget_flags.txt"
}
stage budget budget
mapfile -t BUDGET_FLAGS < "$OUT_DIR/budget_flags.txt"
stage train "${TRAIN_CMD[@]}" "${BUDGET_FLAGS[@]}"
tune() {
  show "${TUNE_CMD[@]}" || return
  say "+ $(quote "${HELPER[@]}" tune-flags "$OUT_DIR/tune/best.json") > $OUT_DIR/tuned_flags.txt"
  "${HELPER[@]}" tune-flags "$OUT_DIR/tune/best.json" > "$OUT_DIR/tuned_flags.txt" && cat "$OUT_DIR/tuned_flags.txt"
}
stage tune tune
mapfile -t TUNED_FLAGS < "$OUT_DIR/tuned_flags.txt"
stage evaluate "${EVAL_CMD[@]}" "${TUNED_FLAGS[@]}"
summarize
say "speedrun done in $(( $(date +%s) - T0 )) s: $OUT_DIR/summary.md"
exit 0
}
