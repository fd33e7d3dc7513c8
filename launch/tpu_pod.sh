#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice, detached, one log per worker.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE -- TRAIN_ARGS...   copy this checkout (HEAD), set up, start
#   launch/tpu_pod.sh [--dry-run] --stop TPU_NAME ZONE              SIGTERM: every worker saves a checkpoint, exits
#   launch/tpu_pod.sh [--dry-run] --logs TPU_NAME ZONE              the last lines of every worker's log
#
#   launch/tpu_pod.sh my-v5p-64 us-east5-a -- --config configs/timescope.py:model=qwen2_5_vl_7b \
#       --config.model.checkpoint=Qwen/Qwen2.5-VL-7B-Instruct --workdir gs://bucket/runs/ts
#
# On each worker: the checkout in ~/jaxgrounding; a virtualenv ~/jaxgrounding/.venv with Python 3.12 made
# by uv (TPU VM images ship Python 3.10, the package needs >= 3.11); the package installed with
# '.[tpu,cloud]' (libtpu, gs:// workdirs); training started from the checkout's root (configs/ is read
# from there) under setsid + nohup, so it outlives the ssh session, with its output in
# ~/jaxgrounding/logs/<worker hostname>.log and its pid in ~/jaxgrounding/train.pid.
# jax.distributed.initialize() learns the slice's hosts from the TPU VM itself
# (jaxgrounding.parallel.initialize_distributed); nothing is exported. A second start resumes from the
# workdir's latest checkpoint. --dry-run prints each command (shell-quoted) instead of running it.
set -euo pipefail

DRY=0
MODE=start
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stop) MODE=stop ;;
    --logs) MODE=logs ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
usage() {
  echo "usage: $0 [--dry-run] TPU_NAME ZONE -- TRAIN_ARGS... | [--dry-run] --stop|--logs TPU_NAME ZONE" >&2
  exit 2
}
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"  # run / quote

[[ $# -ge 2 ]] || usage
TPU="$1"; ZONE="$2"; shift 2
on_all_workers() { run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }
HOME_DIR='~/jaxgrounding'  # expanded by each worker's shell

case "$MODE" in
  stop)
    [[ $# -eq 0 ]] || usage
    on_all_workers "cd $HOME_DIR && if [ -f train.pid ] && kill -0 \$(cat train.pid) 2>/dev/null; then kill -TERM \$(cat train.pid) && echo \"\$(hostname): SIGTERM sent (checkpoint, then exit)\"; else echo \"\$(hostname): not training\"; fi"
    exit 0
    ;;
  logs)
    [[ $# -eq 0 ]] || usage
    on_all_workers "echo \"== \$(hostname)\"; tail -n 5 $HOME_DIR/logs/\$(hostname).log"
    exit 0
    ;;
esac

[[ $# -ge 1 && "$1" == "--" ]] || usage
shift
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
ARCHIVE="$WORK/jaxgrounding.tar.gz"
printf -v TRAIN_ARGS '%q ' "$@"

run git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU:~/jaxgrounding.tar.gz" --zone "$ZONE" --worker=all
# One line, joined by ';' under `set -e`: the trailing '&' then backgrounds the training command only.
STEPS=(
  "set -e"
  "mkdir -p $HOME_DIR/logs"
  "tar -xzf ~/jaxgrounding.tar.gz -C $HOME_DIR"
  "cd $HOME_DIR"
  "export PATH=\$HOME/.local/bin:\$PATH"
  "command -v uv >/dev/null || python3 -m pip install --user -q uv"
  "[ -x .venv/bin/python ] || uv venv -q --python 3.12 .venv"
  "uv pip install -q --python .venv/bin/python -e '.[tpu,cloud]'"
  "if [ -f train.pid ] && kill -0 \$(cat train.pid) 2>/dev/null; then echo \"\$(hostname): already training (pid \$(cat train.pid))\" >&2; exit 1; fi"
  "setsid nohup .venv/bin/python -m jaxgrounding.train ${TRAIN_ARGS}> logs/\$(hostname).log 2>&1 < /dev/null & echo \$! > train.pid"
  "echo \"\$(hostname): training, log $HOME_DIR/logs/\$(hostname).log\""
)
REMOTE="$(printf '%s; ' "${STEPS[@]}")"
on_all_workers "${REMOTE%; }"
if ((!DRY)); then
  echo "logs: $0 --logs $TPU $ZONE    stop (checkpoint first): $0 --stop $TPU $ZONE"
fi
