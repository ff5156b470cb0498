"""FP8: quantisation, the dense scaled matmul, and the FP8 grouped matmul kernel.

The kernel runs in Pallas' GPU interpret mode on the CPU against
:func:`grouped_matmul.reference_fp8` (dequantised f32 ragged_dot), and is lowered for
CUDA (``jax.export``) for every tile config ``pick_config(fp8=True)`` can emit at
Scout's shapes; the GPU tests run it at full size.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.kernels import common, fp8, grouped_matmul as gm


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_quantize_round_trip_and_scales():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 256)) * np.logspace(-3, 3, 6)[:, None], jnp.float32)
    q, s = fp8.quantize(x)
    assert q.dtype == fp8.DTYPE and s.shape == (6,) and s.dtype == jnp.float32
    # The row's absmax maps to 448 exactly; e4m3 keeps 3 mantissa bits (<= 1/16 relative).
    np.testing.assert_allclose(np.abs(np.asarray(q, np.float32)).max(1), fp8.MAX)
    back = fp8.dequantize(q, s)
    err = np.abs(np.asarray(back) - np.asarray(x))
    assert (err <= np.abs(np.asarray(x)) / 16 + np.asarray(s)[:, None] * 2.0**-9).all()
    assert _rel(back, x) < 0.03


def test_quantize_zero_rows_outliers_and_cap():
    x = jnp.asarray([[0.0] * 8, [1.0] * 7 + [1e6]], jnp.float32)
    q, s = fp8.quantize(x)
    assert np.isfinite(np.asarray(q, np.float32)).all() and np.isfinite(np.asarray(s)).all()
    assert (np.asarray(q[0], np.float32) == 0).all()
    # A cap (Meta's activation_scale_ub) clips the outlier instead of flushing the rest to 0.
    q, s = fp8.quantize(x, scale_ub=1200.0)
    assert float(s[1]) == pytest.approx(1200.0 / fp8.MAX)
    assert float(q[1, -1].astype(jnp.float32)) == fp8.MAX  # clamped, not NaN
    np.testing.assert_allclose(np.asarray(fp8.dequantize(q, s)[1, :7]), 1.0, rtol=0.07)


def test_quantize_weights_per_output_channel():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((3, 16, 64)) * rng.uniform(0.01, 10, (3, 16, 1)),
                    jnp.float32)  # [G, N, K]: one scale per (group, output channel)
    q, s = fp8.quantize(w, -1)
    assert s.shape == (3, 16)
    np.testing.assert_allclose(np.asarray(s), np.abs(np.asarray(w)).max(-1) / fp8.MAX, rtol=1e-6)


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64)])
def test_scaled_matmul_matches_reference_and_bf16(shape):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((32, 64)) / 8, jnp.float32)
    wq, ws = fp8.quantize(w)
    got = fp8.scaled_matmul(x, wq, ws)
    assert got.shape == shape[:-1] + (32,) and got.dtype == jnp.bfloat16
    want = fp8.scaled_matmul_reference(x, wq, ws, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)
    exact = jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w)
    assert _rel(got, exact) < 0.06  # what 8-bit operands cost against unquantised f32


def _case(m, sizes, n, k=256, seed=None):
    rng = np.random.default_rng(m if seed is None else seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    wq, ws = fp8.quantize(jnp.asarray(rng.standard_normal((len(sizes), n, k)) / 16, jnp.float32))
    return x, wq, ws, jnp.asarray(sizes, jnp.int32)


def _want(x, wq, ws, gs):
    xq, xs = fp8.quantize(x)
    return np.asarray(gm.reference_fp8(xq, xs, wq, ws, gs))


DECODE = gm.GroupedMatmulConfig(block_m=64, block_k=128)


@pytest.mark.parametrize("m,sizes,n,config", [
    (1, [0, 0, 0, 1], 256, None),  # decode: one row in the last group, three empty ones
    (1, [1, 0, 0, 0], 256, dataclasses.replace(DECODE, k_splits=2)),  # K split over 2 SMs
    (5, [1, 1, 1, 2], 128, dataclasses.replace(DECODE, k_splits=2, block_k=64)),
    (70, [16, 27, 0, 27], 256, None),  # an empty group between unaligned ones
    (200, [0, 200, 0, 0], 256, None),  # every row in one group, several row tiles
    (300, [106, 96, 98, 0], 1024, None),  # prefill tiles visited in bands of 8 N tiles
])
def test_fp8_kernel_matches_reference(m, sizes, n, config):
    x, wq, ws, gs = _case(m, sizes, n)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.grouped_matmul_fp8(x, wq, ws, gs, impl="mosaic", config=config)
    want = _want(x, wq, ws, gs)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    # Same 8-bit products, f32 accumulation in both: bf16 output rounding only.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("m,sizes,n", [(1, [0, 1, 0, 0], 256), (300, [106, 96, 98, 0], 1024)])
def test_fp8_two_weights_in_one_launch(m, sizes, n):
    """Gate and up as one launch: each part's column scales apply to its own columns."""
    x, wq1, ws1, gs = _case(m, sizes, n)
    _, wq2, ws2, _ = _case(m, sizes, n, seed=m + 7)
    ws2 = ws2 * 3.0  # the parts' scales differ: a mix-up would show
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.grouped_matmul_fp8(x, (wq1, wq2), (ws1, ws2), gs, impl="mosaic")
    want = np.concatenate([_want(x, wq1, ws1, gs), _want(x, wq2, ws2, gs)], axis=-1)
    assert got.shape == (m, 2 * n)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())
    xla = gm.grouped_matmul_fp8(x, (wq1, wq2), (ws1, ws2), gs, impl="xla")
    np.testing.assert_allclose(np.asarray(xla, np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


def test_fp8_kernel_f32_output_and_row_scales_differ_per_row():
    """Rows of very different magnitude in one tile: each gets its own scale in the epilogue."""
    x, wq, ws, gs = _case(24, [10, 14], 128, seed=5)
    x = x * jnp.logspace(-2, 2, 24, dtype=jnp.float32)[:, None].astype(jnp.bfloat16)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.grouped_matmul_fp8(x, wq, ws, gs, impl="mosaic", out_dtype=jnp.float32)
    want = _want(x, wq, ws, gs)
    assert got.dtype == jnp.float32
    # Per row (magnitudes span 1e4): f32 output, so only summation order differs.
    err = np.abs(np.asarray(got) - want).max(1) / np.abs(want).max(1)
    assert err.max() < 1e-5, err


@pytest.mark.parametrize("m,sizes", [(7, [3, 0, 4]), (16, [0, 16, 0])])
def test_fp8_xla_path_matches_reference(m, sizes):
    x, wq, ws, gs = _case(m, sizes, 96, k=64)
    got = gm.grouped_matmul_fp8(x, wq, ws, gs, impl="xla", out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), _want(x, wq, ws, gs), rtol=1e-5, atol=1e-4)


def test_fp8_xla_path_leaves_rows_past_the_groups_zero():
    x, wq, ws, _ = _case(6, [2, 2], 64, k=64)
    got = gm.grouped_matmul_fp8(x, wq, ws, jnp.asarray([2, 2], jnp.int32), impl="xla")
    assert (np.asarray(got[4:], np.float32) == 0).all()


def test_fp8_rejects_bad_operands():
    x, wq, ws, gs = _case(4, [4], 64, k=64)
    with pytest.raises(ValueError, match="float8"):
        gm.grouped_matmul_fp8(x, wq.astype(jnp.bfloat16), ws, gs)
    with pytest.raises(ValueError, match="w_scale"):
        gm.grouped_matmul_fp8(x, wq, ws[:, :3], gs)
    with pytest.raises(ValueError, match="block_m"):
        gm.GroupedMatmulConfig(block_m=100)


# Every config the picker emits for Scout's expert shapes, decode to prefill.
SCOUT_M = (1, 7, 32, 64, 65, 300, 8192)
SCOUT_KN = ((5120, 8192), (8192, 5120))


def test_picker_configs_at_scout_shapes():
    configs = {gm.pick_config(m, k, n, fp8=True) for m in SCOUT_M for k, n in SCOUT_KN}
    for c in configs:
        assert c.block_k == (256 if c.swap_ab else 128)
    decode = gm.pick_config(1, 5120, 8192, fp8=True)
    assert decode.swap_ab and decode.block_m == 16 and decode.k_splits == 1
    assert gm.pick_config(1, 128 * 3, 8192, fp8=True).block_k == 128  # K not a 256 multiple
    assert gm.pick_config(16, 5120, 8192, fp8=True).swap_ab
    wider = gm.pick_config(17, 5120, 8192, fp8=True)
    assert not wider.swap_ab and wider.block_m == 64 and wider.max_concurrent_steps == 8


@pytest.mark.parametrize("m", SCOUT_M)
@pytest.mark.parametrize("k,n", SCOUT_KN)
def test_fp8_kernel_lowers_for_scout_shapes(m, k, n):
    """Mosaic lowering and the SMEM budget of the picked config (gate/up 5120 -> 8192, down
    8192 -> 5120), without a GPU."""
    f = jax.jit(lambda x, w, s, gs: gm.grouped_matmul_fp8(x, w, s, gs, impl="mosaic"))
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((16, n, k), fp8.DTYPE),
        jax.ShapeDtypeStruct((16, n), jnp.float32), jax.ShapeDtypeStruct((16,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


SWAP = gm.GroupedMatmulConfig(block_m=16, block_k=128, max_concurrent_steps=11, swap_ab=True)


@pytest.mark.parametrize("m,sizes,parts,tiles", [
    (1, [0, 1, 0, 0], 1, {}),  # batch-1 decode
    (5, [1, 0, 3, 0], 1, {}),  # two groups in one 16-row block: each writes only its rows
    (16, [3, 0, 2, 11], 2, {}),  # gate and up in one launch
    (40, [20, 0, 17, 0], 1, {}),  # groups over several 16-row blocks
    (5, [1, 0, 3, 0], 2, dict(block_n=64, block_k=512)),  # wgmma M = 64, 512-byte K steps
    (1, [0, 1, 0, 0], 1, dict(k_splits=2)),  # K split: f32 slabs [N, rows] per row tile
    (5, [1, 0, 3, 0], 2, dict(k_splits=4)),  # two groups' tiles in one block of rows
    (40, [20, 0, 17, 0], 1, dict(k_splits=2)),  # tiles over several blocks
    (16, [0, 0, 0, 0], 1, dict(k_splits=2)),  # no rows in any group
])
def test_swapped_fp8_kernel_matches_the_reference(m, sizes, parts, tiles):
    """``swap_ab``: acc = W x^T (the weights as wgmma's M side, the rows its N side), stored
    back to row-major tiles through a transposed view of the output tile in SMEM; with K
    split, as f32 partial slabs that ``_swapped_rows`` gathers and sums."""
    x, wq, ws, gs = _case(m, sizes, 128, k=1024)
    config = dataclasses.replace(SWAP, max_concurrent_steps=2, **tiles)
    scales = [ws * (p + 1) for p in range(parts)]  # a mix-up of the parts would show
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.grouped_matmul_fp8(x, (wq,) * parts, tuple(scales), gs, impl="mosaic",
                                    config=config)
    want = np.concatenate([_want(x, wq, s, gs) for s in scales], axis=-1)
    rows = sum(sizes)  # rows past the groups are undefined
    np.testing.assert_allclose(np.asarray(got[:rows], np.float32), want[:rows], rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


def _by_row_want(x, wq, ws, row_groups):
    """Each row through its own group's weights, one row at a time (rows of no group: 0)."""
    xq, xs = fp8.quantize(x)
    out = np.zeros((x.shape[0], wq.shape[1]), np.float32)
    for r, g in enumerate(np.asarray(row_groups)):
        if g < wq.shape[0]:
            out[r] = np.asarray(gm.reference_fp8(xq[r:r + 1], xs[r:r + 1], wq[g:g + 1],
                                                 ws[g:g + 1], jnp.ones((1,), jnp.int32)))[0]
    return out


@pytest.mark.parametrize("row_groups,parts", [
    ([2], 1),  # batch-1 decode
    ([3, 0, 3, 4, 1], 2),  # two rows of one expert, a row of none (4: padding), gate and up
    ([1, 1, 1, 1, 1, 1, 1, 1, 1], 1),  # 9 rows padded to 16 for the TMA tiling, one expert
    ([0, 1, 2, 3, 3, 2, 1, 0, 4, 4, 0, 1, 2, 3, 0, 1], 1),  # a full 16-row token tile
])
@pytest.mark.parametrize("impl", ["mosaic", "xla"])
def test_by_row_fp8_matmul_matches_a_row_by_row_reference(row_groups, parts, impl):
    """``grouped_matmul_fp8_by_row``: rows in token order, each through its own expert's
    weights. Mosaic (GPU interpret mode): a tile per expert hit, over all the rows, storing
    only its rows; XLA: sorted by expert, through the grouped matmul, and back."""
    m = len(row_groups)
    x, wq, ws, _ = _case(m, [0] * 4, 128, k=512, seed=7)
    rg = jnp.asarray(row_groups, jnp.int32)
    scales = [ws * (p + 1) for p in range(parts)]  # a mix-up of the parts would show
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):  # XLA's path: no kernel
        got = gm.grouped_matmul_fp8_by_row(x, (wq,) * parts, tuple(scales), rg, impl=impl)
    want = np.concatenate([_by_row_want(x, wq, s, rg) for s in scales], axis=-1)
    mine = np.asarray(row_groups) < 4  # rows of no expert are undefined
    np.testing.assert_allclose(np.asarray(got, np.float32)[mine], want[mine], rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


def _with_shared_case(row_groups, parts, twice, k, n, groups=4, seed=7):
    """Rows of ``len(row_groups)`` tokens quantised (once, or twice: the routed input then
    the shared input), scales [2M] (the routed rows' times a score, padding rows 0), the
    routed experts' weights and a shared expert's ([N, K] per part, scales apart). Drawn
    on the device: Scout's experts are 671M weights."""
    m = len(row_groups)
    ks = jax.random.split(jax.random.key(seed), 4)
    x = fp8.Quantized.of(jax.random.normal(ks[0], (2 * m if twice else m, k), jnp.bfloat16))
    routed_scale = x.scale[:m] * jax.random.uniform(ks[1], (m,), jnp.float32, 0.2, 1.0)
    routed_scale = jnp.where(jnp.asarray(row_groups) < groups, routed_scale, 0.0)
    shared_scale = x.scale[m:] if twice else x.scale
    x = fp8.Quantized(x.values, jnp.concatenate([routed_scale, shared_scale]), x.dtype)
    wq, ws = jax.jit(fp8.quantize)(jax.random.normal(ks[2], (groups, n, k)) / 16)
    sq, ss = jax.jit(fp8.quantize)(jax.random.normal(ks[3], (n, k)) / 16)
    return x, (wq,) * parts, tuple(ws * (p + 1) for p in range(parts)), \
        ((sq,) * parts, tuple(ss * (p + 2) for p in range(parts)))


def _with_shared_want(x, w, w_scale, row_groups, shared):
    """[2, M, N]: each token's row through its expert's weights (rows of none: 0), then
    through the shared expert's, from the dequantised operands in f32."""
    m, groups = len(row_groups), w[0].shape[0]
    rg = np.asarray(row_groups)
    values = x.values.astype(jnp.float32)
    routed_in, shared_in = (values[:m], values[m:]) if len(values) == 2 * m else (values,) * 2
    deq = lambda q, s: q.astype(jnp.float32) * s[..., None]
    mm = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
    g = jnp.asarray(np.minimum(rg, groups - 1))
    routed = jnp.concatenate([mm("mnk,mk->mn", deq(p[g], s[g]), routed_in)
                              for p, s in zip(w, w_scale)], -1)
    routed = jnp.where(jnp.asarray(rg < groups)[:, None], routed, 0.0)
    shared_y = jnp.concatenate([mm("mk,nk->mn", shared_in, deq(p, s))
                                for p, s in zip(*shared)], -1)
    return np.stack([np.asarray(routed * x.scale[:m, None]),
                     np.asarray(shared_y * x.scale[m:, None])])


@pytest.mark.parametrize("row_groups,parts,twice", [
    ([2, 0, 4, 1, 2, 3, 0, 4], 2, False),  # 8 tokens, gate and up of one input; 4: padding
    ([1] * 15 + [4], 1, True),  # 16 tokens, down: the routed rows, then the shared rows
    ([3, 0, 1, 2, 3, 2], 1, True),  # 6 tokens: the products apart (no 6-row token tile)
])
@pytest.mark.parametrize("impl", ["mosaic", "xla"])
def test_by_row_with_a_shared_expert_matches_the_reference(row_groups, parts, twice, impl):
    """``shared=``: the routed experts by row and a shared expert in one launch (Mosaic, 8
    or 16 tokens: the shared expert's tile after the routed ones'), stacked [2, M, N] as
    an Unscaled product; a routed row of no expert has row scale 0, so it sums to 0."""
    x, w, ws, shared = _with_shared_case(row_groups, parts, twice, k=512, n=128)
    calls = []
    launch = gm._mosaic_grouped_matmul
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()), pytest.MonkeyPatch.context() as mp:
        mp.setattr(gm, "_mosaic_grouped_matmul", lambda *a, **k: calls.append(k) or launch(*a, **k))
        got = gm.grouped_matmul_fp8_by_row(x, w, ws, jnp.asarray(row_groups, jnp.int32),
                                           impl=impl, defer=True, shared=shared)
    assert isinstance(got, fp8.Unscaled) and got.stacked and got.values.shape[:2] == (2, len(row_groups))
    one_launch = impl == "mosaic" and len(row_groups) in (8, 16)
    assert [c.get("shared_blocks") for c in calls] == ([(0, int(twice))] if one_launch else
                                                       [None, None] * (impl == "mosaic"))
    want = _with_shared_want(x, w, ws, row_groups, shared)
    routed, shared_y = (np.asarray(t.resolve(), np.float32) for t in got.unstacked())
    assert _rel(shared_y, want[1]) < 1e-2
    mine = np.asarray(row_groups) < 4
    assert _rel(routed[mine], want[0][mine]) < 1e-2
    assert not routed[~mine].any()  # the padding rows' scale 0: zero, not what was there
    np.testing.assert_allclose(np.asarray(got.resolve(), np.float32), routed + shared_y,
                               rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("settled", [False, True], ids=["groups_now", "groups_settled"])
@pytest.mark.parametrize("sms", [3, 5])
def test_by_row_shared_tiles_over_several_rounds(monkeypatch, sms, settled):
    """A CTA runs its first round's shared-expert tile before the rows' groups arrive, and
    the loop skips it there: with 3 or 5 SMs the shared expert's 4 N tiles (gate and up, 64
    columns each) fall in the first round and the next, with routed tiles among them; every
    row still comes out once, as the reference's. ``settled`` (``groups_settled``): the
    groups read first, and a CTA whose first tile is a routed one copies its weights first
    too (the tile then copies only its rows)."""
    row_groups = [2, 0, 3, 1, 2, 3, 0, 4]  # 4: padding
    # 3 K steps through a 2-slot ring: a slot refilled, its barrier over two phases
    x, w, ws, shared = _with_shared_case(row_groups, 2, False, k=768, n=128)
    monkeypatch.setattr(gm.common, "num_sms", lambda: sms)
    config = dataclasses.replace(gm.pick_config(8, 768, 256, fp8=True), block_m=8, block_n=64,
                                 max_concurrent_steps=2)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = jax.block_until_ready(gm._mosaic_grouped_matmul(
            x.values, w + tuple(p[None] for p in shared[0]), jnp.asarray(row_groups, jnp.int32),
            ws + tuple(s[None] for s in shared[1]), config=config, by_row=True,
            shared_blocks=(0, 0), out_dtype=jnp.float16, groups_settled=settled))
    got = np.asarray(got, np.float32).reshape(2, 8, -1) * np.asarray(x.scale).reshape(2, 8, 1)
    want = _with_shared_want(x, w, ws, row_groups, shared)
    mine = np.asarray(row_groups) < 4
    assert _rel(got[1], want[1]) < 1e-2
    assert _rel(got[0][mine], want[0][mine]) < 1e-2


def test_shared_expert_form_is_checked():
    x, w, ws, shared = _with_shared_case([0, 1, 2, 3, 0, 1, 2, 3], 1, False, k=512, n=128)
    with pytest.raises(ValueError, match="shared expert"):
        gm.grouped_matmul_fp8_by_row(fp8.Quantized(x.values, x.scale[:8], x.dtype), w, ws,
                                     jnp.zeros((8,), jnp.int32), shared=shared)
    with pytest.raises(ValueError, match="shared expert"):
        gm._mosaic_grouped_matmul(x.values, w + shared[0], jnp.zeros((8,), jnp.int32),
                                  ws + shared[1], by_row=True, shared_blocks=(0, 0),
                                  config=dataclasses.replace(SWAP, block_m=8))


@pytest.mark.parametrize("m", [8, 16])
def test_by_row_with_a_shared_expert_lowers_for_scout_shapes(m):
    """Scout's decode MoE with its shared expert: gate and up of both in one launch (one
    input), then down (the routed rows and the shared rows stacked)."""
    f8, f32 = (lambda *s: jax.ShapeDtypeStruct(s, fp8.DTYPE)), (
        lambda *s: jax.ShapeDtypeStruct(s, jnp.float32))
    rows = jax.ShapeDtypeStruct((m,), jnp.int32)

    def moe(x, xs, gate_up, gate_up_s, down, down_s, s_gate_up, s_gate_up_s, s_down, s_down_s,
            rg):
        y = gm.grouped_matmul_fp8_by_row(fp8.Quantized(x, xs, jnp.bfloat16), (gate_up,) * 2,
                                         (gate_up_s,) * 2, rg, impl="mosaic", scale_rows=False,
                                         shared=((s_gate_up,) * 2, (s_gate_up_s,) * 2))
        h = fp8.Quantized(y[..., :8192].reshape(2 * m, -1).astype(fp8.DTYPE), xs, jnp.bfloat16)
        return gm.grouped_matmul_fp8_by_row(h, down, down_s, rg, impl="mosaic", defer=True,
                                            shared=(s_down, s_down_s),
                                            groups_settled=True).values  # as the model's

    exported = jax.export.export(jax.jit(moe), platforms=["cuda"])(
        f8(m, 5120), f32(2 * m), f8(16, 8192, 5120), f32(16, 8192), f8(16, 5120, 8192),
        f32(16, 5120), f8(8192, 5120), f32(8192), f8(5120, 8192), f32(5120), rows)
    assert exported.mlir_module().count("mosaic_gpu") >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not common.on_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("m", [8, 16])
@pytest.mark.parametrize("k,n,twice", [(5120, 8192, False), (8192, 5120, True)])
def test_by_row_with_a_shared_expert_on_gpu_at_scout_shapes(m, k, n, twice):
    rng = np.random.default_rng(m)
    groups = rng.integers(0, 17, m)
    parts = 2 if n > k else 1
    x, w, ws, shared = _with_shared_case(groups, parts, twice, k=k, n=n, groups=16)
    # The weights as arguments: closed over, they would be 2.7 GB of constants in the HLO.
    got = jax.jit(lambda x, rg, w, ws, shared: gm.grouped_matmul_fp8_by_row(
        x, w, ws, rg, defer=True, shared=shared))(x, jnp.asarray(groups, jnp.int32), w, ws,
                                                   shared)
    want = _with_shared_want(x, w, ws, groups, shared)
    routed, shared_y = (np.asarray(t.resolve(), np.float32) for t in got.unstacked())
    mine = groups < 16
    assert _rel(routed[mine], want[0][mine]) < 1e-2 and not routed[~mine].any()
    assert _rel(shared_y, want[1]) < 1e-2


def test_by_row_takes_the_swap_form_only():
    x, wq, ws, _ = _case(4, [0] * 4, 128, k=512)
    with pytest.raises(ValueError, match="by_row"):
        gm._mosaic_grouped_matmul(x.astype(fp8.DTYPE), (wq,), jnp.zeros((4,), jnp.int32), (ws,),
                                  config=gm.pick_config(64, 512, 128, fp8=True), by_row=True)


def test_swap_form_takes_16_bit_outputs_only():
    """A swap-AB tile is stored transposed, which Mosaic lays out for 16-bit values only (an
    f32 output met a layout-inference failure on the GPU, not on the CPU): refused here."""
    x, wq, ws, _ = _case(8, [0] * 8, 128, k=512)
    config = dataclasses.replace(SWAP, block_m=8)
    with pytest.raises(ValueError, match="16-bit outputs"):
        gm._mosaic_grouped_matmul(x.astype(fp8.DTYPE), (wq,), jnp.zeros((8,), jnp.int32), (ws,),
                                  config=config, by_row=True, out_dtype=jnp.float32)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k,n", SCOUT_KN)
def test_by_row_fp8_kernel_lowers_for_scout_shapes(m, k, n):
    """Scout's routed experts at decode, rows in token order: gate and up in one launch,
    and down."""
    parts = 2 if n > k else 1
    f = jax.jit(lambda x, w, s, rg: gm.grouped_matmul_fp8_by_row(
        x, (w,) * parts, (s,) * parts, rg, impl="mosaic"))
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((16, n, k), fp8.DTYPE),
        jax.ShapeDtypeStruct((16, n), jnp.float32), jax.ShapeDtypeStruct((m,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("k,n", SCOUT_KN)
def test_by_row_fp8_kernel_on_gpu_at_scout_shapes(m, k, n):
    """Rows in token order at Scout's expert shapes, padding rows (expert 16: none) among
    them, against the row-by-row reference."""
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    wq, ws = jax.jit(fp8.quantize)(jnp.asarray(rng.standard_normal((16, n, k)) / np.sqrt(k),
                                               jnp.float32))
    groups = rng.integers(0, 17, m)
    got = jax.jit(lambda x, w, s, rg: gm.grouped_matmul_fp8_by_row(x, w, s, rg))(
        x, wq, ws, jnp.asarray(groups, jnp.int32))
    want = _by_row_want(x, wq, ws, groups)
    mine = groups < 16
    assert _rel(np.asarray(got, np.float32)[mine], want[mine]) < 1e-2


# W8A16: f16 rows with FP8 weights, each weight tile widened to f16. GPU interpret mode has no
# register A operand, so the interpret tests widen through shared memory
# (widen_in_registers=False); the lowering and GPU tests take the registers. These tests wait
# for the interpreted kernel's result before the next jax op: its callbacks (barrier
# deallocation) can still be running jax ops, and on a 2-core machine the two deadlocked.
def _w8a16_case(m, k, n, groups, parts, seed=5):
    """f16 rows [2m, K] (the routed rows, then the shared rows), ``parts`` routed weights
    [G, N, K] and as many shared ones [1, N, K] (FP8, scales apart per part)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (2 * m, k), jnp.float16)
    wq, ws = jax.jit(fp8.quantize)(jax.random.normal(ks[1], (groups, n, k)) / 16)
    sq, ss = jax.jit(fp8.quantize)(jax.random.normal(ks[2], (1, n, k)) / 16)
    return (x, (wq,) * parts + (sq,) * parts,
            tuple(ws * (p + 1) for p in range(parts)) + tuple(ss * (p + 2) for p in range(parts)))


def _w8a16_want(x, w, ws, row_groups):
    """[2m, N_1 + ...]: each routed row through its group's weights (rows of none: 0), then
    each shared row through the shared weights, from :func:`gm.reference_fp8` (f16 rows,
    unit scales)."""
    m, parts = len(row_groups), len(w) // 2
    one, unit = jnp.ones((1,), jnp.int32), jnp.ones((1,))
    routed = np.stack([np.concatenate([
        np.asarray(gm.reference_fp8(x[r:r + 1], unit, wp[g:g + 1], sp[g:g + 1], one))[0]
        if g < wp.shape[0] else np.zeros(wp.shape[1]) for wp, sp in zip(w[:parts], ws[:parts])])
        for r, g in enumerate(row_groups)])
    shared = np.concatenate([np.asarray(gm.reference_fp8(x[m:], jnp.ones((m,)), wp, sp,
                                                         one * m))
                             for wp, sp in zip(w[parts:], ws[parts:])], -1)
    return np.concatenate([routed, shared])


@pytest.mark.parametrize("row_groups,parts,block_n", [
    ([2, 0, 4, 1, 2, 3, 0, 4], 2, 128),  # 8 tokens, gate and up; 4: a padding row
    ([1] * 15 + [3], 1, 64),  # 16 tokens, 64-row weight tiles
])
def test_w8a16_by_row_with_a_shared_expert_matches_the_reference(row_groups, parts, block_n):
    """The decode step's by-row launch with f16 rows: each weight tile widened to f16 a
    [64, 128] piece at a time (both 64-row halves of a 128-row tile, every 128-element K
    row of a 256-element K step), against the dequantised weights in f32."""
    m, k, n = len(row_groups), 512, 128
    x, w, ws = _w8a16_case(m, k, n, 4, parts)
    config = dataclasses.replace(gm.pick_config(m, k, n * parts, fp8=True, f16_rows=True),
                                 block_m=m, block_n=block_n, widen_in_registers=False)
    assert config.block_k == 256
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = jax.block_until_ready(gm._mosaic_grouped_matmul(
            x, w, jnp.asarray(row_groups, jnp.int32), ws, config=config, by_row=True,
            shared_blocks=(0, 1), out_dtype=jnp.float16))
    want = _w8a16_want(x, w, ws, row_groups)
    held = np.concatenate([np.asarray(row_groups) < 4, np.ones(m, bool)])
    # f16 x e4m3 products are exact in f32: what is left is the f16 output's rounding.
    assert _rel(np.asarray(got, np.float32)[held], want[held]) < 1e-3


def test_w8a16_grouped_rows_match_the_reference():
    """Rows sorted by group (not by row) through the W8A16 form, against
    :func:`gm.reference_fp8` (f16 rows, unit scales)."""
    x, (wq, _), (ws, _) = _w8a16_case(8, 256, 128, 4, 1, seed=6)
    sizes = jnp.asarray([3, 0, 4, 1], jnp.int32)
    config = dataclasses.replace(gm.pick_config(8, 256, 128, fp8=True, f16_rows=True),
                                 block_m=8, widen_in_registers=False)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = jax.block_until_ready(gm._mosaic_grouped_matmul(
            x[:8], (wq,), sizes, (ws,), config=config, out_dtype=jnp.float16))
    assert _rel(got, gm.reference_fp8(x[:8], jnp.ones((8,)), wq, ws, sizes)) < 1e-3


@pytest.mark.parametrize("m", [8, 16])
@pytest.mark.parametrize("k,n", SCOUT_KN)
@pytest.mark.parametrize("in_registers", [True, False])
def test_w8a16_by_row_lowers_for_scout_shapes(m, k, n, in_registers):
    """Scout's decode MoE launches with the shared expert and f16 rows: the ring of 5 slots
    (32 KiB of weights, 8 KiB of rows) fits shared memory, with the interpret form's
    widening tile too."""
    config = dataclasses.replace(gm.pick_config(m, k, n, fp8=True, f16_rows=True), block_m=m,
                                 widen_in_registers=in_registers)
    f = jax.jit(lambda x, w, s, sw, ss, rg: gm._mosaic_grouped_matmul(
        x, (w, sw), rg, (s, ss), config=config, by_row=True, shared_blocks=(0, 1),
        out_dtype=jnp.bfloat16))
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((2 * m, k), jnp.float16), jax.ShapeDtypeStruct((16, n, k), fp8.DTYPE),
        jax.ShapeDtypeStruct((16, n), jnp.float32), jax.ShapeDtypeStruct((1, n, k), fp8.DTYPE),
        jax.ShapeDtypeStruct((1, n), jnp.float32), jax.ShapeDtypeStruct((m,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.gpu
@pytest.mark.skipif(not common.on_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("k,n", SCOUT_KN)
def test_w8a16_by_row_on_gpu_at_scout_shapes(k, n):
    """The register form (the GPU's) at Scout's expert shapes, padding rows among them."""
    rng = np.random.default_rng(3)
    row_groups = rng.integers(0, 17, 16)
    x, w, ws = _w8a16_case(16, k, n, 16, 1, seed=7)
    config = dataclasses.replace(gm.pick_config(16, k, n, fp8=True, f16_rows=True), block_m=16)
    got = jax.jit(lambda x, w, ws, rg: gm._mosaic_grouped_matmul(
        x, w, rg, ws, config=config, by_row=True, shared_blocks=(0, 1),
        out_dtype=jnp.float16))(x, w, ws, jnp.asarray(row_groups, jnp.int32))
    want = _w8a16_want(x, w, ws, row_groups)
    held = np.concatenate([row_groups < 16, np.ones(16, bool)])
    assert _rel(np.asarray(got, np.float32)[held], want[held]) < 1e-3


def test_w8a16_takes_the_swap_form_only():
    x, (wq, _), (ws, _) = _w8a16_case(8, 256, 128, 4, 1)
    with pytest.raises(ValueError, match="W8A16"):
        gm._mosaic_grouped_matmul(x, (wq,), jnp.full((4,), 2, jnp.int32), (ws,),
                                  config=gm.pick_config(64, 256, 128, fp8=True))
    with pytest.raises(ValueError, match="float8_e4m3fn or f16 rows"):
        gm._mosaic_grouped_matmul(x.astype(jnp.bfloat16), (wq,), jnp.full((4,), 2, jnp.int32),
                                  (ws,), config=gm.pick_config(8, 256, 128, fp8=True))


# swiglu: the gate/up launch writing silu(gate) * up itself, gate's and up's rows of the same
# columns in one tile.
def _swiglu_case(m, k, n, groups, seed=8, x_scale=1.0):
    """FP8 rows [m, K] (both the routed and the shared expert take them), their scales [2m]
    (the routed rows' times a router score, then the shared rows'), gate and up (values,
    scales) of ``groups`` experts and of a shared one ([1, N, K])."""
    ks = jax.random.split(jax.random.key(seed), 6)
    x = fp8.Quantized.of(jax.random.normal(ks[0], (m, k), jnp.bfloat16))
    score = jax.random.uniform(ks[1], (m,), jnp.float32, 0.2, 1.0)
    scale = jnp.concatenate([x.scale * score, x.scale]) * x_scale
    w = [jax.jit(fp8.quantize)(jax.random.normal(kk, (e, n, k)) / 16)
         for kk, e in zip(ks[2:], (groups, groups, 1, 1))]
    return x.values, scale, w


@pytest.mark.parametrize("row_groups,block_n,shared", [
    ([2, 0, 4, 1, 2, 3, 0, 4], 128, True),  # 8 tokens, a padding row (4); 64 columns a tile
    ([2, 0, 4, 1, 2, 3, 0, 4], 256, True),  # 128 columns a tile
    ([1, 3, 3, 0, 2, 1, 4, 0], 128, False),  # routed experts alone
])
def test_swiglu_by_row_matches_the_reference(row_groups, block_n, shared):
    """Each tile's epilogue forms silu(gate) * up from its two weight copies, with the
    columns' and the rows' scales, against :func:`gm.reference_swiglu`."""
    m, k, n = len(row_groups), 256, 128
    xv, scale, (gate, up, sg, su) = _swiglu_case(m, k, n, 4)
    scale = scale if shared else scale[:m]
    config = dataclasses.replace(gm.pick_config(m, k, 2 * n, fp8=True), block_m=m,
                                 block_n=block_n)
    weights, scales = (gate[0], up[0]), (gate[1], up[1])
    if shared:
        weights, scales = weights + (sg[0], su[0]), scales + (sg[1], su[1])
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = jax.block_until_ready(gm._mosaic_grouped_matmul(
            xv, weights, jnp.asarray(row_groups, jnp.int32), scales, scale, config=config,
            by_row=True, shared_blocks=(0, 0) if shared else None, out_dtype=jnp.float16,
            swiglu=True))
    want = gm.reference_swiglu(xv, scale, gate, up, row_groups,
                               shared=(sg, su) if shared else None)
    held = np.asarray(row_groups) < 4
    held = np.concatenate([held, np.ones(m, bool)]) if shared else held
    assert got.shape == want.shape == ((2 if shared else 1) * m, n)
    assert _rel(np.asarray(got, np.float32)[held], np.asarray(want)[held]) < 1e-3


def test_swiglu_rows_scales_come_from_the_caller_where_given():
    """The f16 rows' scales: 1 for a routed row of some expert, 0 for one of none, then 1
    for the shared rows; from ``held`` where the caller gives it (a step's token rows, the
    same every layer), else from the row experts."""
    row_groups = jnp.asarray([2, 0, 4, 1], jnp.int32)  # row 2: no expert (4 experts)
    xv, scale, (gate, up, sg, su) = _swiglu_case(4, 256, 128, 4)
    x = fp8.Quantized(xv, scale, jnp.bfloat16)

    def run(held=None):
        return gm.grouped_matmul_fp8_by_row(
            x, (gate[0], up[0]), (gate[1], up[1]), row_groups, impl="xla",
            shared=((sg[0][0], su[0][0]), (sg[1][0], su[1][0])), swiglu=True, held=held)

    np.testing.assert_array_equal(run().scale, [1, 1, 0, 1, 1, 1, 1, 1])
    given = run(jnp.asarray([1, 1, 0, 0], jnp.float32))  # a caller's padding row: its own
    np.testing.assert_array_equal(given.scale, [1, 1, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(given.values, run().values)


def test_swiglu_saturates_at_the_output_range():
    """Products past f16's range come out as its largest finite value, not inf."""
    row_groups = [0, 1, 2, 3, 0, 1, 2, 3]
    xv, scale, (gate, up, sg, su) = _swiglu_case(8, 256, 128, 4, x_scale=2.0**12)
    config = dataclasses.replace(gm.pick_config(8, 256, 256, fp8=True), block_m=8)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = jax.block_until_ready(gm._mosaic_grouped_matmul(
            xv, (gate[0], up[0], sg[0], su[0]), jnp.asarray(row_groups, jnp.int32),
            (gate[1], up[1], sg[1], su[1]), scale, config=config, by_row=True,
            shared_blocks=(0, 0), out_dtype=jnp.float16, swiglu=True))
    want = np.asarray(gm.reference_swiglu(xv, scale, gate, up, row_groups, shared=(sg, su)))
    got = np.asarray(got, np.float32)
    big = float(jnp.finfo(jnp.float16).max)
    assert (np.abs(want) > big).any() and np.isfinite(got).all()
    np.testing.assert_array_equal(got[want > big], big)
    np.testing.assert_array_equal(got[want < -big], -big)


@pytest.mark.parametrize("m", [8, 16])
def test_swiglu_by_row_lowers_for_scout_shapes(m):
    """Scout's decode gate/up launch with the shared expert, 64 output columns a tile (64
    rows each of gate and up)."""
    k, n = 5120, 8192
    config = dataclasses.replace(gm.pick_config(m, k, 2 * n, fp8=True), block_m=m)
    f = jax.jit(lambda x, s, g, gs, u, us, sg, sgs, su, sus, rg: gm._mosaic_grouped_matmul(
        x, (g, u, sg, su), rg, (gs, us, sgs, sus), s, config=config, by_row=True,
        shared_blocks=(0, 0), out_dtype=jnp.float16, swiglu=True))
    w, ws = jax.ShapeDtypeStruct((16, n, k), fp8.DTYPE), jax.ShapeDtypeStruct((16, n), jnp.float32)
    sw, sws = jax.ShapeDtypeStruct((1, n, k), fp8.DTYPE), jax.ShapeDtypeStruct((1, n), jnp.float32)
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((m, k), fp8.DTYPE), jax.ShapeDtypeStruct((2 * m,), jnp.float32),
        w, ws, w, ws, sw, sws, sw, sws, jax.ShapeDtypeStruct((m,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.gpu
@pytest.mark.skipif(not common.on_hopper(), reason="needs a Hopper GPU")
def test_swiglu_by_row_on_gpu_at_scout_shapes():
    rng = np.random.default_rng(4)
    row_groups = rng.integers(0, 17, 16)
    xv, scale, (gate, up, sg, su) = _swiglu_case(16, 5120, 8192, 16)
    config = dataclasses.replace(gm.pick_config(16, 5120, 16384, fp8=True), block_m=16)
    got = jax.jit(lambda x, s, w, ws, rg: gm._mosaic_grouped_matmul(
        x, w, rg, ws, s, config=config, by_row=True, shared_blocks=(0, 0),
        out_dtype=jnp.float16, swiglu=True))(
        xv, scale, (gate[0], up[0], sg[0], su[0]), (gate[1], up[1], sg[1], su[1]),
        jnp.asarray(row_groups, jnp.int32))
    want = np.asarray(gm.reference_swiglu(xv, scale, gate, up, row_groups, shared=(sg, su)))
    held = np.concatenate([row_groups < 16, np.ones(16, bool)])
    # FP8 wgmmas sum K in less than f32 (2e-3 here at K = 5120), as the other FP8 tests at
    # Scout's shapes allow; gate and up swapped, or a K piece lost, is off by 30% or more.
    assert _rel(np.asarray(got, np.float32)[held], want[held]) < 1e-2


def test_swiglu_form_is_checked():
    xv, scale, (gate, up, _, _) = _swiglu_case(8, 256, 128, 4)
    config = dataclasses.replace(gm.pick_config(8, 256, 256, fp8=True), block_m=8)
    for bad in (dict(lhs_scale=None), dict(weights=(gate[0],), scales=(gate[1],))):
        kw = dict(weights=(gate[0], up[0]), scales=(gate[1], up[1]), lhs_scale=scale[:8]) | bad
        with pytest.raises(ValueError, match="swiglu"):
            gm._mosaic_grouped_matmul(xv, kw["weights"], jnp.zeros((8,), jnp.int32), kw["scales"],
                                      kw["lhs_scale"], config=config, by_row=True, swiglu=True)


def test_swap_ab_config_is_checked():
    with pytest.raises(ValueError, match="swap_ab"):
        gm.GroupedMatmulConfig(block_m=12, swap_ab=True)
    with pytest.raises(ValueError, match="FP8"):
        gm.grouped_matmul(jnp.ones((1, 128), jnp.bfloat16), jnp.ones((1, 128, 128), jnp.bfloat16),
                          jnp.ones((1,), jnp.int32), impl="mosaic", config=SWAP)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k,n", SCOUT_KN)
@pytest.mark.parametrize("k_splits", [1, 2])
def test_swapped_fp8_kernel_lowers_for_scout_shapes(m, k, n, k_splits):
    """11 ring slots of 16 KiB of weights and 2 KiB of rows fit shared memory; K split, the
    f32 partial tile's store lowers too."""
    config = dataclasses.replace(SWAP, k_splits=k_splits)
    f = jax.jit(lambda x, w, s, gs: gm.grouped_matmul_fp8(x, (w, w), (s, s), gs, impl="mosaic",
                                                          config=config))
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((16, n, k), fp8.DTYPE),
        jax.ShapeDtypeStruct((16, n), jnp.float32), jax.ShapeDtypeStruct((17,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


def test_fp8_impl_resolution():
    assert gm.resolve_fp8("auto", 256, 256) == ("mosaic" if common.on_hopper() else "xla")
    assert gm.resolve_fp8("auto", 200, 256) == "xla"
    with pytest.raises(ValueError, match="impl"):
        gm.resolve_fp8("cublas", 256, 256)


SWAP_K256 = dataclasses.replace(SWAP, block_k=256, max_concurrent_steps=6)
SWAP_N64 = dataclasses.replace(SWAP, block_n=64, block_k=512, max_concurrent_steps=5)
SWAP_SPLIT = dataclasses.replace(SWAP_K256, k_splits=2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,config", [(1, None), (32, None), (65, None), (300, None),
                                      (4096, None), (1, SWAP), (5, SWAP), (16, SWAP),
                                      (1, SWAP_K256), (16, SWAP_K256), (5, SWAP_N64),
                                      (1, SWAP_SPLIT), (16, SWAP_SPLIT)],
                         ids=lambda v: {id(SWAP): "swap_ab", id(SWAP_K256): "swap_ab_k256",
                                        id(SWAP_N64): "swap_ab_n64_k512",
                                        id(SWAP_SPLIT): "swap_ab_k_split"}.get(id(v)))
@pytest.mark.parametrize("k,n", SCOUT_KN)
def test_fp8_kernel_on_gpu_at_scout_shapes(m, config, k, n):
    """The picked configs, and the swap-AB form at decode sizes."""
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((16, n, k)) / np.sqrt(k), jnp.float32)
    wq, ws = jax.jit(fp8.quantize)(w)
    gs = jnp.asarray(np.bincount(rng.integers(0, 16, m) // 2 * 2, minlength=16), jnp.int32)
    got = jax.jit(lambda x, w, s, gs: gm.grouped_matmul_fp8(
        x, w, s, gs, impl="mosaic", config=config))(x, wq, ws, gs)
    want = _want(x, wq, ws, gs)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2,
                               atol=2e-2 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 4096])
def test_gate_and_up_in_one_launch_on_gpu(m):
    """Scout's gate and up (5120 -> 8192 each) as one launch, FP8 and bf16, against each
    weight's product alone."""
    rng = np.random.default_rng(m)
    k, n = 5120, 8192
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    gs = jnp.asarray(np.bincount(rng.integers(0, 16, m), minlength=16), jnp.int32)
    ws = [jnp.asarray(rng.standard_normal((16, n, k)) / np.sqrt(k), jnp.float32)
          for _ in range(2)]
    (q1, s1), (q2, s2) = (jax.jit(fp8.quantize)(w) for w in ws)
    got = jax.jit(lambda x, a, b, sa, sb, gs: gm.grouped_matmul_fp8(
        x, (a, b), (sa, sb), gs, impl="mosaic"))(x, q1, q2, s1, s2, gs)
    want = np.concatenate([_want(x, q1, s1, gs), _want(x, q2, s2, gs)], axis=-1)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2,
                               atol=2e-2 * np.abs(want).max())
    b1, b2 = (jnp.swapaxes(w, 1, 2).astype(jnp.bfloat16) for w in ws)  # [G, K, N]
    got = jax.jit(lambda x, a, b, gs: gm.grouped_matmul(x, (a, b), gs, impl="mosaic"))(
        x, b1, b2, gs)
    want = np.concatenate([np.asarray(gm.reference(x, b, gs)) for b in (b1, b2)], axis=-1)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2,
                               atol=2e-2 * np.abs(want).max())


@pytest.mark.gpu
def test_scaled_matmul_on_gpu():
    """XLA's FP8 dot (cuBLASLt on Hopper) against the dequantised f32 product."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((512, 5120)), jnp.bfloat16)
    wq, ws = fp8.quantize(jnp.asarray(rng.standard_normal((8192, 5120)) / 70, jnp.float32))
    got = jax.jit(fp8.scaled_matmul)(x, wq, ws)
    want = fp8.scaled_matmul_reference(x, wq, ws, out_dtype=jnp.float32)
    assert _rel(got, want) < 1e-2


def _projections(ns, k, seed=0):
    """FP8 weights [N_p, K] with their scales, one per N in ``ns`` (q, k and v: N differs)."""
    rng = np.random.default_rng(seed)
    return zip(*(fp8.quantize(jnp.asarray(rng.standard_normal((n, k)) / 16, jnp.float32))
                 for n in ns))


@pytest.mark.parametrize("lead,k_splits", [((1,), 1), ((1, 5), 1), ((16,), 1), ((1,), 2),
                                            ((1, 5), 4)])
@pytest.mark.parametrize("quantized", [False, True])
def test_dense_fp8_is_scaled_matmul_per_weight(lead, k_splits, quantized):
    """Several projections of one input in one grouped-kernel launch (one group of every
    row): each output equals :func:`fp8.scaled_matmul` with its weight, in GPU interpret
    mode (K split over 1, 2 or 4 work items: f32 partial slabs [N, rows] summed after) and
    on the XLA path; leading axes and prequantised rows pass through."""
    ws, ss = _projections((256, 128, 128), 1024)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((*lead, 1024)), jnp.bfloat16)
    xin = fp8.Quantized.of(x) if quantized else x
    want = [np.asarray(fp8.scaled_matmul(x, w, s), np.float32) for w, s in zip(ws, ss)]
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.dense_fp8(xin, ws, ss, impl="mosaic", k_splits=k_splits)
    for impl_got in (got, gm.dense_fp8(xin, ws, ss, impl="xla")):
        assert [y.shape for y in impl_got] == [(*lead, n) for n in (256, 128, 128)]
        for g, w in zip(impl_got, want):
            assert g.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=1e-2,
                                       atol=1e-2 * np.abs(w).max())


def test_dense_fp8_takes_xla_past_a_decode_step_or_off_hopper(monkeypatch):
    """``"auto"``: the grouped kernel only for a decode step's rows on Hopper, tiles that
    divide and enough work items (N tiles times K splits), else XLA's FP8 dot per weight."""
    launched = []

    def kernel(x, parts, scales, gs, config, out_dtype, scale_rows, defer=False, dense=False):
        assert dense
        launched.append(x.values.shape)
        return jnp.zeros((x.values.shape[0], sum(p.shape[1] for p in parts)), jnp.bfloat16)

    monkeypatch.setattr(gm, "_fp8_launch", kernel)
    monkeypatch.setattr(gm.common, "on_hopper", lambda: True)
    monkeypatch.setattr(gm, "DENSE_MIN_N_TILES", 5)
    ws, ss = _projections((256, 128), 256)
    gm.dense_fp8(jnp.ones((gm.SWAP_AB_MAX_ROWS + 1, 256), jnp.bfloat16), ws, ss)  # rows
    gm.dense_fp8(jnp.ones((4, 256), jnp.bfloat16), *_projections((256, 64), 256))  # N tile
    gm.dense_fp8(jnp.ones((4, 256), jnp.bfloat16), *_projections((128, 128), 256))  # 4 items
    gm.dense_fp8(jnp.ones((4, 2048), jnp.bfloat16), *_projections((128, 128), 2048))
    assert not launched
    gm.dense_fp8(jnp.ones((2, 8, 256), jnp.bfloat16), ws, ss)  # 6 narrow tiles
    gm.dense_fp8(jnp.ones((4, 256), jnp.bfloat16), *_projections((384,), 256))  # one weight
    # 4 N tiles, K in 8 steps of 256: 2 splits make 8 work items
    gm.dense_fp8(jnp.ones((4, 2048), jnp.bfloat16), *_projections((128, 128), 2048),
                 k_splits=2)
    assert launched == [(16, 256), (4, 256), (4, 2048)]


def test_dense_launch_reads_no_group_sizes():
    """A dense launch's one group of every row is known when the kernel is built
    (``dense_rows``), so the kernel does not load the group-size array before its first weight
    copy: given zeros there (no rows), it still computes every row."""
    ws, ss = _projections((256, 128), 1024)
    x = fp8.Quantized.of(jnp.asarray(np.random.default_rng(2).standard_normal((16, 1024)),
                                     jnp.bfloat16))
    config = gm.dense_config(16, 1024, 384)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm._mosaic_grouped_matmul(
            x.values, tuple(w[None] for w in ws), jnp.zeros((1,), jnp.int32),
            tuple(s[None].astype(jnp.float32) for s in ss), x.scale, config=config,
            out_dtype=jnp.bfloat16, dense_rows=16)
    want = np.concatenate([np.asarray(fp8.scaled_matmul(x, w, s), np.float32)
                           for w, s in zip(ws, ss)], axis=1)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())
    with pytest.raises(ValueError, match="dense_rows"):
        gm._mosaic_grouped_matmul(x.values, tuple(jnp.stack([w, w]) for w in ws),
                                  jnp.zeros((2,), jnp.int32),
                                  tuple(jnp.stack([s, s]) for s in ss), config=config,
                                  dense_rows=16)


@pytest.mark.parametrize("parts", [1, 3])
def test_dense_fp8_defers_the_row_scales(parts):
    """``defer``: the :class:`fp8.Unscaled` products (column scales applied in the kernel,
    the rows' left to the consumer), which resolve to the products."""
    ns = (256, 128, 128)[:parts]
    ws, ss = (tuple(a) for a in _projections(ns, 1024))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 1024)), jnp.bfloat16)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.dense_fp8(x, ws, ss, impl="mosaic", defer=True)
    for impl_got in (got, gm.dense_fp8(x, ws, ss, impl="xla", defer=True)):
        for g, w, s in zip(impl_got, ws, ss):
            assert isinstance(g, fp8.Unscaled)
            want = np.asarray(fp8.scaled_matmul(x, w, s), np.float32)
            np.testing.assert_allclose(np.asarray(g.resolve(), np.float32), want, rtol=1e-2,
                                       atol=1e-2 * np.abs(want).max())


# Scout's dense FP8 projections per device, (K, N per weight): q/k/v, the shared expert's
# gate/up, o and down, at TP=1 and TP=2.
SCOUT_DENSE = {"qkv": (5120, (5120, 1024, 1024)), "qkv-tp2": (5120, (2560, 512, 512)),
               "gate-up": (5120, (8192, 8192)), "gate-up-tp2": (5120, (4096, 4096)),
               "o": (5120, (5120,)), "o-tp2": (2560, (5120,)), "down": (8192, (5120,)),
               "down-tp2": (4096, (5120,))}


def test_dense_config_narrows_tiles_to_fill_the_sms(monkeypatch):
    """64-column weight tiles where 128-column ones leave SMs idle and 64-column ones fill
    at most one wave; K split only when asked."""
    monkeypatch.setattr(gm.common, "num_sms", lambda: 132)
    configs = {name: gm.dense_config(1, k, sum(ns)) for name, (k, ns) in SCOUT_DENSE.items()}
    assert {name: c.block_n for name, c in configs.items()} == {
        "qkv": 64, "qkv-tp2": 64, "gate-up": 128, "gate-up-tp2": 64, "o": 64, "o-tp2": 64,
        "down": 64, "down-tp2": 64}
    assert {c.k_splits for c in configs.values()} == {1}
    assert gm.dense_config(1, 5120, 7168, k_splits=2).k_splits == 2


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("name", SCOUT_DENSE)
def test_dense_fp8_lowers_for_scout_projections(m, name):
    """Scout's dense projections (TP=1 and TP=2 shards) at decode sizes, one launch per
    input: Mosaic lowering and the SMEM budget of the picked config, K splits included."""
    k, ns = SCOUT_DENSE[name]
    f = jax.jit(lambda x, ws, ss: gm.dense_fp8(x, ws, ss, impl="mosaic"))
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        tuple(jax.ShapeDtypeStruct((n, k), fp8.DTYPE) for n in ns),
        tuple(jax.ShapeDtypeStruct((n,), jnp.float32) for n in ns))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("name,k_splits", [("qkv", 1), ("qkv", 2), ("qkv-tp2", 1),
                                           ("o", 1), ("down", 4)])
def test_dense_fp8_on_gpu_at_scout_shapes(m, name, k_splits):
    """Scout's projections in one launch on the GPU (the picked tiles, K in 2 and 4 splits)
    against the dequantised f32 products."""
    k, ns = SCOUT_DENSE[name]
    ws, ss = _projections(ns, k, seed=m)
    # Not the weights' seed: rows equal to a weight row sum 5120 positive products, which
    # the FP8 wgmma's accumulator rounds low (302 for 320 on the H200, 2026-12-01;
    # NOTES-grouped-matmul.md, "FP8 accumulation").
    x = jnp.asarray(np.random.default_rng(m + 100).standard_normal((m, k)), jnp.bfloat16)
    got = jax.jit(lambda x, ws, ss: gm.dense_fp8(x, ws, ss, impl="mosaic",
                                                 k_splits=k_splits))(x, ws, ss)
    for g, w, s in zip(got, ws, ss):
        want = fp8.scaled_matmul_reference(x, w, s, out_dtype=jnp.float32)
        assert _rel(g, want) < 1e-2


@pytest.mark.parametrize("config", [
    gm.GroupedMatmulConfig(block_m=64, block_k=128, max_concurrent_steps=2, promote=True),
    dataclasses.replace(SWAP, max_concurrent_steps=2, promote=True),
], ids=["64-row", "swap_ab"])
def test_promoted_fp8_kernel_matches_the_reference(config):
    """``promote``: each K step into a fresh accumulator, summed in registers (the pipeline's
    carry); the same product."""
    x, wq, ws, gs = _case(5, [1, 0, 3, 0], 128, k=1024)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.grouped_matmul_fp8(x, (wq, wq), (ws, ws * 2), gs, impl="mosaic", config=config)
    want = np.concatenate([_want(x, wq, ws, gs), _want(x, wq, ws * 2, gs)], axis=-1)
    np.testing.assert_allclose(np.asarray(got[:4], np.float32), want[:4], rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


def test_promoted_fp8_kernel_lowers_at_scout_shapes():
    for config in (gm.pick_config(1, 5120, 8192, fp8=True), gm.pick_config(300, 5120, 8192,
                                                                           fp8=True)):
        config = dataclasses.replace(config, promote=True)
        f = jax.jit(lambda x, w, s, gs: gm.grouped_matmul_fp8(x, w, s, gs, impl="mosaic",
                                                              config=config))
        exported = jax.export.export(f, platforms=["cuda"])(
            jax.ShapeDtypeStruct((16, 5120), jnp.bfloat16),
            jax.ShapeDtypeStruct((16, 8192, 5120), fp8.DTYPE),
            jax.ShapeDtypeStruct((16, 8192), jnp.float32), jax.ShapeDtypeStruct((17,), jnp.int32))
        assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 300])
def test_promoted_fp8_kernel_sums_long_same_sign_rows_on_gpu(m):
    """Rows equal to weight rows: sums of 5120 positive products, which the FP8 wgmma's
    accumulator alone returned 5.6% low on the H200. Promoted, within bf16's rounding."""
    (w,), (s,) = _projections((8192,), 5120, seed=3)
    x = fp8.dequantize(w[:m], jnp.ones((m,)), dtype=jnp.bfloat16)  # e4m3 values: exact rows
    wq, ws = jnp.broadcast_to(w, (16, *w.shape)), jnp.broadcast_to(s, (16, 8192))
    gs = jnp.zeros((16,), jnp.int32).at[2].set(m)
    config = dataclasses.replace(gm.pick_config(m, 5120, 8192, fp8=True), promote=True)
    got = jax.jit(lambda x, w, s, gs: gm.grouped_matmul_fp8(
        x, w, s, gs, impl="mosaic", config=config))(x, wq, ws, gs)
    want = _want(x, wq, ws, gs)
    diag = np.arange(m)
    np.testing.assert_allclose(np.asarray(got, np.float32)[diag, diag], want[diag, diag],
                               rtol=1e-2)
