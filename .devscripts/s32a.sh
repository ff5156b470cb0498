#!/usr/bin/env bash
# Next session, call A (~450 s): the FP8 merged-copy GPU test in full, the FP8 prefill over
# pages in order (the engine's layout, merged copies for both caches), and the serving
# step's table with the in-order column.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_fp8_kv_gpu.py -k merged 2>&1 \
  | tail -3 | tee $OUT/results/merge-fp8-gpu-tests-s32.log
timeout 170 python3 -m benchmarks.fp8_kv --prefill-only --in-order \
  --prefill-cases causal:8192,causal:32768,chunked:131072 --tag s32-in-order 2>&1 | tail -8
BENCH_PARTS=serving_step BENCH_TAG=-s32-serving BENCH_BUDGET_S=120 timeout 200 \
  python3 -m benchmarks.prefill 2>&1 | grep -A16 "^Serving step"
cp benchmarks/results/prefill-*-s32-serving.* benchmarks/results/fp8-kv-*-s32-in-order.* \
  $OUT/results/ 2>/dev/null
