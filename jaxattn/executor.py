"""A pure-JAX executor that computes attention by walking a plan's work items.

It consumes exactly what the kernels consume (the :class:`~jaxattn.scheduler.Plan`)
and must match :mod:`jaxattn.reference`: that proves a plan is complete — every
allowed (query, key) pair is covered by some item, KV splits merge correctly by
log-sum-exp — before any kernel runs. Items are visited one at a time
(``fori_loop`` over the valid count), so memory stays at one item plus the
output accumulators.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxattn import reference
from jaxattn.scheduler import Bounds, Plan, WorkList


def execute_plan(plan: Plan, q, k_pages, v_pages, page_table, kv_lens, *, bounds: Bounds,
                 scale, causal: bool = True, chunk_size=None):
    """Returns out [T, Hq, D] (q.dtype) and lse [T, Hq] f32, like the reference."""
    t, hq, d = q.shape
    rows_max = max(bounds.block_q, bounds.dq)
    bk = bounds.block_kv
    q_pad = jnp.pad(q, ((0, rows_max), (0, 0), (0, 0)))
    # Running log-sum-exp merge per token: m (max lse), s = sum exp(lse_i - m), acc = sum exp(lse_i - m) o_i.
    init = (jnp.full((t + rows_max, hq), -jnp.inf, jnp.float32),
            jnp.zeros((t + rows_max, hq), jnp.float32),
            jnp.zeros((t + rows_max, hq, d), jnp.float32))

    def run(items: WorkList, carry):
        def body(i, carry):
            m, s, acc = carry
            seq, q_start, q_len, q_pos = items.seq[i], items.q_start[i], items.q_len[i], items.q_pos[i]
            kv_start, kv_end = items.kv_start[i], items.kv_end[i]
            rows = jnp.arange(rows_max)
            load_kv = reference.paged_kv_loader(k_pages, v_pages, page_table[seq], bk)
            o, lse = reference.attend_block(
                lax.dynamic_slice_in_dim(q_pad, q_start, rows_max), q_pos + rows, kv_lens[seq],
                load_kv, (kv_start // bk, (kv_end + bk - 1) // bk), scale=scale, causal=causal,
                chunk_size=chunk_size, key_filter=lambda k: (k >= kv_start) & (k < kv_end))
            lse = jnp.where((rows < q_len)[:, None], lse, -jnp.inf)
            m0, s0, a0 = (lax.dynamic_slice_in_dim(x, q_start, rows_max) for x in (m, s, acc))
            m1 = jnp.maximum(m0, lse)
            m1_safe = jnp.where(jnp.isfinite(m1), m1, 0.0)
            w0, w1 = jnp.exp(m0 - m1_safe), jnp.exp(lse - m1_safe)
            s1 = s0 * w0 + w1
            a1 = a0 * w0[..., None] + o * w1[..., None]
            return tuple(lax.dynamic_update_slice_in_dim(x, y, q_start, 0)
                         for x, y in ((m, m1), (s, s1), (acc, a1)))

        return lax.fori_loop(0, items.count, body, carry)

    m, s, acc = run(plan.decode, run(plan.prefill, init))
    m, s, acc = m[:t], s[:t], acc[:t]
    seen = s > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, s, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, s, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse
