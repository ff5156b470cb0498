#!/bin/bash
# Session 4, call 6 (x2, two single-GPU jobs side by side): the FP8 prefill with S = Q8 K8^T
# (GPU tests: exactness of the dequantising path, the default against the reference over
# quantised queries, the 128k needle; the engine's decode-only bucket), and its speed.
bash benchmarks/gpu.sh install-only >/dev/null 2>&1; export PYTHONPATH=/tmp/site
touch /tmp/mark
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider \
  tests/kernels/test_fp8_kv_gpu.py > $OUT/test-fp8-gpu.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 330 python3 -m benchmarks.fp8_kv --quick > $OUT/fp8kv.log 2>&1
wait
tail -30 $OUT/test-fp8-gpu.log | grep -vE "^\s*$" | tail -25
grep -v "^{" $OUT/fp8kv.log | tail -22
find benchmarks/results -newer /tmp/mark -type f -exec cp {} $OUT/ \;
