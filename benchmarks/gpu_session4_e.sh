#!/bin/bash
# Session 4, call 5 (x2): one TP=2 command-buffer variant on the 12-layer slice (collectives
# inside the graphs, addresses profiled stable), then the full 48-layer Scout with the faster
# of it and the engine's default (VMM + SKIP_TEMP, staged batch: 5.07 / 5.84 ms at batch 1 / 8).
bash benchmarks/gpu.sh install-only >/dev/null 2>&1; export PYTHONPATH=/tmp/site
touch /tmp/mark
base=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION
slice="--layers 12 --lengths 8192 --skip-alone --decode-batches 1,8 --max-num-seqs 8 --buckets 16,8192 --profile-steps 0"
XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_PROFILED JAXATTN_COMMAND_BUFFER=$base,COLLECTIVES \
  timeout 110 python3 -m benchmarks.multigpu $slice --tag=-decode-host-staged-profiled-collectives > $OUT/e1.log 2>&1
grep -E "ms/step" $OUT/e1.log
ms=$(python3 -c "
import json,sys
try:
    d=json.load(open('benchmarks/results/multigpu-$(date +%F)-decode-host-staged-profiled-collectives.json'))
    print(d['batch_decode'][0]['ms_per_step'])
except Exception as e: print(99)")
echo "variant batch-1 ms: $ms"
if python3 -c "import sys; sys.exit(0 if $ms < 4.6 else 1)"; then
  export XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_PROFILED JAXATTN_COMMAND_BUFFER=$base,COLLECTIVES
  echo "full run with the variant"
fi
timeout 440 python3 -m benchmarks.multigpu --lengths 8192,131072 --decode-tokens 16 --decode-batches 1,8 --buckets 16,8192 --tag=-x2-bf16-vmm > $OUT/full.log 2>&1
echo rc=$?
grep -vE "^\s*$|compiling|W1130|I1130" $OUT/full.log | tail -30
find benchmarks/results -newer /tmp/mark -type f -exec cp {} $OUT/ \;
