#!/usr/bin/env bash
# Train on one GPU of this machine.
#
#   launch/gpu_single.sh --workdir=runs/glas --config.data.root=/data/GlaS
#   GPU=3 launch/gpu_single.sh --workdir=runs/glas --config.data.root=/data/GlaS --dry-run
#
# Runs (from the repository root):
#   CUDA_VISIBLE_DEVICES=$GPU python -m micronet_jax.main --mode=train --config=$CONFIG \
#       --workdir=$WORKDIR --config.platform=gpu [overrides...]
# --config.platform=gpu makes a missing CUDA jaxlib an error instead of a silent, weeks-long CPU run
# (install with: pip install '.[cuda]').
USAGE_OPTIONS="Options: --config=PATH (default configs/glas_508.py), --workdir=DIR, --dry-run;
         env GPU (default 0), PYTHON, JAX_COMPILATION_CACHE_DIR; other args go to micronet_jax.main."
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
parse_common_args "$@"
require_workdir
GPU=${GPU:-0}

train_command --config.platform=gpu
say "micronet-jax: training on 1 GPU (CUDA_VISIBLE_DEVICES=$GPU), 1 process"
say "  config:  $CONFIG ${OVERRIDES[*]+${OVERRIDES[*]}}"
say "  workdir: $WORKDIR (an existing checkpoint there is resumed)"
say "  train.batch_size is the batch on this GPU; compile cache: $JAX_CACHE"
cd "$REPO_DIR"
run_exec env "CUDA_VISIBLE_DEVICES=$GPU" "JAX_COMPILATION_CACHE_DIR=$JAX_CACHE" "${TRAIN_CMD[@]}"
