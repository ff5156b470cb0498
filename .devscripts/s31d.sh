#!/usr/bin/env bash
# Session 31, call D: merged copies with one first-page read per tile (tile_first_pages):
# GPU tests of the merge, then the paging table again.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_prefill_gpu.py -k "in_order" 2>&1 \
  | tail -3 | tee $OUT/results/merge-gpu-tests-s31-first-pages.log
timeout 100 python3 -m pytest -q -m gpu tests/kernels/test_fp8_kv_gpu.py -k "merged" 2>&1 \
  | tail -3 | tee -a $OUT/results/merge-gpu-tests-s31-first-pages.log
BENCH_PARTS=paging BENCH_TAG=-s31-first-pages BENCH_BUDGET_S=200 timeout 280 \
  python3 -m benchmarks.prefill 2>&1 | grep -A8 "^Paging"
cp benchmarks/results/prefill-*-s31-first-pages.* $OUT/results/ 2>/dev/null
