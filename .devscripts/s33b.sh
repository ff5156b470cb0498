#!/usr/bin/env bash
# Next session, call B (~330 s): merged_dequant_vector (built in session 32, untimed): its GPU
# bit-equality (in the merged-copy test), then the FP8 prefill over pages in order with the
# fp8_v8_m4 column next to v4 / v8, and over shuffled pages (where m4 must equal v8's time).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_fp8_kv_gpu.py -k merged 2>&1 \
  | tail -3 | tee $OUT/results/merged-vector-gpu-tests-s33.log
timeout 200 python3 -m benchmarks.fp8_kv --prefill-only --in-order \
  --prefill-cases causal:8192,causal:32768,chunked:131072 --tag s33-in-order 2>&1 | tail -7
cp benchmarks/results/fp8-kv-*-s33-in-order.* $OUT/results/ 2>/dev/null
