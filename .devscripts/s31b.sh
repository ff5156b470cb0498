#!/usr/bin/env bash
# Session 31, call B: the merged page copies on the GPU (tests), then the paging table
# (contiguous vs pages in order merged / per page, shuffled).
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_prefill_gpu.py \
  -k "in_order or packed_batch or 10001" 2>&1 | tail -4 | tee $OUT/results/merge-gpu-tests-s31.log
timeout 120 python3 -m pytest -q -m gpu tests/kernels/test_fp8_kv_gpu.py \
  -k "merged or producer" 2>&1 | tail -4 | tee -a $OUT/results/merge-gpu-tests-s31.log
BENCH_PARTS=paging BENCH_TAG=-s31-merge BENCH_BUDGET_S=250 timeout 330 python3 -m benchmarks.prefill 2>&1 \
  | grep -A8 "^Paging"
cp benchmarks/results/prefill-*-s31-merge.* $OUT/results/ 2>/dev/null
ls $OUT/results
