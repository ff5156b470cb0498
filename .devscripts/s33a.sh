#!/usr/bin/env bash
# Next session, call A (~330 s): the FP8 cache written by the q/k rows kernel, checked on the
# H200 (the loosened comparison; the toy model's FP8-cache decode steps vs XLA's writes;
# session 32 ran out of device time in these), then the engine's decode with an FP8 cache
# (full Scout, FP8 weights + attention projections, batch 1 / 8 x 8k; s32d.sh, ~140 s).
# Compare with multigpu-2026-12-04-fp8-attn-s32-decode-kv-{bf16,fp8}.json (7.20 / 14.84 ms
# bf16 cache; 7.84 / 15.30 FP8 cache with XLA's writes).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_qk_rows.py \
  tests/models/llama4/test_llama4_gpu.py -k "scout_shapes or fp8_cache_decode" 2>&1 \
  | tail -30 | tee $OUT/results/qk-rows-fp8-cache-gpu-tests-s33.log
TAG_SUFFIX=-qk-kernel bash .devscripts/s32d.sh fp8
