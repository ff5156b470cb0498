#!/usr/bin/env bash
# Session 41, call D (~480 s, any Hopper): the GPU tests call B's timeout cut (out_scale rows,
# the FP8 cache's decode), then the decode benchmark against cuDNN (issue 19's shapes).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
L=$OUT/results/gpu-tests-2026-12-05-s41-d.log
timeout 240 python3 -m pytest -v -m gpu tests/kernels/test_decode_gpu.py::test_out_scale_writes_fp8_rows_on_the_gpu tests/kernels/test_fp8_kv_gpu.py -k "not f16_pv" > $L 2>&1
echo "rc $?"; grep -c PASSED $L; grep -v "^    @ " $L | grep -m 20 "FAILED\|Fatal\|Abort\|abort\|error:\|passed\|failed"
timeout 200 python3 -m benchmarks.decode --quick --tag s41 2>&1 | tail -14; cp benchmarks/results/decode-*s41* $OUT/results/
ls $OUT/results
