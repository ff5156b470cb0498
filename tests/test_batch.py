"""The step batch: packing one step's arrays into one vector (one host-to-device copy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.batch import SeqStep, StepBatch, build_step, pack, unpack

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
    _assert_same(unpack(flat, BOUNDS), b)
    _assert_same(jax.jit(lambda f: unpack(f, BOUNDS))(flat), b)  # static slices under jit


def test_pack_of_device_fields_stays_on_device():
    b = _batch(4)
    flat = pack(b._replace(page_table=jnp.asarray(b.page_table)))
    assert isinstance(flat, jax.Array)
    _assert_same(unpack(flat, BOUNDS), b)


def test_unpack_rejects_a_length_no_batch_has():
    flat = pack(_batch(4))
    with pytest.raises(ValueError, match="does not fit"):
        unpack(flat[:-1], BOUNDS)
