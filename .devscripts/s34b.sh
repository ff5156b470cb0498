#!/usr/bin/env bash
# Next session (34), calls B and C (~380 s each; KV=bf16 then KV=fp8): TTFT with the fixed K scale (s32: FP8 / bf16 1.033 at 32k, 1.050 at 64k),
# one H200, through the engine, prompts alone in 2 rounds. A bf16 cache holds 120,736 tokens
# beside the FP8 weights, so 65,536 is the longest prompt both caches serve. One bucket.
set -uo pipefail
kv=${1:?bf16 or fp8}
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 330 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --kv-cache-dtype $kv --lengths 32768,65536 --buckets 8192 \
  --decode-batches '' --profile-steps 0 --decode-tokens 2 --alone-rounds 2 --max-num-seqs 4 \
  --out $OUT/results --tag=-s34-kv-$kv 2>&1 | grep -v "^compiling\|it/s\]" | tail -14
