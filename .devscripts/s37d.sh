#!/usr/bin/env bash
# Session 37, call D (~560 s, one H200): the FP8 cache's decode at all four shapes (s36's
# run stopped after two), then the bf16 decode benchmark vs cuDNN (issue 19; last s22).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 280 python3 -m benchmarks.fp8_kv --decode-only --tag s37-decode 2>&1 | tail -8
cp benchmarks/results/fp8-kv-*-s37-decode.* $OUT/results/ 2>/dev/null
timeout 230 python3 -m benchmarks.decode --quick --profile --tag s37 2>&1 | tail -12
cp benchmarks/results/decode-*-s37.* $OUT/results/ 2>/dev/null
