"""The pure-JAX reference against a float64 NumPy softmax attention."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import jaxattn
from jaxattn import reference

from attention_cases import make_ragged_case, naive_attention, naive_ragged

TOL = {np.float32: 2e-5, jnp.bfloat16: 2e-2}


def _close(got, want, tol):
    got = np.asarray(got, np.float64)
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert np.isfinite(got).all()
    assert err < tol, err


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal,chunk", [(True, None), (False, None), (True, 64), (False, 64)])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (6, 2)])
def test_contiguous_matches_naive(dtype, causal, chunk, hq, hkv):
    rng = np.random.default_rng(hq * 7 + hkv)
    b, lq, lk, d = 3, 70, 300, 32
    q = rng.standard_normal((b, lq, hq, d)).astype(dtype)
    k = rng.standard_normal((b, lk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, lk, hkv, d)).astype(dtype)
    q_lens = np.array([70, 1, 33], np.int32)
    kv_lens = np.array([300, 129, 64], np.int32)
    out, lse = reference.attention_reference(q, k, v, q_lens, kv_lens, 0.3, causal=causal,
                                             chunk_size=chunk)
    for i in range(b):
        want_o, want_l = naive_attention(np.asarray(q[i, :q_lens[i]], np.float32),
                                         np.asarray(k[i], np.float32), np.asarray(v[i], np.float32),
                                         kv_lens[i], 0.3, causal, chunk)
        _close(out[i, :q_lens[i]], want_o, TOL[dtype])
        np.testing.assert_allclose(lse[i, :q_lens[i]], want_l, rtol=1e-4, atol=1e-4)
        assert (np.asarray(out[i, q_lens[i]:], np.float32) == 0).all()  # padded rows: zeros


@pytest.mark.parametrize("chunk", [None, 64])
def test_ragged_paged_matches_naive(chunk):
    bounds = jaxattn.Bounds(max_num_seqs=6, max_num_batched_tokens=400, max_model_len=512,
                            page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=32,
                            chunk_size=chunk, block_q=64, block_kv=64)
    case = make_ragged_case(bounds, [1, 100, 65, 17, 1], [1, 300, 65, 512, 130], seed=3)
    out, lse = reference.ragged_paged_attention_reference(*case.args(), 0.2, chunk_size=chunk)
    want_o, want_l = naive_ragged(*case.args(), 0.2, chunk=chunk)
    _close(out, want_o, 2e-5)
    finite = np.isfinite(want_l)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_l[finite], rtol=1e-4, atol=1e-4)
    assert (np.asarray(out)[case.cu_q_lens[case.num_seqs]:] == 0).all()


def test_32k_tokens_on_cpu_without_a_full_score_matrix():
    """32768 x 32768 causal would need 4 GiB of fp32 scores; the blockwise reference never forms it."""
    rng = np.random.default_rng(0)
    n, d = 32768, 64
    q = rng.standard_normal((1, n, 1, d)).astype(np.float32)
    k = rng.standard_normal((1, n, 1, d)).astype(np.float32)
    v = rng.standard_normal((1, n, 1, d)).astype(np.float32)
    lens = np.array([n], np.int32)
    fn = jax.jit(lambda q, k, v: reference.attention_reference(q, k, v, lens, lens, 0.125))
    compiled = fn.lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 256 * 2**20, f"reference needs {temp / 2**20:.0f} MiB of temporaries"
    out, _ = compiled(q, k, v)
    for row in (0, 1, 8191, 8192, 10000, n - 1):
        want, _ = naive_attention(q[0, row:row + 1], k[0, :row + 1], v[0, :row + 1], row + 1,
                                  0.125, True, None)
        np.testing.assert_allclose(out[0, row], want[0], rtol=1e-4, atol=1e-4)
