"""The query/key rows kernel (RoPE, QK-norm, temperature in one launch) against the XLA ops
it replaces.

On CPU the Mosaic GPU kernel runs in Pallas' GPU interpret mode (its register pair swap by
jnp there) and is lowered for CUDA (the swap as Mosaic code); on a Hopper GPU it runs at
Scout's decode shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import kv_quant
from jaxattn.kernels import common, qk_rows

from attention_cases import assert_fp8_pools_close


def _case(tokens, hq, hkv, d, seed=0):
    """A q/k/v projection's joint output (bf16, a wide spread of magnitudes), RoPE tables at
    scattered positions up to ~10k, and Llama 4's NoPE temperature at those positions."""
    qkv = (jax.random.normal(jax.random.key(seed), (tokens, (hq + 2 * hkv) * d)) * 3
           ).astype(jnp.bfloat16)
    pos = (jnp.arange(tokens) * 677 + 5) % 10001
    inv_freq = 1.0 / 500000.0 ** (jnp.arange(0, d, 2) / d)
    temperature = jnp.log1p(jnp.floor((pos + 1.0) / 8192.0)) * 0.1 + 1.0
    return qkv, qk_rows.rope_tables(inv_freq, pos), temperature


def _assert_close(got, want, exact_fraction=0.98):
    """Within one bf16 step, and (``exact_fraction``) equal for almost all values: a last-bit
    rounding here and there (the kernel's f32 sums and fused multiply-adds are not XLA's)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)
    if exact_fraction is not None:
        assert (got == want).mean() >= exact_fraction


def _bf16(x):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16))


LAYERS = {  # what a Scout layer asks for: RoPE + norm (3 in 4), temperature (NoPE)
    "rope+norm": lambda rope, t: dict(rope=rope, eps=1e-5),
    "rope": lambda rope, t: dict(rope=rope),
    "temperature": lambda rope, t: dict(temperature=t * 1.3),
}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("tokens,hq,hkv,d", [(16, 40, 8, 128), (16, 20, 4, 128),
                                             (8, 8, 8, 64), (64, 2, 1, 128), (2, 40, 8, 128)])
def test_kernel_equals_the_model_ops(interpret, layer, tokens, hq, hkv, d):
    """Scout's heads at TP=1 and TP=2 in a 16-token bucket, head_dim 64, 64 tokens, and 2
    tokens (the last token's tile then starts inside the first's)."""
    qkv, rope, t = _case(tokens, hq, hkv, d)
    kw = LAYERS[layer](rope, t)
    got = qk_rows.rope_norm(qkv, hq, hkv, impl="mosaic", **kw)
    q, k, v = qk_rows.split(qkv, hq, hkv)
    want = (*qk_rows.reference(q, k, **kw), v)
    if layer == "temperature":
        # XLA on the CPU multiplies by the temperature rounded to bf16 (its excess-precision
        # rewrite of convert-multiply-convert); HF and the kernel multiply in f32.
        want = (_bf16(np.asarray(q, np.float32) * np.asarray(kw["temperature"])[:, None, None]),
                k, v)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16 and g.shape == w.shape
        _assert_close(g, w)


def _target(tokens, hkv, d, num_pages=6, page_size=8, fp8=False):
    """Pools with random contents and slots: scattered, one repeated page, two padding
    tokens (past the pool: not written). ``fp8``: an FP8 cache's, with its scale pools."""
    kp, vp = (jax.random.normal(jax.random.key(s), (num_pages, page_size, hkv, d), jnp.bfloat16)
              for s in (20, 21))
    slots = (jnp.arange(tokens) * 5 + 3) % (num_pages * page_size)
    slots = slots.at[1].set(num_pages * page_size).at[-1].set(num_pages * page_size + 7)
    if not fp8:
        return qk_rows.KVTarget(kp, vp, slots.astype(jnp.int32))
    (kp, ks), (vp, vs) = (kv_quant.quantize(p) for p in (kp, vp))
    return qk_rows.KVTarget(kp, vp, slots.astype(jnp.int32), jnp.swapaxes(ks, 1, 2),
                            jnp.swapaxes(vs, 1, 2))  # scales [P, Hkv, page_size]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("tokens,hq,hkv,d", [(16, 40, 8, 128), (8, 8, 8, 64), (3, 20, 4, 128)])
