"""Pure-JAX reference attention: the oracle every kernel is tested against.

Blockwise over keys with an online softmax (fp32), so memory stays
``O(block_q * block_kv * heads)`` and a 32k-token case runs on a CPU without
an ``Lq x Lk`` matrix. Both functions are jittable.

Paged KV layout (shared by the whole project): ``k_pages[num_pages,
page_size, num_kv_heads, head_dim]`` — token-major inside a page, like the
packed ``q[T, Hq, D]``, so writing new tokens is a plain row scatter and a KV
head of one page is a strided 2-D box that one TMA copy moves.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn import kv_quant
from jaxattn.planner import cdiv

_BQ = 256  # reference query block
_BK = 256  # reference key block


def allowed_keys(q_pos, k_pos, kv_len, *, causal: bool, chunk_size):
    """The mask that defines the semantics: may a query at ``q_pos`` see the key at ``k_pos``?

    Bottom-right causal: ``k <= q_pos``. Chunked-local (Llama 4 RoPE layers):
    keys from the start of the query's chunk, ``floor(q_pos / C) * C``;
    without causality, keys up to the end of that chunk. Broadcasts.
    """
    ok = (k_pos < kv_len) & (k_pos >= 0)
    if chunk_size is not None:
        ok &= k_pos >= (q_pos // chunk_size) * chunk_size
        if not causal:
            ok &= k_pos < (q_pos // chunk_size + 1) * chunk_size
    if causal:
        ok &= k_pos <= q_pos
    return ok


def key_range(first_pos, last_pos, kv_len, *, causal: bool, chunk_size):
    """Keys ``[lo, hi)`` that rows at positions ``first_pos..last_pos`` can see (one chunk or not)."""
    lo = 0 if chunk_size is None else (first_pos // chunk_size) * chunk_size
    if causal:
        hi = jnp.minimum(last_pos + 1, kv_len)
    elif chunk_size is None:
        hi = kv_len
    else:
        hi = jnp.minimum(kv_len, (last_pos // chunk_size + 1) * chunk_size)
    return lo, hi


def attend_block(q, q_pos, kv_len, load_kv, kv_blocks, *, scale, causal, chunk_size,
                 key_filter=None, p_round=None):
    """Online-softmax attention of one block of query rows over a range of key blocks.

    q: [R, Hq, D]; q_pos: [R] absolute positions; load_kv(j) -> (k [bk, Hkv, D],
    v [bk, Hkv, D], k_pos [bk]) for key block j; kv_blocks = (j_lo, j_hi), may be
    traced. ``key_filter(k_pos) -> bool[bk]`` restricts keys further (work items).
    ``p_round(p) -> p'``: what P.V multiplies instead of P (a kernel that rounds P, as the
    e4m3 P.V does: benchmarks/fp8_pv_accuracy.py); l sums the unrounded P, as kernels do.
    Returns o [R, Hq, D] f32 and lse [R, Hq] f32 (natural log; -inf for rows
    that see no key, whose o is 0).
    """
    r, hq, d = q.shape
    hkv = load_kv(0)[0].shape[1]
    qf = (q.astype(jnp.float32) * scale).reshape(r, hkv, hq // hkv, d)

    def body(j, carry):
        m, l, acc = carry
        k, v, k_pos = load_kv(j)
        s = jnp.einsum("rhgd,khd->rhgk", qf, k.astype(jnp.float32))
        mask = allowed_keys(q_pos[:, None], k_pos[None, :], kv_len, causal=causal,
                            chunk_size=chunk_size)
        if key_filter is not None:
            mask &= key_filter(k_pos)[None, :]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        pv = p if p_round is None else p_round(p)
        acc = acc * alpha[..., None] + jnp.einsum("rhgk,khd->rhgd", pv, v.astype(jnp.float32))
        return m_new, l, acc

    init = (jnp.full((r, hkv, hq // hkv), -jnp.inf, jnp.float32),
            jnp.zeros((r, hkv, hq // hkv), jnp.float32),
            jnp.zeros((r, hkv, hq // hkv, d), jnp.float32))
    m, l, acc = lax.fori_loop(kv_blocks[0], kv_blocks[1], body, init)
    seen = l > 0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return o.reshape(r, hq, d), lse.reshape(r, hq)


@functools.partial(jax.jit, static_argnames=("causal", "chunk_size"))
def attention_reference(q, k, v, q_lens, kv_lens, scale, *, causal=True, chunk_size=None):
    """Contiguous batched attention. q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D]; lens int32 [B].

    Returns out [B, Lq, Hq, D] (q.dtype; rows >= q_len are 0) and lse [B, Lq, Hq] f32.
    """
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    bq, bk = min(_BQ, lq), min(_BK, lk)
    nq = cdiv(lq, bq)
    q = jnp.pad(q, ((0, 0), (0, nq * bq - lq), (0, 0), (0, 0)))
    pad_k = cdiv(lk, bk) * bk - lk
    k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))

    def one_seq(q, k, v, q_len, kv_len):
        def load_kv(j):
            start = j * bk
            return (lax.dynamic_slice_in_dim(k, start, bk), lax.dynamic_slice_in_dim(v, start, bk),
                    start + jnp.arange(bk))

        def one_block(i):
            rows = i * bq + jnp.arange(bq)
            q_pos = kv_len - q_len + rows
            lo, hi = key_range(q_pos[0], kv_len - q_len + jnp.minimum((i + 1) * bq, q_len) - 1,
                               kv_len, causal=causal, chunk_size=chunk_size)
            o, lse = attend_block(lax.dynamic_slice_in_dim(q, i * bq, bq), q_pos, kv_len, load_kv,
                                  (lo // bk, cdiv(hi, bk)), scale=scale, causal=causal,
                                  chunk_size=chunk_size)
            valid = rows < q_len
            return jnp.where(valid[:, None, None], o, 0.0), jnp.where(valid[:, None], lse, -jnp.inf)

        o, lse = lax.map(one_block, jnp.arange(nq))
        return o.reshape(nq * bq, hq, d)[:lq], lse.reshape(nq * bq, hq)[:lq]

    o, lse = jax.vmap(one_seq)(q, k, v, q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32))
    return o.astype(q.dtype), lse


def paged_kv_loader(k_pages, v_pages, page_row, block, k_scale=None, v_scale=None):
    """load_kv(j) for one sequence: gather key block j through its page-table row.

    With an FP8 cache (``k_scale``/``v_scale`` [P, Hkv, page_size], see
    :mod:`jaxattn.kv_quant`) the block comes out dequantised to f32.
    """
    page_size = k_pages.shape[1]
    last = page_row.shape[0] * page_size - 1

    def load_kv(j):
        k_pos = j * block + jnp.arange(block)
        pos = jnp.clip(k_pos, 0, last)
        pages, slots = page_row[pos // page_size], pos % page_size
        k, v = k_pages[pages, slots], v_pages[pages, slots]
        if k_scale is not None:
            k = kv_quant.dequantize(k, k_scale[pages, :, slots])
            v = kv_quant.dequantize(v, v_scale[pages, :, slots])
        return k, v, k_pos

    return load_kv


@functools.partial(jax.jit, static_argnames=("causal", "chunk_size"))
def ragged_paged_attention_reference(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens,
                                     num_seqs, scale, *, causal=True, chunk_size=None,
                                     k_scale=None, v_scale=None):
    """Packed ragged batch over a paged KV cache, computed sequence by sequence.

    q [T, Hq, D]; k_pages, v_pages [P, page_size, Hkv, D]; page_table [S, pages_per_seq];
    cu_q_lens [S+1]; kv_lens [S]; num_seqs scalar. An FP8 cache passes its scales
    ``k_scale``/``v_scale`` [P, Hkv, page_size] (dequantised, then attended in f32).
    Returns out [T, Hq, D] (q.dtype; rows past cu_q_lens[num_seqs] are 0) and lse [T, Hq] f32.
    """
    t, hq, d = q.shape
    # Key blocks start at chunk starts (a block size dividing the chunk): a chunked layer
    # then never loads a page before its live chunk, whose table entry may name a page
    # returned to the pool (the hybrid cache), holding anything.
    bq, bk = min(_BQ, t), _BK if chunk_size is None else math.gcd(_BK, chunk_size)
    q_pad = jnp.pad(q, ((0, bq), (0, 0), (0, 0)))
    out = jnp.zeros((t + bq, hq, d), jnp.float32)
    lse = jnp.full((t + bq, hq), -jnp.inf, jnp.float32)

    def seq_body(s, carry):
        q_start, q_len, kv_len = cu_q_lens[s], cu_q_lens[s + 1] - cu_q_lens[s], kv_lens[s]
        load_kv = paged_kv_loader(k_pages, v_pages, page_table[s], bk, k_scale, v_scale)

        def block_body(i, carry):
            out, lse = carry
            rows = i * bq + jnp.arange(bq)
            q_pos = kv_len - q_len + rows
            lo, hi = key_range(q_pos[0], kv_len - q_len + jnp.minimum((i + 1) * bq, q_len) - 1,
                               kv_len, causal=causal, chunk_size=chunk_size)
            start = q_start + i * bq
            o, l = attend_block(lax.dynamic_slice_in_dim(q_pad, start, bq), q_pos, kv_len, load_kv,
                                (lo // bk, cdiv(hi, bk)), scale=scale, causal=causal,
                                chunk_size=chunk_size)
            valid = rows < q_len
            old_o, old_l = (lax.dynamic_slice_in_dim(out, start, bq),
                            lax.dynamic_slice_in_dim(lse, start, bq))
            out = lax.dynamic_update_slice_in_dim(
                out, jnp.where(valid[:, None, None], o, old_o), start, 0)
            lse = lax.dynamic_update_slice_in_dim(
                lse, jnp.where(valid[:, None], l, old_l), start, 0)
            return out, lse

        return lax.fori_loop(0, cdiv(q_len, bq), block_body, carry)

    n = jnp.asarray(num_seqs, jnp.int32).reshape(())
    out, lse = lax.fori_loop(0, n, seq_body, (out, lse))
    return out[:t].astype(q.dtype), lse[:t]
