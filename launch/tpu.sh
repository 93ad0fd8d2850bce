#!/usr/bin/env bash
# TPU pod slices for gptstack runs, through gcloud.
#
#   launch/tpu.sh create NAME TYPE [--spot]   a slice (v4-*, v5litepod-* / v5e, v5p-*, v6e-*)
#   launch/tpu.sh queue NAME TYPE [--spot]    the same through a queued resource: waits for capacity
#   launch/tpu.sh install NAME                this checkout on every worker, `pip install -e .[tpu]`
#   launch/tpu.sh mount NAME BUCKET           gs://BUCKET at /mnt/gcs on every worker (gcsfuse)
#   launch/tpu.sh run NAME COMMAND...         COMMAND on every worker, in the background
#   launch/tpu.sh tail NAME [WORKER]          follow a worker's log (default worker 0)
#   launch/tpu.sh stop NAME                   SIGTERM the run: it checkpoints and exits
#   launch/tpu.sh delete NAME                 the slice (and its queued resource)
#
# Environment: ZONE (default us-east5-a), PROJECT (default: gcloud's), RUNTIME (the TPU software
# version; default by generation).
#
# A run is the same `python -m experiments.run ...` command a laptop uses. Every worker runs it;
# JAX finds the other workers by itself (`jax.distributed.initialize` from the TPU environment)
# and the workdir must be shared by all workers, e.g. /mnt/gcs/runs/NAME after `mount`.
# Preemption (spot or maintenance) sends SIGTERM: every process finishes its step, the checkpoint
# is written and the run exits 0. Re-create the slice, `install`, `mount` and `run` the same
# command: it resumes from the last checkpoint, with the data stream where it stopped.
set -euo pipefail

ZONE=${ZONE:-us-east5-a}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
LOG='~/gptstack.log'

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 1; }

runtime_for() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "unknown accelerator type $1" >&2; exit 1 ;;
  esac
}

on_all() {  # on_all NAME COMMAND: run COMMAND on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$1" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$2"
}

[[ $# -ge 2 ]] || usage
action=$1 name=$2
shift 2
case "$action" in
  create)
    type=${1:?TYPE}; shift
    gcloud compute tpus tpu-vm create "$name" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="${type/v5e-/v5litepod-}" --version="${RUNTIME:-$(runtime_for "$type")}" "$@"
    ;;
  queue)
    type=${1:?TYPE}; shift
    gcloud compute tpus queued-resources create "$name" --node-id="$name" --zone="$ZONE" \
      $PROJECT_FLAG --accelerator-type="${type/v5e-/v5litepod-}" \
      --runtime-version="${RUNTIME:-$(runtime_for "$type")}" "$@"
    echo "waiting for $name (gcloud compute tpus queued-resources describe $name --zone=$ZONE)"
    until gcloud compute tpus queued-resources describe "$name" --zone="$ZONE" $PROJECT_FLAG \
        --format='value(state.state)' | grep -q ACTIVE; do sleep 60; done
    ;;
  install)
    archive=$(mktemp --suffix=.tar.gz)
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$name":~/gptstack.tar.gz --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    on_all "$name" 'rm -rf ~/gptstack && mkdir ~/gptstack && tar -xzf ~/gptstack.tar.gz -C ~/gptstack \
      && python3 -m pip install --quiet -e "~/gptstack[tpu]"'
    rm -f "$archive"
    ;;
  mount)
    bucket=${1:?BUCKET}
    on_all "$name" "sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && \
      (mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs $bucket /mnt/gcs)"
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    command=$(printf '%q ' "$@")
    on_all "$name" "cd ~/gptstack && nohup $command > $LOG 2>&1 < /dev/null &"
    echo "started on every worker of $name; follow it with: $0 tail $name"
    ;;
  tail)
    gcloud compute tpus tpu-vm ssh "$name" --zone="$ZONE" $PROJECT_FLAG --worker="${1:-0}" \
      --command="tail -f $LOG"
    ;;
  stop)
    on_all "$name" "pkill -TERM -f experiments.run || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$ZONE" $PROJECT_FLAG --quiet || true
    gcloud compute tpus queued-resources delete "$name" --zone="$ZONE" $PROJECT_FLAG --quiet \
      2>/dev/null || true
    ;;
  *) usage ;;
esac
