"""Grouped matmul for the routed experts: rows sorted by expert times that expert's matrix.

``grouped_matmul(x [M, K], w [G, K, N], group_sizes [G]) -> [M, N]`` with the
semantics of ``jax.lax.ragged_dot`` (:func:`reference`). Two implementations:

* ``"xla"``: ``lax.ragged_dot``. XLA on the GPU runs it as a dense matmul over
  zero-padded groups, so it does the work of every group and reads every
  expert's weights even when one token hits one expert
  (benchmarks/NOTES-grouped-matmul.md).
* ``"mosaic"``: a Pallas Mosaic GPU persistent kernel (Hopper, bf16/f16), adapted
  from JAX's ``jax/experimental/pallas/ops/gpu/ragged_dot_mgpu.py`` (Apache 2.0).
  Row tiles are numbered as there (each group's rows start a new tile, so a tile
  holds one group's rows), with two changes for decode, where one token hits one
  expert and the kernel should read that expert's weights at copy bandwidth:

  - only the tiles that hold rows are visited, listed first (XLA computes the
    list), so their work items are dealt evenly to the SMs. JAX's version visits
    every tile, computing the empty ones against group 0's weights, and the
    few real items of a decode step land on a fraction of the SMs.
  - ``k_splits`` > 1 splits K over several SMs (f32 partial sums, added by XLA),
    so that a single expert's N tiles still occupy every SM.

``"auto"`` picks ``"mosaic"`` on a Hopper GPU for bf16/f16 with K a multiple of
the K tile and N of the N tile, else ``"xla"``; to force one, pass it as ``impl``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxattn.kernels import common

IMPLS = ("auto", "xla", "mosaic")
_BLOCK_K, _BLOCK_N = 64, 128


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tiles of one kernel launch."""

    block_m: int = 128  # rows per tile; a wgmma has at least 64
    block_n: int = _BLOCK_N
    block_k: int = _BLOCK_K
    max_concurrent_steps: int = 4  # K steps in flight (TMA ring depth)
    grid_block_n: int = 1  # N tiles per band of the planar snake (weight tiles stay in L2)
    k_splits: int = 1  # K ranges on different SMs, summed in f32 afterwards


def pick_config(m: int, k: int, n: int, num_sms: int | None = None) -> GroupedMatmulConfig:
    """Tiles for an [m, k] x [k, n] problem on ``num_sms`` SMs (default: the device's).

    Prefill: 128-row tiles in bands of 8 N tiles, which keeps the weight tiles
    in L2 across row tiles. Decode (M <= 64, one tile per group hit): K split
    until one expert's N tiles cover the SMs.
    """
    sms = num_sms or common.num_sms()
    if m > 64:
        return GroupedMatmulConfig(grid_block_n=8 if n % (8 * _BLOCK_N) == 0 else 1)
    steps, splits = k // _BLOCK_K, 1
    while (n // _BLOCK_N) * splits < sms and steps % (2 * splits) == 0:
        splits *= 2
    return GroupedMatmulConfig(block_m=64, k_splits=splits)


def reference(x, w, group_sizes):
    """The semantics, in f32 (what the kernels are tested against)."""
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


def resolve(impl: str, x, w) -> str:
    """The implementation ``impl`` stands for: "auto" -> "mosaic" where it runs, else "xla"."""
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    k, n = w.shape[1], w.shape[2]
    ok = (common.on_hopper() and x.dtype == w.dtype and x.dtype in common.DTYPES
          and k % _BLOCK_K == 0 and n % _BLOCK_N == 0)
    return "mosaic" if ok else "xla"


def grouped_matmul(x, w, group_sizes, *, impl: str = "auto",
                   config: GroupedMatmulConfig | None = None):
    """x [M, K] sorted by group; w [G, K, N]; group_sizes [G] int32 -> [M, N].

    The groups must cover all M rows (sum(group_sizes) == M): the Mosaic kernel writes
    only rows that belong to a group.
    """
    if resolve(impl, x, w) == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes)
    m = x.shape[0]
    config = config or pick_config(m, w.shape[1], w.shape[2])
    if m > 8 and m % 8:  # Mosaic's TMA tiling needs the row count a multiple of 8 (or < 8)
        x = jnp.pad(x, ((0, -m % 8), (0, 0)))  # rows of no group: never written, cut below
    return _mosaic_grouped_matmul(x, w, group_sizes.astype(jnp.int32), config=config)[:m]


