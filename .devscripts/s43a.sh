#!/usr/bin/env bash
# Session 43, call A (~400 s, any Hopper): the W8A16 form's GPU tests, and its launch against
# the FP8 rows' at a decode step's by-row launches (benchmarks.fp8_matmul --w8a16).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
L=$OUT/results/gpu-tests-w8a16.log
timeout 200 python3 -m pytest -v -m gpu tests/kernels/test_fp8.py -k "w8a16" > $L 2>&1
echo "rc $?"; grep -c PASSED $L; grep -v "^    @ " $L | grep -m 20 "FAILED\|Fatal\|Abort\|abort\|error:\|passed\|failed"
timeout 300 python3 -m benchmarks.fp8_matmul --w8a16 2>&1 | grep -v Warn | tail -12
cp benchmarks/results/gmm-w8a16-* $OUT/results/ 2>/dev/null
