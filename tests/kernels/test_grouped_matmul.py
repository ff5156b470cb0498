"""The routed experts' grouped matmul: the Mosaic GPU kernel against lax.ragged_dot.

On CPU the kernel runs in Pallas' GPU interpret mode (simulated SMEM, TMA,
wgmma), and is lowered for CUDA at Scout's shapes to check Mosaic lowering and
the shared-memory budget without a GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.kernels import common, grouped_matmul as gm


DECODE = gm.GroupedMatmulConfig(block_m=64)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([8, 64, 128]), st.lists(st.integers(0, 300), min_size=1, max_size=16))
def test_tiles_holding_rows_come_first_and_cover_every_row_once(block_m, sizes):
    """The kernel's tile numbering (empty groups take no tile): tiles 0..count-1 hold
    rows, each of one group inside one block, and together they hold every row once."""
    g, m = len(sizes), sum(sizes)
    grid_m = -(-m // block_m) + g - 1
    gs = jnp.asarray(sizes, jnp.int32)

    def info(t):
        i, count = gm.tile_info(gs, block_m, t)
        return (i.group_id, i.block, i.actual_start, i.actual_size), count

    (groups, blocks, starts_, sizes_), counts = jax.jit(jax.vmap(info))(
        jnp.arange(max(grid_m, 1)))
    count = int(counts[0])
    assert count <= max(grid_m, 0)
    seen = np.zeros(m, int)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for t in range(count):
        size, start, group, block = (int(a[t]) for a in (sizes_, starts_, groups, blocks))
        assert size > 0 and starts[group] <= start and start + size <= starts[group + 1]
        assert block * block_m <= start and start + size <= (block + 1) * block_m
        seen[start:start + size] += 1
    np.testing.assert_array_equal(seen, 1)


@pytest.mark.parametrize("m,sizes,n,config", [
    (1, [0, 0, 0, 1], 256, None),  # decode: one row in the last group, three empty ones
    (1, [1, 0, 0, 0], 256, None),  # ... in the first group
    (3, [0, 2, 0, 1], 256, dataclasses.replace(DECODE, k_splits=2)),  # K split over 2 SMs
    (5, [1, 1, 1, 2], 128, dataclasses.replace(DECODE, k_splits=2, block_k=32)),
    (64, [0, 64, 0, 0], 256, dataclasses.replace(DECODE, k_splits=4, block_k=32)),
    (70, [16, 27, 0, 27], 256, None),  # an empty group between unaligned ones
    (200, [0, 200, 0, 0], 256, None),  # every row in one group, several row tiles
    (300, [106, 96, 98, 0], 1024, None),  # prefill tiles visited in bands of 8 N tiles
])
def test_mosaic_kernel_matches_ragged_dot(m, sizes, n, config):
    rng = np.random.default_rng(m)
    k, g = 128, len(sizes)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.grouped_matmul(x, w, gs, impl="mosaic", config=config)
    want = gm.reference(x, w, gs)
    # bf16 output rounding only (f32 accumulation in both).
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=0.1)


@pytest.mark.parametrize("fp8", [False, True])
def test_counts_past_the_last_group_are_rows_of_none(fp8):
    """The MoE passes its expert counts with the padding rows' count after the last expert
    (G + 1 entries): the kernel computes the G groups' rows and leaves those rows alone."""
    from jaxattn.kernels import fp8 as fp8_lib

    rng = np.random.default_rng(3)
    m, k, n, sizes = 16, 128, 256, [0, 3, 0, 2]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.bfloat16)
    counts = jnp.asarray(sizes + [m - sum(sizes)], jnp.int32)  # 11 padding rows
    rows = sum(sizes)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        if fp8:
            wq, ws = fp8_lib.quantize(jnp.swapaxes(w, 1, 2), -1)
            got = gm.grouped_matmul_fp8(x, wq, ws, counts, impl="mosaic")
            want = gm.grouped_matmul_fp8(x, wq, ws, counts, impl="xla")
        else:
            got = gm.grouped_matmul(x, w, counts, impl="mosaic")
            want = gm.reference(x, w, counts[:len(sizes)])
    np.testing.assert_allclose(np.asarray(got[:rows], np.float32),
                               np.asarray(want[:rows], np.float32), rtol=2e-2, atol=0.1)


