"""The step batch: packing one step's arrays into one vector (one host-to-device copy)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn.serve.batch import SeqStep, StepBatch, build_step, pack, unpack

BOUNDS = jaxattn.Bounds(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, page_size=8,
                        num_q_heads=4, num_kv_heads=2, head_dim=16, block_kv=16)
HYBRID = dataclasses.replace(BOUNDS, chunk_size=16)  # chunks of two pages


def _batch(num_tokens):
    seqs = [SeqStep([5] * min(num_tokens, 3), 9, [3, 1]), SeqStep([7], 0, [2])][:num_tokens]
    return build_step(BOUNDS, num_tokens, seqs[:1] if num_tokens < 4 else seqs, num_pages=8)


def _assert_same(got: StepBatch, want: StepBatch):
    for name, g, w in zip(StepBatch._fields, got, want):
        assert np.shape(g) == np.shape(w), name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


@pytest.mark.parametrize("num_tokens", [1, 4, 17, 64])
def test_pack_unpack_round_trip(num_tokens):
    b = _batch(num_tokens)
    flat = pack(b)
    assert isinstance(flat, np.ndarray) and flat.dtype == np.int32
    _assert_same(unpack(flat, BOUNDS, num_tokens), b)
    _assert_same(jax.jit(lambda f: unpack(f, BOUNDS, num_tokens))(flat), b)  # static slices


def test_fields_start_256_byte_aligned():
    """XLA hands a kernel a slice of the vector as a view: Mosaic GPU needs 256-byte operands
    (on the H100 an unaligned page table failed: 'Input buffer 2 is not 256-byte aligned')."""
    b = _batch(17)
    flat = pack(b)
    off = 0
    for x in b:
        assert off % 64 == 0
        np.testing.assert_array_equal(flat[off:off + np.size(x)], np.ravel(x))
        off += -(-np.size(x) // 64) * 64
    assert off == flat.shape[0]


def test_pack_of_device_fields_stays_on_device():
    b = _batch(4)
    flat = pack(b._replace(page_table=jnp.asarray(b.page_table)))
    assert isinstance(flat, jax.Array)
    _assert_same(unpack(flat, BOUNDS, 4), b)


def test_unpack_rejects_another_batch_size():
    flat = pack(_batch(4))
    with pytest.raises(ValueError, match="is not one of 80 tokens"):
        unpack(flat, BOUNDS, 80)


@st.composite
def _decode_steps(draw):
    """A decode step of 1-4 sequences (one new token each, pages for one more) under the
    hybrid bounds, and the tokens its sampler drew."""
    n = draw(st.integers(1, HYBRID.max_num_seqs))
    free = draw(st.permutations(range(32)))
    seqs, at = [], 0
    for _ in range(n):
        cached = draw(st.integers(0, HYBRID.max_model_len - 2))
        want = (cached + 2 + HYBRID.page_size - 1) // HYBRID.page_size
        pages = list(free[at:at + want])
        at += want
        # Chunked entries before the live chunk went back to the pool (NULL_PAGE, -1).
        window = cached // HYBRID.chunk_size * HYBRID.chunk_size // HYBRID.page_size
        cpages = [-1] * window + draw(st.permutations(range(32)))[:want - window]
        seqs.append(SeqStep([draw(st.integers(0, 999))], cached, pages, cpages))
    drawn = draw(st.lists(st.integers(0, 999), min_size=HYBRID.max_num_seqs,
                          max_size=HYBRID.max_num_seqs))
    return seqs, drawn, draw(st.sampled_from([4, 16]))


@settings(max_examples=60, deadline=None)
@given(case=_decode_steps())
def test_next_decode_step_is_the_host_built_next_step(case):
    """The decode burst's step after step (paged_step.next_decode_step, on the device) equals
    the batch the host would build for it: each sequence's drawn token at the next position,
    its slots from both page tables (across page and chunk boundaries), padding untouched."""
    from jaxattn.serve.paged_step import next_decode_step

    seqs, drawn, t = case
    build = functools.partial(build_step, HYBRID, t, num_pages=32)
    now = build(seqs)
    want = build([SeqStep([drawn[i]], s.num_cached + 1, s.pages, s.chunked_pages)
                  for i, s in enumerate(seqs)])
    got = jax.jit(lambda b, d: next_decode_step(b, d, HYBRID))(
        StepBatch(*map(jnp.asarray, now)), jnp.asarray(drawn, jnp.int32))
    _assert_same(got, want)
