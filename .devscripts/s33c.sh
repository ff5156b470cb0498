#!/usr/bin/env bash
# Diagnosis: the toy FP8-cache steps with XLA's writes, then the kernel's, each with a
# timeout and Python's stack dumped on it (faulthandler); then the engine decode (longer).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
for m in xla kernel; do
  timeout -s INT 100 python3 -X faulthandler .devscripts/diag_fp8_step.py $m 2>&1 | grep -v "^  File.*site-packages" | tail -25
done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 400 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype fp8 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1,8 --decode-context 8192 --decode-tokens 64 --profile-steps 0 \
  --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model \
  --out $OUT/results --tag=-s33-decode-kv-fp8-qk-kernel 2>&1 | grep -v "it/s\]" | tail -30
