#!/usr/bin/env bash
# Session 40, call A (~400 s, any Hopper): the GPU tests of session 38's row kernels (no
# automatic barriers; the routing norm) and session 40's FP8 attention rows (decode kernels
# writing FP8 under a static scale; the toy model's step with STATIC_O_SCALE). Full log.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 380 python3 -X faulthandler -m pytest -v -s -m gpu tests/kernels/test_fp8_rows.py \
  tests/models/llama4/test_llama4_gpu.py tests/kernels/test_decode_gpu.py \
  -k "scout_shapes or fp8_decode_step or out_scale" > $OUT/results/gpu-tests-s40.log 2>&1
echo "rc $?"; grep -v "^    @ " $OUT/results/gpu-tests-s40.log | grep "PASSED\|FAILED\|Fatal\|Abort\|error:\|passed\|failed\|rms vs"
