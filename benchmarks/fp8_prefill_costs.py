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
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

import jaxattn
from jaxattn import kernels, planner
from jaxattn.kernels import common, prefill

from benchmarks.common import gpu_ms, mode_lengths, write_report
from benchmarks.fp8_kv import CHUNK, D, HKV, HQ, PAGE, _cache, _flops

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
    """Column name -> (jitted prefill, its arguments): one sequence of ``length`` tokens."""
    chunk = CHUNK if mode == "chunked" else None
    (k, v), (k8, v8, ks, vs), table = _cache(1, length, seed=1)
    q = jax.random.normal(jax.random.key(8), (length, HQ, D), jnp.bfloat16)
    cu, kv = np.array([0, length], np.int32), np.array([length], np.int32)
    bounds = jaxattn.Bounds(max_num_seqs=1, max_num_batched_tokens=length, max_model_len=length,
                            page_size=PAGE, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                            chunk_size=chunk, block_kv=128)
    plan = jax.jit(lambda: planner.plan(bounds, cu, kv, np.int32(1), chunk_size=chunk))()
    fns = {}
    for name, (fp8, _) in COLUMNS.items():
        scales = dict(k_scale=ks, v_scale=vs) if fp8 else {}
        config = prefill.pick_config(bounds, q.dtype, k8.dtype if fp8 else None)
        # A jit of its own per column, so each traces under its own helpers.
        f = jax.jit(lambda q, k, v, pt, plan, sc=scales, c=config: kernels.ragged_paged_attention(
            q, k, v, pt, plan, bounds=bounds, scale=D ** -0.5, config=c, **sc)[0])
        fns[name] = (f, (q, *((k8, v8) if fp8 else (k, v)), table, plan))
    return fns


def bench(mode, length) -> dict:
    fns = columns(mode, length)
    best = {name: float("inf") for name in fns}
    for _ in range(3):
        for name, (f, args) in fns.items():
            with _swapped(COLUMNS[name][1]):
                best[name] = min(best[name], gpu_ms(f, *args))
    flops = _flops(mode, length)
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
    res = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
               jax=jax.__version__, rows=[])
    for case in mode_lengths(args.cases) if args.cases else CASES:
        res["rows"].append(bench(*case))
        print(res["rows"][-1], flush=True)
    write_report(f"fp8-prefill-costs-{res['date']}" + (f"-{args.tag}" if args.tag else ""),
                 res, markdown(res))


if __name__ == "__main__":
    main()
