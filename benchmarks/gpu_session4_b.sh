#!/bin/bash
# Session 4, call 3 (x2): the engine's new default (VMM + SKIP_TEMP + staged batch input) on the
# 12-layer slice, profiled; then which allocations still move (XLA's command-buffer log).
bash benchmarks/gpu.sh install-only >/dev/null 2>&1; export PYTHONPATH=/tmp/site
touch /tmp/mark
slice="--layers 12 --lengths 8192 --skip-alone --decode-batches 1,8 --max-num-seqs 8 --buckets 16,8192"
timeout 130 python3 -m benchmarks.multigpu $slice --tag=-decode-host-staged > $OUT/staged.log 2>&1
grep -E "KV cache|ms/step|profile" $OUT/staged.log | cut -c1-300
TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0 \
  timeout 110 python3 -m benchmarks.multigpu --layers 12 --lengths 8192 --skip-alone --decode-batches 1 --max-num-seqs 8 --buckets 16,8192 --decode-tokens 6 --profile-steps 0 --tag=-vlog > $OUT/vlog.full 2>&1
grep "updated_allocs" $OUT/vlog.full | sed 's/^.*num_commands/num_commands/' | sort | uniq -c | sort -rn | head -30 > $OUT/vlog-updates.txt
grep -c "Execute command buffer" $OUT/vlog.full >> $OUT/vlog-updates.txt
grep "updated_allocs" $OUT/vlog.full | tail -40 | cut -c1-400 >> $OUT/vlog-updates.txt
rm $OUT/vlog.full
cat $OUT/vlog-updates.txt | head -30
find benchmarks/results -newer /tmp/mark -type f -exec cp {} $OUT/ \;