def test_kernel_writes_k_and_v_into_the_cache(interpret, layer, tokens, hq, hkv, d):
    """With a :class:`KVTarget` the kernel also writes the token's k (rotated, normed) and v
    rows into their slots (padding tokens nowhere), and every other slot keeps its value:
    XLA's scatters, exactly."""
    qkv, rope, t = _case(tokens, hq, hkv, d)
    kw = LAYERS[layer](rope, t)
    target = _target(tokens, hkv, d)
    q, k, v, (kp, vp) = qk_rows.rope_norm(qkv, hq, hkv, cache=target, impl="mosaic", **kw)
    assert k is None and v is None
    wq, wk, wv, (wkp, wvp) = qk_rows.rope_norm(qkv, hq, hkv, cache=target, impl="xla", **kw)
    if layer != "temperature":  # XLA's CPU temperature: see test_kernel_equals_the_model_ops
        _assert_close(q, wq)
    for g, w in ((kp, wkp), (vp, wvp)):
        _assert_close(g, w)
    np.testing.assert_array_equal(np.asarray(vp, np.float32), np.asarray(wvp, np.float32))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("tokens,hq,hkv,page_size", [(16, 40, 8, 32), (3, 20, 4, 8),
                                                     (64, 2, 1, 16)])
def test_kernel_quantises_k_and_v_into_an_fp8_cache(interpret, layer, tokens, hq, hkv,
                                                    page_size):
    """An FP8 cache: the kernel writes each token's k and v rows as e4m3 values with one
    scale per token and KV head (kv_quant.quantize's arithmetic), padding tokens nowhere,
    every other slot and scale as it was: XLA's quantisation and scatters, bit for bit."""
    qkv, rope, t = _case(tokens, hq, hkv, 128)
    kw = LAYERS[layer](rope, t)
    target = _target(tokens, hkv, 128, page_size=page_size, fp8=True)
    q, k, v, pools = qk_rows.rope_norm(qkv, hq, hkv, cache=target, impl="mosaic", **kw)
    assert k is None and v is None and len(pools) == 4
    wq, wk, wv, want = qk_rows.rope_norm(qkv, hq, hkv, cache=target, impl="xla", **kw)
    if layer != "temperature":  # XLA's CPU temperature: see test_kernel_equals_the_model_ops
        _assert_close(q, wq)
    for g, w in ((pools[::2], want[::2]), (pools[1::2], want[1::2])):  # K's, then V's
        assert_fp8_pools_close(g, w)
    # the writes reached the pools: each written slot's scales are its rows' own
    page, off = divmod(int(target.slots[0]), page_size)
    np.testing.assert_array_equal(np.asarray(pools[3][page, :, off]),
                                  np.asarray(kv_quant.quantize(wv[0])[1]))


@pytest.mark.parametrize("tokens,hq,hkv,page_size,fixed_v", [(16, 40, 8, 32, True),
                                                              (3, 20, 4, 8, False)])
