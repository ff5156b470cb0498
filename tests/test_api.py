"""The public attention API: numerics of every implementation, validation, static shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import kernels

from attention_cases import make_ragged_case, naive_attention, naive_ragged

# Kernel modules add their impls here once they run on the CPU (interpret mode).
IMPLS = ["reference", "executor"]
TOL = {np.float32: 3e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


def _bounds(hq=4, hkv=2, d=32, chunk=None, **kw):
    base = dict(max_num_seqs=6, max_num_batched_tokens=320, max_model_len=640, page_size=16,
                num_q_heads=hq, num_kv_heads=hkv, head_dim=d, chunk_size=chunk, block_q=64,
                block_kv=64, num_workers=8, min_split_kv=64)
    return jaxattn.Bounds(**{**base, **kw})


def _assert_close(got, want, dtype):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err < TOL[dtype], err


# Mixed batches: decode (1 token), speculative (3), fresh prefill, chunked prefill over a cached
# prefix, lengths at page/block/chunk boundaries +-1.
MIXES = {
    "mixed": ([1, 100, 3, 65, 1], [1, 300, 130, 65, 640]),
    "decode_only": ([1, 1, 2, 1], [63, 64, 65, 500]),
    "prefill_boundaries": ([63, 64, 65, 127], [63, 128, 129, 256]),
    "chunked_prefill": ([200, 17], [600, 17]),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("chunk", [None, 128])
def test_ragged_paged_matches_oracle(impl, mix, chunk):
    bounds = _bounds(chunk=chunk)
    case = make_ragged_case(bounds, *MIXES[mix], seed=len(mix))
    out, lse = jaxattn.ragged_paged_attention(*case.args(), bounds=bounds, chunk_size=chunk,
                                              return_lse=True, impl=impl)
    want_o, want_l = naive_ragged(*case.args(), 1 / np.sqrt(32), chunk=chunk)
    _assert_close(out, want_o, np.float32)
    finite = np.isfinite(want_l)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_l[finite], rtol=1e-4, atol=1e-4)
    assert (np.asarray(lse)[~finite] == -np.inf).all()


# Chunks shorter than a page and than a decode tile's 64 // group = 21 tokens (6 query / 2 KV
# heads), with the engine's tile for them (gcd(chunk, page)): decode, speculative rows that
# straddle boundaries, fresh and chunked prefill crossing many chunks, in one batch.
TINY_MIX = ([1, 3, 40, 21, 2, 1], [7, 30, 40, 120, 2, 97])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 16, 24])
def test_ragged_paged_tiny_chunks_match_oracle(impl, chunk):
    from jaxattn.serve.config import default_block_kv

    bounds = _bounds(hq=6, hkv=2, chunk=chunk, page_size=8, block_q=16,
                     block_kv=default_block_kv(chunk, 8), min_split_kv=8)
    assert bounds.dq == min(21, chunk)
    case = make_ragged_case(bounds, *TINY_MIX, seed=chunk)
    out, lse = jaxattn.ragged_paged_attention(*case.args(), bounds=bounds, chunk_size=chunk,
                                              return_lse=True, impl=impl)
    want_o, want_l = naive_ragged(*case.args(), 1 / np.sqrt(32), chunk=chunk)
    _assert_close(out, want_o, np.float32)
    np.testing.assert_allclose(np.asarray(lse), want_l, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (5, 1), (8, 1)])
def test_ragged_paged_dtypes_and_gqa(impl, dtype, hq, hkv):
    bounds = _bounds(hq=hq, hkv=hkv, d=64, chunk=128)
    case = make_ragged_case(bounds, [1, 150, 2], [129, 300, 640], dtype=dtype, seed=hq)
    out = jaxattn.ragged_paged_attention(*case.args(), bounds=bounds, chunk_size=128, scale=0.1,
                                         impl=impl)
    assert out.dtype == dtype
    want, _ = naive_ragged(*case.args(), 0.1, chunk=128)
    _assert_close(out, want, dtype)


@pytest.mark.parametrize("causal,chunk", [(True, None), (False, None), (True, 48), (False, 48),
                                          (True, 1), (True, 3), (False, 5)])
def test_attention_contiguous(causal, chunk):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 40, 6, 32)).astype(np.float32)
    k = rng.standard_normal((2, 100, 2, 32)).astype(np.float32)
    v = rng.standard_normal((2, 100, 2, 32)).astype(np.float32)
    q_lens, kv_lens = np.array([40, 7], np.int32), np.array([100, 50], np.int32)
    out, lse = jax.jit(functools.partial(jaxattn.attention, causal=causal, chunk_size=chunk,
                                         return_lse=True))(q, k, v, q_lens=q_lens, kv_lens=kv_lens)
    for b in range(2):
        want, want_l = naive_attention(q[b, :q_lens[b]], k[b], v[b], kv_lens[b], 1 / np.sqrt(32),
                                       causal, chunk)
        _assert_close(out[b, :q_lens[b]], want, np.float32)
        np.testing.assert_allclose(lse[b, :q_lens[b]], want_l, rtol=1e-4, atol=1e-4)
    assert not np.isnan(np.asarray(out)).any()
    assert (np.asarray(out[1, 7:]) == 0).all(), "padded query rows must be zeros"


def test_attention_defaults_bottom_right_causal():
    """Lq < Lk with no lengths: the queries are the last Lq positions."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 3, 2, 16)).astype(np.float32)
    k = rng.standard_normal((1, 10, 2, 16)).astype(np.float32)
    out = jaxattn.attention(q, k, k)
    want, _ = naive_attention(q[0], k[0], k[0], 10, 0.25, True, None)
    _assert_close(out[0], want, np.float32)


