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

from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.kernels import common, qk_rows


@pytest.fixture
def interpret():
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        yield


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


def _target(tokens, hkv, d, num_pages=6, page_size=8):
    """Pools with random contents and slots: scattered, one repeated page, two padding
    tokens (past the pool: not written)."""
    kp, vp = (jax.random.normal(jax.random.key(s), (num_pages, page_size, hkv, d), jnp.bfloat16)
              for s in (20, 21))
    slots = (jnp.arange(tokens) * 5 + 3) % (num_pages * page_size)
    slots = slots.at[1].set(num_pages * page_size).at[-1].set(num_pages * page_size + 7)
    return qk_rows.KVTarget(kp, vp, slots.astype(jnp.int32))


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
