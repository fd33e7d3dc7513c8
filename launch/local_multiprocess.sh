#!/usr/bin/env bash
# N processes on this machine (CPU devices, gloo collectives): a rehearsal of a multi-host run.
#
#   launch/local_multiprocess.sh 2 --config configs/meco.py --workdir runs/meco_2proc
set -euo pipefail
N="$1"; shift
PORT="${PORT:-12355}"
PIDS=()
for ((i = 0; i < N; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
    JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo python -m jaxgrounding.train "$@" &
  PIDS+=($!)
done
trap 'kill "${PIDS[@]}" 2>/dev/null' INT TERM
STATUS=0
for pid in "${PIDS[@]}"; do wait "$pid" || STATUS=$?; done
exit "$STATUS"
