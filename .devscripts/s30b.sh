#!/usr/bin/env bash
# Next session, call B (~520 s): chunked-local tile orders against cuDNN's reshaped batch (the
# bf16 chunked 128k rate, 512 TFLOP/s, is below causal 8k's 580 with the same items; "auto"
# picks kv_major there and item_major at 8k); then the FP8 prefill at causal 4k / 16k, whose
# rates beside 8k / 32k's separate a per-item cost of the FP8 form from a per-tile one; then
# bf16 and FP8 prefill with every column in item_major order at chunked 128k and causal 32k.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
BENCH_PARTS=orders ORDER_CASES=chunked:32768,chunked:131072 BENCH_TAG=-s30-chunked-orders \
  timeout 200 python3 -m benchmarks.prefill 2>&1 | grep -A8 "Tile orders"
cp benchmarks/results/prefill-*-s30-chunked-orders.* $OUT/results/ 2>/dev/null
timeout 150 python3 -m benchmarks.fp8_kv --prefill-only --tag s30-lengths \
  --prefill-cases causal:4096,causal:16384 2>&1 | tail -6
timeout 150 python3 -m benchmarks.fp8_kv --prefill-only --tag s30-item-major --tile-order item_major \
  --prefill-cases chunked:131072,causal:32768 2>&1 | tail -6
