#!/usr/bin/env bash
# Session 40, call B (~560 s, one H200, needs_h200): full Scout FP8 batch-1/8 decode, session
# 33's command, the same run: as it is, then with --route-in-norm --static-o-scale (the
# routing in the norm's kernel, and the attention's FP8 rows from the decode kernels: 144
# launches a step fewer, 96 of them Mosaic).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
for opts in "" "--route-in-norm --static-o-scale"; do
tag=$(echo "$opts" | sed 's/--route-in-norm/-route/; s/ --static-o-scale/-static/')
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 270 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype bf16 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1,8 --decode-context 8192 --decode-tokens 64 --profile-steps 0 \
  --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model $opts \
  --out $OUT/results --tag=-s40-decode$tag 2>&1 | grep -v "it/s\]" | grep "batch decode\|warm-up\|error\|Error"
done
