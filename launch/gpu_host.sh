#!/usr/bin/env bash
# Train on all GPUs of this machine: one process, data parallel over every visible GPU.
#
#   launch/gpu_host.sh --workdir=runs/glas --config.data.root=/data/GlaS --config.train.batch_size=16
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/gpu_host.sh --workdir=runs/glas --dry-run
#
# Runs (from the repository root):
#   python -m micronet_jax.main --mode=train --config=$CONFIG --workdir=$WORKDIR \
#       --config.platform=gpu [overrides...]
# One process drives all local GPUs (no jax.distributed needed on one host). train.batch_size is
# the GLOBAL batch: each GPU gets batch / GPUs, so it must divide by GPUs x train.grad_accum_steps.
# The learning rate is not scaled with the batch; set --config.train.learning_rate yourself.
USAGE_OPTIONS="Options: --config=PATH (default configs/glas_508.py), --workdir=DIR, --dry-run;
         env NUM_GPUS (default: count from nvidia-smi), PYTHON, JAX_COMPILATION_CACHE_DIR."
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
parse_common_args "$@"
require_workdir

count_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local ids=${CUDA_VISIBLE_DEVICES//,/ }
    set -- $ids
    echo $#
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU' || true
  else
    echo "?"
  fi
}
NUM_GPUS=${NUM_GPUS:-$(count_gpus)}

train_command --config.platform=gpu
say "micronet-jax: training on all $NUM_GPUS GPUs of this host, 1 process, data parallel"
say "  config:  $CONFIG ${OVERRIDES[*]+${OVERRIDES[*]}}"
say "  workdir: $WORKDIR (an existing checkpoint there is resumed)"
say "  train.batch_size is global: per GPU = batch / $NUM_GPUS; it must divide by $NUM_GPUS x grad_accum_steps"
say "  tip: --config.data.num_workers=8 (grain input processes) on a many-core host"
cd "$REPO_DIR"
run_exec env "JAX_COMPILATION_CACHE_DIR=$JAX_CACHE" "${TRAIN_CMD[@]}"
