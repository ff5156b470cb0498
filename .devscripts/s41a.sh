#!/usr/bin/env bash
# Session 41, call A (~250 s, any Hopper): the decode kernel's time at batch 1 over 1-8192
# keys per config (the chunked-local layers' ~8 us a call in the full step, session 40's
# profile), kernel times from a CUPTI trace.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
timeout 230 python3 .devscripts/decode_short.py 2>&1 | grep -v Warn | tail -20
