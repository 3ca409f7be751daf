#!/usr/bin/env bash
# One-shot GPU check for a single H100 / H200 (no network needed), about 8 minutes. From the repository root:
#     bash benchmarks/gpu_check.sh
# 1. Llama 3.2 1B training MFU at sequence 4096 and 8192 (benchmarks/gpu_train_mfu.py).
# 2. Attention backends: agreement with a float32 reference and forward+backward time (benchmarks/gpu_attention.py).
# 3. FP8 inference: decode throughput of Llama 3.2 1B (random weights), bfloat16 vs bfloat16 + FP8 FFN
#    (benchmarks/decode.py).
# Each part has its own time limit, so one failure does not hide the others. Results (with the device kind) go
# to benchmarks/gpu_results.md and benchmarks/gpu_attention.md, copied to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/gpu_results.md
ATTN=benchmarks/gpu_attention.md
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
PY="${PYTHON:-python3}"
copy_out() { if [ -n "${OUT:-}" ]; then cp -f "$RESULTS" "$ATTN" "$OUT/" 2>/dev/null; fi; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

# --- 1. training MFU ---
timeout "${MFU_TIMEOUT:-260}" "$PY" benchmarks/gpu_train_mfu.py --out "$RESULTS" --budget-s "${MFU_BUDGET:-170}" \
  || echo "gpu_train_mfu.py exited with $?" | tee -a "$RESULTS"
copy_out

# --- 2. attention backends ---
timeout "${ATTN_TIMEOUT:-150}" "$PY" benchmarks/gpu_attention.py --out "$ATTN" --budget-s "${ATTN_BUDGET:-100}" \
  || echo "gpu_attention.py exited with $?" | tee -a "$ATTN"
copy_out

# --- 3. FP8 decode ---
{ echo; echo "### FP8 decode: Llama 3.2 1B, random weights (benchmarks/decode.py)"; echo; } >> "$RESULTS"
timeout "${DECODE_TIMEOUT:-110}" "$PY" benchmarks/decode.py --preset=llama3.2-1b --dtypes=bfloat16 \
  --batches=1,8 --prompt_len=128 --new_tokens=256 --repeats=3 2>&1 | grep -v '^[IWE][0-9]\{4\} \|^WARNING' >> "$RESULTS" \
  || echo "decode.py exited with $?" >> "$RESULTS"
copy_out
cat "$RESULTS" "$ATTN"
