#!/usr/bin/env bash
# Session 42, call A (~550 s, an H200 preferred): (1) GPU tests of session 41's grouped-matmul
# change (FP8 by-row / shared / dense); (2) the FP8 decode launches, session 40's code against
# the working tree (scales loaded before the K loop), interleaved, cold L2; (3) bf16 narrow
# tiles against the default at issue 19's shapes (GPU time).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
L=$OUT/results/gpu-tests-2026-12-06-s42-gmm.log
timeout 200 python3 -m pytest -v -m gpu tests/kernels/test_fp8.py -k "by_row or dense_fp8 or gate_and_up" > $L 2>&1
echo "rc $?"; grep -c PASSED $L; grep -v "^    @ " $L | grep -m 20 "FAILED\|Fatal\|Abort\|abort\|error:\|passed\|failed"
timeout 150 python3 .devscripts/gmm_base_vs_new.py 2>&1 | grep -v Warn | tail -8
timeout 180 python3 -m benchmarks.decode_variants --only "bf16" --tag s42-narrow 2>&1 | tail -12
cp benchmarks/results/decode-variants-*s42* $OUT/results/ 2>/dev/null
