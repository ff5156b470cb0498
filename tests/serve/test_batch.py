"""The step batch: packing one step's arrays into one vector (one host-to-device copy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.serve.batch import SeqStep, StepBatch, build_step, pack, unpack

BOUNDS = jaxattn.Bounds(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, page_size=8,
                        num_q_heads=4, num_kv_heads=2, head_dim=16, block_kv=16)


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
