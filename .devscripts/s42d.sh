#!/usr/bin/env bash
# Session 42, call D (~300 s, any Hopper): the grouped-matmul base/new probe (weights now
# passed as arguments: closed over, they were GBs of HLO constants and it never compiled).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 330 python3 .devscripts/gmm_base_vs_new.py > $OUT/results/gmm-probe.log 2>&1
echo "probe rc $?"; grep -v "^    @ \|Warn" $OUT/results/gmm-probe.log | grep -m 30 "{\|Error\|error\|FAILED\|Check\|Fatal\|terminate"
