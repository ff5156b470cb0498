#!/usr/bin/env bash
# Session 31, call C: full-size Scout, FP8 weights, one H200, through the engine: the bf16 KV
# cache against the FP8 one (issue 21's "prefill and decode speed with the FP8 cache within
# 5% of bf16" where users meet it), each prompt alone in 3 rounds; one bucket (8192) keeps
# the warm-up to one compile of the step per run.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
for kv in bf16 fp8; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 178 python3 -m benchmarks.multigpu -tp 1 \
    --quantization fp8 --kv-cache-dtype $kv --lengths 32768,131072 --buckets 8192 \
    --decode-batches '' --profile-steps 0 --decode-tokens 2 --alone-rounds 2 \
    --out $OUT/results --tag=-s31-kv-$kv 2>&1 | grep -v "^compiling\|it/s\]" | tail -12
done
