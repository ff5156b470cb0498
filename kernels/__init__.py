"""Pallas Mosaic GPU attention kernels (import name ``jaxattn.kernels``).

:func:`ragged_paged_attention` runs a plan: the prefill work list through the
FA3-style kernel of :mod:`jaxattn.kernels.prefill`, the decode work list
through :mod:`jaxattn.kernels.decode`, and writes the decode rows into the
prefill output (the planner gives the two lists disjoint rows).
:func:`attention` is the contiguous form: the cache is viewed as pages of an
identity page table, so it runs the very same kernels. What the kernels share
(supported shapes, constants, device queries) is in :mod:`jaxattn.kernels.common`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn import planner
from jaxattn.kernels import common, decode, decode_schedule, fp8, prefill
from jaxattn.kernels.common import DTYPES, HEAD_DIMS, num_sms, on_hopper, supports
from jaxattn.planner import Bounds, Plan

__all__ = ["DTYPES", "HEAD_DIMS", "KernelPlan", "attention", "contiguous_bounds",
           "contiguous_unsupported_reason", "num_sms", "on_hopper", "prepare",
           "ragged_paged_attention", "supports", "unsupported_reason"]

# Shorter key sequences are padded to this (a TMA box may not exceed the array's extent).
_MIN_CONTIGUOUS_PAGE = 256
# Chunk sizes the contiguous form takes: chunk-aligned key ranges must start on a KV tile
# (the prefill kernel's tiles are multiples of 64 keys).
_CHUNK_MULTIPLE = 64
_INTERPRET_WORKERS = 4  # CTAs simulated in interpret mode: enough to exercise the tile schedule


def unsupported_reason(bounds: Bounds, dtype, kv_dtype=None) -> str | None:
    """Why the kernels cannot serve these bounds, dtype and KV cache dtype (None when they can)."""
    try:
        prefill.pick_config(bounds, dtype, kv_dtype)
        decode.pick_config(bounds, dtype, kv_dtype=kv_dtype)
    except ValueError as e:
        return str(e)
    return None


def contiguous_unsupported_reason(head_dim: int, dtype, chunk_size: int | None = None
                                  ) -> str | None:
    """Why :func:`attention` (the contiguous form) cannot take these (None when it can)."""
    if not supports(head_dim, dtype):
        return f"head_dim {head_dim} / dtype {dtype} unsupported"
    if chunk_size is not None and chunk_size % _CHUNK_MULTIPLE:
        return f"chunk_size={chunk_size} is not a multiple of {_CHUNK_MULTIPLE}"
    return None


def _covered_rows(plan: Plan):
    """Rows [0, n) hold the batch's tokens: the largest row end of any valid item."""
    ends = [jnp.where(jnp.arange(w.seq.shape[0]) < w.count, w.q_start + w.q_len, 0).max()
            for w in (plan.prefill, plan.decode)]
    return jnp.maximum(*ends).astype(jnp.int32)


class KernelPlan(NamedTuple):
    """A plan with everything the kernels derive from it alone, built once per step and
    shared by all layers of a kind (per layer it cost 0.07-0.14 ms of XLA launches).

    ``dec_src`` [R]: the row of q each compact decode row comes from (T: none);
    ``dec_meta``: the decode kernel's metadata over the compact rows; ``zero`` [R, 2]:
    row ranges [a, b) no item covers, which the prefill kernel fills with zeros;
    ``first_pages`` [S, KV tiles]: the prefill's :func:`prefill.tile_first_pages` of the
    page table the plan runs over (None: each call computes it; also when pages are not
    smaller than a tile)."""

    plan: Plan
    dec_src: jax.Array
    dec_meta: decode_schedule.DecodeMeta
    zero: jax.Array
    first_pages: jax.Array | None = None


