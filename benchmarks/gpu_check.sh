#!/usr/bin/env bash
# One-shot GPU check for a single H100 / H200 (no network needed). From the repository root:
#     bash benchmarks/gpu_check.sh
# 1. Llama 3.2 1B training MFU at sequence 4096 and 8192 (benchmarks/gpu_train_mfu.py), about 5-6 minutes.
# 2. Hook: FP8 decode throughput, `benchmarks/decode.py --quantize-compare`, run only if that file exists.
# Results (with the device kind) are written to benchmarks/gpu_results.md, and copied to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/gpu_results.md

if ! python -c "import llama_jax" 2>/dev/null; then
  pip install --no-deps --no-build-isolation -q -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"

# --- 1. training MFU (hard limit 7 minutes; the script itself stops starting new runs after 400 s) ---
timeout 420 python benchmarks/gpu_train_mfu.py --out "$RESULTS"
rc=$?
if [ $rc -ne 0 ]; then
  echo "gpu_train_mfu.py exited with $rc" | tee -a "$RESULTS"
fi

# --- 2. FP8 decode hook (added separately; skipped while benchmarks/decode.py does not exist) ---
if [ -f benchmarks/decode.py ]; then
  { echo; echo "### FP8 decode (benchmarks/decode.py --quantize-compare)"; echo; } >> "$RESULTS"
  timeout 120 python benchmarks/decode.py --quantize-compare >> "$RESULTS" 2>&1 \
    || echo "decode.py --quantize-compare exited with $?" >> "$RESULTS"
else
  echo "benchmarks/decode.py not present: FP8 decode check skipped"
fi

if [ -n "${OUT:-}" ]; then cp "$RESULTS" "$OUT/"; fi
cat "$RESULTS"
