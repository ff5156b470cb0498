#!/usr/bin/env bash
# Session 35, call A (~560 s, one H200): session 34's one-K-scale work on the H200, untested
# there: (1) the FP8 kernels' fixed-scale GPU tests (the prefill's and, since s34, the
# decode's: the mixed batches of test_fp8_kv_gpu -k fixed) and the q/k kernel's Scout-shape
# cases; (2) the toy model's FP8-cache decode steps (its NoPE layer 3 now writes its keys
# with the weight-bound scale); (3) the decode benchmark with the new fp8_fixed_k column
# (FP8 decode over keys under one scale vs bf16; s29: default 0.99-1.05x bf16).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 260 python3 -m pytest -q -m gpu tests/kernels/test_qk_rows.py \
  tests/kernels/test_fp8_kv_gpu.py -k "scout_shapes or fixed" 2>&1 | tail -4 \
  | tee $OUT/results/fixed-k-scale-gpu-tests-s35.log
timeout 180 python3 -m pytest -q -s -m gpu tests/models/llama4/test_llama4_gpu.py \
  -k fp8_cache_decode 2>&1 | grep -v "^compiling" | tail -16 \
  | tee $OUT/results/fp8-cache-decode-step-gpu-test-s35.log
timeout 120 python3 -m benchmarks.fp8_kv --decode-only --tag s35-fixed-k 2>&1 | tail -8
cp benchmarks/results/fp8-kv-*-s35-fixed-k.* $OUT/results/ 2>/dev/null
