#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- --config configs/timescope.py:model=qwen2_5_vl_7b --workdir gs://bucket/runs/ts
#
# Copies this checkout to all workers, installs it into a virtualenv there (first run only) and
# starts `python -m jaxgrounding.train` on all of them at once. JAX finds the other hosts of the
# slice itself (jax.distributed.initialize via jaxgrounding.parallel.initialize_distributed).
set -euo pipefail
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 TPU_NAME ZONE -- TRAIN_ARGS..." >&2
  exit 2
fi
TPU="$1"; ZONE="$2"; shift 3
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ARCHIVE="$(mktemp -d)/jaxgrounding.tar.gz"
git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU":~/jaxgrounding.tar.gz --zone "$ZONE" --worker=all
printf -v ARGS '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/jaxgrounding && tar -xzf ~/jaxgrounding.tar.gz -C ~/jaxgrounding
  cd ~/jaxgrounding
  [[ -d .venv ]] || python3 -m venv .venv
  .venv/bin/pip install -q -e . 'jax[tpu]>=0.10,<0.11'
  export TPU_WORKER_HOSTNAMES=\${TPU_WORKER_HOSTNAMES:-multi,host}
  .venv/bin/python -m jaxgrounding.train $ARGS
"
