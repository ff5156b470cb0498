"""The prefill kernel on a Hopper GPU at Llama 4 Scout shapes (40/8 heads, D=128, bf16).

All lengths run under one compiled function per layer kind (static bounds of
131072 batched tokens), so this also shows that no length recompiles. Rows
are checked against float32 attention computed directly for a sample of
rows (the first, last and boundary rows of every sequence plus random ones);
every row of the batch is checked for NaN and padding rows for zeros.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import kernels, planner
from jaxattn.kernels import prefill

pytestmark = pytest.mark.gpu

HQ, HKV, D, PAGE, CHUNK = 40, 8, 128, 64, 8192
T = 131072
SCALE = 1 / np.sqrt(D)
BOUNDS = {c: jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=T, max_model_len=T,
                            page_size=PAGE, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                            chunk_size=c) for c in (None, CHUNK)}


@functools.cache
def _data():
    """Random q and K/V pools big enough for 131072 tokens; pages shuffled."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    n_pages = 2 * T // PAGE  # room for a full-length sequence plus a packed batch
    q = jax.random.normal(kq, (T, HQ, D), jnp.bfloat16)
    k = jax.random.normal(kk, (n_pages, PAGE, HKV, D), jnp.bfloat16)
    v = jax.random.normal(kv, (n_pages, PAGE, HKV, D), jnp.bfloat16)
    return q, k, v, n_pages


@functools.cache
def _fn(chunk, config=None):
    if config is None:
        return jax.jit(functools.partial(jaxattn.ragged_paged_attention, bounds=BOUNDS[chunk],
                                         chunk_size=chunk, return_lse=True, impl="mosaic"))
    bounds = dataclasses.replace(BOUNDS[chunk], block_kv=config.block_kv)

    def f(q, k_pages, v_pages, table, cu, kv, n):
        plan = planner.plan(bounds, cu, kv, n, chunk_size=chunk)
        return kernels.ragged_paged_attention(q, k_pages, v_pages, table, plan, bounds=bounds,
                                              scale=SCALE, config=config)
    return jax.jit(f)


