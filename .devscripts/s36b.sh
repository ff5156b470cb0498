#!/usr/bin/env bash
# Session 36, call B (~560 s, one H200): the GPU tests of the f16 and e4m3 PV forms, then: the FP8 prefill over pages in order (the engine's
# layout), V under one scale (fp8_v8_fixed_kv) vs K only (fp8_v8_normed_k) vs bf16 over the
# same normed keys, and P.V as an e4m3 wgmma over V^T pages (fp8_pv_fixed_kv, an experiment:
# 10x the output error of the default in interpret mode). s34: K only 1.141 / 1.071 / 1.024x at causal 8k / 32k / chunked 128k.
# Then, if time is left in the session, s34e.sh-style engine TTFT runs: `s36c.sh bf16`,
# `s36c.sh fp8` (~300 s each).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
timeout 170 python3 -m pytest -q -m gpu tests/kernels/test_fp8_kv_gpu.py -k "f16_pv or fp8_pv" \
  2>&1 | tail -4 | tee $OUT/results/fp8-pv-forms-gpu-tests-s36.log
timeout 380 python3 -m benchmarks.fp8_kv --prefill-only --in-order \
  --columns fp8_v8_normed_k,fp8_v8_fixed_kv,fp8_v8_fixed_kv_f16pv,fp8_pv_fixed_kv --tag s36-fixed-kv-prefill 2>&1 | tail -5
cp benchmarks/results/fp8-kv-*-s36-fixed-kv-prefill.* $OUT/results/ 2>/dev/null
