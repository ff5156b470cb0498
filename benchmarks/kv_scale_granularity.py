"""What the FP8 cache's scale granularity costs in accuracy (CPU, pure JAX; no kernels).

    python -m benchmarks.kv_scale_granularity

The FP8 prefill spends 3-5 points of its time on K's per-key scales and 8-11 on converting V
(benchmarks/NOTES-fp8-kv.md, session 30). With one scale per KV tile (128 keys of a head)
both would fold into per-row factors, but a tile's rows would share one range. This measures
that trade on synthetic K/V with the structure that motivates per-token scales: row norms
spread log-normally (``spread``: the sigma of log norm), one attention-sink row 50x the
median, and a few outlier channels 10x the rest; the largest value is scaled to 1,000. One
head, D=128, 8,192 keys, 64 queries whose largest |logit| is ``sharpness``: random
directions, or each along one random key (a retrieving head's). Random queries make the
logits' quantisation error large next to the logits themselves (|q||k| far above q.k), so
their absolute errors overstate a real head's; the columns compare with each other. For each
granularity (per token, as the cache stores today; per 32-token page; per 128-token tile;
one scale for the whole head; per tile with P rounded to e4m3 too, as FA3's FP8 PV takes
it) it reports the output's relative L2 error and the largest lse error against the
unquantised f32 attention.

A second table takes K as Llama 4's RoPE layers hand it to the cache: after ``use_qk_norm``
(each row divided by its RMS, no weight), so no element exceeds sqrt(D). It compares K's
per-token scale with one fixed scale for every row (``STATIC_K``: the rows times 16 or 1
before the e4m3 rounding), which would free the prefill kernel from K's per-key scales; V
keeps its per-token scale in every column.
Results: benchmarks/results/kv-scale-granularity-<date>.json/.md.
"""

from __future__ import annotations

import datetime
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import kv_quant

from benchmarks.common import write_report

L, D, NQ = 8192, 128, 64
# column -> (rows per scale, P's factor before its e4m3 rounding; None: P stays f32)
COLUMNS = {"token": (1, None), "page 32": (32, None), "tile 128": (128, None),
           "head": (L, None), "tile 128, P e4m3": (128, 1.0),
           "tile 128, P e4m3 x256": (128, 256.0)}
# column of the qk-normed table -> K's fixed factor before the e4m3 rounding (None: per token)
STATIC_K = {"token": None, "static x16": 16.0, "static x1": 1.0}
SPREADS = (0.0, 1.0, 2.0)
SHARPNESS = (5.0, 30.0)


def rows(key, spread):
    """[L, D] f32: Gaussian rows with log-normal norms, a sink row and outlier channels."""
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (L, D), jnp.float32)
    x = x * jnp.exp(spread * jax.random.normal(kn, (L, 1)))
    x = x.at[0].multiply(50.0)  # an attention sink
    x = x.at[:, :4].multiply(10.0)  # outlier channels
    return x * (1000.0 / jnp.abs(x).max())  # well inside the cache's range (|x| <= 65408)


def quantize_blocks(x, block):
    """x [L, D] through the cache's e4m3 rounding with one scale per ``block`` rows (the
    largest of the block's per-row scales, clipped to the cache's range)."""
    _, s = kv_quant.quantize(x)
    s = jnp.repeat(s.reshape(-1, block).max(axis=1), block)
    x8 = jnp.clip(x / s[:, None], -kv_quant.FP8_MAX, kv_quant.FP8_MAX).astype(kv_quant.FP8)
    return kv_quant.dequantize(x8, s)


def attend(q, k, v, p_factor=None):
    """Softmax attention in f32. ``p_factor``: P (over the row's max, in [0, 1]) rounded to
    e4m3 after scaling by it, as an FP8 PV wgmma would take it (a factor of 256 folds into
    the exponent for free and keeps P's small values off e4m3's subnormals); the row sum
    stays f32's, as the kernel's l does."""
    logits = q @ k.T
    m = logits.max(axis=1, keepdims=True)
    p = jnp.exp(logits - m)
    lse = jnp.log(p.sum(axis=1)) + m[:, 0]
    if p_factor is not None:
        p8 = (p * p_factor).astype(kv_quant.FP8).astype(jnp.float32) / p_factor
        return (p8 @ v) / p.sum(axis=1, keepdims=True), lse
    return (p @ v) / p.sum(axis=1, keepdims=True), lse


