"""Decode kernel configurations side by side in one GPU run: ``DecodeConfig`` variants over
the same bf16 and FP8 caches.

    python -m benchmarks.decode_variants               # on the GPU
    python -m benchmarks.decode_variants --tag s18     # results/decode-variants-<date>-s18.*
    python -m benchmarks.decode_variants --cases 1x40,1x1000 --only bf16   # short, bf16 only

Scout's heads (40 query / 8 KV, D=128), 32-token pages shuffled in the pool (the caches of
:mod:`benchmarks.fp8_kv`), one new token per sequence, at 256 x 2k, 32 x 8k, 8 x 32k and
1 x 128k: one layer's decode attention as the model calls it. Every variant is timed
interleaved with the others (best of three rounds of CUPTI medians) and reported as its time
over the baseline's, the 64-key bf16 kernel (the bf16 default before 2026-12-02), with the
largest difference of its output from the baseline's. The "fp8_fixed" cache holds L2-normed
keys and the values each under one power-of-two scale, the kernel told both (every Llama 4
layer's cache since session 35: its tiles are converted without scales, so the dequantising
warpgroup has about half the work and the best ring may differ). Session 17's runs
(results/decode-blocks-2026-12-02-s17*.json) compared these variants the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import kv_quant, planner
from jaxattn.kernels import decode

from benchmarks import fp8_kv
from benchmarks.common import gpu_ms, time_kernels_alone, variants_table, write_report

CASES = [(256, 2048), (32, 8192), (8, 32768), (1, 131072)]  # (batch, context)
BASELINE = "bf16, 64-key blocks"


def variants() -> dict[str, tuple[str, decode.DecodeConfig]]:
    """name -> (cache: "bf16", "fp8" or "fp8_fixed", config)."""
    bf16, fp8 = decode.default_config(), decode.default_config(fp8=True)
    r = dataclasses.replace
    bf16_tiles = r(fp8, f16_dequant=False)  # K/V dequantised to bf16 (before 2026-12-04)
    return {
        BASELINE: ("bf16", r(bf16, block_kv=64, num_stages=4)),
        "bf16 default": ("bf16", bf16),
        # one token's 5 query rows as the wgmma N (keys as M): 0-1.3% slower than the default
        # at these shapes on the H200 in session 16, 5-13% faster at batch 1 over 1-8k keys
        # on an H100 after session 41's fixed-cost changes (NOTES-decode.md)
        "bf16 narrow tiles": ("bf16", r(bf16, narrow_tiles=True)),
        "FP8 default": ("fp8", fp8),
        # the tiles dequantised in vectors of 2 / 8 values (the default: 4, 4-byte fp8 loads
        # and 8-byte f16 stores; 2 is the wgmma layout: 2-byte loads, 4-byte stores)
        "FP8 default, 2-value vectors": ("fp8", r(fp8, dequant_vector=2)),
        "FP8 default, 8-value vectors": ("fp8", r(fp8, dequant_vector=8)),
        "FP8, f16 tiles, 1-deep ring, 6 stages": ("fp8", r(fp8, dequant_stages=1,
                                                          num_stages=6)),
        "FP8, f16 tiles, two consumers": ("fp8", r(fp8, consumers=2)),
        "FP8, bf16 tiles, 1-deep ring, 6 stages": ("fp8", r(bf16_tiles, dequant_stages=1,
                                                           num_stages=6)),
        "FP8, bf16 tiles, 2-deep ring, 4 stages": ("fp8", bf16_tiles),
        "FP8, bf16 tiles, two consumers": ("fp8", r(bf16_tiles, consumers=2)),
        # one K and one V scale (the engine's cache for Llama 4): the default and the forms
        # a cheaper conversion might favour
        "FP8 fixed K+V, default": ("fp8_fixed", fp8),
        "FP8 fixed K+V, 8-value vectors": ("fp8_fixed", r(fp8, dequant_vector=8)),
        "FP8 fixed K+V, 1-deep ring, 6 stages": ("fp8_fixed", r(fp8, dequant_stages=1,
                                                               num_stages=6)),
        "FP8 fixed K+V, the consumer dequantises": ("fp8_fixed", r(fp8, dequant_warpgroup=False)),
        "FP8 fixed K+V, two consumers": ("fp8_fixed", r(fp8, consumers=2)),
    }


def fixed_scales(k, v) -> tuple[tuple, dict]:
    """The "fp8_fixed" cache over bf16 pages ``k``, ``v``: (its FP8 pools and scales, the
    kernel's ``fixed_k_scale`` / ``fixed_v_scale``)."""
    _, k8, ks = fp8_kv._normed_keys(k)
    v8, vs, v_scale = fp8_kv._fixed_values(v)
    return (k8, v8, ks, vs), dict(fixed_k_scale=kv_quant.normed_k_scale(fp8_kv.D),
                                  fixed_v_scale=v_scale)


def bench_case(batch, ctx, table_of_variants) -> dict:
    bounds = jaxattn.Bounds(max_num_seqs=batch, max_num_batched_tokens=max(batch, 16),
                            max_model_len=131072, page_size=fp8_kv.PAGE, num_q_heads=fp8_kv.HQ,
                            num_kv_heads=fp8_kv.HKV, head_dim=fp8_kv.D, chunk_size=fp8_kv.CHUNK)
    (k, v), (k8, v8, ks, vs), table = fp8_kv._cache(batch, ctx)
    table = jnp.pad(table, ((0, 0), (0, bounds.pages_per_seq - table.shape[1])))
    cu = np.minimum(np.arange(batch + 1), batch).astype(np.int32)
    plan = jax.jit(lambda: planner.plan(bounds, cu, np.full(batch, ctx, np.int32),
                                        np.int32(batch)))()
    q = jax.random.normal(jax.random.key(7), (bounds.max_num_batched_tokens, fp8_kv.HQ,
                                              fp8_kv.D), jnp.bfloat16)
    args = {"bf16": (q, k, v, table, plan.decode), "fp8": (q, k8, v8, table, plan.decode, ks, vs)}
    told = {}
    if any(cache == "fp8_fixed" for cache, _ in table_of_variants.values()):
        (k8f, v8f, ksf, vsf), told["fp8_fixed"] = fixed_scales(k, v)
        args["fp8_fixed"] = (q, k8f, v8f, table, plan.decode, ksf, vsf)
    fns, outs, row = {}, {}, dict(batch=batch, ctx=ctx, errors={})
    for name, (cache, config) in table_of_variants.items():
        fixed = told.get(cache, {})
        f = jax.jit(lambda q, k, v, pt, items, ks=None, vs=None, c=config, fixed=fixed:
                    decode.decode_attention(q, k, v, pt, items, bounds=bounds,
                                            scale=fp8_kv.D ** -0.5, k_scale=ks, v_scale=vs,
                                            config=c, **fixed)[0])
        try:
            outs[name] = np.asarray(f(*args[cache])[:batch], np.float32)
            fns[name] = (f, args[cache])
        except Exception as e:  # noqa: BLE001 - a variant that does not build is a result too
            row["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    best = {name: float("inf") for name in fns}
    for _ in range(3):
        for name, (f, a) in fns.items():
            best[name] = min(best[name], gpu_ms(f, *a))
    base = best[BASELINE]
    row.update(ms=best, over_baseline={n: t / base for n, t in best.items()},
               max_abs_diff={n: float(np.abs(o - outs[BASELINE]).max()) for n, o in outs.items()})
    return row


def markdown(res) -> str:
    rows = res["rows"]
    cell = lambda r, n: (f"{r['over_baseline'][n]:.3f} ({r['max_abs_diff'][n]:.2g})"
                         if n in r["over_baseline"] else None)
    return "\n".join([
        f"# Decode variants, {res['device']}, {res['date']}", "",
        f"Time / {BASELINE} (same run, interleaved); max abs output difference from it.", "",
        *variants_table(res["variants"], [f"{r['batch']}x{r['ctx']}" for r in rows], rows,
                        cell)]) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--cases", default=",".join(f"{b}x{c}" for b, c in CASES),
                    help="batch x context pairs, e.g. 1x40,1x1000,1x8232 (a decode step's "
                         "chunked-local layers read a few keys past 8k)")
    ap.add_argument("--only", default="", help="variants whose name starts with one of these "
                                                "|-separated prefixes (and the baseline)")
    args = ap.parse_args(argv)
    time_kernels_alone()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    prefixes = tuple(args.only.split("|"))
    table = {n: v for n, v in variants().items() if n.startswith(prefixes) or n == BASELINE}
    res = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
               variants={n: [cache, dataclasses.asdict(c)] for n, (cache, c) in table.items()},
               rows=[])
    for batch, ctx in cases:
        res["rows"].append(bench_case(batch, ctx, table))
        print(res["rows"][-1], flush=True)
    stem = f"decode-variants-{res['date']}" + (f"-{args.tag}" if args.tag else "")
    write_report(stem, res, markdown(res))


if __name__ == "__main__":
    main()
