#!/usr/bin/env bash
# Next session, call A (~400 s): what the page table costs the prefill (chunked 128k ran at 515
# TFLOP/s over shuffled 32-token pages and 548-557 through the contiguous API, same plans),
# then the FP8 prefill's cost ablations at chunked 128k and causal 32k.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
BENCH_PARTS=paging BENCH_TAG=-s31-paging timeout 260 python3 -m benchmarks.prefill 2>&1 \
  | grep -A8 "^Paging"
cp benchmarks/results/prefill-*-s31-paging.* $OUT/results/ 2>/dev/null
timeout 200 python3 -m benchmarks.fp8_prefill_costs --cases chunked:131072,causal:32768 \
  --tag s31 2>&1 | tail -5
cp benchmarks/results/fp8-prefill-costs-*-s31.* $OUT/results/ 2>/dev/null
ls $OUT/results
