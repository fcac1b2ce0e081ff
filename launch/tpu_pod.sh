#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every worker; jax.distributed auto-detects
# the coordinator, process count and index from the TPU metadata.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a WORKDIR=gs://BUCKET/runs/wan13b DATA_DIR=gs://BUCKET/data \
#       launch/tpu_pod.sh --config=configs/wan_1_3b.py [--config.train.num_steps=...]
#
# Extra arguments go to `python -m sora_jax.train`; BINARY=eval runs `python -m sora_jax.eval` on
# every worker instead (one eval over the slice, e.g. --watch beside a run on another slice).
# Assumes the repository is checked out at $REPO_DIR on every worker with its .venv installed
# (`make install`); set SETUP=1 to do that first. A trainer that loses a peer exits 75;
# MAX_RESTARTS=N runs the whole job again up to N times (it resumes from the newest checkpoint in
# $WORKDIR). DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${WORKDIR:?set WORKDIR to gs://BUCKET/RUN or a path every worker shares (e.g. a gcsfuse mount)}"
: "${DATA_DIR:?set DATA_DIR to the prepared dataset (gs://BUCKET/DATA or a path every worker shares)}"
PROJECT_FLAG=${PROJECT:+--project="$PROJECT"}
BINARY="${BINARY:-train}"
if [[ "$BINARY" != "train" && "$BINARY" != "eval" ]]; then
  echo "tpu_pod.sh: BINARY=$BINARY; expected train or eval" >&2
  exit 2
fi
REPO_DIR="${REPO_DIR:-~/sora_jax}"
REPO_URL="${REPO_URL:-}"

quote_args() { printf ' %q' "$@"; }
TRAIN_ARGS="--workdir=$(printf %q "$WORKDIR") --config.data.dir=$(printf %q "$DATA_DIR")$(quote_args "$@")"

SETUP_CMD=":"
if [[ "${SETUP:-0}" == "1" ]]; then
  : "${REPO_URL:?SETUP=1 needs REPO_URL to clone}"
  SETUP_CMD="(test -d $REPO_DIR || git clone $REPO_URL $REPO_DIR) && cd $REPO_DIR && git pull --ff-only && make install PYTHON=python3"
fi

# Every worker runs the same binary; logs of worker 0 stream back, the others go to a file there.
REMOTE="
  set -e -o pipefail
  $SETUP_CMD
  cd $REPO_DIR
  .venv/bin/python -m sora_jax.$BINARY --distributed=on $TRAIN_ARGS 2>&1 | tee /tmp/sora_$BINARY.log
"
COMMAND=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command "$REMOTE")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${COMMAND[@]}"
  printf '\n'
  exit 0
fi
MAX_RESTARTS="${MAX_RESTARTS:-0}"
for ((attempt = 0; ; attempt++)); do
  status=0
  "${COMMAND[@]}" || status=$?
  if [[ "$status" -ne 0 && "$attempt" -lt "$MAX_RESTARTS" ]]; then
    echo "tpu_pod.sh: the job exited $status; restart $((attempt + 1)) of $MAX_RESTARTS" >&2
    continue
  fi
  exit "$status"
done
