#!/usr/bin/env bash
# Engine decode, full Scout, FP8 weights (+ FP8 attention projections, as session 24), one
# H200, batch 1 and 8 at 8k, KV cache $1 (bf16 or fp8). ~170 s.
set -uo pipefail
kv=${1:?bf16 or fp8}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p $OUT/results
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 280 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype $kv --lengths 8192 --buckets 16,8192 \
  --decode-batches 1,8 --decode-context 8192 --decode-tokens 64 --profile-steps 0 \
  --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model \
  --out $OUT/results --tag=-s33-decode-kv-$kv${TAG_SUFFIX:-} 2>&1 | grep -v "^compiling\|it/s\]" | tail -12
