#!/usr/bin/env bash
# Session 34, call D: the toy FP8-cache step test with per-layer row errors printed; the FP8
# prefill at causal 32k over pages in order with the normed-key columns.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 200 python3 -m pytest -q -s -m gpu tests/models/llama4/test_llama4_gpu.py \
  -k fp8_cache_decode 2>&1 | grep -v "^compiling" | tail -30 | tee $OUT/results/fp8-cache-decode-step-gpu-test-s34.log
: timeout 260 python3 -m benchmarks.fp8_kv --prefill-only --in-order \
  --prefill-cases causal:32768 --tag s34-normed-k-32k 2>&1 | tail -5
cp benchmarks/results/fp8-kv-*-s34-normed-k-32k.* $OUT/results/ 2>/dev/null
