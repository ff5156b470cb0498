#!/usr/bin/env bash
# Session 38, call A (~500 s): find session 37's abort with f16 V tiles. Full logs.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:.devscripts JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv
timeout 280 python3 -X faulthandler -m pytest -v -m gpu tests/kernels/test_fp8_kv_gpu.py \
  -k f16_pv > $OUT/results/f16-pv-gpu-tests-s38.log 2>&1
echo "rc $?"; grep -c PASSED $OUT/results/f16-pv-gpu-tests-s38.log
grep -v "^    @ " $OUT/results/f16-pv-gpu-tests-s38.log | grep -m 20 "FAILED\|Fatal\|Abort\|abort\|error:\|Check failed\|passed\|failed"
timeout 200 python3 -X faulthandler -m pytest -v -m gpu -p force_f16 \
  tests/models/llama4/test_llama4_gpu.py -k fp8 > $OUT/results/f16-pv-toy-model-s38.log 2>&1
echo "rc $?"; grep -v "^    @ " $OUT/results/f16-pv-toy-model-s38.log | grep -m 20 "PASSED\|FAILED\|Fatal\|Abort\|abort\|error:\|Check failed\|passed\|failed"
