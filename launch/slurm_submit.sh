#!/usr/bin/env bash
# Submit multi-node GPU training to SLURM (builds the sbatch line for launch/slurm_multinode.sbatch).
#
#   launch/slurm_submit.sh --nodes=4 --workdir=/shared/runs/glas --config.data.root=/shared/GlaS \
#       --config.train.batch_size=32 --dry-run
#   launch/slurm_submit.sh --nodes=2 --per-gpu --partition=gpu --time=24:00:00 --workdir=...
#
# Runs: sbatch --job-name=micronet --nodes=N --ntasks-per-node=1|G --gpus-per-node=G --chdir=REPO \
#           [--partition=P] [--time=T] [--account=A] launch/slurm_multinode.sbatch --config=... \
#           --workdir=... [overrides...]
# --dry-run prints that line and the srun line the job would run, and submits nothing.
USAGE_OPTIONS="Options: --nodes=N (2), --gpus-per-node=G (8), --per-gpu (one process per GPU instead
         of per node), --partition=P, --time=T, --account=A, --config=PATH, --workdir=DIR, --dry-run."
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NODES=2
GPUS_PER_NODE=8
PER_GPU=0
SBATCH_EXTRA=()
REST=()
while (($#)); do
  case "$1" in
    --nodes=*) NODES=${1#*=} ;;
    --gpus-per-node=*) GPUS_PER_NODE=${1#*=} ;;
    --per-gpu) PER_GPU=1 ;;
    --partition=* | --time=* | --account=* | --qos=*) SBATCH_EXTRA+=("$1") ;;
    *) REST+=("$1") ;;
  esac
  shift
done
parse_common_args ${REST[@]+"${REST[@]}"}
require_workdir
TASKS_PER_NODE=1
if [[ "$PER_GPU" == 1 ]]; then TASKS_PER_NODE=$GPUS_PER_NODE; fi

JOB_ARGS=("--config=$CONFIG" "--workdir=$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
SBATCH=(sbatch --job-name=micronet "--nodes=$NODES" "--ntasks-per-node=$TASKS_PER_NODE"
  "--gpus-per-node=$GPUS_PER_NODE" "--chdir=$REPO_DIR" ${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"}
  "$LAUNCH_DIR/slurm_multinode.sbatch" "${JOB_ARGS[@]}")
say "micronet-jax: submitting $NODES node(s) x $GPUS_PER_NODE GPUs, $TASKS_PER_NODE process(es) per node"
say "  workdir must be on a filesystem every node mounts: $WORKDIR"
export MICRONET_REPO=$REPO_DIR
run "${SBATCH[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
  say "The job would run (preview with this job's layout; the coordinator is the job's first node):"
  SLURM_JOB_NUM_NODES=$NODES SLURM_NTASKS_PER_NODE=$TASKS_PER_NODE SLURM_GPUS_ON_NODE=$GPUS_PER_NODE \
    bash "$LAUNCH_DIR/slurm_multinode.sbatch" --dry-run "${JOB_ARGS[@]}" | sed 's/^/    /'
fi