def _tile_info(group_sizes, block_m: int, tile):
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import GroupInfo

    return GroupInfo.create(group_sizes, block_m, tile)


@functools.partial(jax.jit, static_argnames=("config",))
def _mosaic_grouped_matmul(lhs, rhs, group_sizes, *, config: GroupedMatmulConfig):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = lhs.shape
    g, _, n = rhs.shape
    bm, bn, bk, splits = config.block_m, config.block_n, config.block_k, config.k_splits
    if k % (bk * splits) or n % bn:
        raise ValueError(f"K={k} must be a multiple of block_k*k_splits={bk * splits} "
                         f"and N={n} of block_n={bn}")
    # Row tiles: every group's rows, each group starting a new tile (+ g - 1 at most).
    grid_m, grid_n, k_steps = common.cdiv(m, bm) + g - 1, n // bn, k // bk // splits
    # The tiles holding rows first, then their count: [grid_m + 1] int32.
    sizes = jax.vmap(lambda t: _tile_info(group_sizes, bm, t).actual_size)(
        jnp.arange(grid_m, dtype=jnp.int32))
    tiles = jnp.argsort(sizes <= 0, stable=True).astype(jnp.int32)
    tiles = jnp.append(tiles, jnp.sum(sizes > 0, dtype=jnp.int32))
    out_dtype = lhs.dtype if splits == 1 else jnp.float32

    def body(tiles_gmem, sizes_gmem, lhs_gmem, rhs_gmem, o_gmem):
        @plgpu.nd_loop((grid_m * grid_n * splits,), collective_axes="sm")
        def work_loop(loop_info: plgpu.NDLoopInfo):
            w = loop_info.index[0]
            split = w % splits
            ti, ni = plgpu.planar_snake(w // splits, (grid_m, grid_n), 1, config.grid_block_n)

            @pl.when(ti < tiles_gmem[grid_m])
            def _():
                info = _tile_info(sizes_gmem, bm, tiles_gmem[ti])
                k0 = split * k_steps

                def acc_scope(acc_ref):
                    plgpu.emit_pipeline(
                        lambda _, lhs_smem, rhs_smem: plgpu.wgmma(acc_ref, lhs_smem, rhs_smem),
                        grid=(k_steps,),
                        in_specs=[
                            plgpu.BlockSpec((bm, bk), lambda kk: (info.block, k0 + kk),
                                            delay_release=1),
                            plgpu.BlockSpec((bk, bn), lambda kk: (k0 + kk, ni),
                                            delay_release=1),
                        ],
                        max_concurrent_steps=config.max_concurrent_steps,
                    )(lhs_gmem, rhs_gmem.at[info.group_id])
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))
                out = o_gmem if splits == 1 else o_gmem.at[split]

                @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), dtype=out_dtype))
                def store_scope(o_smem):
                    o_smem[...] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    # TMA stores need static row counts: store the tile's rows as a sum of
                    # powers of two (one descriptor per power), as JAX's kernel does.
                    smem_start = info.start_within_block
                    remaining = min(bm, m)
                    while remaining > 0:
                        rows = 1 << int(math.log2(remaining))
                        remaining //= 2

                        @pl.when(info.actual_size & rows != 0)
                        def _():
                            plgpu.copy_smem_to_gmem(
                                o_smem.at[pl.ds(smem_start, rows)],
                                out.at[pl.ds(info.block_start + smem_start, rows),
                                       pl.ds(ni * bn, bn)])

                        smem_start += info.actual_size & rows
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_shape = (m, n) if splits == 1 else (splits, m, n)
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype), grid=(common.num_sms(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    out = kernel(tiles, group_sizes, lhs, rhs)
    return out if splits == 1 else out.sum(0).astype(lhs.dtype)
