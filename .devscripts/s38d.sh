#!/usr/bin/env bash
# Session 38/39, call D (~560 s, one H200, needs_h200): full Scout FP8 batch-1/8 decode, session
# 33's command (max_model_len 8,256, no profile), without and then with --route-in-norm, back
# to back (the compile cache is shared; the two steps differ). The first run is also
# s38b's first half (host time at max_model_len 8,256 on this machine).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
for route in "" --route-in-norm; do
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 270 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype bf16 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1,8 --decode-context 8192 --decode-tokens 64 --profile-steps 0 \
  --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model $route \
  --out $OUT/results --tag=-s39-decode${route:+-route} 2>&1 | grep -v "it/s\]" | grep "batch decode\|warm-up\|error\|Error" 
done