def _case(key, spread, sharpness, aligned, qk_norm=False):
    """(q, k, v, out, lse): synthetic rows (:func:`rows`; ``qk_norm``: K's rows then over
    their RMS, as Llama 4's RoPE layers normalise K), queries and their f32 attention.
    ``aligned``: each query points along one random key (plus as much noise), as a
    retrieving head's does; else the queries are random directions."""
    kq, kk, kv, ki = jax.random.split(key, 4)
    k, v = rows(kk, spread), rows(kv, spread)
    if qk_norm:
        k = k * jax.lax.rsqrt(jnp.mean(k * k, axis=1, keepdims=True) + 1e-5)
    q = jax.random.normal(kq, (NQ, D), jnp.float32)
    if aligned:
        target = k[jax.random.randint(ki, (NQ,), 0, L)]
        norm = (np.sqrt(D) if qk_norm  # K's norm without the rsqrt's eps
                else jnp.linalg.norm(target, axis=1, keepdims=True))
        q = q / jnp.linalg.norm(q, axis=1, keepdims=True) + target / norm
    q = q * sharpness / jnp.abs(q @ k.T).max(axis=1, keepdims=True)
    return (q, k, v, *attend(q, k, v))


def _errors(got, out, lse):
    """(output relative L2 error, largest lse error) of ``got`` = (out, lse)."""
    o, l = got
    return jnp.linalg.norm(o - out) / jnp.linalg.norm(out), jnp.abs(l - lse).max()


@functools.partial(jax.jit, static_argnames="aligned")
def errors(key, spread, sharpness, aligned):
    """Each :data:`COLUMNS` granularity's errors against f32 attention."""
    q, k, v, out, lse = _case(key, spread, sharpness, aligned)
    return {name: _errors(attend(q, quantize_blocks(k, block), quantize_blocks(v, block),
                                 p_factor), out, lse)
            for name, (block, p_factor) in COLUMNS.items()}


def quantize_static(x, factor):
    """x through e4m3 at one fixed scale (1 / ``factor``) for every row, saturating."""
    x8 = jnp.clip(x * factor, -kv_quant.FP8_MAX, kv_quant.FP8_MAX).astype(kv_quant.FP8)
    return x8.astype(jnp.float32) / factor


@functools.partial(jax.jit, static_argnames="aligned")
def qk_normed_errors(key, spread, sharpness, aligned):
    """K as after Llama 4's qk norm, V per token: each :data:`STATIC_K` column's errors
    against f32 attention, and K's largest value."""
    q, k, v, out, lse = _case(key, spread, sharpness, aligned, qk_norm=True)
    v8 = quantize_blocks(v, 1)
    return {name: _errors(attend(q, quantize_blocks(k, 1) if factor is None
                                 else quantize_static(k, factor), v8), out, lse)
            for name, factor in STATIC_K.items()}, jnp.abs(k).max()


def _sweep(fn):
    """One row per (queries, norm spread, max logit) of ``fn``'s per-column errors."""
    out = []
    for aligned, spread, sharp in itertools.product((True, False), SPREADS, SHARPNESS):
        e, extra = fn(jax.random.key(0), spread, sharp, aligned)
        out.append(dict(queries="along a key" if aligned else "random", spread=spread,
                        sharpness=sharp, **extra, **{
            name: dict(rel_l2=float(r), lse_max=float(m)) for name, (r, m) in e.items()}))
    return out


def _table(rows_, names, head, extra=()):
    """Markdown lines: ``head`` columns, ``extra`` (key, header, format) ones, then a
    'relative L2 / largest lse' cell per name."""
    lines = ["| " + " | ".join(head + [h for _, h, _ in extra] + names) + " |",
             "|" + "---|" * (len(head) + len(extra) + len(names))]
    for r in rows_:
        lines.append(f"| {r['queries']} | {r['spread']} | {r['sharpness']:.0f} | " + "".join(
            f"{r[key]:{fmt}} | " for key, _, fmt in extra) + " | ".join(
            f"{r[n]['rel_l2']:.2e} / {r[n]['lse_max']:.2e}" for n in names) + " |")
    return lines


def main():
    def qk_normed(*case):
        e, k_max = qk_normed_errors(*case)
        return e, dict(k_max=float(k_max))

    res = dict(date=datetime.date.today().isoformat(),
               rows=_sweep(lambda *case: (errors(*case), {})), qk_normed=_sweep(qk_normed))
    lines = ["FP8 K/V scale granularity: output relative L2 error / largest lse error against "
             f"f32 attention (synthetic K/V, one head, D={D}, {L} keys, {NQ} queries; "
             f"{res['date']})", ""]
    lines += _table(res["rows"], list(COLUMNS),
                    ["queries", "norm spread (sigma of log)", "max logit"])
    lines += ["", "K after Llama 4's qk norm (rows over their RMS): K's per-token scale against "
              "one fixed scale for all rows (V per token throughout); output relative L2 error "
              "/ largest lse error against f32 attention", ""]
    lines += _table(res["qk_normed"], list(STATIC_K),
                    ["queries", "norm spread before the norm", "max logit"],
                    extra=[("k_max", "largest K", ".1f")])
    write_report(f"kv-scale-granularity-{res['date']}", res, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