def prepare(plan: Plan | KernelPlan, *, bounds: Bounds, num_tokens: int,
            page_table=None) -> KernelPlan:
    """The kernels' view of a plan for a batch of ``num_tokens`` rows (idempotent).
    ``page_table`` [S, pages]: the one every call with this plan reads (a model's layers of
    one kind share it), whose tile runs the prefill then finds once for all of them."""
    if isinstance(plan, KernelPlan):
        return plan
    zero = jnp.stack([_covered_rows(plan), jnp.int32(num_tokens)]).reshape(1, 2)
    items, src = _compact_decode_items(plan.decode, bounds, num_tokens)
    meta = decode_schedule.decode_metadata(items, bounds=bounds, num_tokens=src.shape[0])
    first = None
    if page_table is not None:
        per_tile = prefill.tile_pages(bounds.page_size, bounds.block_kv, page_table.shape[1])
        if per_tile > 1:
            first = prefill.tile_first_pages(jnp.asarray(page_table, jnp.int32), per_tile)
    return KernelPlan(plan._replace(decode=items), src, meta, zero, first)


def _run_plan(q, k_pages, v_pages, page_table, kplan: KernelPlan, *, bounds: Bounds, scale,
              causal, interpret, num_workers, config=None, k_scale=None, v_scale=None,
              fixed_k_scale=None, fixed_v_scale=None, decode_only=False, out_scale=None):
    plan = kplan.plan
    g, d = bounds.group, q.shape[-1]
    if out_scale is not None and not (decode_only and decode.out_scale_in_kernel(g, d)):
        # FP8 rows from XLA: the same rounding, one elementwise pass after the kernels.
        out, lse = _run_plan(q, k_pages, v_pages, page_table, kplan, bounds=bounds, scale=scale,
                             causal=causal, interpret=interpret, num_workers=num_workers,
                             config=config, k_scale=k_scale, v_scale=v_scale,
                             fixed_k_scale=fixed_k_scale, fixed_v_scale=fixed_v_scale,
                             decode_only=decode_only)
        return fp8.quantize_fixed(out, out_scale), lse
    if decode_only:
        # Every row is a decode row, so the compact decode rows are the rows themselves in
        # order (kplan.dec_src is arange over the real rows): the decode kernel reads q and
        # writes out directly, with no prefill launch, gather or merge scatter.
        if kplan.dec_src.shape[0] != q.shape[0]:
            raise ValueError(f"decode_only needs T={q.shape[0]} <= max_num_seqs * decode_q")
        dec_out, dec_lse = decode.decode_attention(
            q, k_pages, v_pages, page_table, plan.decode, bounds=bounds, scale=scale,
            causal=causal, interpret=interpret, metadata=kplan.dec_meta,
            k_scale=k_scale, v_scale=v_scale, fixed_k_scale=fixed_k_scale,
            fixed_v_scale=fixed_v_scale, out_scale=out_scale)
        return dec_out, dec_lse
    if config is None:
        config = prefill.pick_config(bounds, q.dtype, k_pages.dtype)
    elif (config.block_q, config.block_kv) != (bounds.block_q, bounds.block_kv):
        raise ValueError(f"config tiles ({config.block_q}, {config.block_kv}) != bounds "
                         f"({bounds.block_q}, {bounds.block_kv})")
    out, lse_tiles = prefill.prefill_attention(
        q, k_pages, v_pages, page_table, plan.prefill, kplan.zero, config=config, scale=scale,
        causal=causal, num_workers=num_workers, interpret=interpret, k_scale=k_scale,
        v_scale=v_scale, fixed_k_scale=fixed_k_scale, fixed_v_scale=fixed_v_scale,
        first_pages=kplan.first_pages)
    lse = prefill.scatter_lse(lse_tiles, plan.prefill, q.shape[0])

    # The decode kernel runs even when the batch has no decode rows: its CTAs read the
    # item count and exit, and the write below touches only max_num_seqs * dq rows. A
    # lax.cond on the count would cost more: XLA branches on the host, so every layer
    # would stall the host until the GPU caught up (tests/models/llama4/
    # test_llama4_step_lowering.py).
    src = kplan.dec_src
    q_dec = jnp.take(q, src, axis=0, mode="fill", fill_value=0)
    dec_out, dec_lse = decode.decode_attention(
        q_dec, k_pages, v_pages, page_table, plan.decode, bounds=bounds, scale=scale,
        causal=causal, interpret=interpret, metadata=kplan.dec_meta,
        k_scale=k_scale, v_scale=v_scale, fixed_k_scale=fixed_k_scale,
        fixed_v_scale=fixed_v_scale)
    # The planner gives decode and prefill items disjoint rows, so a decode row's result is
    # final: write it over the prefill output (src == T, no row, is dropped). Reading the
    # prefill output back to merge it, or deriving the valid count from a reduction, put
    # that reduction inside the scatter's index computation: XLA recomputed it per updated
    # element (benchmarks/NOTES-prefill.md, v4).
    return (out.at[src].set(dec_out, mode="drop"),
            lse.at[src].set(dec_lse, mode="drop"))


