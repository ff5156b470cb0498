"""The decode kernel on a Hopper GPU at real sizes, against the pure-JAX reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import planner, reference
from jaxattn.kernels import decode, decode_combine

pytestmark = pytest.mark.gpu

# Context boundaries: pages (8..128), KV blocks (64/128), chunks (8192), and the 128k maximum.
EDGES = (1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 129, 8191, 8192, 8193, 16385,
         32768, 65537, 131071, 131072)


def _case(q_lens, kv_lens, *, page_size=16, hq=40, hkv=8, d=128, dtype=jnp.bfloat16, seed=0,
          pad=0, in_order=False, num_workers=None):
    """Device-side random pools; each sequence gets shuffled pages (``in_order``: the pool's
    pages in order, as a fresh engine hands them out, but for two swapped); ``pad`` rows of
    q past the batch's tokens."""
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    s_max = max(n, 1)
    bounds = jaxattn.Bounds(max_num_seqs=s_max, max_num_batched_tokens=max(sum(q_lens) + pad, 1),
                            max_model_len=131072, page_size=page_size, num_q_heads=hq,
                            num_kv_heads=hkv, head_dim=d, chunk_size=8192,
                            block_kv=max(128, page_size),
                            **({} if num_workers is None else {"num_workers": num_workers}))
    used = [-(-k // page_size) for k in kv_lens]
    num_pages = sum(used) + 1
    perm = rng.permutation(num_pages).astype(np.int32)
    if in_order:
        perm = np.arange(num_pages, dtype=np.int32)
        perm[[1, 2]] = perm[[2, 1]]
    table = np.zeros((s_max, bounds.pages_per_seq), np.int32)
    off = 0
    for s, u in enumerate(used):
        table[s, :u] = perm[off:off + u]
        off += u
    cu = np.zeros(s_max + 1, np.int32)
    cu[1:n + 1] = np.cumsum(q_lens)
    kv = np.zeros(s_max, np.int32)
    kv[:n] = kv_lens
    keys = jax.random.split(jax.random.key(seed), 3)
    t = int(cu[-1]) + pad
    q = jax.random.normal(keys[0], (t, hq, d), dtype)
    k = jax.random.normal(keys[1], (num_pages, page_size, hkv, d), dtype)
    v = jax.random.normal(keys[2], (num_pages, page_size, hkv, d), dtype)
    return bounds, q, k, v, jnp.asarray(table), jnp.asarray(cu), jnp.asarray(kv), n


def _check(q_lens, kv_lens, *, chunk=None, causal=True, config=None, tol=2e-2, **kw):
    bounds, q, k, v, table, cu, kv, n = _case(q_lens, kv_lens, **kw)
    plan = planner.plan(bounds, cu, kv, n, chunk_size=chunk, causal=causal)
    fn = jax.jit(lambda q, k, v, table, items: decode.decode_attention(
        q, k, v, table, items, bounds=bounds, scale=0.088, causal=causal, config=config))
    out, lse = fn(q, k, v, table, plan.decode)
    want, want_lse = reference.ragged_paged_attention_reference(
        q, k, v, table, cu, kv, n, 0.088, causal=causal, chunk_size=chunk)
    out, lse = np.asarray(out), np.asarray(lse)
    want, want_lse = np.asarray(want, np.float32), np.asarray(want_lse)
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    # Rows past the batch's tokens: 0 and -inf (the kernel zeroes them; out starts
    # uninitialised).
    t = int(cu[-1])
    assert (out[t:] == 0).all() and (lse[t:] == -np.inf).all()
    out, lse, want, want_lse = out[:t], lse[:t], want[:t], want_lse[:t]
    err = np.abs(out - want).max() / max(1.0, np.abs(want).max())
    assert err < tol, err
    np.testing.assert_allclose(lse, want_lse, rtol=1e-3, atol=1e-2)
    return plan, out, lse


def test_context_edges_one_token_each():
    plan, *_ = _check([1] * len(EDGES), list(EDGES), pad=37)
    assert int((np.asarray(plan.decode.num_splits) > 1).sum()) > 0


def test_context_edges_chunked_local_multi_token():
    q_lens = [1, 2, 5, 12, 12, 3, 1, 12]
    kv_lens = [8192, 8193, 8196, 8200, 16384, 131072, 65536, 12]  # some straddle a chunk edge
    _check(q_lens, kv_lens, chunk=8192)


@pytest.mark.parametrize("batch,ctx", [(1, 1), (1, 131072), (256, 2048)])
def test_batches(batch, ctx):
    rng = np.random.default_rng(batch)
    kv = rng.integers(max(1, ctx // 2), ctx + 1, size=batch).tolist()
    kv[0] = ctx
    _check([1] * batch, kv)


@pytest.mark.parametrize("page_size", [8, 16, 32, 64, 128])
def test_page_sizes(page_size):
    _check([1, 4, 12, 1], [100, 5000, 20000, 777], page_size=page_size)


def test_smem_p_path_and_other_shapes():
    """The interpret-tested P-through-SMEM path, fp16, D=64, G=8, and the 128-key blocks."""
    _check([1, 8, 3], [40000, 9000, 513], hq=64, hkv=8, d=64, dtype=jnp.float16,
           config=decode.DecodeConfig(p_in_registers=False), tol=5e-3)
    _check([1, 12, 3], [40000, 9000, 513], config=decode.DecodeConfig(
        block_kv=128, num_stages=2, p_in_registers=True))


@pytest.mark.parametrize("combine", [
    decode_combine.CombineConfig(warpgroups=1, approx_math=False),
    decode_combine.CombineConfig(warpgroups=4, cols=32),
], ids=["1wg-exact", "4wg-32cols"])
def test_combine_options(combine):
    """The combine's shares and column blocks off the default: context edges one token each
    (split one-token pieces), multi-token chunked items (multi-row pieces: 32 columns at
    G = 5 are widened to 64, whose token rows start on 128 bytes) and 1 x 128k (16 pieces)."""
    config = decode.DecodeConfig(combine=combine)
    _check([1] * len(EDGES), list(EDGES), pad=5, config=config)
    _check([1, 2, 5, 12, 3, 12], [8193, 8196, 16384, 131072, 65536, 12], chunk=8192,
           config=config)
    _check([1], [131072], config=config)


FOLD_CASES = {
    # split one-token pieces at every context edge, and the padding rows
    "edges": dict(q_lens=[1] * len(EDGES), kv_lens=list(EDGES), pad=5),
    # multi-row pieces (multi-token items, chunked), and a 16-piece parent (1 x 128k)
    "chunked": dict(q_lens=[1, 2, 5, 12, 3, 12, 1], kv_lens=[8193, 8196, 16384, 131072, 65536,
                                                          12, 131072], chunk=8192),
    # 24 CTAs, 3 tiles each: every CTA runs a tile after its piece (tickets are taken after
    # it), 16 parents among them (a CTA may merge several: the barriers' phases carry over)
    "few_ctas": dict(q_lens=[1, 1, 4, 1, 1], kv_lens=[70000, 9000, 30000, 513, 131072],
                     num_workers=24),
}


@pytest.mark.parametrize("name", sorted(FOLD_CASES))
def test_folded_combine_equals_the_combine_kernel(name):
    """DecodeConfig.fold_combine (the CTA that finishes a parent's last piece merges it, no
    combine kernel): within the reference's tolerance, and bit for bit what the combine
    kernel gives with one warpgroup (the same adds in the same order); the FP8-row output
    too. Run three times over one metadata: the tickets go back to zero after every call."""
    case = dict(FOLD_CASES[name])
    chunk = case.pop("chunk", None)
    fold = dataclasses.replace(decode.default_config(), fold_combine=True)
    got = [_check(config=dataclasses.replace(fold, fold_combine=f, combine=decode_combine.
                                             CombineConfig(warpgroups=1)), chunk=chunk,
                  **case)[1:] for f in (True, False)]
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])

    bounds, q, k, v, table, cu, kv, n = _case(**case)
    plan = planner.plan(bounds, cu, kv, n, chunk_size=chunk)
    md = jax.jit(lambda items: decode.decode_metadata(items, bounds=bounds,
                                                      num_tokens=q.shape[0]))(plan.decode)
    assert int(md.parents[0]) > 0  # split parents to merge
    for out_scale in (None, 2.0 ** -6):
        fn = jax.jit(lambda q, k, v, table, items, md: decode.decode_attention(
            q, k, v, table, items, bounds=bounds, scale=0.088, config=fold, metadata=md,
            out_scale=out_scale))
        runs = [[np.asarray(x, np.float32) for x in fn(q, k, v, table, plan.decode, md)]
                for _ in range(3)]
        assert (np.asarray(md.tickets) == 0).all()
        for out, lse in runs[1:]:
            np.testing.assert_array_equal(out, runs[0][0])
            np.testing.assert_array_equal(lse, runs[0][1])


@pytest.mark.parametrize("page_size", [16, 32])
def test_merged_pages_equal_page_by_page_on_the_gpu(page_size):
    """DecodeConfig.merge_pages over pages in order (a block's pages one TMA copy): within
    the reference's tolerance and bit for bit what one copy per page gives, under the bf16
    default's 128-key blocks and under 64-key ones."""
    q_lens, kv_lens = [1, 12, 1, 3, 1], [8193, 20000, 131072, 777, 40]
    for base in (decode.default_config(), decode.DecodeConfig(p_in_registers=True)):
        got = [_check(q_lens, kv_lens, chunk=8192, page_size=page_size, in_order=True,
                      config=dataclasses.replace(base, merge_pages=m))[1:] for m in (True, False)]
        np.testing.assert_array_equal(got[0][0], got[1][0])
        np.testing.assert_array_equal(got[0][1], got[1][1])


def test_non_causal_and_g1():
    _check([2, 1, 30], [5000, 70000, 600], causal=False, chunk=8192, hq=8, hkv=8)


def test_decode_only_equals_the_general_path_on_the_gpu():
    """The engine's decode-only step (``ragged_paged_attention(decode_only=True)``) at Scout's
    heads: the same output and lse as the general path (prefill pass + merge), bit for bit,
    for a batch of decode rows with a 128k sequence (split), chunked and global."""
    q_lens, kv_lens = (1, 1, 3, 12, 1), (131072, 8193, 300, 17, 1)
    bounds, q, k, v, table, cu, kv, n = _case(q_lens, kv_lens)
    for chunk in (None, 8192):
        def run(decode_only, chunk=chunk):
            f = jax.jit(lambda *a: jaxattn.ragged_paged_attention(
                *a, n, bounds=bounds, scale=0.088, chunk_size=chunk, impl="mosaic",
                return_lse=True, decode_only=decode_only))
            return [np.asarray(x, np.float32) for x in f(q, k, v, table, cu, kv)]

        (out, lse), (out_d, lse_d) = run(False), run(True)
        np.testing.assert_array_equal(out_d, out)
        np.testing.assert_array_equal(lse_d, lse)


def test_out_scale_writes_fp8_rows_on_the_gpu():
    """``out_scale`` (FP8 rows for an FP8 o_proj, llama4.model.STATIC_O_SCALE) at Scout's
    heads, decode-only: the main kernel's unsplit rows and the combine's (128-column CTAs;
    a 128k sequence's 16 pieces, multi-token pieces) within one e4m3 step of quantising the
    bf16 output, and the padding rows 0."""
    q_lens, kv_lens = (1, 1, 3, 12, 1), (131072, 8193, 300, 17, 1)
    bounds, q, k, v, table, cu, kv, n = _case(q_lens, kv_lens, pad=3)
    out_scale = 2.0 ** -6  # |out| <= max |v| ~ 5.5 < 448 * 2^-6 = 7
    for chunk in (None, 8192):
        def run(**kw):
            f = jax.jit(lambda *a: jaxattn.ragged_paged_attention(
                *a, n, bounds=bounds, scale=0.088, chunk_size=chunk, impl="mosaic",
                decode_only=True, **kw))
            return f(q, k, v, table, cu, kv)

        got = run(out_scale=out_scale)
        assert got.dtype == jnp.float8_e4m3fn
        got = np.asarray(got, np.float32)
        want = np.asarray(jnp.clip(run().astype(jnp.float32) / out_scale, -448, 448).astype(
            jnp.float8_e4m3fn), np.float32)
        t = int(cu[-1])
        assert (got[t:] == 0).all()
        np.testing.assert_allclose(got, want, rtol=2.0 ** -3, atol=2.0 ** -9)
        assert np.mean(got == want) > 0.9
