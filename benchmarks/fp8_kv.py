"""FP8 vs bf16 KV cache: the attention kernels' speed over the same paged cache, one GPU run.

    python -m benchmarks.fp8_kv            # on the GPU (benchmarks/gpu.sh fp8)
    python -m benchmarks.fp8_kv --quick    # two decode and two prefill cases
    python -m benchmarks.fp8_kv --prefill-only  # (or --decode-only)
    python -m benchmarks.fp8_kv --prefill-only --prefill-cases causal:4096,causal:16384
    python -m benchmarks.fp8_kv --prefill-only --tile-order item_major  # every column
    python -m benchmarks.fp8_kv --prefill-only --columns fp8_v8_normed_k,fp8_v8_fixed_kv

Scout's heads (40 query / 8 KV, D=128), 32-token pages shuffled in the pool. Each
case builds one random bf16 cache and its FP8 quantisation (``jaxattn.kv_quant``:
e4m3 values and a float32 scale per token and KV head) and times, interleaved (best of
three rounds each, CUPTI kernel time when available):

* decode (one token per sequence): ``decode.decode_attention``, one layer's attention as
  the model calls it; bandwidth = bytes of the cache it reads (FP8: values + scales) / time;
  FP8 with the engine's default (a warpgroup of its own dequantises each tile; one-token
  tiles take the keys as the wgmma M, ``narrow_tiles``), each cache also in the other tile
  form (FP8's 64-row tiles: its form before 2026-12-02), FP8 with two consumer
  warpgroups on alternate blocks (``consumers=2``), and FP8 over L2-normed keys under one
  power-of-two scale, the kernel told it (``fp8_fixed_k``: no K scale rows copied, K
  converted without them), and with the values under one scale too (``fp8_fixed_kv``: as
  the engine runs every Llama 4 layer since session 35, V converted without scales and
  normalised by ``scale / l``);
* prefill (one fresh sequence, through ``kernels.ragged_paged_attention`` with its plan):
  bf16 at the engine's 128-key tiles, and FP8 in the engine's form (``S = Q8 K8^T`` on the
  fp8 K tile, V dequantised once by the producer warpgroup) with V dequantised in 2-, 4-
  and 8-value vectors (``dequant_vector``: 2-, 4- and 8-byte fp8 loads; the engine's: 8);
  and the engine's form over L2-normed keys stored with one power-of-two scale
  (``fp8_v8_normed_k``: what a Llama 4 RoPE layer's cache holds, the kernel told
  ``fixed_k_scale`` and so copying no K scale rows and skipping S's per-key scaling), and
  with the values under one scale too (``fp8_v8_fixed_kv``: every Llama 4 layer's cache
  since session 35; no V scale rows copied, V's tiles converted without a multiply), also
  with V's tiles and P as f16 (``fp8_v8_fixed_kv_f16pv``: ``PrefillConfig.f16_pv``), and
  (pages in order only) P.V as an e4m3 wgmma over V^T pages of 128 tokens
  (``fp8_pv_fixed_kv``: ``PrefillConfig.fp8_pv``, the prefill kernel alone).
  TFLOP/s count useful FLOPs. (Session 30's column with the query rows quantised from
  16-byte loads took the same time and went with the option: results/fp8-kv-2026-12-04-s30.md.)

The goal (issue 21): FP8 within 5% of bf16, or faster. Results go to
benchmarks/results/fp8-kv-<date>.json/.md (and $OUT).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import kernels, kv_quant, planner
from jaxattn.kernels import decode, prefill, qk_rows

from benchmarks.common import gpu_rounds, mode_lengths, time_kernels_alone, write_report

HQ, HKV, D, PAGE, CHUNK = 40, 8, 128, 32, 8192  # PAGE: the FP8 cache's default (and bf16's here)
DECODE_CASES = [(256, 2048), (32, 8192), (8, 32768), (1, 131072)]  # (batch, context)
PREFILL_CASES = [("causal", 8192), ("causal", 32768), ("chunked", 131072)]
QUICK = dict(decode=[(32, 8192), (1, 131072)], prefill=[("causal", 32768), ("chunked", 131072)])


def _interleaved(fns: dict, rounds=3, around=None) -> dict:
    """Best ms of each callable (name -> (f, args)) over ``rounds`` rounds that visit them
    in turn (drift and clock changes hit all alike); ``around(name)``: a context each call
    runs in."""
    return {k: min(t) for k, t in gpu_rounds(fns, rounds, around=around).items()}


def _cache(batch, ctx, seed=0, in_order=False):
    """A shuffled paged bf16 cache of ``batch`` sequences of ``ctx`` tokens, and its FP8 form;
    ``in_order``: each sequence's pages one after another (as the engine hands out a
    prompt's), which the prefill copies a tile at a time."""
    per_seq = -(-ctx // PAGE)
    n = batch * per_seq
    kk, kv = jax.random.split(jax.random.key(seed))
    k = jax.random.normal(kk, (n, PAGE, HKV, D), jnp.bfloat16)
    v = jax.random.normal(kv, (n, PAGE, HKV, D), jnp.bfloat16)
    table = (np.arange(n) if in_order else np.random.default_rng(seed).permutation(n)
             ).astype(np.int32).reshape(batch, per_seq)
    quantize = jax.jit(kv_quant.quantize_pages)
    (k8, ks), (v8, vs) = quantize(k), quantize(v)
    fp8 = (k8, v8, ks, vs)
    return (k, v), fp8, jnp.asarray(table)


def _fixed_values(v):
    """The bf16 value pages ``v`` under one power-of-two scale, the smallest that keeps them
    all (a weight bound gives a larger one, which the kernels' speed does not see):
    (v8, v_scale, the scale)."""
    scale = kv_quant.power_of_two_scale(float(jnp.abs(v.astype(jnp.float32)).max()))
    return *jax.jit(kv_quant.quantize_pages, static_argnums=1)(v, scale), scale


def _normed_keys(k):
    """Each key row of the bf16 pages ``k`` L2-normed as a Llama 4 RoPE layer norms its keys
    (``qk_rows.l2norm``), and their FP8 form under the one scale such keys take
    (``kv_quant.normed_k_scale``): (k_normed, k8, k_scale)."""
    k_normed = qk_rows.l2norm(k, 1e-5)
    return k_normed, *jax.jit(kv_quant.quantize_pages, static_argnums=1)(
        k_normed, kv_quant.normed_k_scale(D))


def bench_decode(batch, ctx, in_order=False):
    """One decode layer over a bf16 cache and its FP8 forms, interleaved. ``in_order``: the
    sequences' pages one after another (the bf16 default then copies a block in one piece,
    ``DecodeConfig.merge_pages``, as does FP8's under one K and one V scale); adds each FP8
    form in the other way too."""
    bounds = jaxattn.Bounds(max_num_seqs=max(batch, 1), max_num_batched_tokens=max(batch, 16),
                            max_model_len=131072, page_size=PAGE, num_q_heads=HQ,
                            num_kv_heads=HKV, head_dim=D, chunk_size=CHUNK)
    (k, v), (k8, v8, ks, vs), table = _cache(batch, ctx, in_order=in_order)
    table = jnp.pad(table, ((0, 0), (0, bounds.pages_per_seq - table.shape[1])))
    t = bounds.max_num_batched_tokens
    cu = np.minimum(np.arange(batch + 1), batch).astype(np.int32)
    plan = jax.jit(lambda: planner.plan(bounds, cu, np.full(batch, ctx, np.int32),
                                        np.int32(batch)))()
    q = jax.random.normal(jax.random.key(7), (t, HQ, D), jnp.bfloat16)
    def layer_fn(config=None, fixed_k_scale=None, fixed_v_scale=None):
        return jax.jit(lambda q, k, v, pt, items, ks=None, vs=None: decode.decode_attention(
            q, k, v, pt, items, bounds=bounds, scale=D ** -0.5, k_scale=ks, v_scale=vs,
            config=config, fixed_k_scale=fixed_k_scale, fixed_v_scale=fixed_v_scale))

    layer = layer_fn()
    # The default for an FP8 cache dequantises on a warpgroup of its own (the consumer
    # dequantising before each wgmma measured 1.30-1.35x bf16's time against 1.15-1.20x,
    # fp8-kv-2026-12-01-s10-decode.md) and takes one-token tiles with the keys as the wgmma
    # M (narrow_tiles); each cache also in the other tile form (FP8's before 2026-12-02).
    other = {kind: layer_fn(dataclasses.replace(cfg, narrow_tiles=not cfg.narrow_tiles))
             for kind, cfg in (("bf16", decode.default_config()),
                               ("fp8", decode.default_config(fp8=True)))}
    # Two consumer warpgroups on alternate blocks (session 17, with K and V then on a
    # dequantising warpgroup each: 1.04-1.08x bf16 from 8k keys, 1.26x at 256 x 2k; not the
    # default). (S = Q8 K8^T and the two dequantising warpgroups went in session 34:
    # kernels/decode.py's docstring.)
    two = layer_fn(dataclasses.replace(decode.default_config(fp8=True), consumers=2))
    # Keys under one scale, as every Llama 4 layer stores them (kv_quant): the kernel told
    # it copies no K scale rows and converts K's tiles without them. Over normed keys.
    _, k8_normed, ks_normed = _normed_keys(k)
    fixed = layer_fn(fixed_k_scale=kv_quant.normed_k_scale(D))
    # ... and the values under one scale too: every Llama 4 layer's cache since session 35.
    v8_fixed, vs_fixed, v_scale = _fixed_values(v)
    fixed_kv = layer_fn(fixed_k_scale=kv_quant.normed_k_scale(D), fixed_v_scale=v_scale)
    fp8_args = (q, k8, v8, table, plan.decode, ks, vs)
    bf16_args = (q, k, v, table, plan.decode)
    fixed_kv_args = (q, k8_normed, v8_fixed, table, plan.decode, ks_normed, vs_fixed)
    fns = {"bf16": (layer, bf16_args), "fp8": (layer, fp8_args),
           "bf16_narrow": (other["bf16"], bf16_args),
           "fp8_wide": (other["fp8"], fp8_args),
           "fp8_2c": (two, fp8_args),
           "fp8_fixed_k": (fixed, (q, k8_normed, v8, table, plan.decode, ks_normed, vs)),
           "fp8_fixed_kv": (fixed_kv, fixed_kv_args)}
    if in_order:
        # The FP8 default merges a block's value copies only under one K and one V scale
        # (fp8_fixed_kv above); the other form of each: per-row scales merged (their scale
        # rows still page by page), fixed scales page by page.
        fp8_default = decode.default_config(fp8=True)
        fns["fp8_merged"] = (layer_fn(dataclasses.replace(fp8_default, merge_pages=True)),
                             fp8_args)
        fns["fp8_fixed_kv_per_page"] = (
            layer_fn(dataclasses.replace(fp8_default, merge_pages=False),
                     kv_quant.normed_k_scale(D), v_scale), fixed_kv_args)
    ms = _interleaved(fns)
    out_b = np.asarray(layer(q, k, v, table, plan.decode)[0][:batch], np.float32)
    out_8 = np.asarray(layer(q, k8, v8, table, plan.decode, ks, vs)[0][:batch], np.float32)
    bytes_bf16 = 2 * batch * ctx * HKV * D * 2
    bytes_fp8 = 2 * batch * ctx * HKV * (D + 4)
    merged_ratios = {f"{n}_over_bf16": ms[n] / ms["bf16"]
                     for n in ("fp8_merged", "fp8_fixed_kv_per_page") if n in ms}
    return dict(kind="decode", batch=batch, ctx=ctx, pages="in order" if in_order else "shuffled",
                **merged_ratios, bf16_ms=ms["bf16"], fp8_ms=ms["fp8"],
                fp8_over_bf16=ms["fp8"] / ms["bf16"], bf16_narrow_ms=ms["bf16_narrow"],
                fp8_wide_ms=ms["fp8_wide"], fp8_wide_over_bf16=ms["fp8_wide"] / ms["bf16"],
                fp8_2c_ms=ms["fp8_2c"], fp8_2c_over_bf16=ms["fp8_2c"] / ms["bf16"],
                fp8_fixed_k_ms=ms["fp8_fixed_k"],
                fp8_fixed_k_over_bf16=ms["fp8_fixed_k"] / ms["bf16"],
                fp8_fixed_kv_ms=ms["fp8_fixed_kv"],
                fp8_fixed_kv_over_bf16=ms["fp8_fixed_kv"] / ms["bf16"],
                bf16_tbps=bytes_bf16 / ms["bf16"] / 1e9, fp8_tbps=bytes_fp8 / ms["fp8"] / 1e9,
                max_abs_diff=float(np.abs(out_8 - out_b).max()))


def _flops(mode, length):
    causal = lambda n: 4 * n * n * HQ * D / 2
    if mode == "causal":
        return causal(length)
    full, rest = divmod(length, CHUNK)
    return full * causal(CHUNK) + causal(rest)


# Prefill columns, all at 128-key tiles: name -> (FP8 cache?, pick_config's keywords). The
# engine's FP8 form takes S = Q8 K8^T on the fp8 K tile and V dequantised once by the
# producer warpgroup; its two forms before (K and V dequantised to bf16, 64-key tiles: 1.9-2.2x
# bf16's time; V dequantised by each consumer: 1.3-1.6x) are in results/fp8-kv-2026-12-04.md
# and older. V dequantised to f16 with P as f16 took 3-8% more time than bf16 V tiles on the
# H200 (the same file) and was removed.
PREFILL_VARIANTS = {
    "bf16": (False, {}),
    "fp8_v2": (True, dict(dequant_vector=2)),
    "fp8_v4": (True, dict(dequant_vector=4)),
    "fp8_v8": (True, dict(dequant_vector=8)),
    # pick_config's keywords, and normed_k: the keys L2-normed (FP8: stored with one scale)
    "bf16_normed_k": (False, dict(normed_k=True)),
    "fp8_v8_normed_k": (True, dict(dequant_vector=8, normed_k=True)),
    # and fixed_v: the values under one scale too (every Llama 4 layer's cache)
    "fp8_v8_fixed_kv": (True, dict(dequant_vector=8, normed_k=True, fixed_v=True)),
    # ... with V's tiles and P as f16 (PrefillConfig.f16_pv: V converted in one instruction
    # per pair of values)
    "fp8_v8_fixed_kv_f16pv": (True, dict(dequant_vector=8, normed_k=True, fixed_v=True,
                                         f16_pv=True)),
    # ... P.V as an e4m3 wgmma over V^T pages (PrefillConfig.fp8_pv, an experiment): the
    # sequence's 32-token pages in order regrouped as 128-token ones, V transposed in each;
    # pages in order only (--in-order), where they match bf16's merged copies
    "fp8_pv_fixed_kv": (True, dict(normed_k=True, fixed_v=True, fp8_pv=True)),
}
# ``--per-page`` (with ``--in-order``): the same forms copying a tile's pages one at a time,
# which the engine's in-order pages would take without ``PrefillConfig.merge_pages``.
PER_PAGE_VARIANTS = {
    "bf16_per_page": (False, dict(merge_pages=False)),
    "fp8_v4_per_page": (True, dict(dequant_vector=4, merge_pages=False)),
    "fp8_v8_per_page": (True, dict(dequant_vector=8, merge_pages=False)),
}


def _prefill_vector() -> int:
    """The engine's ``dequant_vector`` for prefill (pick_config's default)."""
    return inspect.signature(prefill.pick_config).parameters["dequant_vector"].default


def prefill_fns(mode, length, forms: dict, tile_order=None, in_order=False) -> dict:
    """One fresh sequence of ``length`` tokens over both caches: name -> (jitted prefill, its
    arguments) for each of ``forms`` (name -> (FP8 cache?, pick_config's keywords)), each a
    jit of its own; ``tile_order``: every one's ``PrefillConfig.tile_order`` (None: "auto");
    ``in_order``: the sequence's pages one after another in the pool (else shuffled)."""
    chunk = CHUNK if mode == "chunked" else None
    (k, v), (k8, v8, ks, vs), table = _cache(1, length, seed=1, in_order=in_order)
    if any(form.get("normed_k") for _, form in forms.values()):
        k_normed, k8_normed, ks_normed = _normed_keys(k)
    if any(form.get("fixed_v") for _, form in forms.values()):
        v8_fixed, vs_fixed, v_scale = _fixed_values(v)
    q = jax.random.normal(jax.random.key(8), (length, HQ, D), jnp.bfloat16)
    cu, kv = np.array([0, length], np.int32), np.array([length], np.int32)
    bounds = jaxattn.Bounds(max_num_seqs=1, max_num_batched_tokens=length, max_model_len=length,
                            page_size=PAGE, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                            chunk_size=chunk, block_kv=128)
    plan = jax.jit(lambda: planner.plan(bounds, cu, kv, np.int32(1), chunk_size=chunk))()
    fns = {}
    for name, (fp8, form) in forms.items():
        form = dict(form)
        if form.get("fp8_pv"):
            if in_order:  # (shuffled 32-token pages cannot be regrouped)
                fns[name] = _fp8_pv_fn(q, k8_normed, ks_normed, v8_fixed, vs_fixed, v_scale,
                                       table, plan, bounds, tile_order)
            continue
        normed, fixed_v = form.pop("normed_k", False), form.pop("fixed_v", False)
        scales = dict(k_scale=ks_normed if normed else ks,
                      v_scale=vs_fixed if fixed_v else vs) if fp8 else {}
        if normed:
            scales["fixed_k_scale"] = kv_quant.normed_k_scale(D)
        if fixed_v:
            scales["fixed_v_scale"] = v_scale
        config = prefill.pick_config(bounds, q.dtype, k8.dtype if fp8 else None, **form)
        if tile_order is not None:
            config = dataclasses.replace(config, tile_order=tile_order)
        f = jax.jit(lambda q, k, v, pt, plan, sc=scales, c=config:
                    kernels.ragged_paged_attention(q, k, v, pt, plan, bounds=bounds,
                                                   scale=D ** -0.5, config=c, **sc)[0])
        keys = (k8_normed if normed else k8) if fp8 else (k_normed if normed else k)
        values = (v8_fixed if fixed_v else v8) if fp8 else v
        fns[name] = (f, (q, keys, values, table, plan))
    return fns


def _fp8_pv_fn(q, k8, ks, v8, vs, v_scale, table, plan, bounds, tile_order):
    """The ``fp8_pv_fixed_kv`` column: the prefill kernel alone (the decode kernel does not
    read V^T) over 128-token pages, the in-order 32-token ones four at a time."""
    group = 128 // PAGE
    regroup = lambda x: x.reshape(x.shape[0] // group, 128, *x.shape[2:])  # [P/4, 128, ..]
    k8_128, v8_128 = regroup(k8), regroup(v8)
    scales_128 = [jnp.swapaxes(regroup(jnp.swapaxes(x, 1, 2)), 1, 2) for x in (ks, vs)]
    vt = jnp.transpose(v8_128, (0, 2, 3, 1))  # [P/4, Hkv, D, 128]
    table_128 = table[:, ::group] // group
    bounds = dataclasses.replace(bounds, page_size=128)
    config = prefill.pick_config(bounds, q.dtype, k8.dtype, fp8_pv=True)
    if tile_order is not None:
        config = dataclasses.replace(config, tile_order=tile_order)
    kplan = kernels.prepare(plan, bounds=bounds, num_tokens=q.shape[0])
    f = jax.jit(lambda q, k, v, pt, kp: prefill.prefill_attention(
        q, k, v, pt, kp.plan.prefill, kp.zero, config=config, scale=D ** -0.5, causal=True,
        num_workers=bounds.num_workers, k_scale=scales_128[0], v_scale=scales_128[1],
        fixed_k_scale=kv_quant.normed_k_scale(D), fixed_v_scale=v_scale)[0])
    return f, (q, k8_128, vt, table_128, kplan)


def bench_prefill(mode, length, tile_order=None, in_order=False, forms=PREFILL_VARIANTS):
    """One prefill case, a column for each of ``forms`` (:data:`PREFILL_VARIANTS`' keys
    included); ``tile_order``: every column's ``PrefillConfig.tile_order`` (None: the
    kernels' "auto"); ``in_order``: the pages one after another in the pool (else shuffled)."""
    fns = prefill_fns(mode, length, forms, tile_order, in_order)
    ms = _interleaved(fns)
    diff = jax.jit(lambda a, b: jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
    out = {n: f(*a) for n, (f, a) in fns.items()}
    flops = _flops(mode, length)
    default = f"fp8_v{_prefill_vector()}"
    row = dict(kind="prefill", mode=mode, length=length, tile_order=tile_order or "auto",
               pages="in order" if in_order else "shuffled",
               default=default)
    if default in out:
        row["max_abs_diff"] = float(diff(out[default], out["bf16"]))
    if {"fp8_v2", "fp8_v4", "fp8_v8"} <= out.keys():  # the same numbers (0 expected)
        row["vectors_max_abs_diff"] = max(float(diff(out[n], out["fp8_v2"]))
                                          for n in ("fp8_v4", "fp8_v8"))
    # against bf16 over the same normed keys
    for n in ("fp8_v8_normed_k", "fp8_v8_fixed_kv", "fp8_pv_fixed_kv"):
        if n in fns:
            row[f"{n}_max_abs_diff"] = float(diff(out[n], out["bf16_normed_k"]))
    for n in fns:
        row[f"{n}_ms"] = ms[n]
        row[f"{n}_tflops"] = flops / ms[n] / 1e9
        row[f"{n}_over_bf16"] = ms[n] / ms["bf16"]
    return row


def markdown(res) -> str:
    lines = [f"# FP8 vs bf16 KV cache, {res['device']}, {res['date']}", "",
             "Decode (one layer's attention; bytes read / time):", "",
             "| batch x ctx | bf16 ms (TB/s) | FP8 ms (TB/s) | FP8 / bf16 time | "
             "bf16, narrow tiles ms | FP8, 64-row tiles (before) ms, / bf16 | "
             "FP8, two consumers / bf16 | FP8, one K scale (normed keys) / bf16 | "
             "FP8, one K and one V scale / bf16 | FP8 merged pages / bf16 | FP8, one K and "
             "one V scale, page by page / bf16 | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r.get("kind") == "decode" and "error" not in r:
            order = ", pages in order" if r.get("pages") == "in order" else ""
            lines.append(f"| {r['batch']}x{r['ctx']}{order} | {r['bf16_ms']:.3f} "
                         f"({r['bf16_tbps']:.2f}) "
                         f"| {r['fp8_ms']:.3f} ({r['fp8_tbps']:.2f}) | {r['fp8_over_bf16']:.3f} "
                         f"| {r['bf16_narrow_ms']:.3f} | {r['fp8_wide_ms']:.3f}, "
                         f"{r['fp8_wide_over_bf16']:.3f} "
                         f"| {r.get('fp8_2c_over_bf16', float('nan')):.3f} "
                         f"| {r.get('fp8_fixed_k_over_bf16', float('nan')):.3f} "
                         f"| {r.get('fp8_fixed_kv_over_bf16', float('nan')):.3f} "
                         f"| {r.get('fp8_merged_over_bf16', float('nan')):.3f} "
                         f"| {r.get('fp8_fixed_kv_per_page_over_bf16', float('nan')):.3f} "
                         f"| {r['max_abs_diff']:.3g} |")
    names = res.get("prefill_columns", list(PREFILL_VARIANTS))
    lines += ["", "Prefill (one sequence, fresh; ms, useful TFLOP/s, time / bf16). fp8_vN: "
              "the producer dequantises V in N-value vectors; *_normed_k: over L2-normed "
              "keys (FP8: one fixed K scale); *_fixed_kv: and the values under one scale; the "
              "engine's default: "
              f"fp8_v{_prefill_vector()}:", "",
              "| mode, length | " + " | ".join(names) + " | max abs diff default vs bf16 "
              "| vector forms vs fp8_v2 |",
              "|---|" + "---|" * (len(names) + 2)]
    for r in res["rows"]:
        if r.get("kind") == "prefill" and "error" not in r:
            cells = [f"{r[n + '_ms']:.3f} ({r[n + '_tflops']:.0f}, {r[n + '_over_bf16']:.3f})"
                     if n + "_ms" in r else "-" for n in names]  # (fp8_pv: pages in order)
            order = "" if r.get("tile_order", "auto") == "auto" else f", {r['tile_order']}"
            order += ", pages in order" if r.get("pages") == "in order" else ""
            diffs = [f"{r.get(n, float('nan')):.3g}" for n in ("max_abs_diff",
                                                                "vectors_max_abs_diff")]
            lines.append(f"| {r['mode']} {r['length']}{order} | " + " | ".join(cells + diffs)
                         + " |")
    errors = [r for r in res["rows"] if "error" in r]
    lines += [""] + [f"- error in {r}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two decode and two prefill cases")
    ap.add_argument("--decode-only", action="store_true", help="no prefill cases")
    ap.add_argument("--prefill-only", action="store_true", help="no decode cases")
    ap.add_argument("--tag", default="", help="results/fp8-kv-<date>-TAG.*")
    ap.add_argument("--tile-order", default=None, choices=prefill.TILE_ORDERS,
                    help="every prefill column's PrefillConfig.tile_order (default: auto)")
    ap.add_argument("--prefill-cases", default=None,
                    help="e.g. causal:4096,causal:16384 (mode:length; default: "
                         + ",".join(f"{m}:{n}" for m, n in PREFILL_CASES) + ")")
    ap.add_argument("--in-order", action="store_true",
                    help="pages one after another in the pool, as the engine hands out a "
                    "prompt's (default: shuffled); adds FP8 decode columns in the other form "
                    "of DecodeConfig.merge_pages (a block's pages in one copy): per-row "
                    "scales merged, one K and one V scale page by page")
    ap.add_argument("--per-page", action="store_true",
                    help="with --in-order: add columns copying one page at a time "
                    "(PrefillConfig.merge_pages off)")
    ap.add_argument("--columns", default=None,
                    help="prefill columns to time, comma-separated (bf16 and the twin over "
                    "normed keys always come too; default: all)")
    args = ap.parse_args(argv)
    time_kernels_alone()
    if args.per_page and not args.in_order:
        ap.error("--per-page compares page copies over pages in order: add --in-order")
    forms = PREFILL_VARIANTS | (PER_PAGE_VARIANTS if args.per_page else {})
    if args.columns:
        wanted = {"bf16", "bf16_normed_k", *args.columns.split(",")}
        if not wanted <= forms.keys():
            ap.error(f"--columns: unknown {sorted(wanted - forms.keys())}; from {list(forms)}")
        forms = {n: f for n, f in forms.items() if n in wanted}
    dec = [] if args.prefill_only else QUICK["decode"] if args.quick else DECODE_CASES
    pre = [] if args.decode_only else QUICK["prefill"] if args.quick else PREFILL_CASES
    if args.prefill_cases and not args.decode_only:
        pre = mode_lengths(args.prefill_cases)
    res = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
               jax=jax.__version__, prefill_columns=list(forms), rows=[])
    for case in dec:
        try:
            res["rows"].append(bench_decode(*case, in_order=args.in_order))
        except Exception as e:  # noqa: BLE001 - one failed case must not hide the others
            res["rows"].append(dict(kind="decode", case=case, error=f"{type(e).__name__}: {e}"[:400]))
        print(res["rows"][-1], flush=True)
    for case in pre:
        try:
            res["rows"].append(bench_prefill(*case, tile_order=args.tile_order,
                                             in_order=args.in_order, forms=forms))
        except Exception as e:  # noqa: BLE001
            res["rows"].append(dict(kind="prefill", case=case, error=f"{type(e).__name__}: {e}"[:400]))
        print(res["rows"][-1], flush=True)
    write_report(f"fp8-kv-{res['date']}" + (f"-{args.tag}" if args.tag else ""), res,
                 markdown(res))


if __name__ == "__main__":
    main()
