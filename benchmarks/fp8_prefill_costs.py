"""Where the FP8 cache's prefill spends its extra time: timing-only ablations, one GPU run.

    python -m benchmarks.fp8_prefill_costs                          # causal 8k, 16k, 32k
    python -m benchmarks.fp8_prefill_costs --cases causal:8192,chunked:131072

The engine's FP8 prefill (``S = Q8 K8^T`` on the fp8 K tile, V dequantised to bf16 by the
producer warpgroup) does three things the bf16 kernel does not: it multiplies S's columns by
K's per-key scales, scales each query row by its own e4m3 scale, and converts V. Each
column here removes some of them by swapping the helper in ``kernels.common`` that does it
for a no-op while that column is traced and timed, so **its outputs are wrong by design**:
the columns measure what each piece costs, nothing else. Same cache and plan as
``benchmarks.fp8_kv`` (Scout's heads, 32-token shuffled pages); interleaved, best of three
rounds, CUPTI kernel time. Results: benchmarks/results/fp8-prefill-costs-<date>.json/.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.kernels import common

from benchmarks import fp8_kv
from benchmarks.common import mode_lengths, time_kernels_alone, write_report

CASES = [("causal", 8192), ("causal", 16384), ("causal", 32768)]


def _quantize_rows_unscaled(src, dst):
    """Q still quantised, but its row scales left out of the softmax (a constant instead)."""
    _HELPERS["quantize_rows"](src, dst)
    return 1.0


def _dequantize_nothing(src8, scale, dst, vector=2):
    """V's bf16 tile left as it is (the producer's ring handshakes still run)."""
    plgpu.commit_smem()
    return dst


_HELPERS = {n: getattr(common, n) for n in ("column_scales", "quantize_rows", "dequantize_tile")}
_NO_K_SCALES = dict(column_scales=lambda scale, shape: 1.0)
_NO_Q_SCALES = dict(quantize_rows=_quantize_rows_unscaled)
_NO_V_CONVERSION = dict(dequantize_tile=_dequantize_nothing)

# column -> (FP8 cache?, helpers swapped out)
COLUMNS = {
    "bf16": (False, {}),
    "fp8": (True, {}),
    "no K scales": (True, _NO_K_SCALES),
    "no Q scales": (True, _NO_Q_SCALES),
    "no K, Q scales": (True, {**_NO_K_SCALES, **_NO_Q_SCALES}),
    "no V conversion": (True, _NO_V_CONVERSION),
    "none of them": (True, {**_NO_K_SCALES, **_NO_Q_SCALES, **_NO_V_CONVERSION}),
}


@contextlib.contextmanager
def _swapped(helpers: dict):
    """``kernels.common``'s helpers replaced while a column is traced or called."""
    for name, fn in helpers.items():
        setattr(common, name, fn)
    try:
        yield
    finally:
        for name, fn in _HELPERS.items():
            setattr(common, name, fn)


def columns(mode, length) -> dict:
    """Column name -> (jitted prefill, its arguments): one sequence of ``length`` tokens, each
    column a jit of its own, so each traces under its own helpers."""
    return fp8_kv.prefill_fns(mode, length, {n: (fp8, {}) for n, (fp8, _) in COLUMNS.items()})


def bench(mode, length) -> dict:
    best = fp8_kv._interleaved(columns(mode, length),
                               around=lambda name: _swapped(COLUMNS[name][1]))
    flops = fp8_kv._flops(mode, length)
    return dict(mode=mode, length=length,
                **{f"{n}_ms": ms for n, ms in best.items()},
                **{f"{n}_tflops": flops / ms / 1e9 for n, ms in best.items()},
                **{f"{n}_over_bf16": ms / best["bf16"] for n, ms in best.items()})


def markdown(res) -> str:
    names = list(COLUMNS)
    lines = [f"FP8 prefill, timing-only ablations ({res['device']}, jax {res['jax']}, "
             f"{res['date']}): ms (useful TFLOP/s, time / bf16). Columns past `fp8` leave "
             "pieces of the FP8 form out, so their outputs are wrong by design.", "",
             "| mode, length | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in res["rows"]:
        lines.append(f"| {r['mode']} {r['length']} | " + " | ".join(
            f"{r[n + '_ms']:.3f} ({r[n + '_tflops']:.0f}, {r[n + '_over_bf16']:.3f})"
            for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=None, help="mode:length,... (default: "
                    + ",".join(f"{m}:{n}" for m, n in CASES) + ")")
    ap.add_argument("--tag", default="", help="results/fp8-prefill-costs-<date>-TAG.*")
    args = ap.parse_args(argv)
    time_kernels_alone()
    res = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
               jax=jax.__version__, rows=[])
    for case in mode_lengths(args.cases) if args.cases else CASES:
        res["rows"].append(bench(*case))
        print(res["rows"][-1], flush=True)
    write_report(f"fp8-prefill-costs-{res['date']}" + (f"-{args.tag}" if args.tag else ""),
                 res, markdown(res))


if __name__ == "__main__":
    main()
