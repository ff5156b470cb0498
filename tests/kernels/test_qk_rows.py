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
    """q, k (bf16, a wide spread of magnitudes), RoPE tables at scattered positions up to
    ~10k, and Llama 4's NoPE temperature at those positions."""
    kq, kk = jax.random.split(jax.random.key(seed))
    q = (jax.random.normal(kq, (tokens, hq, d)) * 3).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (tokens, hkv, d), jnp.bfloat16)
    pos = (jnp.arange(tokens) * 677 + 5) % 10001
    inv_freq = 1.0 / 500000.0 ** (jnp.arange(0, d, 2) / d)
    freqs = pos[:, None].astype(jnp.float32) * inv_freq
    temperature = jnp.log1p(jnp.floor((pos + 1.0) / 8192.0)) * 0.1 + 1.0
    return q, k, (jnp.cos(freqs), jnp.sin(freqs)), temperature


def _assert_close(got, want):
    """Equal but for a last-bit rounding here and there (the kernel's f32 sums and fused
    multiply-adds are not XLA's): within one bf16 step, and equal for almost all values."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)
    assert (got != want).mean() < 0.02


def _bf16(x):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16))


LAYERS = {  # what a Scout layer asks for: RoPE + norm (3 in 4), temperature (NoPE)
    "rope+norm": lambda rope, t: dict(rope=rope, eps=1e-5),
    "rope": lambda rope, t: dict(rope=rope),
    "temperature": lambda rope, t: dict(temperature=t * 1.3),
}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("tokens,hq,hkv,d", [(16, 40, 8, 128), (16, 20, 4, 128),
                                             (8, 8, 8, 64), (64, 2, 1, 128)])
def test_kernel_equals_the_model_ops(interpret, layer, tokens, hq, hkv, d):
    """Scout's heads at TP=1 and TP=2 in a 16-token bucket, head_dim 64, 64 tokens."""
    q, k, rope, t = _case(tokens, hq, hkv, d)
    kw = LAYERS[layer](rope, t)
    got = qk_rows.rope_norm(q, k, impl="mosaic", **kw)
    want = qk_rows.reference(q, k, **kw)
    if layer == "temperature":
        # XLA on the CPU multiplies by the temperature rounded to bf16 (its excess-precision
        # rewrite of convert-multiply-convert); HF and the kernel multiply in f32.
        want = (_bf16(np.asarray(q, np.float32) * np.asarray(kw["temperature"])[:, None, None]),
                k)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        _assert_close(g, w)
    if layer == "temperature":  # k is not touched
        np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(k, np.float32))


def test_the_kernel_rotates_pairs_not_halves(interpret):
    """A row of one unit pair: RoPE by a quarter turn moves element 2j onto 2j + 1
    (interleaved pairs, HF's convention), without the norm."""
    q = jnp.zeros((16, 4, 64), jnp.bfloat16).at[:, :, 6].set(1.0)
    cos = jnp.zeros((16, 32)).at[:, 3].set(0.0)
    sin = jnp.zeros((16, 32)).at[:, 3].set(1.0)
    got, _ = qk_rows.rope_norm(q, q, (cos, sin), impl="mosaic")
    want = jnp.zeros_like(q).at[:, :, 7].set(1.0)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_auto_takes_xla_off_hopper_and_past_decode(monkeypatch):
    q, k, rope, t = _case(16, 8, 8, 64)
    calls = []
    monkeypatch.setattr(qk_rows, "_rope_norm_kernel",
                        lambda *a, **kw: calls.append(a[0].shape) or (a[0], a[1]))
    monkeypatch.setattr(common, "on_hopper", lambda: False)
    qk_rows.rope_norm(q, k, rope, eps=1e-5)
    monkeypatch.setattr(common, "on_hopper", lambda: True)
    qk_rows.rope_norm(q[None], k[None], rope, eps=1e-5)  # [B, P, H, D]: the forward's
    qk_rows.rope_norm(q.astype(jnp.float32), k.astype(jnp.float32), rope)
    qk_rows.rope_norm(q[:3], k[:3], tuple(a[:3] for a in rope))  # 3 x 8 heads: not 64-row tiles
    big = jnp.zeros((128, 8, 64), jnp.bfloat16)
    qk_rows.rope_norm(big, big, (jnp.zeros((128, 32)),) * 2)  # past max_tokens
    assert calls == []
    assert qk_rows.rope_norm(q, k) == (q, k)  # nothing to do: no launch either
    qk_rows.rope_norm(q, k, rope, eps=1e-5)
    assert calls == [q.shape]


def test_mosaic_rejects_shapes_it_cannot_tile():
    q = jnp.zeros((3, 8, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 64"):
        qk_rows.rope_norm(q, q, (jnp.zeros((3, 32)),) * 2, impl="mosaic")
    with pytest.raises(ValueError, match="impl"):
        qk_rows.rope_norm(q, q, (jnp.zeros((3, 32)),) * 2, impl="triton")


@pytest.mark.parametrize("tokens,hq,hkv", [(8, 40, 8), (16, 40, 8), (64, 40, 8), (16, 20, 4),
                                           (64, 20, 4)])
def test_kernel_lowers_for_cuda_at_scout_shapes(tokens, hq, hkv):
    """Every form a Scout decode step launches: buckets of 8-64 tokens at TP=1, of 16-64 at
    TP=2 (8 tokens of 4 KV heads are half a tile: XLA's ops run those)."""
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    q, k, table = bf16(tokens, hq, 128), bf16(tokens, hkv, 128), f32(tokens, 64)
    cases = [
        (lambda q, k, c, s: qk_rows.rope_norm(q, k, (c, s), eps=1e-5, impl="mosaic"),
         (q, k, table, table)),
        (lambda q, k, t: qk_rows.rope_norm(q, k, temperature=t, impl="mosaic"),
         (q, k, f32(tokens))),
    ]
    for f, args in cases:
        assert "mosaic_gpu" in jax.export.export(jax.jit(f), platforms=["cuda"])(
            *args).mlir_module()


@pytest.mark.gpu
@pytest.mark.skipif(not common.on_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("tokens,hq,hkv", [(16, 40, 8), (8, 20, 4), (64, 40, 8)])
def test_kernel_on_gpu_at_scout_shapes(layer, tokens, hq, hkv):
    """The Mosaic pair swap (not interpret mode's jnp) against XLA's ops on the GPU."""
    q, k, rope, t = _case(tokens, hq, hkv, 128, seed=tokens)
    kw = LAYERS[layer](rope, t)
    got = jax.jit(lambda q, k: qk_rows.rope_norm(q, k, impl="mosaic", **kw))(q, k)
    want = jax.jit(lambda q, k: qk_rows.reference(q, k, **kw))(q, k)
    for g, w in zip(got, want):
        _assert_close(g, w)
