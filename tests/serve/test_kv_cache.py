"""The paged KV cache: in-place token writes and the memory budget."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import reference
from jaxattn.serve import batch
from jaxattn.serve import kv_cache as cache

from attention_cases import naive_attention

SPEC = cache.CacheSpec(num_layers=2, num_pages=12, page_size=8, num_kv_heads=2, head_dim=16,
                       dtype="float32")
BOUNDS = jaxattn.Bounds(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, page_size=8,
                        num_q_heads=4, num_kv_heads=2, head_dim=16, block_kv=16)


def _rows(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 2, 16)).astype(np.float32)


def _step(seqs, num_tokens=32):
    return batch.build_step(BOUNDS, num_tokens, seqs, num_pages=SPEC.num_pages)


def test_write_across_page_boundaries_and_skips_padding():
    # Sequence A: 5 cached tokens, 13 new ones -> positions 5..17 over pages 7, 2, 9.
    # Sequence B: 0 cached, 3 new -> page 4. The bucket of 32 rows pads with 16 slots.
    seqs = [batch.SeqStep(token_ids=range(13), num_cached=5, pages=[7, 2, 9]),
            batch.SeqStep(token_ids=range(3), num_cached=0, pages=[4])]
    step = _step(seqs)
    k_new, v_new = _rows(32, 1), _rows(32, 2)
    k0, v0 = (np.full((12, 8, 2, 16), -7.0, np.float32) for _ in range(2))
    k1, v1 = jax.jit(cache.write)(k0, v0, k_new, v_new, step.slots)
    k1, v1 = np.asarray(k1), np.asarray(v1)
    want_k, want_v = k0.copy(), v0.copy()
    for row, pos in enumerate(range(5, 18)):
        page = [7, 2, 9][pos // 8]
        want_k[page, pos % 8], want_v[page, pos % 8] = k_new[row], v_new[row]
    for row in range(3):
        want_k[4, row], want_v[4, row] = k_new[13 + row], v_new[13 + row]
    np.testing.assert_array_equal(k1, want_k)  # padding rows 16..31 wrote nothing
    np.testing.assert_array_equal(v1, want_v)


def test_write_is_in_place_when_donated():
    pools = cache.allocate(dataclasses.replace(SPEC, dtype="bfloat16"))
    k, v = pools.k[0], pools.v[0]
    write = jax.jit(cache.write, donate_argnums=(0, 1))
    slots = jnp.array([0, 9, 95], jnp.int32)
    new = jnp.ones((3, 2, 16), jnp.bfloat16)
    hlo = write.lower(k, v, new, new, slots).compile().as_text()
    assert "input_output_alias={ {0}: (0" in hlo and "{1}: (1" in hlo
    ptr_k, ptr_v = k.unsafe_buffer_pointer(), v.unsafe_buffer_pointer()
    k2, v2 = write(k, v, new, new, slots)
    assert k2.unsafe_buffer_pointer() == ptr_k and v2.unsafe_buffer_pointer() == ptr_v
    assert k.is_deleted() and v.is_deleted()
    assert float(k2[1, 1, 0, 0]) == 1.0 and float(k2[0, 1, 0, 0]) == 0.0


@pytest.mark.parametrize("chunk", [None, 16])
def test_written_cache_reads_back_through_attention(chunk):
    """Write a prompt in two steps (the second crosses a page and a chunk boundary),
    then attend from the last tokens: same result as contiguous attention, on
    global and chunked-local layers alike (they share the pool layout)."""
    total, first = 27, 14  # positions 14..26 cross page 16 and chunk 16
    pages = [5, 0, 11, 3]
    k_all, v_all, q = _rows(total, 3), _rows(total, 4), np.random.default_rng(5).standard_normal(
        (total, 4, 16)).astype(np.float32)
    k_pool, v_pool = jnp.zeros((12, 8, 2, 16), jnp.float32), jnp.zeros((12, 8, 2, 16), jnp.float32)
    write = jax.jit(cache.write, donate_argnums=(0, 1))
    for lo, hi in ((0, first), (first, total)):
        step = _step([batch.SeqStep(token_ids=range(hi - lo), num_cached=lo, pages=pages)])
        pad = ((0, 32 - (hi - lo)), (0, 0), (0, 0))  # rows of the 32-token bucket
        k_pool, v_pool = write(k_pool, v_pool, np.pad(k_all[lo:hi], pad),
                               np.pad(v_all[lo:hi], pad), step.slots)
    n_new = total - first
    step = _step([batch.SeqStep(token_ids=range(n_new), num_cached=first, pages=pages)])
    q_pad = np.zeros((32, 4, 16), np.float32)
    q_pad[:n_new] = q[first:]
    out, lse = reference.ragged_paged_attention_reference(
        q_pad, k_pool, v_pool, step.page_table, step.cu_q_lens, step.kv_lens, step.num_seqs,
        0.25, chunk_size=chunk)
    want, _ = naive_attention(q[first:], k_all, v_all, total, 0.25, True, chunk)
    np.testing.assert_allclose(np.asarray(out)[:n_new], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text,free,want", [
    ("4GiB", None, 4 * 2**30), ("512MB", None, 512 * 10**6), (" 1.5 kib ", None, 1536),
    (123456, None, 123456), (0.5, 1000, 500), ("0.25", 4000, 1000), ("1", 800, 800),
])
def test_parse_budget(text, free, want):
    assert cache.parse_budget(text, free) == want


@pytest.mark.parametrize("bad,free", [("lots", None), ("4 parsecs", None), (0, None), (-3, None),
                                      (1.5, 100), (0.5, None)])
def test_parse_budget_rejects(bad, free):
    with pytest.raises(ValueError):
        cache.parse_budget(bad, free)


def test_pages_for_budget():
    spec = cache.CacheSpec(num_layers=48, num_pages=0, page_size=16, num_kv_heads=8,
                           head_dim=128)  # Scout, bf16
    per_page = 2 * 48 * 16 * 8 * 128 * 2
    assert spec.bytes_per_page == per_page
    assert cache.pages_for_budget(10 * per_page + per_page - 1, spec) == 10
    assert cache.pages_for_budget(cache.parse_budget("60GiB"), spec) == 60 * 2**30 // per_page
    assert dataclasses.replace(spec, num_pages=7).total_bytes == 7 * per_page
