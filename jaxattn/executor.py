"""A pure-JAX executor that computes attention by walking a plan's work items.

It consumes exactly what the kernels consume (the :class:`~jaxattn.planner.Plan`)
and must match :mod:`jaxattn.reference`: that proves a plan is complete — every
allowed (query, key) pair is covered by some item, KV splits merge correctly by
log-sum-exp — before any kernel runs. Items are visited one at a time
(``fori_loop`` over the valid count), so memory stays at one item plus the
output accumulators.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn import reference
from jaxattn.planner import Bounds, Plan, WorkList


def execute_items(items: WorkList, q, k_pages, v_pages, page_table, kv_lens, *, bounds: Bounds,
                  scale, causal: bool = True, chunk_size=None, k_scale=None, v_scale=None):
    """Attention of the rows one work list covers: out [T, Hq, D] f32 and lse [T, Hq] f32.

    ``k_scale``/``v_scale``: the scales of an FP8 cache (:mod:`jaxattn.kv_quant`).

    Rows no item covers come out as 0 / -inf; pieces of a split item are merged
    by log-sum-exp.
    """
    t, hq, d = q.shape
    rows_max = max(bounds.block_q, bounds.dq)
    bk = bounds.block_kv
    q_pad = jnp.pad(q, ((0, rows_max), (0, 0), (0, 0)))
    # Running merge per token: m = max lse, s = sum exp(lse_i - m), acc = sum exp(lse_i - m) o_i.
    init = (jnp.full((t + rows_max, hq), -jnp.inf, jnp.float32),
            jnp.zeros((t + rows_max, hq), jnp.float32),
            jnp.zeros((t + rows_max, hq, d), jnp.float32))

    def body(i, carry):
        m, s, acc = carry
        seq, q_start, q_len, q_pos = items.seq[i], items.q_start[i], items.q_len[i], items.q_pos[i]
        kv_start, kv_end = items.kv_start[i], items.kv_end[i]
        rows = jnp.arange(rows_max)
        load_kv = reference.paged_kv_loader(k_pages, v_pages, page_table[seq], bk, k_scale,
                                            v_scale)
        o, lse = reference.attend_block(
            lax.dynamic_slice_in_dim(q_pad, q_start, rows_max), q_pos + rows, kv_lens[seq],
            load_kv, (kv_start // bk, (kv_end + bk - 1) // bk), scale=scale, causal=causal,
            chunk_size=chunk_size, key_filter=lambda k: (k >= kv_start) & (k < kv_end))
        lse = jnp.where((rows < q_len)[:, None], lse, -jnp.inf)
        m0, s0, a0 = (lax.dynamic_slice_in_dim(x, q_start, rows_max) for x in (m, s, acc))
        m1 = jnp.maximum(m0, lse)
        m1_safe = jnp.where(jnp.isfinite(m1), m1, 0.0)
        w0, w1 = jnp.exp(m0 - m1_safe), jnp.exp(lse - m1_safe)
        updates = (m1, s0 * w0 + w1, a0 * w0[..., None] + o * w1[..., None])
        return tuple(lax.dynamic_update_slice_in_dim(x, y, q_start, 0)
                     for x, y in zip(carry, updates))

    m, s, acc = (x[:t] for x in lax.fori_loop(0, items.count, body, init))
    seen = s > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, s, 1.0)[..., None], 0.0)
    return out, jnp.where(seen, m + jnp.log(jnp.where(seen, s, 1.0)), -jnp.inf)


def merge_disjoint(out_a, lse_a, out_b, lse_b, dtype):
    """Combine results of two work lists that cover disjoint rows (prefill and decode)."""
    take_b = jnp.isfinite(lse_b)
    return (jnp.where(take_b[..., None], out_b, out_a).astype(dtype),
            jnp.where(take_b, lse_b, lse_a))


@functools.partial(jax.jit, static_argnames=("bounds", "causal", "chunk_size"))
def execute_plan(plan: Plan, q, k_pages, v_pages, page_table, kv_lens, *, bounds: Bounds,
                 scale, causal: bool = True, chunk_size=None, k_scale=None, v_scale=None):
    """Returns out [T, Hq, D] (q.dtype) and lse [T, Hq] f32, like the reference."""
    kw = dict(bounds=bounds, scale=scale, causal=causal, chunk_size=chunk_size, k_scale=k_scale,
              v_scale=v_scale)
    pre = execute_items(plan.prefill, q, k_pages, v_pages, page_table, kv_lens, **kw)
    dec = execute_items(plan.decode, q, k_pages, v_pages, page_table, kv_lens, **kw)
    return merge_disjoint(*pre, *dec, q.dtype)
