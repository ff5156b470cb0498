#!/usr/bin/env bash
# Session 35, calls B and C on nvidia-h200-x2 (~420 s each; `s35b.sh bf16`, then `s35b.sh fp8`):
# issue 21's prefill goal where the 12 global layers' causal attention dominates. Full Scout,
# bf16 weights, TP=2; one 786,432-token prompt alone (the default bf16 plan holds 1,030,656
# tokens at 0.95; README: 1M took TTFT 216 s with the FP8 cache on 2026-12-01). Compare the
# two TTFTs (s34 on one H200: 1.023 / 1.028 at 32k / 64k; the causal kernel 1.07x at 32k).
set -uo pipefail
kv=${1:?bf16 or fp8}
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 560 python3 -m benchmarks.multigpu -tp 2 \
  --kv-cache-dtype $kv --lengths 786432 --buckets 16,8192 --max-num-seqs 1 \
  --decode-batches '' --profile-steps 0 --decode-tokens 4 --skip-alone \
  --out $OUT/results --tag=-s35-x2-768k-kv-$kv 2>&1 | grep -v "^compiling\|it/s\]" | tail -14