@pytest.mark.parametrize("m,k,n", [(1, 5120, 8192), (1, 8192, 5120), (64, 5120, 8192),
                                   (65, 5120, 8192), (32768, 5120, 8192)])
def test_pick_config_decode_and_prefill_tiles(m, k, n):
    """Decode (M <= 64): 64-row tiles, an 8-deep ring, K not split (measured faster on the
    H200 than splits that fill the SMs); prefill: 128-row tiles in bands of 8 N tiles."""
    config = gm.pick_config(m, k, n)
    assert config.k_splits == 1
    assert config.block_m == (64 if m <= 64 else 128)
    assert config.max_concurrent_steps == (8 if m <= 64 else 4)
    assert config.grid_block_n == (1 if m <= 64 else 8)


@pytest.mark.parametrize("m", [1, 7, 32, 65, 300, 32768])
@pytest.mark.parametrize("k,n", [(5120, 8192), (8192, 5120)])
def test_mosaic_kernel_lowers_for_scout_shapes(m, k, n):
    """Scout's gate/up (5120 -> 8192) and down (8192 -> 5120) projections, decode to prefill."""
    f = jax.jit(lambda x, w, gs: gm.grouped_matmul(x, w, gs, impl="mosaic"))
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((16, k, n), jnp.bfloat16),
        jax.ShapeDtypeStruct((16,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


def test_impl_resolution():
    """"auto" is the Mosaic kernel on Hopper where dtypes and shapes allow, else XLA; an
    explicit impl is taken as given."""
    x, w = jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((2, 64, 128), jnp.bfloat16)
    auto = "mosaic" if common.on_hopper() else "xla"
    assert gm.resolve("auto", x, w) == auto
    assert gm.resolve("auto", x, w[:, :, :96]) == "xla"  # N not a multiple of the N tile
    assert gm.resolve("auto", x.astype(jnp.float32), w.astype(jnp.float32)) == "xla"
    assert gm.resolve("xla", x, w) == "xla"
    assert gm.resolve("mosaic", x, w) == "mosaic"
    with pytest.raises(ValueError, match="impl"):
        gm.resolve("cublas", x, w)


def test_xla_impl_is_ragged_dot():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 64, 128)), jnp.bfloat16)
    gs = jnp.asarray([2, 0, 3], jnp.int32)
    got = gm.grouped_matmul(x, w, gs, impl="xla")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.ragged_dot(x, w, gs)))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 65, 300, 4096])
@pytest.mark.parametrize("k,n", [(5120, 8192), (8192, 5120)])
def test_mosaic_kernel_on_gpu_at_scout_shapes(m, k, n):
    """The picked config (K split at decode sizes, bands of N tiles at prefill sizes) on the
    device, 16 experts with uneven (and some empty) groups."""
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)) / np.sqrt(k), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((16, k, n)), jnp.bfloat16)
    gs = jnp.asarray(np.bincount(rng.integers(0, 16, m) // 2 * 2, minlength=16), jnp.int32)
    got = jax.jit(lambda x, w, gs: gm.grouped_matmul(x, w, gs, impl="mosaic"))(x, w, gs)
    want = gm.reference(x, w, gs)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m,sizes,ns,config", [
    (1, [0, 0, 1, 0], (256, 256), None),  # decode: one row, both parts' N tiles in one launch
    (1, [0, 0, 1, 0], (256, 128, 128), None),  # attention's q, k and v: N differs
    (70, [16, 27, 0, 27], (256, 256), dataclasses.replace(DECODE, k_splits=2)),  # K split too
    (300, [106, 96, 98, 0], (1024, 1024), None),  # prefill bands of 8 N tiles across the parts
    (300, [106, 96, 98, 0], (1024, 384, 640), None),  # bands across parts of different N
])
def test_several_weights_in_one_launch(m, sizes, ns, config):
    """``w`` a tuple (an expert's gate and up projections; q, k and v): one kernel, outputs
    side by side, equal to each weight's product alone; the XLA path concatenates the same."""
    rng = np.random.default_rng(m)
    k, g = 128, len(sizes)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    ws = tuple(jnp.asarray(rng.standard_normal((g, k, n)), jnp.bfloat16) for n in ns)
    gs = jnp.asarray(sizes, jnp.int32)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
        got = gm.grouped_matmul(x, ws, gs, impl="mosaic", config=config)
    want = np.concatenate([np.asarray(gm.reference(x, w, gs)) for w in ws], axis=-1)
    assert got.shape == (m, sum(ns))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=0.1)
    xla = gm.grouped_matmul(x, ws, gs, impl="xla")
    np.testing.assert_allclose(np.asarray(xla, np.float32), want, rtol=1e-2, atol=0.1)
    with pytest.raises(ValueError, match="share one dtype and shape"):
        gm.grouped_matmul(x, (ws[0], ws[1][:, :64]), gs, impl="xla")


