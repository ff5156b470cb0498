#!/usr/bin/env bash
# Session 38, call B (~560 s, one H200): is batch-1 decode's host time (s33 5.1 ms a step, s37
# 8.6) the max_model_len (s37: 24,608 from the profiled prefill) or the machine? The s33
# command twice, back to back: max_model_len 8,256 (s33's), then 24,608; no profile. The
# model compile is cached across the two (--compile-cache), not across sessions.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
for len in 0 24608; do
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 260 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype bf16 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1,8 --decode-context 8192 --decode-tokens 64 --profile-steps 0 \
  --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model --max-model-len $len \
  --out $OUT/results --tag=-s38-host-len$len 2>&1 | grep -v "it/s\]" | grep "batch decode\|warm-up\|error" 
done
