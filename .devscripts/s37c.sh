#!/usr/bin/env bash
# Session 37, call C (~560 s, one H200): engine TTFT, FP8 weights, FP8 cache (K and V under
# one scale, f16 V tiles in prefill) vs bf16 cache, 32k / 64k prompts alone, 2 rounds (s34,
# K only: 1.023 / 1.028).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
for kv in fp8 bf16; do
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 275 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --kv-cache-dtype $kv --lengths 32768,65536 --buckets 8192 \
  --decode-batches '' --profile-steps 0 --decode-tokens 2 --alone-rounds 2 --max-num-seqs 4 \
  --out $OUT/results --tag=-s37-kv-$kv 2>&1 | grep -v "^compiling\|it/s\]" | tail -8
done