@pytest.mark.parametrize("m", [1, 300, 8192])
def test_two_weights_lower_for_scout_shapes(m):
    """Scout's gate and up (5120 -> 8192 each, TP=1) as one launch, decode to prefill."""
    f = jax.jit(lambda x, a, b, gs: gm.grouped_matmul(x, (a, b), gs, impl="mosaic"))
    w = jax.ShapeDtypeStruct((16, 5120, 8192), jnp.bfloat16)
    exported = jax.export.export(f, platforms=["cuda"])(
        jax.ShapeDtypeStruct((m, 5120), jnp.bfloat16), w, w,
        jax.ShapeDtypeStruct((16,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("sms", [132, 114, 8, 7])
def test_decode_work_items_are_dealt_once_each_and_spread(sms):
    """The swap-AB form's persistent loop visits every work item of each round once, and a
    round's first items go to CTAs spread over the GPU, not to CTAs 0, 1, 2, ..."""
    dealt = [gm._dealt(w, sms) for w in range(3 * sms)]
    assert sorted(dealt) == list(range(3 * sms))
    assert [d // sms for d in dealt] == [w // sms for w in range(3 * sms)]  # rounds kept
    first = sorted(dealt.index(j) for j in range(sms // 3))  # CTAs of the first third
    assert max(first) - min(first) > sms // 2
    traced = jax.jit(lambda w: gm._dealt(w, sms))(jnp.arange(3 * sms, dtype=jnp.int32))
    assert list(map(int, traced)) == dealt


def test_down_launch_lowers_with_the_trace_on(tmp_path):
    """The decode MoE's down launch (W8A16 by row with the shared expert, Scout's shapes)
    lowers for CUDA with Mosaic GPU's profiler and its regions inside common.kernel_trace (the
    80 regions benchmarks.kernel_trace --down asks for fit beside its ring) up to the trace's
    dump, a host callback that needs a CUDA backend; too many are caught by the shared-memory
    budget."""
    f8, sds = jnp.float8_e4m3fn, jax.ShapeDtypeStruct
    config = dataclasses.replace(gm.pick_config(16, 8192, 5120, fp8=True, f16_rows=True),
                                 block_m=16)
    fn = jax.jit(lambda x, g, w, s: gm._mosaic_grouped_matmul(
        x, w, g, s, config=config, by_row=True, shared_blocks=(0, 1), out_dtype=jnp.bfloat16))
    args = (sds((32, 8192), jnp.float16), sds((16,), jnp.int32),
            (sds((16, 5120, 8192), f8), sds((1, 5120, 8192), f8)),
            (sds((16, 5120), jnp.float32), sds((1, 5120), jnp.float32)))
    # One jitted function throughout: kernel_trace clears JAX's caches on entry and exit, so
    # each block lowers it anew.
    export = lambda: jax.export.export(fn, platforms=["cuda"])(*args)
    with common.kernel_trace(str(tmp_path), 80):
        with pytest.raises(ValueError, match="different from the lowering platform cuda"):
            export()
    with common.kernel_trace(str(tmp_path), 20000):
        with pytest.raises(ValueError, match="exceeds available shared memory"):
            export()
    assert "mosaic_gpu" in export().mlir_module()
