#!/usr/bin/env bash
# FP8 prefill over pages in order: merged copies vs one per page, same run (~260 s); then the
# engine's decode with a bf16 cache (s32d.sh, ~170 s).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 300 python3 -m benchmarks.fp8_kv --prefill-only --in-order --per-page \
  --prefill-cases causal:8192,causal:32768,chunked:131072 --tag s32-per-page 2>&1 | tail -7
cp benchmarks/results/fp8-kv-*-s32-per-page.* $OUT/results/ 2>/dev/null
bash .devscripts/s32d.sh bf16