def test_kernel_writes_rows_with_the_fixed_scales(interpret, tokens, hq, hkv, page_size,
                                                  fixed_v):
    """``fixed_k_scale`` (a RoPE layer's normed keys, kv_quant.normed_k_scale): k's rows
    quantised with that one scale, which its scale pool then holds at each written slot;
    ``fixed_v_scale`` (a bound over the values, as Llama4ForCausalLM.fix_kv_scales gives)
    likewise v's, or without it v's per row; both as XLA's writes, bit for bit."""
    qkv, rope, t = _case(tokens, hq, hkv, 128)
    fixed = kv_quant.normed_k_scale(128)
    v_largest = float(jnp.abs(qk_rows.split(qkv, hq, hkv)[2].astype(jnp.float32)).max())
    fv = kv_quant.power_of_two_scale(v_largest) if fixed_v else None
    target = _target(tokens, hkv, 128, page_size=page_size, fp8=True)
    kw = dict(rope=rope, eps=1e-5, cache=target, fixed_k_scale=fixed, fixed_v_scale=fv)
    *_, pools = qk_rows.rope_norm(qkv, hq, hkv, impl="mosaic", **kw)
    *_, want = qk_rows.rope_norm(qkv, hq, hkv, impl="xla", **kw)
    for g, w in ((pools[::2], want[::2]), (pools[1::2], want[1::2])):
        assert_fp8_pools_close(g, w)
    np.testing.assert_array_equal(_written_scales(pools[2], target), fixed)
    v_scales = _written_scales(pools[3], target)
    if fixed_v:
        np.testing.assert_array_equal(v_scales, fv)
    else:
        assert len(np.unique(v_scales)) > 1


