"""The decode combine kernel alone: its tunings (``decode_combine.CombineConfig``) side by side.

    python -m benchmarks.decode_combine            # on the GPU
    python -m benchmarks.decode_combine --tag s19  # results/decode-combine-<date>-s19.*

At 1 x 128k the combine took 9.5 µs of the layer's 138.4 against cuDNN's 3.1 µs reduction
(results/decode-2026-12-02--s19.md): 16 pieces per (item, KV head) parent, merged one after
another by one warpgroup. Per case (Scout's 40 / 8 heads, D=128, the planner's real split
structure at each batch x context, random pieces) every variant's GPU time (CUPTI, best of
three interleaved rounds) and the largest difference of its merged rows from the default's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.common import gpu_ms, time_kernels_alone, variants_table, write_report
from benchmarks.decode import HQ, HKV, D, bounds_for
from jaxattn import planner
from jaxattn.kernels import common, decode, decode_combine, decode_schedule

CASES = [(1, 131072), (1, 32768), (2, 65536), (8, 32768), (32, 8192), (256, 2048)]
C = decode_combine.CombineConfig
VARIANTS = {
    "default": C(),
    "1 warpgroup, exact exp (session 18's, with one copy per piece)": C(
        warpgroups=1, approx_math=False),
    "1 warpgroup": C(warpgroups=1),
    "2 warpgroups from 2 pieces": C(share_from=2),
    "32 columns (widened to 64 at G = 5)": C(cols=32),
}


def bench_case(batch, ctx) -> dict:
    bounds = bounds_for(batch, 16)
    t = 256
    cu = np.minimum(np.arange(t + 1), batch).astype(np.int32)
    kv = np.where(np.arange(t) < batch, ctx, 0).astype(np.int32)
    plan = planner.plan(bounds, cu, kv, np.int32(batch))
    md = decode_schedule.decode_metadata(plan.decode, bounds=bounds, num_tokens=t)
    n_part = md.cmeta.shape[0]
    keys = jax.random.split(jax.random.key(0), 2)
    rows = jax.random.normal(keys[0], (n_part, decode.ROWS, D), jnp.float32)
    lse = 3 * jax.random.normal(keys[1], (n_part, decode.ROWS), jnp.float32)
    merged = np.asarray(md.tok_src) <= -2  # [T, Hkv]: (token, KV head) rows a parent writes

    def fn(config):
        def f(rows, lse, cmeta, parents):
            out = jax.new_ref(lax.empty((t, HKV, HQ // HKV, D), jnp.bfloat16))
            lse_m = decode_combine.combine_pieces(
                cmeta, parents, decode_combine.Pieces(rows, lse), out, g=HQ // HKV,
                workers=bounds.num_workers, out_dtype=jnp.bfloat16, interpret=False,
                config=config)
            return out[...], lse_m
        return jax.jit(f)

    args = (rows, lse, md.cmeta, md.parents)
    fns, outs, errors = {}, {}, {}
    for name, config in VARIANTS.items():
        try:
            fns[name] = fn(config)
            outs[name] = np.asarray(fns[name](*args)[0], np.float32)[merged]
        except Exception as e:  # noqa: BLE001 - a variant that does not build is a result too
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            fns.pop(name, None)
    best = {name: float("inf") for name in fns}
    for _ in range(3):
        for name, f in fns.items():
            best[name] = min(best[name], gpu_ms(f, *args))
    base = outs.get("default")
    return dict(batch=batch, ctx=ctx, parents=int(md.parents[0]),
                pieces=int(np.asarray(md.cmeta)[:, 0].sum()),
                us={n: 1e3 * v for n, v in best.items()},
                max_abs_diff={n: float(np.abs(o - base).max(initial=0)) for n, o in outs.items()}
                if base is not None else {}, errors=errors)


def markdown(res) -> str:
    rows = res["rows"]
    cell = lambda r, n: (f"{r['us'][n]:.1f} ({r['max_abs_diff'].get(n, float('nan')):.2g})"
                         if n in r["us"] else None)
    columns = [f"{r['batch']}x{r['ctx']} ({r['parents']} parents, {r['pieces']} pieces)"
               for r in rows]
    return "\n".join([
        f"# Decode combine kernel, {res['device']}, {res['date']}", "",
        "GPU µs per call (CUPTI, best of 3 interleaved rounds); max abs difference of the "
        "merged rows from the default's in brackets.", "",
        *variants_table(res["variants"], columns, rows, cell)]) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    time_kernels_alone()
    res = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
               sms=common.num_sms(),
               variants={n: dataclasses.asdict(c) for n, c in VARIANTS.items()}, rows=[])
    for batch, ctx in CASES:
        res["rows"].append(bench_case(batch, ctx))
        print(res["rows"][-1], flush=True)
    stem = f"decode-combine-{res['date']}" + (f"-{args.tag}" if args.tag else "")
    write_report(stem, res, markdown(res))


if __name__ == "__main__":
    main()
