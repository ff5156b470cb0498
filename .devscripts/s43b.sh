#!/usr/bin/env bash
# Session 43, call B (~560 s, one H200, needs_h200): full Scout FP8 batch-1/8 decode, session
# 33's command, the same run: as it is, then with --swiglu-in-gate-up (the SwiGLU in the gate/up
# launch, the W8A16 down launch: one launch a layer fewer). Only once s43a's GPU tests pass.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
nvidia-smi --query-gpu=name --format=csv,noheader
for opt in --no-swiglu-in-gate-up --swiglu-in-gate-up; do
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 265 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype bf16 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1,8 --decode-context 8192 --decode-tokens 64 --profile-steps 0 \
  --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model $opt \
  --out $OUT/results --tag=-s43-decode${opt#--} 2>&1 | grep -v "it/s\]" | grep "batch decode\|warm-up\|error\|Error"
done