def test_one_compile_for_fifty_length_mixes():
    bounds = _bounds(chunk=128)
    base = make_ragged_case(bounds, [1], [1])
    fns = {impl: jax.jit(functools.partial(jaxattn.ragged_paged_attention, bounds=bounds,
                                           chunk_size=128, impl=impl)) for impl in IMPLS}
    rng = np.random.default_rng(0)
    for i in range(50):
        n = rng.integers(1, bounds.max_num_seqs + 1)
        q_lens = rng.integers(1, bounds.max_num_batched_tokens // n + 1, size=n)
        kv_lens = np.minimum(q_lens + rng.integers(0, bounds.max_model_len, size=n), bounds.max_model_len)
        case = make_ragged_case(bounds, q_lens, kv_lens, seed=i)
        for impl, fn in fns.items():
            out = fn(case.q, base.k_pages, base.v_pages, case.page_table * 0, case.cu_q_lens,
                     case.kv_lens, np.int32(n))
            assert np.isfinite(np.asarray(out)).all()
    for impl, fn in fns.items():
        assert fn._cache_size() == 1, f"{impl} recompiled: {fn._cache_size()} compilations"


# --- validation: ValueError naming the problem, before any kernel is traced ---

def _ragged_args(bounds, **override):
    case = make_ragged_case(bounds, [3, 1], [10, 20])
    args = dict(zip(["q", "k_pages", "v_pages", "page_table", "cu_q_lens", "kv_lens", "num_seqs"],
                    case.args()))
    return {**args, **override}


@pytest.mark.parametrize("override,match", [
    (lambda a: {"q": a["q"][:, :3]}, "num_q_heads"),
    (lambda a: {"q": a["q"].astype(np.float16)}, "dtypes differ"),
    (lambda a: {"v_pages": a["v_pages"][:, :, :1]}, "shape"),
    (lambda a: {"page_table": a["page_table"][:, :2]}, "page_table too short"),
    (lambda a: {"kv_lens": np.array([10, 641, 0, 0, 0, 0], np.int32)}, "max_model_len"),
    (lambda a: {"cu_q_lens": np.array([0, 3, 330, 330, 330, 330, 330], np.int32),
                "kv_lens": np.array([10, 400, 0, 0, 0, 0], np.int32)}, "max_num_batched_tokens"),
    (lambda a: {"num_seqs": np.int32(7)}, "max_num_seqs"),
    (lambda a: {"kv_lens": np.array([2, 20, 0, 0, 0, 0], np.int32)}, "q_len"),
    (lambda a: {"page_table": a["page_table"] + 1000}, "page ids"),
    (lambda a: {"q": a["q"].astype(np.int32), "k_pages": a["k_pages"].astype(np.int32),
                "v_pages": a["v_pages"].astype(np.int32)}, "unsupported"),
])
def test_ragged_validation(override, match):
    bounds = _bounds()
    args = _ragged_args(bounds)
    args.update(override(args))
    with pytest.raises(ValueError, match=match):
        jaxattn.ragged_paged_attention(**args, bounds=bounds)


def test_attention_validation():
    q = np.zeros((1, 4, 6, 32), np.float32)
    k = np.zeros((1, 8, 4, 32), np.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        jaxattn.attention(q, k, k)
    with pytest.raises(ValueError, match="head_dim"):
        jaxattn.attention(np.zeros((1, 4, 2, 12), np.float32), np.zeros((1, 8, 2, 12), np.float32),
                          np.zeros((1, 8, 2, 12), np.float32))
    with pytest.raises(ValueError, match="head_dim"):
        jaxattn.attention(q[..., :16], k[..., :2, :], k[..., :2, :])
    with pytest.raises(ValueError, match="kv_lens"):
        jaxattn.attention(q, k[:, :, :2], k[:, :, :2], kv_lens=np.array([9]))
    with pytest.raises(ValueError, match="impl"):
        jaxattn.attention(q, k[:, :, :2], k[:, :, :2], impl="cuda")


def test_kernel_impls_refuse_what_the_kernels_cannot_serve():
    q = np.zeros((1, 4, 2, 32), np.float16)  # head_dim 32: the reference's, not the kernels'
    assert not kernels.supports(32, np.float16)
    with pytest.raises(ValueError, match="cannot serve"):
        jaxattn.attention(q, q, q, impl="mosaic")
    # Chunks the kernels' tiles cannot start on: "auto" takes the reference there (any valid
    # Llama 4 chunk size serves), an explicit kernel impl is refused.
    assert kernels.contiguous_unsupported_reason(64, jnp.bfloat16, 8192) is None
    assert "multiple of 64" in kernels.contiguous_unsupported_reason(64, jnp.bfloat16, 16)
    q64 = np.zeros((1, 4, 2, 64), np.float16)
    with pytest.raises(ValueError, match="multiple of 64"):
        jaxattn.attention(q64, q64, q64, chunk_size=16, impl="mosaic")
