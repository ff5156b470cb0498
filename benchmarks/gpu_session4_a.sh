#!/bin/bash
# Session 4, call 2 (x2): command buffers with collectives under VMM + SKIP_TEMP; which
# allocations move; then single-GPU checks (decode-only GPU test, FP8 KV variants).
bash benchmarks/gpu.sh install-only >/dev/null 2>&1; export PYTHONPATH=/tmp/site
touch /tmp/mark
slice="--layers 12 --lengths 8192 --skip-alone --decode-batches 1,8 --max-num-seqs 8 --buckets 16,8192 --kv-cache-memory 8GiB"
base=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION
export XLA_PYTHON_CLIENT_ALLOCATOR=vmm
XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP JAXATTN_COMMAND_BUFFER=$base,COLLECTIVES \
  timeout 130 python3 -m benchmarks.multigpu $slice --tag=-decode-host-vmm-skip-temp-collectives > $OUT/coll.log 2>&1
grep -E "ms/step|profile" $OUT/coll.log
XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP JAXATTN_COMMAND_BUFFER=$base,COLLECTIVES \
  TF_CPP_VMODULE=command_buffer_thunk=3,command_buffer_cmd=2 TF_CPP_MIN_LOG_LEVEL=0 \
  timeout 110 python3 -m benchmarks.multigpu --layers 12 --lengths 8192 --skip-alone --decode-batches 1 --max-num-seqs 8 --buckets 16,8192 --kv-cache-memory 8GiB --decode-tokens 6 --profile-steps 0 --tag=-vlog > $OUT/vlog.full 2>&1
grep -c . $OUT/vlog.full; grep -i "command_buffer" $OUT/vlog.full | sed 's/^.*command_buffer/cb/' | cut -c1-160 | sort | uniq -c | sort -rn | head -40 > $OUT/vlog-summary.txt
tail -c 3000000 $OUT/vlog.full > $OUT/vlog-tail.log; rm $OUT/vlog.full
unset XLA_PYTHON_CLIENT_ALLOCATOR
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_decode_gpu.py -k decode_only > $OUT/test-decode-only.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 280 python3 -m benchmarks.fp8_kv --quick > $OUT/fp8kv.log 2>&1
wait
tail -3 $OUT/test-decode-only.log; tail -25 $OUT/fp8kv.log
find benchmarks/results -newer /tmp/mark -type f -exec cp {} $OUT/ \;
