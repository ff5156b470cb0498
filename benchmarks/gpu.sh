#!/usr/bin/env bash
# The one GPU entry point (`make gpu`, or through the device tool): installs the
# project offline, runs the GPU tests (pytest -m gpu) and the benchmarks, and
# writes JSON/markdown/PNG into benchmarks/results/ (and $OUT when set).
#   bash benchmarks/gpu.sh [tests|prefill|profile|decode|model|serving|sweep|soak|fp8|sampling|all|multigpu|decode-host|fp8-decode|decode-kernels|fp8-costs] ...
# (not part of all: multigpu and decode-host need several GPUs; fp8-decode and decode-kernels
# repeat parts of it for the FP8 decode work; fp8-costs is a diagnostic)
set -uo pipefail
cd "$(dirname "$0")/.."
# Steps run under `timeout`: a killed Python loses whatever its block-buffered stdout held.
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels the GPU image lacks (fastapi, uvicorn, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
started=$(mktemp)  # files newer than this are this run's results
status=0
for what in "${@:-all}"; do
  case $what in
    # test_fuzz_api holds no GPU tests and needs schemathesis, which the GPU image lacks.
    tests|all) python3 -m pytest -m gpu -q -p no:cacheprovider tests --junitxml="$RESULTS/gpu-tests.xml" \
                 --ignore=tests/serve/test_fuzz_api.py \
                 || status=1 ;;&
    prefill|all) [ -f benchmarks/prefill.py ] && { python3 -m benchmarks.prefill || status=1; } ;;&
    profile|all) python3 -m benchmarks.profile_attention || status=1 ;;&
    fp8|all) python3 -m benchmarks.fp8_kv || status=1 ;;&
    decode|all) [ -f benchmarks/decode.py ] && { python3 -m benchmarks.decode || status=1; } ;;&
    decode|all) python3 -m benchmarks.decode_variants || status=1 ;;&
    model|all) [ -f benchmarks/model.py ] && { python3 -m benchmarks.model || status=1; } ;;&
    serving|all) [ -f benchmarks/serving.py ] && { python3 -m benchmarks.serving || status=1; } ;;&
    sweep|all) [ -f benchmarks/length_sweep.py ] && { python3 -m benchmarks.length_sweep || status=1; } ;;&
    soak|all) [ -f benchmarks/soak.py ] && { python3 -m benchmarks.soak || status=1; } ;;&
    fp8|all) python3 -m benchmarks.fp8_matmul || status=1 ;;&
    fp8|all) python3 -m benchmarks.fp8_rows || status=1 ;;&
    sampling|all) python3 -m benchmarks.sampling || status=1 ;;&
    multigpu) python3 -m benchmarks.multigpu || status=1 ;;&
    # All of Scout with FP8 weights on one H200, decode at 8k (README, "FP8 weights"), after
    # the GPU tests of the decode step's kernels (the row kernels; the by-row experts with
    # the shared expert; the dense projections; the q/k rows kernel) and the row kernels' benchmark; ~9 minutes
    # in all. (All the FP8 matmuls' GPU tests: tests/kernels/test_fp8.py.)
    fp8-decode)
      timeout 360 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_fp8_rows.py \
        tests/kernels/test_fp8.py tests/kernels/test_qk_rows.py \
        -k "kernels_on_gpu or shared_expert_on_gpu or dense_fp8_on_gpu or kernel_on_gpu" \
        2>&1 | tee "$RESULTS/fp8-decode-gpu-tests.log" || status=1
      python3 -m benchmarks.fp8_rows || status=1
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 420 python3 -m benchmarks.multigpu \
        --quantization fp8 --fp8-attention --lengths 8192 --skip-alone --buckets 16,8192 \
        --decode-batches 1,8 --max-num-seqs 8 --profile-steps 2 --tag=-fp8-decode \
        --dump-hlo /tmp/jaxattn-hlo-dump \
        || status=1 ;;&
    # The decode step's small kernels on their own (~7 minutes): the GPU tests of the decode
    # attention kernels (bf16 and FP8 cache) and of the FP8 row kernels, then their
    # benchmarks (the decode layer with its GPU time against cuDNN's).
    decode-kernels)
      timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_decode_gpu.py \
        tests/kernels/test_fp8_rows.py tests/kernels/test_fp8_kv_gpu.py -k "not q8_k8" 2>&1 \
        | tee "$RESULTS/decode-kernels-gpu-tests.log" || status=1
      python3 -m benchmarks.fp8_rows || status=1
      python3 -m benchmarks.decode --quick --profile || status=1 ;;&
    # What each piece of the FP8 cache's prefill costs (timing-only ablations, wrong outputs).
    fp8-costs) python3 -m benchmarks.fp8_prefill_costs || status=1 ;;&
    # The step's command-buffer settings (benchmarks/NOTES-model.md) on a 12-layer slice on all
    # GPUs, ~100 s each, each with a profiled batch-1 step: the engine's default (XLA's BFC
    # allocator, the step's addresses kept still by the step), VMM with SKIP_PROFILED and the
    # collectives inside the graphs, and VMM with only the temp buffer fixed.
    decode-host)
      slice="--layers 12 --lengths 8192 --skip-alone --decode-batches 1,8 --max-num-seqs 8 --buckets 16,8192"
      for v in default vmm vmm-skip-temp; do
        env=()
        case $v in
          vmm) env+=(XLA_PYTHON_CLIENT_ALLOCATOR=vmm) ;;
          vmm-skip-temp) env+=(XLA_PYTHON_CLIENT_ALLOCATOR=vmm JAXATTN_COMMAND_BUFFER_UPDATE=SKIP_TEMP) ;;
        esac
        env "${env[@]}" timeout 140 python3 -m benchmarks.multigpu $slice --tag="-decode-host-$v" \
          || status=1
      done ;;&
    *) ;;
  esac
done
# Only this run's files go to $OUT (the device tool brings back a handful of files).
[ -n "${OUT:-}" ] && find "$RESULTS" -type f -newer "$started" -exec cp {} "$OUT"/ \;
exit $status
