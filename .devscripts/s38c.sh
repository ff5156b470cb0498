#!/usr/bin/env bash
# Session 38/39, call C (~300 s, one H200): ROUTE_IN_NORM v2 (session 38, untimed). The row
# kernels' GPU tests (the norm kernel routing and scaling Scout's rows), the toy model's FP8
# decode step with and without it, then benchmarks.fp8_rows (kernel time of the routing norm).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 240 python3 -X faulthandler -m pytest -v -s -m gpu tests/kernels/test_fp8_rows.py \
  tests/models/llama4/test_llama4_gpu.py -k "scout_shapes or fp8_decode_step" \
  > $OUT/results/route-in-norm-gpu-tests-s39.log 2>&1
echo "rc $?"; grep -v "^    @ " $OUT/results/route-in-norm-gpu-tests-s39.log | grep -m 20 "PASSED\|FAILED\|Fatal\|Abort\|error:\|passed\|failed\|rms vs"
timeout 200 python3 -m benchmarks.fp8_rows 2>&1 | tail -12
