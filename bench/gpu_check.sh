#!/usr/bin/env bash
# The prepared GPU check: one run on a machine with one GPU, JSON lines into $OUT (or /tmp/gpu_check).
#
#   bash bench/gpu_check.sh            # from the repository root; WHEELS=dir of wheels for what the machine lacks
#
# 1. The HVR Pallas kernel compiled for the GPU (Triton), forward and backward: its outputs and gradients against
#    the jnp reference on the same device (max_err_*), and its bandwidth against the reference's, bf16 and fp32.
# 2. TimeScope trained on the GPU through that kernel (HVR impl "auto" resolves to the Pallas kernel there): a short
#    run of configs/timescope.py on a small synthetic set, its train_metrics.jsonl and eval metrics.
# 3. The MeCo SFT step's speed at the default tiny shape.
# Each part runs even when an earlier one failed; the exit status is the first failure's.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STATUS=0
step() { "$@" || { code=$?; echo "FAILED ($code): $*" >&2; [ "$STATUS" = 0 ] && STATUS=$code; }; }

if [ -n "${WHEELS:-}" ]; then step "$PY" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

step "$PY" bench/hvr_kernel.py --backward --peak-gbps 4800 | tee "$OUT/hvr_kernel.jsonl"
step "$PY" bench/hvr_kernel.py --backward --peak-gbps 4800 --dtype float32 --shape 28,1,16,144,4,128,4,1 \
  | tee -a "$OUT/hvr_kernel.jsonl"

RUN=/tmp/gpu_check_ts
step timeout 240 "$PY" -m jaxgrounding.train --config configs/timescope.py --workdir "$RUN/ts" \
  --config.data.synthetic_train_videos=32 --config.data.synthetic_eval_videos=8 \
  --config.train.steps="${TS_STEPS:-100}" --config.train.export=False 2>&1 | grep -v "it/s\]" | tail -n 8
cp "$RUN/ts/train_metrics.jsonl" "$OUT/timescope_train_metrics.jsonl" 2>/dev/null
cp "$RUN/ts/eval/metrics.json" "$OUT/timescope_eval_metrics.json" 2>/dev/null

step "$PY" bench/sft_step.py --shape default | tee "$OUT/sft_step.jsonl"
exit "$STATUS"
