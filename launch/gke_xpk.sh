#!/usr/bin/env bash
# Train on TPU slices of a GKE cluster with xpk, from the container image built by the repository's Dockerfile.
#
#   launch/gke_xpk.sh [--dry-run] [--num-slices N] [--workload NAME] [--max-restarts N] \
#       CLUSTER TPU_TYPE IMAGE -- TRAIN_ARGS...          build and push IMAGE, create the workload
#   launch/gke_xpk.sh [--dry-run] --stop CLUSTER WORKLOAD       delete it (SIGTERM: every pod saves a checkpoint)
#
#   launch/gke_xpk.sh my-cluster v5p-64 gcr.io/my-project/jaxgrounding:latest -- \
#       --config configs/timescope.py:model=qwen2_5_vl_7b --config.model.checkpoint=Qwen/Qwen2.5-VL-7B-Instruct \
#       --workdir gs://bucket/runs/ts
#
# The image holds this checkout (the working tree, not only HEAD) installed with '.[tpu,cloud]'; training runs
# from /app, the checkout's root in the image. GKE sets TPU_WORKER_HOSTNAMES on every pod, from which
# jaxgrounding.parallel.initialize_distributed and jax.distributed.initialize() join the hosts. The workdir
# must be shared storage (gs://): a restarted workload (up to --max-restarts, e.g. after a node's maintenance)
# resumes from its latest checkpoint; pods get 120 s after SIGTERM to write it. xpk takes the project and zone
# from the gcloud config. --dry-run prints each command instead of running it.
set -euo pipefail

DRY=0
MODE=start
NUM_SLICES=1
MAX_RESTARTS=3
WORKLOAD="jaxgrounding-$(date -u +%m%d-%H%M)"
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stop) MODE=stop ;;
    --num-slices) NUM_SLICES="$2"; shift ;;
    --workload) WORKLOAD="$2"; shift ;;
    --max-restarts) MAX_RESTARTS="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
usage() {
  echo "usage: $0 [--dry-run] [--num-slices N] [--workload NAME] [--max-restarts N] CLUSTER TPU_TYPE IMAGE -- TRAIN_ARGS..." >&2
  echo "       $0 [--dry-run] --stop CLUSTER WORKLOAD" >&2
  exit 2
}
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"  # run / quote

if [[ "$MODE" == stop ]]; then
  [[ $# -eq 2 ]] || usage
  run xpk workload delete --cluster "$1" --workload "$2"
  exit 0
fi

[[ $# -ge 4 && "$4" == "--" ]] || usage
CLUSTER="$1"; TPU_TYPE="$2"; IMAGE="$3"; shift 4
REPO="$(cd "$(dirname "$0")/.." && pwd)"
printf -v TRAIN_ARGS '%q ' "$@"

run docker build --build-arg EXTRAS=tpu,cloud -t "$IMAGE" "$REPO"
run docker push "$IMAGE"
run xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --docker-image "$IMAGE" \
  --tpu-type "$TPU_TYPE" --num-slices "$NUM_SLICES" --max-restarts "$MAX_RESTARTS" \
  --termination-grace-period-seconds 120 \
  --command "cd /app && python -m jaxgrounding.train ${TRAIN_ARGS% }"
if ((!DRY)); then
  echo "stop (checkpoint first): $0 --stop $CLUSTER $WORKLOAD"
fi
