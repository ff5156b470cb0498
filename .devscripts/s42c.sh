#!/usr/bin/env bash
# Session 42, call C (~450 s, any Hopper): the dense-launch GPU tests call A had no time for,
# and the grouped-matmul base/new probe with its whole log kept (it aborted in call A).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
L=$OUT/results/gpu-tests-2026-12-05-s42-dense.log
timeout 280 python3 -m pytest -v -m gpu tests/kernels/test_fp8.py -k "dense_fp8 or gate_and_up_in_one_launch_on_gpu and 4096" > $L 2>&1
echo "rc $?"; grep -c PASSED $L; grep -v "^    @ " $L | grep -m 20 "FAILED\|Fatal\|Abort\|abort\|error:\|passed\|failed"
timeout 250 python3 .devscripts/gmm_base_vs_new.py > $OUT/results/gmm-probe.log 2>&1
echo "probe rc $?"; grep -v "^    @ \|Warn" $OUT/results/gmm-probe.log | grep -m 30 "{\|Error\|error\|FAILED\|Check\|F1205\|F1206\|Fatal\|terminate"
