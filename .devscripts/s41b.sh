#!/usr/bin/env bash
# Session 41, call B (~450 s, any Hopper): GPU tests of the decode kernel's fixed-cost
# changes (and the read-only final waits in combine/prefill), then the batch-1 few-key probe,
# HEAD against the working tree, interleaved.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
L=$OUT/results/gpu-tests-2026-12-05-s41.log
timeout 200 python3 -m pytest -v -m gpu tests/kernels/test_decode_gpu.py tests/kernels/test_fp8_kv_gpu.py -k "not f16_pv" > $L 2>&1
echo "rc $?"; grep -c PASSED $L; grep -v "^    @ " $L | grep -m 20 "FAILED\|Fatal\|Abort\|abort\|error:\|passed\|failed"
timeout 60 python3 -m pytest -v -m gpu tests/kernels/test_prefill_gpu.py -x -k "not slow" --maxfail=1 > $OUT/results/gpu-tests-prefill-2026-12-05-s41.log 2>&1
echo "rc $?"; grep -v "^    @ " $OUT/results/gpu-tests-prefill-2026-12-05-s41.log | grep -m 5 "FAILED\|passed\|failed"
timeout 250 python3 .devscripts/decode_short2.py 2>&1 | grep -v Warn
