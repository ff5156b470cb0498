#!/usr/bin/env bash
# Session 40, call C (~560 s, one H200, needs_h200): batch 1 profiled (launches by layer kind,
# Mosaic count, the host's Thunks::Prepare / Initialize), --route-in-norm alone and with
# --static-o-scale; step HLO dumped.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
for opts in "--route-in-norm --static-o-scale"; do
tag=$(echo "$opts" | sed 's/--route-in-norm/-route/; s/ --static-o-scale/-static/')
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 275 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype bf16 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1 --decode-context 8192 --decode-tokens 16 --profile-steps 2 \
  --dump-hlo /tmp/hlo$tag --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model $opts \
  --out $OUT/results --tag=-s40-sources$tag 2>&1 | grep -v "it/s\]" | grep "batch decode\|warm-up\|error\|Error\|profile\|layer kind\| <- \|Thunks\|mosaic"
done
