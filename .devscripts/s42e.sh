#!/usr/bin/env bash
# Session 42, call E (~330 s, one H200, needs_h200): full Scout FP8 batch-1/8 decode with
# this tree's kernels (session 33's command); session 40's runs are the prior.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 300 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype bf16 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1,8 --decode-context 8192 --decode-tokens 64 --profile-steps 0 \
  --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model \
  --out $OUT/results --tag=-s42-decode 2>&1 | grep -v "it/s\]" | grep "batch decode\|warm-up\|error\|Error\|roofline"
