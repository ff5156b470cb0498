"""CUDA lowering of the decode kernel on CPU for every configuration the planner can send it.

``jax.export(..., platforms=["cuda"])`` runs Pallas -> Mosaic GPU lowering, layout
inference, TMA shape rules and the shared-memory budget check without a GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import planner
from jaxattn.kernels import common, decode, decode_combine


def _export(bounds, dtype, *, causal=True, config=None, num_tokens=None, out_scale=None):
    cap = planner.capacity(bounds).decode_items
    i32 = jnp.int32
    sds = jax.ShapeDtypeStruct
    items = planner.WorkList(*[sds((cap,), i32)] * 8, sds((), i32))
    t = num_tokens or bounds.max_num_batched_tokens
    pool = sds((64, bounds.page_size, bounds.num_kv_heads, bounds.head_dim), dtype)
    fn = lambda q, k, v, pt, items: decode.decode_attention(
        q, k, v, pt, items, bounds=bounds, scale=0.1, causal=causal, config=config,
        out_scale=out_scale)
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(
        sds((t, bounds.num_q_heads, bounds.head_dim), dtype), pool, pool,
        sds((bounds.max_num_seqs, bounds.pages_per_seq), i32), items)


# (Hq, Hkv) per device: Scout at TP 1/2/8 (G=5), and G = 1, 2, 4, 8 models.
HEADS = [(40, 8), (20, 4), (5, 1), (8, 8), (16, 8), (32, 8), (64, 8)]
PAGE_SIZES = [8, 16, 32, 64, 128]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS)
def test_cuda_lowering_every_planner_config(head_dim, heads):
    """Every (heads, head_dim, page size) the planner can pair; dtype and causality alternate
    so each dtype and mask variant meets every head layout and head_dim."""
    for i, page_size in enumerate(PAGE_SIZES):
        bounds = jaxattn.Bounds(max_num_seqs=256, max_num_batched_tokens=2048,
                                max_model_len=131072, page_size=page_size,
                                num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                                chunk_size=8192)
        dtype = (jnp.bfloat16, jnp.float16)[i % 2]
        exp = _export(bounds, dtype, causal=(i // 2) % 2 == 0)
        assert "mosaic_gpu" in exp.mlir_module()
        if i == 0 and decode.out_scale_in_kernel(heads[0] // heads[1], head_dim):
            _export(bounds, dtype, out_scale=2.0 ** -3)  # FP8 rows out


@pytest.mark.parametrize("config", [
    decode.DecodeConfig(),  # the interpret-tested SMEM-P path
    decode.DecodeConfig(block_kv=128, num_stages=2, p_in_registers=True),
    decode.DecodeConfig(num_stages=3, p_in_registers=True),
    decode.DecodeConfig(p_in_registers=True, narrow_tiles=True),  # the FP8 cache's tile form
    decode.DecodeConfig(block_kv=128, num_stages=2, p_in_registers=True, narrow_tiles=True),
    decode.DecodeConfig(p_in_registers=True, consumers=2),  # two consumers, both tile forms
    decode.DecodeConfig(p_in_registers=True, consumers=2, narrow_tiles=True),
    decode.DecodeConfig(block_kv=128, num_stages=2, p_in_registers=True, consumers=2),
    # a block's consecutive 16-row pages in one copy, under the bf16 default's blocks too
    decode.DecodeConfig(p_in_registers=True, merge_pages=True),
    decode.DecodeConfig(block_kv=128, num_stages=2, p_in_registers=True, merge_pages=True),
    # the combine folded into the main kernel, with 128-key blocks, and with two consumers
    # and narrow tiles (the producer still merges half the columns)
    decode.DecodeConfig(block_kv=128, num_stages=2, p_in_registers=True, fold_combine=True),
    decode.DecodeConfig(p_in_registers=True, consumers=2, narrow_tiles=True, fold_combine=True),
    # the combine kernel's tunings (benchmarks/decode_combine.py)
    *(decode.DecodeConfig(p_in_registers=True, combine=c) for c in [
        decode_combine.CombineConfig(cols=16), decode_combine.CombineConfig(cols=32, warpgroups=2),
        decode_combine.CombineConfig(warpgroups=4, approx_math=True),
        decode_combine.CombineConfig(cols=16, warpgroups=4, approx_math=True)]),
])
def test_cuda_lowering_tuning_variants(config):
    bounds = jaxattn.Bounds(max_num_seqs=256, max_num_batched_tokens=8192,
                            max_model_len=131072, page_size=16, num_q_heads=40,
                            num_kv_heads=8, head_dim=128, chunk_size=8192)
    _export(bounds, jnp.bfloat16, config=config)
    if config.combine.warpgroups <= 2:  # FP8 rows: 128-column combine CTAs (SMEM: 2 WGs)
        _export(bounds, jnp.bfloat16, config=config, out_scale=2.0 ** -3)


def test_oversized_config_is_caught_on_cpu():
    bounds = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=4096,
                            page_size=16, num_q_heads=40, num_kv_heads=8, head_dim=128)
    with pytest.raises(Exception, match="shared memory"):
        _export(bounds, jnp.bfloat16,
                config=decode.DecodeConfig(block_kv=128, num_stages=4, p_in_registers=True))


def test_four_combine_warpgroups_with_fp8_rows_are_refused_clearly():
    """FP8 rows at G = 5 take 128-column combine CTAs, whose ring and shares at 4 warpgroups
    exceed shared memory: a ValueError that says so, where Mosaic's budget check would
    otherwise fail deep in the lowering."""
    bounds = jaxattn.Bounds(max_num_seqs=256, max_num_batched_tokens=8192,
                            max_model_len=131072, page_size=16, num_q_heads=40,
                            num_kv_heads=8, head_dim=128, chunk_size=8192)
    config = decode.DecodeConfig(combine=decode_combine.CombineConfig(warpgroups=4))
    with pytest.raises(ValueError, match="at most 2 warpgroups"):
        _export(bounds, jnp.bfloat16, config=config, out_scale=2.0 ** -3)
    _export(bounds, jnp.bfloat16, config=config)  # bf16 rows: 64 columns, it fits


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_folded_combine_replaces_the_combine_kernel(head_dim):
    """DecodeConfig.fold_combine merges split parents in the main kernel (its ticket's atomic
    is in the module, and no combine kernel is); the default (fold off) launches the combine
    kernel, and has no atomic. Also where the output is FP8 rows."""
    bounds = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=131072,
                            page_size=16, num_q_heads=40, num_kv_heads=8, head_dim=head_dim,
                            chunk_size=8192)
    fold = dataclasses.replace(decode.default_config(), fold_combine=True)
    for out_scale in (None, 2.0 ** -3) if head_dim == 128 else (None,):  # (5 x 64 bytes)
        mod = _export(bounds, jnp.bfloat16, out_scale=out_scale, config=fold).mlir_module()
        assert "atom.acq_rel.gpu" in mod and "decode_combine_kernel" not in mod
        mod = _export(bounds, jnp.bfloat16, out_scale=out_scale).mlir_module()
        assert "atom.acq_rel.gpu" not in mod and "decode_combine_kernel" in mod


@pytest.mark.parametrize("config", [None, decode.DecodeConfig(p_in_registers=True, consumers=2)])
def test_kernels_lower_with_the_trace_on(config, tmp_path):
    """Inside common.kernel_trace the main kernel lowers with Mosaic GPU's profiler and its
    regions (benchmarks.kernel_trace's default 64 a warpgroup fit in shared memory beside
    Scout's tiles) up to the trace's dump, a host callback that needs a CUDA backend (so the
    lowering stops there, before the combine); too many events are caught by the
    shared-memory budget; outside the block nothing is traced."""
    bounds = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=8192,
                            page_size=16, num_q_heads=40, num_kv_heads=8, head_dim=128,
                            chunk_size=8192)
    with common.kernel_trace(str(tmp_path), 64):
        with pytest.raises(ValueError, match="different from the lowering platform cuda"):
            _export(bounds, jnp.bfloat16, config=config)
    with common.kernel_trace(str(tmp_path), 20000):
        with pytest.raises(ValueError, match="exceeds available shared memory"):
            _export(bounds, jnp.bfloat16, config=config)
    assert "mosaic_gpu" in _export(bounds, jnp.bfloat16, config=config).mlir_module()
