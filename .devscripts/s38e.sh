#!/usr/bin/env bash
# Session 39+, call E (~560 s, one H200, needs_h200): where the batch-1 step's launches go.
# Session 33's decode command at batch 1 only, profiled (per-layer-kind split of the
# attention kernels, Mosaic launch count, the host's Thunks::Prepare / Initialize and graph
# launch), with the step's HLO dumped so that each XLA kernel names its source lines; once
# without and once with --route-in-norm (48 fewer Mosaic launches: Prepare + Initialize
# should fall by ~0.2 ms a step if they are per Mosaic launch, NOTES-fp8 session 39).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mkdir -p $OUT/results
for route in "" --route-in-norm; do
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s INT 275 python3 -m benchmarks.multigpu -tp 1 \
  --quantization fp8 --fp8-attention --kv-cache-dtype bf16 --lengths 8192 --buckets 16,8192 \
  --decode-batches 1 --decode-context 8192 --decode-tokens 16 --profile-steps 2 \
  --dump-hlo /tmp/hlo$route --skip-alone --max-num-seqs 8 --compile-cache /tmp/jaxcc-model $route \
  --out $OUT/results --tag=-s39-sources${route:+-route} 2>&1 | grep -v "it/s\]" | grep "batch decode\|warm-up\|error\|Error\|profile\|layer kind\| <- "
done
