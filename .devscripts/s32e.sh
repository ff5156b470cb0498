#!/usr/bin/env bash
# The FP8 cache written by the q/k rows kernel: its GPU tests (~60 s), then the engine's
# decode with an FP8 cache (s32d.sh, ~140 s).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 100 python3 -m pytest -q -m gpu tests/kernels/test_qk_rows.py -k "scout_shapes or fp8_cache_decode" \
  tests/models/llama4/test_llama4_gpu.py \
  2>&1 | tail -15 | tee $OUT/results/qk-rows-fp8-cache-gpu-tests-s32.log
TAG_SUFFIX=-qk-kernel bash .devscripts/s32d.sh fp8