def _compact_decode_items(items: planner.WorkList, bounds: Bounds, t: int):
    """Point the decode items at a compact array of the decode rows of q.

    The decode kernel's output is [rows, Hq, D]; over all T rows of a long
    prefill batch that is gigabytes (and XLA reserves it even when the branch
    is not taken), but decode rows number at most max_num_seqs * decode_q.
    Returns the remapped items and src [R]: the row of q each compact row
    comes from, T for the unused ones (their q_dec rows are zeros).
    """
    r = min(t, bounds.max_num_seqs * bounds.dq)
    k = jnp.arange(bounds.dq, dtype=jnp.int32)
    live = (jnp.arange(items.seq.shape[0]) < items.count)[:, None] & (k[None, :] < items.q_len[:, None])
    rows = jnp.where(live, items.q_start[:, None] + k[None, :], t).reshape(-1)
    is_dec = jnp.zeros((t,), bool).at[rows].set(True, mode="drop")
    slot = jnp.cumsum(is_dec, dtype=jnp.int32) - 1  # compact index of each decode row
    src = jnp.full((r,), t, jnp.int32).at[jnp.where(is_dec, slot, r)].set(
        jnp.arange(t, dtype=jnp.int32), mode="drop")
    items = items._replace(q_start=jnp.where(items.q_len > 0, slot[jnp.minimum(items.q_start, t - 1)], 0))
    return items, src


def ragged_paged_attention(q, k_pages, v_pages, page_table, plan: Plan | KernelPlan, *,
                           bounds: Bounds, scale, causal=True, interpret=False,
                           config: prefill.PrefillConfig | None = None, k_scale=None,
                           v_scale=None, fixed_k_scale=None, fixed_v_scale=None,
                           decode_only=False, out_scale=None):
    """Run a plan over a paged cache: out [T, Hq, D] (q.dtype), lse [T, Hq] f32.

    Key lengths and chunked-local windows come from the plan's items. A model passes
    a :class:`KernelPlan` (:func:`prepare`, once per step) so its layers share it. An FP8
    cache passes its scales ``k_scale``/``v_scale`` [num_pages, Hkv, page_size] f32, and
    ``fixed_k_scale`` (``fixed_v_scale``) where every K (V) scale is that power of two (both
    kernels then skip that side's per-key scaling). ``config`` overrides the picked prefill
    tuning (benchmarks); its tiles must match ``bounds``.
    ``decode_only``: every row is a decode row (:func:`jaxattn.ragged_paged_attention`).
    ``out_scale``: out as FP8 under that one scale (:func:`fp8.quantize_fixed`), written so
    by the decode kernels in a decode-only call, else quantised after them.
    """
    kplan = prepare(plan, bounds=bounds, num_tokens=q.shape[0])
    workers = _INTERPRET_WORKERS if interpret else bounds.num_workers
    return _run_plan(q, k_pages, v_pages, page_table, kplan, bounds=bounds, scale=scale,
                     causal=causal, interpret=interpret,
                     num_workers=min(workers, bounds.num_workers), config=config,
                     k_scale=k_scale, v_scale=v_scale, fixed_k_scale=fixed_k_scale,
                     fixed_v_scale=fixed_v_scale, decode_only=decode_only, out_scale=out_scale)


