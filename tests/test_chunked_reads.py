"""No chunked-layer read touches a page before the live chunk (the hybrid KV cache's premise).

The hybrid cache returns a chunked-local layer's pages before ``floor(p0 / C) * C`` (``p0``:
the sequence's cached length) to the pool, where they are reused and hold anything. Here
those page-table entries point at a poisoned page full of NaN: a chunked-layer attention
that read it would come out NaN or, in the reference, zero (its online softmax drops
NaN rows). Property (hypothesis): the
outputs stay finite and equal the outputs over the full table, for the reference and the
plan executor (which walks exactly the work items the kernels run; the kernels' KV tiles
start at ``kv_start // block_kv``, test_planner checks kv_start). A global layer over the
same poisoned table does come out NaN: the poison would be seen.
"""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxattn

from attention_cases import make_ragged_case

C = 16
BOUNDS = jaxattn.Bounds(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=96, page_size=4,
                        num_q_heads=4, num_kv_heads=2, head_dim=8, chunk_size=C, block_q=8,
                        block_kv=8, decode_q=2, num_workers=4, min_split_kv=8)


POOL = BOUNDS.max_num_seqs * BOUNDS.pages_per_seq + 2  # every case's pages, then the poison


def _case(q_lens, kv_lens, seed):
    """A random case whose pools are padded to POOL pages (one compile per impl)."""
    case = make_ragged_case(BOUNDS, q_lens, kv_lens, seed=seed)
    pad = lambda x: np.concatenate([x, np.zeros((POOL - x.shape[0],) + x.shape[1:], x.dtype)])
    case.k_pages, case.v_pages = pad(case.k_pages), pad(case.v_pages)
    return case


def poisoned(case):
    """(k, v, table): the last page is NaN; entries before each live chunk point at it."""
    poison = POOL - 1
    k, v = case.k_pages.copy(), case.v_pages.copy()
    k[poison] = v[poison] = np.nan
    table = case.page_table.copy()
    for s in range(case.num_seqs):
        p0 = case.kv_lens[s] - (case.cu_q_lens[s + 1] - case.cu_q_lens[s])
        table[s, :p0 // C * C // BOUNDS.page_size] = poison
    return k, v, table


@functools.lru_cache(maxsize=None)
def _attention(impl, chunk):
    return jax.jit(functools.partial(jaxattn.ragged_paged_attention, bounds=BOUNDS,
                                     chunk_size=chunk, impl=impl, return_lse=True, scale=0.3))


@st.composite
def batches(draw):
    n = draw(st.integers(1, BOUNDS.max_num_seqs))
    q_lens, left = [], BOUNDS.max_num_batched_tokens
    for i in range(n):
        q = draw(st.one_of(st.integers(1, 2), st.integers(1, max(1, left - (n - i - 1)))))
        q_lens.append(q)
        left -= q
    kv = [draw(st.integers(q, BOUNDS.max_model_len)) for q in q_lens]
    return q_lens, kv


@pytest.mark.parametrize("impl", ["reference", "executor"])
@settings(max_examples=40, deadline=None)
@given(batch=batches(), seed=st.integers(0, 2**16))
def test_chunked_reads_never_touch_returned_pages(impl, batch, seed):
    case = _case(*batch, seed)
    k, v, table = poisoned(case)
    args = (case.q, case.cu_q_lens, case.kv_lens, np.int32(case.num_seqs))
    run = _attention(impl, C)
    want_o, want_l = run(case.q, case.k_pages, case.v_pages, case.page_table, *args[1:])
    got_o, got_l = run(case.q, k, v, table, *args[1:])
    assert np.isfinite(np.asarray(got_o)).all()
    np.testing.assert_array_equal(np.asarray(got_o), np.asarray(want_o))
    np.testing.assert_array_equal(np.asarray(got_l), np.asarray(want_l))


@pytest.mark.parametrize("impl", ["reference", "executor"])
def test_the_poison_is_seen_by_a_global_layer(impl):
    """The same poisoned table under a global layer (which reads from key 0) changes the
    output: the property above would catch a read (the reference turns NaN rows into 0)."""
    case = _case([1, 20], [40, 70], seed=3)
    k, v, table = poisoned(case)
    args = (case.cu_q_lens, case.kv_lens, np.int32(case.num_seqs))
    clean, _ = _attention(impl, None)(case.q, case.k_pages, case.v_pages, case.page_table, *args)
    bad, _ = _attention(impl, None)(case.q, k, v, table, *args)
    rows = np.asarray(bad)[:21]
    assert (~np.isfinite(rows) | (rows != np.asarray(clean)[:21])).any(axis=(1, 2)).all()
