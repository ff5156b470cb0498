#!/usr/bin/env bash
# Session 34, call B: the toy model's FP8-cache decode steps test, then s34b.sh bf16.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 190 python3 -m pytest -q -m gpu tests/models/llama4/test_llama4_gpu.py \
  -k fp8_cache_decode 2>&1 | tail -6 | tee $OUT/results/fp8-cache-decode-step-gpu-test-s34.log
bash .devscripts/s34b.sh bf16
