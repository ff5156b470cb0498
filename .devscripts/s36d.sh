#!/usr/bin/env bash
# Session 36, call D (~300 s, one H200): the decode forms over the fixed-K+V cache (the
# engine's for Llama 4 since session 35): does its cheaper conversion move the best ring /
# warpgroup form? Baseline: the 64-key bf16 kernel; the bf16 and FP8 defaults beside.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 420 python3 -m benchmarks.decode_variants --only "bf16 default|FP8 default|FP8 fixed" \
  --tag s36-fixed-kv 2>&1 | tail -3
cp benchmarks/results/decode-variants-*-s36-fixed-kv.* $OUT/results/ 2>/dev/null