def _written_scales(scale_pool, target):
    """The scales [tokens, Hkv] at ``target``'s slots, padding tokens left out."""
    page_size = target.k_pages.shape[1]
    slots = np.asarray(target.slots)
    slots = slots[slots < target.k_pages.shape[0] * page_size]
    return np.asarray(scale_pool)[slots // page_size, :, slots % page_size]


def test_fp8_pool_comparison_tells_a_last_bit_from_a_wrong_row():
    """The GPU tests' comparison of two FP8 writes: rows whose bf16 inputs differ in last
    bits pass; a row written to the wrong slot does not."""
    x = jax.random.normal(jax.random.key(3), (4, 8, 2, 128)) * 3
    nudged = (x * (1 + 2.0**-7 * (jax.random.uniform(jax.random.key(4), x.shape) < 0.25))
              ).astype(jnp.bfloat16)  # a quarter of the values a bf16 step or two off
    pools = [(v, jnp.swapaxes(s, 1, 2)) for v, s in (kv_quant.quantize(x.astype(jnp.bfloat16)),
                                                      kv_quant.quantize(nudged))]
    assert_fp8_pools_close(*pools, exact_fraction=0.9)
    with pytest.raises(AssertionError):
        assert_fp8_pools_close(*pools)  # not bit for bit
    (v, s), want = pools
    with pytest.raises(AssertionError):  # one token's row in another's slot
        assert_fp8_pools_close((v.at[1, 3].set(v[2, 5]), s.at[1, :, 3].set(s[2, :, 5])), want,
                               exact_fraction=0.9)


def test_an_fp8_cache_at_head_dim_64_takes_xla(monkeypatch):
    """Its e4m3 rows would lie 64 bytes apart in shared memory: no TMA store's source."""
    monkeypatch.setattr(common, "on_hopper", lambda: True)
    monkeypatch.setattr(qk_rows, "_rope_norm_kernel", lambda *a, **k: pytest.fail("kernel"))
    qkv, rope, _ = _case(16, 8, 8, 64)
    target = _target(16, 8, 64, page_size=16, fp8=True)
    q, k, v, pools = qk_rows.rope_norm(qkv, 8, 8, rope, eps=1e-5, cache=target)
    assert k is not None and len(pools) == 4


def test_the_kernel_rotates_pairs_not_halves(interpret):
    """A row of one unit pair: RoPE by a quarter turn moves element 2j onto 2j + 1
    (interleaved pairs, HF's convention), without the norm."""
    qkv = jnp.zeros((16, 6, 64), jnp.bfloat16).at[:, :, 6].set(1.0).reshape(16, -1)
    cos = jnp.ones((16, 64)).at[:, 6:8].set(0.0)
    sin = jnp.zeros((16, 64)).at[:, 6].set(-1.0).at[:, 7].set(1.0)
    q, k, v = qk_rows.rope_norm(qkv, 4, 1, (cos, sin), impl="mosaic")
    want = jnp.zeros((16, 4, 64)).at[:, :, 7].set(1.0)
    np.testing.assert_array_equal(np.asarray(q, np.float32), want)
    np.testing.assert_array_equal(np.asarray(k, np.float32), want[:, :1])
    np.testing.assert_array_equal(np.asarray(v, np.float32),
                                  np.asarray(qkv[:, -64:], np.float32)[:, None])


def test_auto_takes_xla_off_hopper_and_past_decode(monkeypatch):
    qkv, rope, t = _case(16, 8, 8, 64)
    calls = []
    monkeypatch.setattr(qk_rows, "_rope_norm_kernel",
                        lambda qkv, *a, **kw: calls.append(qkv.shape) or (None, None, None))
    monkeypatch.setattr(common, "on_hopper", lambda: False)
    qk_rows.rope_norm(qkv, 8, 8, rope, eps=1e-5)
    monkeypatch.setattr(common, "on_hopper", lambda: True)
    qk_rows.rope_norm(qkv[None], 8, 8, rope, eps=1e-5)  # [B, P, ...]: the forward's
    qk_rows.rope_norm(qkv.astype(jnp.float32), 8, 8, rope)
    qk_rows.rope_norm(tuple(jnp.split(qkv, [512, 1024], -1)), 8, 8, rope)  # XLA's dots' parts
    qk_rows.rope_norm(qkv[:2], 8, 8, tuple(a[:2] for a in rope))  # 2 x 24 heads: under a tile
    big = jnp.zeros((128, 24 * 64), jnp.bfloat16)
    qk_rows.rope_norm(big, 8, 8, (jnp.zeros((128, 64)),) * 2)  # past max_tokens
    qk_rows.rope_norm(qkv, 8, 8)  # nothing to do
    assert calls == []
    qk_rows.rope_norm(qkv, 8, 8, rope, eps=1e-5)
    assert calls == [qkv.shape]


def test_mosaic_rejects_shapes_it_cannot_tile():
    qkv = jnp.zeros((2, 24 * 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="Hq \\+ 2 Hkv <= 64"):
        qk_rows.rope_norm(qkv, 8, 8, (jnp.zeros((2, 64)),) * 2, impl="mosaic")
    with pytest.raises(ValueError, match="impl"):
        qk_rows.rope_norm(qkv, 8, 8, (jnp.zeros((2, 64)),) * 2, impl="triton")


@pytest.mark.parametrize("tokens,hq,hkv", [(8, 40, 8), (16, 40, 8), (64, 40, 8), (8, 20, 4),
                                           (16, 20, 4), (64, 20, 4)])
def test_kernel_lowers_for_cuda_at_scout_shapes(tokens, hq, hkv):
    """Every form a Scout decode step launches: buckets of 8-64 tokens, TP=1 and TP=2."""
    qkv = jax.ShapeDtypeStruct((tokens, (hq + 2 * hkv) * 128), jnp.bfloat16)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    table = f32(tokens, 128)
    cases = [
        (lambda a, c, s: qk_rows.rope_norm(a, hq, hkv, (c, s), eps=1e-5, impl="mosaic"),
         (qkv, table, table)),
        (lambda a, t: qk_rows.rope_norm(a, hq, hkv, temperature=t, impl="mosaic"),
         (qkv, f32(tokens))),
    ]
    for f, args in cases:
        assert "mosaic_gpu" in jax.export.export(jax.jit(f), platforms=["cuda"])(
            *args).mlir_module()
    pools = jax.ShapeDtypeStruct((64, 16, hkv, 128), jnp.bfloat16)
    write = jax.jit(lambda a, c, s, kp, vp, slots: qk_rows.rope_norm(
        a, hq, hkv, (c, s), eps=1e-5, cache=qk_rows.KVTarget(kp, vp, slots), impl="mosaic"),
        donate_argnums=(3, 4))
    module = jax.export.export(write, platforms=["cuda"])(
        qkv, table, table, pools, pools, jax.ShapeDtypeStruct((tokens,), jnp.int32)).mlir_module()
    assert module.count("tf.aliasing_output") == 2  # the pools, updated in place
    values = jax.ShapeDtypeStruct((64, 32, hkv, 128), kv_quant.FP8)
    scales = jax.ShapeDtypeStruct((64, hkv, 32), jnp.float32)
    # k's and v's scales per row, or one each (Llama 4's layers)
    for fk, fv in ((None, None), (kv_quant.normed_k_scale(128), 2.0 ** -3)):
        write8 = jax.jit(lambda a, c, s, kp, vp, ks, vs, slots: qk_rows.rope_norm(
            a, hq, hkv, (c, s), eps=1e-5, cache=qk_rows.KVTarget(kp, vp, slots, ks, vs),
            impl="mosaic", fixed_k_scale=fk, fixed_v_scale=fv), donate_argnums=(3, 4, 5, 6))
        module = jax.export.export(write8, platforms=["cuda"])(
            qkv, table, table, values, values, scales, scales,
            jax.ShapeDtypeStruct((tokens,), jnp.int32)).mlir_module()
        assert module.count("tf.aliasing_output") == 4  # values and scales, in place


@pytest.mark.gpu
@pytest.mark.skipif(not common.on_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("tokens,hq,hkv", [(16, 40, 8), (8, 20, 4), (64, 40, 8)])
def test_kernel_on_gpu_at_scout_shapes(layer, tokens, hq, hkv):
    """The Mosaic pair swap (not interpret mode's jnp) against XLA's ops on the GPU, within
    one bf16 step: XLA there skips the model's bf16 rounding between RoPE and the norm (its
    excess precision), the kernel keeps it (HF's), so last bits differ often."""
    qkv, rope, t = _case(tokens, hq, hkv, 128, seed=tokens)
    kw = LAYERS[layer](rope, t)
    got = jax.jit(lambda a: qk_rows.rope_norm(a, hq, hkv, impl="mosaic", **kw))(qkv)
    want = jax.jit(lambda a: qk_rows.rope_norm(a, hq, hkv, impl="xla", **kw))(qkv)
    for g, w in zip(got, want):
        _assert_close(g, w, exact_fraction=None)
    target = _target(tokens, hkv, 128, num_pages=64)
    write = lambda impl: jax.jit(lambda a, c: qk_rows.rope_norm(
        a, hq, hkv, cache=c, impl=impl, **kw))(qkv, target)
    (q, _, _, pools), (wq, _, _, want_pools) = write("mosaic"), write("xla")
    _assert_close(q, wq, exact_fraction=None)
    for g, w in zip(pools, want_pools):
        _assert_close(g, w, exact_fraction=None)
    target = _target(tokens, hkv, 128, num_pages=64, page_size=32, fp8=True)
    (q, _, _, pools), (wq, _, _, want_pools) = write("mosaic"), write("xla")
    _assert_close(q, wq, exact_fraction=None)
    # k's bf16 rows differ from XLA's in last bits (above, up to ~25% of values): their e4m3
    # values by a step (~3% of them with RoPE)
    assert_fp8_pools_close(pools[::2], want_pools[::2], exact_fraction=0.9)
    # v as it came: equal but for a reciprocal's last bit, if XLA's division is not Mosaic's
    assert_fp8_pools_close(pools[1::2], want_pools[1::2], exact_fraction=0.99)
    # one V scale (every Llama 4 layer's), and normed keys' one K scale
    v_largest = float(jnp.abs(qk_rows.split(qkv, hq, hkv)[2].astype(jnp.float32)).max())
    kw["fixed_v_scale"] = kv_quant.power_of_two_scale(v_largest)
    if "eps" in kw:
        kw["fixed_k_scale"] = kv_quant.normed_k_scale(128)
    (q, _, _, pools), (wq, _, _, want_pools) = write("mosaic"), write("xla")
    assert_fp8_pools_close(pools[::2], want_pools[::2], exact_fraction=0.9)
    assert_fp8_pools_close(pools[1::2], want_pools[1::2], exact_fraction=0.99)
    np.testing.assert_array_equal(_written_scales(pools[3], target), kw["fixed_v_scale"])
    if "eps" in kw:
        np.testing.assert_array_equal(_written_scales(pools[2], target), kw["fixed_k_scale"])