def _batch(q_lens, kv_lens, seed, in_order=False):
    """``in_order``: each sequence's pages one after another in the pool (as the engine's
    allocator hands out a prompt's), from an odd page on; else shuffled."""
    _, _, _, n_pages = _data()
    rng = np.random.default_rng(seed)
    pps = T // PAGE
    table = np.zeros((8, pps), np.int32)
    perm = np.roll(np.arange(n_pages), -7) if in_order else rng.permutation(n_pages)
    off = 0
    for s, kv in enumerate(kv_lens):
        u = -(-kv // PAGE)
        table[s, :u] = perm[off:off + u]
        off += u
    cu = np.zeros(9, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    kv = np.zeros(8, np.int32)
    kv[:len(kv_lens)] = kv_lens
    return table, cu, kv


@jax.jit
def _rows_f32(q_rows, pos, k_seq, v_seq, kv_len, lo):
    """Exact attention of sampled rows: q_rows [n, Hq, D] at positions pos [n]; keys [lo, pos]."""
    g = HQ // HKV
    qf = q_rows.astype(jnp.float32).reshape(-1, HKV, g, D)
    s = jnp.einsum("nhgd,khd->nhgk", qf, k_seq.astype(jnp.float32)) * SCALE
    key = jnp.arange(k_seq.shape[0])
    ok = (key[None, :] <= pos[:, None]) & (key[None, :] >= lo[:, None]) & (key[None, :] < kv_len)
    s = jnp.where(ok[:, None, None, :], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("nhgk,khd->nhgd", p, v_seq.astype(jnp.float32))
    return o.reshape(-1, HQ, D), lse.reshape(-1, HQ)


N_ROWS = 40  # sampled rows per sequence (fixed, so the f32 check compiles once)


def _check(q_lens, kv_lens, chunk, seed=0, config=None, in_order=False):
    """Runs the batch, checks sampled rows against f32 attention; returns (out, lse)."""
    q, k_pages, v_pages, _ = _data()
    table, cu, kv = _batch(q_lens, kv_lens, seed, in_order)
    out, lse = _fn(chunk, config)(q, k_pages, v_pages, table, cu, kv, np.int32(len(q_lens)))
    n = int(cu[len(q_lens)])
    assert not bool(jnp.isnan(out[:n]).any()), "NaN in the output"
    assert bool((out[n:] == 0).all()), "padding rows must be zeros"
    rng = np.random.default_rng(seed + 1)
    for s, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        k_seq = k_pages[table[s]].reshape(-1, HKV, D)  # [T, Hkv, D]; keys >= kv_len masked
        v_seq = v_pages[table[s]].reshape(-1, HKV, D)
        fixed = [0, 1, ql - 1, ql - 2, 127, 128, 8191, 8192, 8193, ql // 2]
        rows = [r for r in fixed if 0 <= r < ql]
        rows = np.array(rows + list(rng.integers(0, ql, N_ROWS - len(rows))))
        pos = kl - ql + rows
        lo = (pos // chunk) * chunk if chunk else np.zeros_like(pos)
        want_o, want_l = _rows_f32(q[cu[s] + rows], pos, k_seq, v_seq, kl, lo)
        got_o = np.asarray(out[cu[s] + rows], np.float32)
        err = np.abs(got_o - np.asarray(want_o)).max()
        assert err < 2e-2, (s, ql, kl, err)
        np.testing.assert_allclose(np.asarray(lse[cu[s] + rows]), np.asarray(want_l),
                                   atol=2e-3, rtol=1e-4)
    return out, lse


LENGTHS = [1, 127, 128, 129, 1000, 8191, 8192, 8193, 10000, 10001, 16383, 16384, 16385, 65536,
           131072]


@pytest.mark.parametrize("chunk", [None, CHUNK])
@pytest.mark.parametrize("length", LENGTHS)
def test_single_sequence(length, chunk):
    _check([length], [length], chunk, seed=length)


@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_packed_batch_with_prefix_and_decode(chunk):
    """Mixed prefill lengths, chunked prefill over a cached prefix, decode rows, one call."""
    q_lens = [10001, 1, 8193, 3000, 129, 12, 5000]
    kv_lens = [10001, 9000, 16385, 20000, 129, 12, 30000]
    _check(q_lens, kv_lens, chunk, seed=7)


VARIANTS = {"no_overlap": prefill.PrefillConfig(overlap=False),
            "mbarrier_turns": prefill.PrefillConfig(named_barriers=False),
            "no_overlap_mbarrier_turns": prefill.PrefillConfig(overlap=False, named_barriers=False),
            "bkv64_s4": prefill.PrefillConfig(block_kv=64, num_stages=4),
            "item_major": prefill.PrefillConfig(tile_order="item_major"),
            "kv_major": prefill.PrefillConfig(tile_order="kv_major")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_variants(variant):
    """The tuning variants the benchmark compares compute the same thing."""
    _check([10001, 1, 8193, 3000, 129, 12, 5000], [10001, 9000, 16385, 20000, 129, 12, 30000],
           CHUNK, seed=11, config=VARIANTS[variant])
    _check([16385], [16385], None, seed=12, config=VARIANTS[variant])


@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_pages_in_order_merge_into_one_copy_per_tile(chunk):
    """Consecutive pages (each KV tile one TMA copy, ``PrefillConfig.merge_pages``) give
    the numbers of one copy per page, bit for bit, and match f32 attention."""
    q_lens, kv_lens = [10001, 1, 8193], [10001, 9000, 16385]
    merged = _check(q_lens, kv_lens, chunk, seed=13, config=prefill.PrefillConfig(),
                    in_order=True)
    per_page = _check(q_lens, kv_lens, chunk, seed=13, in_order=True,
                      config=prefill.PrefillConfig(merge_pages=False))
    for a, b in zip(merged, per_page):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_one_compile_for_all_lengths():
    for chunk in (None, CHUNK):
        assert _fn(chunk)._cache_size() <= 1


CONTIGUOUS = [(1, 8191, 8191, None), (1, 8193, 8193, CHUNK), (1, 10001, 10001, None),
              (2, 12287, 12287, CHUNK), (1, 1000, 20001, None), (3, 3, 9999, CHUNK),
              (1, 37, 37, None), (2, 129, 300, None)]


@pytest.mark.parametrize("b,lq,lk,chunk", CONTIGUOUS)
def test_contiguous_any_length(b, lq, lk, chunk):
    """The contiguous API reads each sequence as one page at any length (its last KV tile
    runs past the array, which TMA fills with zeros): sampled rows against f32 attention."""
    kq, kk, kv = jax.random.split(jax.random.key(lq + lk), 3)
    q = jax.random.normal(kq, (b, lq, HQ, D), jnp.bfloat16)
    k = jax.random.normal(kk, (b, lk, HKV, D), jnp.bfloat16)
    v = jax.random.normal(kv, (b, lk, HKV, D), jnp.bfloat16)
    out, lse = jaxattn.attention(q, k, v, causal=True, chunk_size=chunk, return_lse=True,
                                 impl="mosaic")
    assert not bool(jnp.isnan(out).any())
    rng = np.random.default_rng(lk)
    for s in range(b):
        rows = np.unique(np.r_[[0, lq - 1, lq // 2], rng.integers(0, lq, N_ROWS)])[:N_ROWS]
        rows = np.pad(rows, (0, N_ROWS - len(rows)), mode="edge")
        pos = lk - lq + rows
        lo = (pos // chunk) * chunk if chunk else np.zeros_like(pos)
        want_o, want_l = _rows_f32(q[s, rows], pos, k[s], v[s], lk, lo)
        err = np.abs(np.asarray(out[s, rows], np.float32) - np.asarray(want_o)).max()
        assert err < 2e-2, (s, err)
        np.testing.assert_allclose(np.asarray(lse[s, rows]), np.asarray(want_l), atol=2e-3,
                                   rtol=1e-4)
