#!/usr/bin/env bash
# The toy model's FP8-cache decode-step GPU test, then the bf16-cache engine decode (same
# session's comparison for s33c's FP8-cache run).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 150 python3 -m pytest -q -m gpu tests/models/llama4/test_llama4_gpu.py -k fp8_cache_decode 2>&1 \
  | tail -4 | tee $OUT/results/fp8-cache-decode-step-gpu-test-s33.log
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 330 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype bf16 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1,8 --decode-context 8192 --decode-tokens 64 --profile-steps 0 \
  --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model \
  --out $OUT/results --tag=-s33-decode-kv-bf16 2>&1 | grep -v "it/s\]" | tail -8
