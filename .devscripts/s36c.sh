#!/usr/bin/env bash
# Session 36, calls C and D (~300 s each; `s36c.sh bf16`, `s36c.sh fp8`): engine TTFT FP8 / bf16 cache with V under one scale too (s34, K only: 1.023 / 1.028 at 32k / 64k),
# one H200, through the engine, prompts alone in 2 rounds. A bf16 cache holds 120,736 tokens
# beside the FP8 weights, so 65,536 is the longest prompt both caches serve. One bucket.
set -uo pipefail
kv=${1:?bf16 or fp8}
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 270 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --kv-cache-dtype $kv --lengths 32768,65536 --buckets 8192 \
  --decode-batches '' --profile-steps 0 --decode-tokens 2 --alone-rounds 2 --max-num-seqs 4 \
  --out $OUT/results --tag=-s36-kv-$kv-fixed-v 2>&1 | grep -v "^compiling\|it/s\]" | tail -14
