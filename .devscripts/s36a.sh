#!/usr/bin/env bash
# Session 36, call A (~560 s, one H200). Run FIRST: sessions 34-35's fixed-scale kernel paths
# (every Llama 4 layer's default) have never run on a GPU. (1) bit-equality of fixed K+V
# scales vs reading the rows (prefill and decode, shuffled and in order) and the q/k kernel
# writing V with its fixed scale at Scout's shapes; (2) the toy model's FP8-cache decode
# steps (its layers now write V under one scale); (3) the decode benchmark: fp8_fixed_kv vs
# fp8_fixed_k vs bf16 (s29 default 0.99-1.05x bf16).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 280 python3 -m pytest -q -m gpu tests/kernels/test_qk_rows.py \
  tests/kernels/test_fp8_kv_gpu.py -k "scout_shapes or fixed_scales_give" 2>&1 | tail -4 \
  | tee $OUT/results/fixed-kv-scales-gpu-tests-s36.log
timeout 150 python3 -m pytest -q -s -m gpu tests/models/llama4/test_llama4_gpu.py \
  -k fp8_cache_decode 2>&1 | grep -v "^compiling" | tail -16 \
  | tee $OUT/results/fp8-cache-decode-step-gpu-test-s36.log
timeout 130 python3 -m benchmarks.fp8_kv --decode-only --tag s36-fixed-kv 2>&1 | tail -8
cp benchmarks/results/fp8-kv-*-s36-fixed-kv.* $OUT/results/ 2>/dev/null
