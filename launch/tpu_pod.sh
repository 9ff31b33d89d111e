#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy and install the package on every worker,
# then start the same training command on all workers at once.
#
#   export TPU_NAME=micronet ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16
#   launch/tpu_pod.sh all --workdir=/mnt/shared/runs/glas --config.data.root=/home/$USER/glas \
#       --config.train.batch_size=16 --dry-run
#   launch/tpu_pod.sh create | setup | train | delete   (one step at a time; same arguments)
#
# Steps (gcloud runs here; the trainer runs on the workers):
#   create: gcloud compute tpus tpu-vm create $TPU_NAME --zone=$ZONE --accelerator-type=... --version=...
#   setup:  git archive HEAD -> scp to --worker=all -> unpack in ~/micronet-jax, pip install '.[tpu]';
#           with DATA_DIR set, also scp the dataset folder to REMOTE_DATA_DIR on every worker
#           (train then passes --config.data.root=REMOTE_DATA_DIR; default /home/$USER/glas)
#   train:  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command \
#             "cd ~/micronet-jax && python3 -m micronet_jax.main --mode=train --config=... \
#              --workdir=... --config.distributed.initialize=True --config.platform=tpu [overrides]"
# On TPU, jax.distributed.initialize() needs no arguments (it reads the slice's metadata). One
# process per worker drives its chips; train.batch_size is global and must divide by the number of
# chips (v5litepod-16: 16) times grad_accum_steps. A multi-worker slice needs a WORKDIR on a mount
# all workers share (Filestore NFS, or a gcsfuse-mounted bucket): orbax writes each checkpoint from
# all processes into one folder. Paths are as seen on the workers; config paths are repo-relative.
USAGE_OPTIONS="Usage: launch/tpu_pod.sh {create|setup|train|all|delete} [--workdir=DIR] [--config=PATH] [--dry-run] [overrides]
Env: TPU_NAME, ZONE (required); ACCELERATOR_TYPE (v5litepod-16), TPU_VERSION (v2-alpha-tpuv5-lite),
     PROJECT, DATA_DIR (local dataset folder to copy), REMOTE_DATA_DIR (/home/\$USER/glas),
     REMOTE_DIR (~/micronet-jax), GCLOUD (gcloud)."
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

ACTION=${1:-}
case "$ACTION" in
  create | setup | train | all | delete) shift ;;
  -h | --help) usage; exit 0 ;;
  *) echo "error: first argument must be create, setup, train, all or delete (see --help)" >&2; exit 2 ;;
esac
parse_common_args "$@"
: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${ZONE:?set ZONE (e.g. us-west4-a)}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
TPU_VERSION=${TPU_VERSION:-v2-alpha-tpuv5-lite}
REMOTE_DIR=${REMOTE_DIR:-"~/micronet-jax"}  # Quoted: expanded by the workers' shell, not here.
# An absolute path: the trainer does not expand "~" in data.root. gcloud logs in as the local user.
REMOTE_DATA_DIR=${REMOTE_DATA_DIR:-/home/${USER:-$(id -un)}/glas}
GCLOUD=${GCLOUD:-gcloud}
TPU=("$GCLOUD" compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
if [[ -n "${PROJECT:-}" ]]; then WHERE+=("--project=$PROJECT"); fi

# Config paths stay relative (they are read on the workers, in REMOTE_DIR); the workdir is used as
# given, so it must name the same shared folder on every worker.
CONFIG=${CONFIG#"$REPO_DIR"/}

say "micronet-jax on TPU $TPU_NAME ($ACCELERATOR_TYPE, zone $ZONE), step: $ACTION"

do_create() {
  run "${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--version=$TPU_VERSION"
}

do_setup() {
  local tarball=/tmp/micronet-jax-$$.tar.gz
  say "  copies the committed tree ($(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo HEAD)); uncommitted edits are not sent"
  run git -C "$REPO_DIR" archive --format=tar.gz -o "$tarball" HEAD
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:micronet-jax.tar.gz" --worker=all "${WHERE[@]}"
  run "${TPU[@]}" ssh "$TPU_NAME" --worker=all "${WHERE[@]}" --command \
    "mkdir -p $REMOTE_DIR && tar -xzf ~/micronet-jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m pip install -q \".[tpu]\""
  if [[ -n "${DATA_DIR:-}" ]]; then
    run "${TPU[@]}" scp --recurse "$DATA_DIR" "$TPU_NAME:$REMOTE_DATA_DIR" --worker=all "${WHERE[@]}"
  fi
  if [[ "$DRY_RUN" != 1 ]]; then rm -f "$tarball"; fi
}

do_train() {
  if [[ -z "$WORKDIR" ]]; then
    echo "error: set the run directory with --workdir=DIR (as the workers see it); see --help" >&2
    exit 2
  fi
  local data=()
  if [[ -n "${DATA_DIR:-}" ]]; then data=("--config.data.root=$REMOTE_DATA_DIR"); fi
  train_command --config.distributed.initialize=True --config.platform=tpu ${data[@]+"${data[@]}"}
  TRAIN_CMD[0]=python3
  say "  config:  $CONFIG ${OVERRIDES[*]+${OVERRIDES[*]}}"
  say "  workdir: $WORKDIR (on the workers; shared by all of them on a multi-worker slice)"
  say "  train.batch_size is global: it must divide by the chips of $ACCELERATOR_TYPE x grad_accum_steps"
  run "${TPU[@]}" ssh "$TPU_NAME" --worker=all "${WHERE[@]}" --command \
    "cd $REMOTE_DIR && JAX_COMPILATION_CACHE_DIR=~/.cache/micronet_jax/xla $(quote "${TRAIN_CMD[@]}")"
}

do_delete() {
  run "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
}

case "$ACTION" in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  all) do_create; do_setup; do_train ;;
  delete) do_delete ;;
esac
finish_dry_run