def contiguous_bounds(q_shape, k_shape, *, num_workers: int, chunk_size=None,
                      block_kv=None) -> Bounds:
    """Bounds under which a contiguous [B, L, H, D] batch is planned (identity page table)."""
    b, lq, hq, d = q_shape
    lk, hkv = k_shape[1], k_shape[2]
    block_kv = block_kv or 128
    if chunk_size is not None and chunk_size % block_kv:
        if chunk_size % _CHUNK_MULTIPLE:
            raise ValueError(f"the Mosaic kernels need chunk_size to be a multiple of "
                             f"{_CHUNK_MULTIPLE}, got {chunk_size}")
        block_kv = _CHUNK_MULTIPLE
    # Each sequence's keys are one page (an identity page table of one column), so every KV
    # tile is one TMA copy at any length; the last tile reads past the page's end, which
    # TMA fills with zeros (masked keys). Small-page views of an unaligned length cost up
    # to 16 copies per tile (30% at 8191 tokens: benchmarks/NOTES-prefill.md, v5). A TMA
    # copy into 8-row SMEM tiles needs the page's rows to be a multiple of 8.
    page = max(common.cdiv(lk, 8) * 8, _MIN_CONTIGUOUS_PAGE)
    return Bounds(max_num_seqs=b, max_num_batched_tokens=b * lq, max_model_len=page,
                  page_size=page, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                  chunk_size=chunk_size, block_q=128, block_kv=block_kv,
                  num_workers=num_workers)


def _to_padded_rows(w: planner.WorkList, cu, lq):
    """Items planned on packed rows -> rows of the [B * Lq] padded layout."""
    return w._replace(q_start=w.q_start - cu[w.seq] + w.seq * lq)


def attention(q, k, v, q_lens, kv_lens, *, scale, causal=True, chunk_size=None, interpret=False,
              config: prefill.PrefillConfig | None = None):
    """Contiguous form. q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D] -> out [B, Lq, Hq, D], lse [B, Lq, Hq]."""
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    b, lq, hq, d = q.shape
    workers = _INTERPRET_WORKERS if interpret else num_sms()
    bounds = contiguous_bounds(q.shape, k.shape, chunk_size=chunk_size, num_workers=workers,
                               block_kv=config.block_kv if config else None)
    page = bounds.page_size
    if page != k.shape[1]:  # lengths that are not a multiple of 8, and short ones: <= 1.5%
        # of the kernel's time at 8k keys, 0.1% at 128k (a copy of K and V)
        pad = ((0, 0), (0, page - k.shape[1]), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    # [B, Lk, Hkv, D] is already B pages of Lk keys: no copy.
    page_table = jnp.arange(b, dtype=jnp.int32).reshape(b, 1)
    q_lens = jnp.asarray(q_lens, jnp.int32)
    kv_lens = jnp.asarray(kv_lens, jnp.int32)
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens, dtype=jnp.int32)])
    plan = planner.plan(bounds, cu, kv_lens, b, chunk_size=chunk_size, causal=causal)
    plan = plan._replace(prefill=_to_padded_rows(plan.prefill, cu, lq),
                         decode=_to_padded_rows(plan.decode, cu, lq))
    rows = jnp.arange(b, dtype=jnp.int32) * lq
    zero = jnp.stack([rows + q_lens, rows + lq], axis=1)  # each sequence's padding rows
    kplan = prepare(plan, bounds=bounds, num_tokens=b * lq)._replace(zero=zero)
    out, lse = _run_plan(q.reshape(b * lq, hq, d), k, v, page_table, kplan,
                         bounds=bounds, scale=scale, causal=causal, interpret=interpret,
                         num_workers=workers, config=config)
    return out.reshape(b, lq, hq, d), lse.reshape(b, lq, hq)
