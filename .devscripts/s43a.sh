#!/usr/bin/env bash
# Session 43, call A (~450 s, any Hopper): the GPU tests of session 42's W8A16 and swiglu forms
# (and the model's MoE with SWIGLU_IN_GATE_UP in the decode-step GPU test, if time allows),
# then benchmarks.fp8_matmul --w8a16 (launches and the whole decode MoE both ways).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
L=$OUT/results/gpu-tests-w8a16-swiglu.log
timeout 260 python3 -m pytest -v -m gpu tests/kernels/test_fp8.py tests/models/llama4/test_llama4_gpu.py -k "w8a16 or swiglu or (kernels_match_xla and True-True-True)" > $L 2>&1
echo "rc $?"; grep -c PASSED $L; grep -v "^    @ " $L | grep -m 20 "FAILED\|Fatal\|Abort\|abort\|error:\|passed\|failed"
timeout 330 python3 -m benchmarks.fp8_matmul --w8a16 2>&1 | grep -v Warn | tail -14
cp benchmarks/results/gmm-w8a16-* $OUT/results/ 2>/dev/null
