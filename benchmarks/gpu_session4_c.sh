#!/bin/bash
# Session 4, call 4: why every command buffer still re-records under VMM + SKIP_TEMP (12-layer
# slice on one GPU, TP=1): XLA's VA-remap and command-buffer logs and the decode module's buffer
# assignment (which allocation moves).
bash benchmarks/gpu.sh install-only >/dev/null 2>&1; export PYTHONPATH=/tmp/site
export CUDA_VISIBLE_DEVICES=0
TF_CPP_VMODULE=command_buffer_thunk=3,gpu_executable_va_remap_allocator=3,gpu_executable_buffer_allocator=3,gpu_executable=2 \
  TF_CPP_MIN_LOG_LEVEL=0 XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_pass_re=NONE" \
  timeout 200 python3 -m benchmarks.multigpu --layers 12 --tensor-parallel-size 1 --lengths 8192 --skip-alone --decode-batches 1 --max-num-seqs 8 --buckets 16,8192 --decode-tokens 6 --profile-steps 0 --tag=-vlog1 > /tmp/v.log 2>&1
echo rc=$?
grep -E "ms/step" /tmp/v.log
grep -iE "va remap|allocation policy|copy-protection|no VMM|remapp" /tmp/v.log | cut -c1-300 | sort | uniq -c | sort -rn | head -20
grep "updated_allocs" /tmp/v.log | sed 's/^.*num_commands/num_commands/' | sort | uniq -c | sort -rn | head -8
ls /tmp/dump | grep -i buffer-assignment | head; 
for f in $(ls /tmp/dump/*jit_jitted*buffer-assignment.txt 2>/dev/null); do echo "== $f $(wc -c < $f)"; grep -E "^allocation [0-9]+:" $f | head -40; done > $OUT/buffer-assignment-allocs.txt
head -c 20000 $OUT/buffer-assignment-allocs.txt | head -100
grep -E "updated_allocs|Updated command|VA remap|allocation" /tmp/v.log | head -3000 > $OUT/vlog1.txt
grep -E "command_buffer_thunk|va_remap|buffer_allocator" /tmp/v.log | grep -v "Execute command buffer" | tail -400 | cut -c1-400 > $OUT/vlog1-tail.txt
