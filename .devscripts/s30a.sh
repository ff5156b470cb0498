#!/usr/bin/env bash
# Next session, call A (~450 s): prefill's query rows from 16-byte loads (q_vector=8) checked
# bit-equal on the GPU, then timed beside the default (V in 8-value vectors) and the 2/4 forms.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 200 python3 -m pytest -m gpu -v -p no:cacheprovider tests/kernels/test_fp8_kv_gpu.py \
  -k "vectors" 2>&1 | tee $OUT/results/fp8-q-vector-gpu-tests.log | grep -E "PASS|FAIL|Error|passed|failed" | head
timeout 240 python3 -m benchmarks.fp8_kv --prefill-only --tag s30 2>&1 | tail -9
