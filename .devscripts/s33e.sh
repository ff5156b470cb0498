#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 200 python3 -m pytest -q -s -m gpu tests/models/llama4/test_llama4_gpu.py -k "fp8_cache_decode or fp8_decode_step" 2>&1 \
  | tail -12 | tee $OUT/results/fp8-cache-decode-step-gpu-test-s33.log
