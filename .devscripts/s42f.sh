#!/usr/bin/env bash
# Session 42, call F (~270 s, any Hopper): the prefill GPU tests session 41's runs had no time
# for (its final wait for the stores' reads), FP8-cache prefill ones first.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
L=$OUT/results/gpu-tests-2026-12-05-s42-h100-prefill.log
timeout 255 python3 -m pytest -v -m gpu tests/kernels/test_fp8_kv_gpu.py tests/kernels/test_prefill_gpu.py \
  -k "fp8_prefill or pv_prefill or needle or contiguous_any_length or kernel_variants or pages_in_order or one_compile" > $L 2>&1
echo "rc $?"; grep -c PASSED $L; grep -v "^    @ " $L | grep -m 20 "FAILED\|Fatal\|Abort\|abort\|error:\|passed\|failed"
