"""Grouped matmul for the routed experts: rows sorted by expert times that expert's matrix.

``grouped_matmul(x [M, K], w [G, K, N], group_sizes [G]) -> [M, N]`` with the
semantics of ``jax.lax.ragged_dot``. Two implementations:

* ``"xla"``: ``lax.ragged_dot``. On the H100 image XLA runs it as a dense matmul
  over zero-padded groups: measured 54 ms for 32768 rows x 16 experts (5120 x 8192)
  where one dense matmul of the same useful FLOPs takes 3.8 ms, and every expert's
  weights are read even when one token hits one expert (benchmarks/model.py).
* ``"mosaic"``: a Pallas Mosaic GPU persistent kernel (Hopper, bf16/f16), adapted
  from JAX's ``jax/experimental/pallas/ops/gpu/ragged_dot_mgpu.py`` (Apache 2.0) with
  one change: output tiles that hold no rows of their group skip the pipeline
  entirely. JAX's version computes them against group 0's weights and discards the
  result, which at decode (one row, 16 groups) reads the weights of 16 groups
  instead of 1.

``"auto"`` picks ``"mosaic"`` on a Hopper GPU for bf16/f16 with K a multiple of
the K tile and N of the N tile, else ``"xla"``; the environment variable
``JAXATTN_GROUPED_MATMUL=xla|mosaic`` overrides that choice (an operational escape
hatch, read at trace time).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "mosaic")
_BLOCK_K, _BLOCK_N = 64, 128


def _on_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def resolve(impl: str, x, w) -> str:
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        impl = os.environ.get("JAXATTN_GROUPED_MATMUL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"JAXATTN_GROUPED_MATMUL={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    k, n = w.shape[1], w.shape[2]
    ok = (_on_hopper() and x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16)
          and k % _BLOCK_K == 0 and n % _BLOCK_N == 0)
    return "mosaic" if ok else "xla"


def grouped_matmul(x, w, group_sizes, *, impl: str = "auto"):
    """x [M, K] sorted by group; w [G, K, N]; group_sizes [G] int32 -> [M, N].

    The groups must cover all M rows (sum(group_sizes) == M): the Mosaic kernel writes
    only rows that belong to a group.
    """
    if resolve(impl, x, w) == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes)
    m = x.shape[0]
    # A wgmma tile has at least 64 rows; decode batches fit one tile per group.
    block_m = 64 if m <= 64 else 128
    return _mosaic_ragged_dot(x, w, group_sizes.astype(jnp.int32), block_m=block_m,
                              block_n=_BLOCK_N, block_k=_BLOCK_K, max_concurrent_steps=4,
                              grid_block_n=1)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k",
                                             "max_concurrent_steps", "grid_block_n"))
def _mosaic_ragged_dot(lhs, rhs, group_sizes, *, block_m, block_n, block_k,
                       max_concurrent_steps, grid_block_n):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import GroupInfo

    m, k = lhs.shape
    g, _, n = rhs.shape
    if k % block_k or n % block_n:
        raise ValueError(f"K={k} must be a multiple of {block_k} and N={n} of {block_n}")

    def body(rows_per_group_gmem, lhs_gmem, rhs_gmem, o_gmem):
        # Row tiles: every group's rows, each group starting a new tile (+ g - 1 at most).
        grid_m = pl.cdiv(m, block_m) + g - 1
        grid_n = pl.cdiv(n, block_n)

        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def mn_loop(loop_info: plgpu.NDLoopInfo):
            mi, ni = plgpu.planar_snake(loop_info.index[0], (grid_m, grid_n), 1, grid_block_n)
            info = GroupInfo.create(rows_per_group_gmem, block_m, mi)

            @pl.when(info.actual_size > 0)  # the change: empty tiles read nothing
            def _():
                def acc_scope(acc_ref):
                    plgpu.emit_pipeline(
                        lambda _, lhs_smem, rhs_smem: plgpu.wgmma(acc_ref, lhs_smem, rhs_smem),
                        grid=(k // block_k,),
                        in_specs=[
                            plgpu.BlockSpec((block_m, block_k), lambda kk: (info.block, kk),
                                            delay_release=1),
                            plgpu.BlockSpec((block_k, block_n), lambda kk: (kk, ni),
                                            delay_release=1),
                        ],
                        max_concurrent_steps=max_concurrent_steps,
                    )(lhs_gmem, rhs_gmem.at[info.group_id])
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))

                @functools.partial(pl.run_scoped,
                                   o_smem=plgpu.SMEM((block_m, block_n), dtype=o_gmem.dtype))
                def store_scope(o_smem):
                    o_smem[...] = acc.astype(o_smem.dtype)
                    plgpu.commit_smem()
                    # TMA stores need static row counts: store the tile's rows as a sum of
                    # powers of two (one descriptor per power), as JAX's kernel does.
                    smem_start = info.start_within_block
                    remaining = min(block_m, m)
                    while remaining > 0:
                        rows = 1 << int(math.log2(remaining))
                        remaining //= 2

                        @pl.when(info.actual_size & rows != 0)
                        def _():
                            plgpu.copy_smem_to_gmem(
                                o_smem.at[pl.ds(smem_start, rows)],
                                o_gmem.at[pl.ds(info.block_start + smem_start, rows),
                                          pl.ds(ni * block_n, block_n)])

                        smem_start += info.actual_size & rows
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    num_sms = getattr(jax.devices()[0], "core_count", 132) if _on_hopper() else 132
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m, n), lhs.dtype), grid=(num_sms,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return kernel(group_sizes, lhs, rhs)
