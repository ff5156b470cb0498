#!/usr/bin/env bash
# Session 34, call A (~520 s): the fixed K scale's GPU tests, then the FP8 prefill over pages
# in order with the normed-key columns (compare fp8_v8_normed_k/bf16_normed_k with fp8_v8/bf16).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 190 python3 -m pytest -q -m gpu tests/kernels/test_qk_rows.py \
  tests/kernels/test_fp8_kv_gpu.py -k "scout_shapes or fixed" 2>&1 | tail -6 \
  | tee $OUT/results/fixed-k-scale-gpu-tests-s34.log
timeout 310 python3 -m benchmarks.fp8_kv --prefill-only --in-order \
  --prefill-cases chunked:131072,causal:8192 --tag s34-normed-k 2>&1 | tail -9
cp benchmarks/results/fp8-kv-*-s34-normed-k.* $OUT/results/ 2>/dev/null
