#!/usr/bin/env bash
# Session 37, call A (~560 s, one H200): f16 V tiles (PrefillConfig.f16_pv) are now the FP8
# prefill's form where V has one scale (every Llama 4 layer). (1) GPU tests: fixed K+V vs the
# scale rows (both in f16 tiles), f16 vs bf16 tiles; the toy model's FP8-cache steps. (2) The
# prefill over pages in order: the default (f16 tiles) vs the bf16 tiles (s36's default) vs bf16.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_fp8_kv_gpu.py \
  -k "fixed_scales_give or f16_pv" 2>&1 | tail -4 | tee $OUT/results/f16-pv-default-gpu-tests-s37.log
timeout 120 python3 -m pytest -q -s -m gpu tests/models/llama4/test_llama4_gpu.py \
  -k fp8_cache 2>&1 | grep -v "^compiling" | tail -12 \
  | tee $OUT/results/fp8-cache-steps-gpu-test-s37.log
timeout 300 python3 -m benchmarks.fp8_kv --prefill-only --in-order \
  --columns fp8_v8_fixed_kv,fp8_v8_fixed_kv_bf16pv --tag s37-f16-pv 2>&1 | tail -5
cp benchmarks/results/fp8-kv-*-s37-f16-pv.* $OUT/results/ 2>/dev/null
