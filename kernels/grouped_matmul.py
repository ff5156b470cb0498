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

  - only the tiles that hold rows are visited: the kernel numbers tiles group by
    group and gives empty groups none (:func:`tile_info`), so the tiles holding rows
    are the first ``count`` and their work items are dealt evenly to the SMs. JAX's
    version visits every tile, computing the empty ones against group 0's weights,
    and the few real items of a decode step land on a fraction of the SMs.
  - FP8 ``swap_ab``: the weights as the wgmma's M side and the few rows as its N side
    (``acc = W x^T``, stored back through a transposed view of the output tile in SMEM),
    so a ring slot holds 16 rows instead of 64 and more weight bytes are in flight.
    :func:`pick_config` picks it for FP8 calls of at most 16 rows.
  - by row (:func:`grouped_matmul_fp8_by_row`): a decode step's rows in token order, a
    tile per expert some row picked, each storing its rows; a shared expert (every row
    through it) rides in the same launch as one more tile, its rows stored after the
    routed ones (``shared=``).
  - ``k_splits`` > 1 splits K over several SMs (f32 partial sums, added by XLA),
    so that a single expert's N tiles occupy more SMs. Measured slower than no split
    at Scout's decode shapes (the partial sums' extra pass), so :func:`pick_config` and
    :func:`dense_config` leave it at 1 (the latter narrows the N tiles instead); configs
    may still ask for it.

``"auto"`` picks ``"mosaic"`` on a Hopper GPU for bf16/f16 with K a multiple of
the K tile and N of the N tile, else ``"xla"``; to force one, pass it as ``impl``.

Several weight tensors (``w`` a tuple: an expert's gate and up projections; attention's
q, k and v) multiply the same rows in one launch, their outputs side by side ``[M, N_1 +
... + N_P]``: one kernel whose N tiles cover every part, so a decode step's few tiles per
part share one wave of SMs instead of taking one launch each. The parts share K, dtype and
group count; their N may differ.

FP8 (:func:`grouped_matmul_fp8`): rows quantised per token at run time, experts'
weights float8_e4m3fn with per-output-channel scales, stored K-major ``[G, N, K]``
(wgmma reads 8-bit operands only K-major; a checkpoint's per-expert Linear weights
are ``[out, in]``, the same layout). The same kernel with 8-bit tiles (128 K
elements: a 128-byte swizzled row, as bf16's 64), the weight tile read as
``[N, K]`` and transposed for the wgmma, the column scales of the tile's expert applied
to the f32 accumulator in the epilogue, and the row scales by XLA after it (a multiply
that fuses into whatever reads the product). :func:`reference_fp8` is its semantics.

W8A16 (swap-AB, f16 rows with FP8 weights, the kernel's form only so far): each weight
tile is widened to f16 in registers (e4m3 values are exact in f16, and Hopper converts e4m3
to f16 but not to bf16) and the rows stay 16-bit, so they need no per-token scale: a
consumer that makes them (a SwiGLU in the gate/up launch's epilogue) needs no reduction over
the whole row. :func:`reference_fp8` with f16 rows under unit scales is its semantics.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.kernels import common, fp8

IMPLS = ("auto", "xla", "mosaic")
_BLOCK_K, _BLOCK_N = 64, 128
_BLOCK_K_FP8 = 128  # 128 one-byte elements: one 128-byte swizzled row, as 64 bf16


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tiles of one kernel launch."""

    block_m: int = 128  # rows per tile; a wgmma has at least 64 (swap_ab: 8)
    block_n: int = _BLOCK_N
    block_k: int = _BLOCK_K
    max_concurrent_steps: int = 4  # K steps in flight (TMA ring depth)
    grid_block_n: int = 1  # N tiles per band of the planar snake (weight tiles stay in L2)
    k_splits: int = 1  # K ranges on different SMs, summed in f32 afterwards
    # FP8 decode: the weights are the wgmma's M side and the few rows its N side (W x^T).
    # A 64-row tile of 1-16 real rows otherwise takes a third of each ring slot, and the
    # bytes of weights in flight per SM are what bound a decode call (Little's law).
    swap_ab: bool = False
    # FP8: each K step's wgmma into a fresh accumulator, summed in f32 registers (DeepSeek-V3's
    # promotion). Hopper's FP8 wgmma keeps ~14 bits in its accumulator, so a long same-sign
    # sum over all of K can come out low (302 for 320 at K = 5120, H200); promoting costs a
    # wgmma wait per K step. Off by default, as inference FP8 GEMMs run (fast accumulation).
    promote: bool = False
    # W8A16 (f16 rows, FP8 weights): each weight tile is widened to f16 in registers, 64 rows
    # by 128 K at a time, and fed to the wgmma as its A operand. GPU interpret mode cannot
    # run a register A operand, so there (and where this is off) the pieces go through a
    # shared-memory tile instead.
    widen_in_registers: bool = True

    def __post_init__(self):
        if self.swap_ab:
            if self.block_m % 8 or not 8 <= self.block_m <= 256 or self.block_n % 64:
                raise ValueError(f"swap_ab: block_m={self.block_m} must be a multiple of 8 "
                                 f"in [8, 256] (wgmma N) and block_n={self.block_n} of 64")
        elif self.block_m not in (64, 128, 192, 256):
            raise ValueError(f"block_m={self.block_m}: a multiple of 64 (one wgmma), at most 256")
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 8 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 8")
        for name in ("max_concurrent_steps", "grid_block_n", "k_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


SWAP_AB_MAX_ROWS = 16  # FP8 calls of at most this many rows (a decode step's) run swap-AB
# By row, the token counts whose launch takes a shared expert along (its tile's rows are
# the kernel's row block: a multiple of 8, at most SWAP_AB_MAX_ROWS).
SHARED_EXPERT_ROWS = (8, SWAP_AB_MAX_ROWS)


def pick_config(m: int, k: int, n: int, *, fp8: bool = False,
                f16_rows: bool = False) -> GroupedMatmulConfig:
    """Tiles for an [m, k] x [k, n] problem.

    Prefill: 128-row tiles in bands of 8 N tiles, which keeps the weight tiles
    in L2 across row tiles. Decode (M <= 64, one tile per group hit): 64-row tiles,
    an 8-deep TMA ring and no K split. Splitting K to occupy more SMs measured
    slower at Scout's decode shapes on the H200 (the f32 partial sums cost an extra
    write, read and kernel; benchmarks/NOTES-grouped-matmul.md), so ``k_splits`` is
    left to explicit configs. ``fp8``: 8-bit operands, whose K tile is 128 elements
    (the same 128 bytes per row). FP8 at most 16 rows (a decode step's): the swap-AB form,
    16-row token tiles and 256-byte K tiles in a 6-deep ring, 1.2-1.6x faster than the
    64-row tile at Scout's decode shapes on the H200 (128-byte K tiles: 1.1-1.5x; a tile's
    fixed cost per K step is what a decode call pays, NOTES-grouped-matmul.md).
    ``f16_rows`` (W8A16: FP8 weights, f16 rows): the same tiles, a slot fewer in the ring
    (the rows' tile is twice as wide, and six slots would not fit in shared memory); on an
    H100 the by-row launches with the shared expert took 1-28% longer in 64-column tiles
    (256- or 512-byte K steps) and 1.6-2.3x in 512-byte K steps of 128 columns (2 slots)
    (results/gmm-w8a16-2026-12-06-s50-tiles-h100.json).
    """
    bk = _BLOCK_K_FP8 if fp8 else _BLOCK_K
    if fp8 and m <= SWAP_AB_MAX_ROWS:
        if k % (2 * bk) == 0:
            return GroupedMatmulConfig(block_m=16, block_k=2 * bk,
                                       max_concurrent_steps=5 if f16_rows else 6, swap_ab=True)
        return GroupedMatmulConfig(block_m=16, block_k=bk, max_concurrent_steps=8, swap_ab=True)
    if m > 64:
        return GroupedMatmulConfig(block_k=bk,
                                   grid_block_n=8 if n % (8 * _BLOCK_N) == 0 else 1)
    return GroupedMatmulConfig(block_m=64, block_k=bk, max_concurrent_steps=8)


def reference(x, w, group_sizes):
    """The semantics, in f32 (what the kernels are tested against)."""
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)


def reference_fp8(xq, x_scale, wq, w_scale, group_sizes):
    """The FP8 product's semantics in f32: ``xq [M, K]`` float8 with ``x_scale [M]``,
    ``wq [G, N, K]`` float8 with ``w_scale [G, N]``; dequantised, then ragged_dot. W8A16's
    too: ``xq`` f16 rows (their scales 1)."""
    x = fp8.dequantize(xq, x_scale)
    w = fp8.dequantize(wq, w_scale)  # [G, N, K]
    return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), group_sizes,
                              precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)


def _parts(w, n_axis: int | None = None) -> tuple:
    """``w`` as a tuple of weight tensors (one tensor: a 1-tuple) of one dtype and one shape
    except along ``n_axis``, where each part's N may differ."""
    parts = tuple(w) if isinstance(w, (tuple, list)) else (w,)

    def key(p):
        shape = list(p.shape)
        if n_axis is not None:
            shape[n_axis] = None
        return shape, p.dtype

    if any(key(p) != key(parts[0]) for p in parts):
        raise ValueError(f"grouped matmul weights must share one dtype and shape (but N), got "
                         f"{[(p.shape, str(p.dtype)) for p in parts]}")
    return parts


def resolve(impl: str, x, w) -> str:
    """The implementation ``impl`` stands for: "auto" -> "mosaic" where it runs, else "xla"."""
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    parts = _parts(w, n_axis=2)
    k = parts[0].shape[1]
    ok = (common.on_hopper() and x.dtype == parts[0].dtype and x.dtype in common.DTYPES
          and k % _BLOCK_K == 0 and all(p.shape[2] % _BLOCK_N == 0 for p in parts))
    return "mosaic" if ok else "xla"


def grouped_matmul(x, w, group_sizes, *, impl: str = "auto",
                   config: GroupedMatmulConfig | None = None):
    """x [M, K] sorted by group; w [G, K, N] (or a tuple of them, N may differ); group_sizes
    [>= G] int32 -> [M, N] (a tuple of weights: [M, N_1 + ... + N_P], each part's columns in
    turn).

    Rows past the groups, and rows counted past the G-th (``group_sizes`` may be longer:
    a MoE's padding rows under a past-the-end expert id), belong to no group: the Mosaic
    kernel does not write them, so their output is undefined.
    """
    parts = _parts(w, n_axis=2)
    if resolve(impl, x, parts) == "xla":
        gs = group_sizes[:parts[0].shape[0]]
        return jnp.concatenate([jax.lax.ragged_dot(x, p, gs) for p in parts], axis=-1)
    m, k = x.shape[0], parts[0].shape[1]
    config = config or pick_config(m, k, sum(p.shape[2] for p in parts))
    if m > 8 and m % 8:  # Mosaic's TMA tiling needs the row count a multiple of 8 (or < 8)
        x = jnp.pad(x, ((0, -m % 8), (0, 0)))  # rows of no group: never written, cut below
    return _mosaic_grouped_matmul(x, parts, group_sizes.astype(jnp.int32), config=config)[:m]


def resolve_fp8(impl: str, k: int, *ns: int) -> str:
    """:func:`resolve` for :func:`grouped_matmul_fp8` (the Mosaic kernel on Hopper); ``ns``:
    each weight's N."""
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    ok = common.on_hopper() and k % _BLOCK_K_FP8 == 0 and all(n % _BLOCK_N == 0 for n in ns)
    return "mosaic" if ok else "xla"


def grouped_matmul_fp8(x, w, w_scale, group_sizes, *, impl: str = "auto",
                       config: GroupedMatmulConfig | None = None, out_dtype=None,
                       scale_ub: float | None = None, scale_rows: bool = True):
    """x [M, K] (bf16/f32) sorted by group; FP8 weights w [G, N, K] (K-major) with per-output-
    channel scales w_scale [G, N] f32 (or tuples of them, as :func:`grouped_matmul` takes
    weights); group_sizes [>= G] int32 -> [M, N] (or [M, N_1 + ... + N_P]) in ``out_dtype``
    (default x's dtype).

    The rows are quantised per token here (dynamic scales, :func:`fp8.quantize`), unless
    ``x`` is :class:`fp8.Quantized` already. ``scale_rows=False`` leaves the rows' scales
    out (the product in units of each row's scale, ``x.scale``), for a consumer that applies
    them itself (the SwiGLU kernel of :mod:`fp8_rows`). As for :func:`grouped_matmul`, rows
    of no group are undefined. ``"xla"``: the 8-bit operands widened to bf16 (exactly) and
    ``lax.ragged_dot_general`` contracting w's last axis.

    ``x`` may also be :class:`fp8.Quantized` f16 values (W8A16: the weights widened instead,
    at most ``SWAP_AB_MAX_ROWS`` rows in the kernel; more go to XLA in f32).
    """
    x = x if isinstance(x, fp8.Quantized) else fp8.Quantized.of(x, scale_ub)
    xq, xs, out_dtype = x.values, x.scale, out_dtype or x.dtype
    parts, scales = _parts(w, n_axis=1), _parts(w_scale, n_axis=1)
    m, (g, _, k), ns = xq.shape[0], parts[0].shape, [p.shape[1] for p in parts]
    if (xq.shape[1] != k or len(scales) != len(parts) or parts[0].dtype != fp8.DTYPE
            or any(s.shape != (g, n) for s, n in zip(scales, ns))):
        raise ValueError(f"grouped_matmul_fp8: x {xq.shape}, w {[p.shape for p in parts]} "
                         f"{parts[0].dtype}, w_scale {[s.shape for s in scales]}: want x [M, K], "
                         f"w [G, N, K] float8_e4m3fn, w_scale [G, N], as many scales as weights")
    gs = group_sizes.astype(jnp.int32)
    f16_rows = xq.dtype == jnp.float16
    if resolve_fp8(impl, k, *ns) == "xla" or (f16_rows and m > SWAP_AB_MAX_ROWS):
        gs = gs[:g]
        dn = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[0])
        # Each row's expert, for its column scales (rows past the groups: none, scale 0).
        row_group = jnp.searchsorted(jnp.cumsum(gs), jnp.arange(m, dtype=jnp.int32),
                                     side="right")
        outs = []
        wide = jnp.float32 if f16_rows else jnp.bfloat16  # what holds both operands exactly
        for wq, ws in zip(parts, scales):
            y = jax.lax.ragged_dot_general(xq.astype(wide), wq.astype(wide),
                                           gs, dn, preferred_element_type=jnp.float32)
            col = jnp.take(ws, row_group, axis=0, mode="fill", fill_value=0)
            outs.append((y * (xs[:, None] if scale_rows else 1) * col).astype(out_dtype))
        return jnp.concatenate(outs, axis=-1)
    return _fp8_launch(x, parts, scales, gs,
                       config or pick_config(m, k, sum(ns), fp8=True, f16_rows=f16_rows),
                       out_dtype, scale_rows)


def _fp8_launch(x, parts, scales, groups, config, out_dtype, scale_rows, by_row=False,
                defer=False, dense=False):
    """The FP8 Mosaic kernel on quantised rows ``x`` -> [M, N_1 + ... + N_P] in
    ``out_dtype`` (``defer``: :class:`fp8.Unscaled` by the row scales); ``groups``: the
    group sizes, or each row's group (``by_row``); ``dense``: one group of every row."""
    xq, xs, m = x.values, x.scale, x.values.shape[0]
    if m > 8 and m % 8:  # Mosaic's TMA tiling needs the row count a multiple of 8 (or < 8)
        xq = jnp.pad(xq, ((0, -m % 8), (0, 0)))
        if by_row:  # the padding rows: of no group
            groups = jnp.pad(groups, (0, -m % 8), constant_values=parts[0].shape[0])
    scales = tuple(s.astype(jnp.float32) for s in scales)
    launch = functools.partial(_mosaic_grouped_matmul, dense_rows=m if dense else None)
    if (scale_rows and not defer and not by_row and config.swap_ab and config.k_splits == 1
            and m % config.block_m == 0):  # a decode step's bucket: the epilogue scales rows
        return launch(xq, parts, groups, scales, xs, config=config, out_dtype=out_dtype)
    # The kernel writes (x_q w_q) * w_scale (in bf16 at least: the row scale is still out
    # of its range); the row scales, applied here, fuse into the product's consumer (the
    # SwiGLU, the scatter back to token order) instead of padding per call for the
    # epilogue to read.
    y = launch(xq, parts, groups, scales, config=config, by_row=by_row,
               out_dtype=jnp.promote_types(jnp.bfloat16, out_dtype))[:m]
    if defer and scale_rows:
        return fp8.Unscaled(y, xs, None, jnp.dtype(out_dtype))
    return (y * xs[:, None] if scale_rows else y).astype(out_dtype)


def grouped_matmul_fp8_by_row(x, w, w_scale, row_groups, *, impl: str = "auto",
                              out_dtype=None, scale_ub: float | None = None,
                              scale_rows: bool = True, defer: bool = False, shared=None,
                              swiglu: bool = False, groups_settled: bool = False, held=None):
    """:func:`grouped_matmul_fp8` with the rows in any order: row r through the weights of
    group ``row_groups[r]`` (int32 [M]; G or more: no group, its row undefined) -> [M, N].
    ``defer``: where the Mosaic kernel runs, the :class:`fp8.Unscaled` product (by the
    rows' scales) for the consumer to scale.

    A decode step's MoE (top-1, at most ``SWAP_AB_MAX_ROWS`` rows) calls this in token order,
    so it sorts nothing by expert and scatters nothing back: those were several small
    kernels per layer. The Mosaic kernel (Hopper) runs a tile per expert that some row
    picked, over all the rows, and stores only that expert's rows (a TMA store per row).
    Elsewhere, and for more rows, the rows are sorted by group and go through
    :func:`grouped_matmul_fp8`.

    ``shared``: (weights, scales) of a shared expert that every row goes through as well,
    ``[N, K]`` and ``[N]`` per part (a Linear's), see :func:`_by_row_with_shared`, which
    also takes ``swiglu`` (gate and up in, their SwiGLU out as f16 rows), ``held`` and
    ``groups_settled`` (``row_groups`` written two launches back or more, see
    :func:`_mosaic_grouped_matmul`).
    """
    x = x if isinstance(x, fp8.Quantized) else fp8.Quantized.of(x, scale_ub)
    if shared is not None:
        return _by_row_with_shared(x, w, w_scale, row_groups, shared, impl=impl,
                                   out_dtype=out_dtype or x.dtype, scale_rows=scale_rows,
                                   defer=defer, swiglu=swiglu, groups_settled=groups_settled,
                                   held=held)
    if swiglu:
        raise ValueError("swiglu: by row with a shared expert (the decode MoE's launch) only")
    parts, scales = _parts(w, n_axis=1), _parts(w_scale, n_axis=1)
    (m, k), g, ns = x.values.shape, parts[0].shape[0], [p.shape[1] for p in parts]
    row_groups = row_groups.astype(jnp.int32)
    if m > SWAP_AB_MAX_ROWS or resolve_fp8(impl, k, *ns) == "xla":
        order = jnp.argsort(row_groups, stable=True)
        sizes = jnp.zeros((g,), jnp.int32).at[row_groups].add(1, mode="drop")
        y = grouped_matmul_fp8(x.take(order), w, w_scale, sizes, impl=impl,
                               out_dtype=out_dtype, scale_rows=scale_rows)
        return jnp.zeros_like(y).at[order].set(y, unique_indices=True)
    config = pick_config(m, k, sum(ns), fp8=True, f16_rows=x.values.dtype == jnp.float16)
    return _fp8_launch(x, parts, scales, row_groups, config, out_dtype or x.dtype, scale_rows,
                       by_row=True, defer=defer)


def _by_row_with_shared(x, w, w_scale, row_groups, shared, *, impl, out_dtype, scale_rows,
                        defer, swiglu=False, groups_settled=False, held=None):
    """The routed experts by row and a shared expert, for M = ``len(row_groups)`` tokens:
    ``x``'s values hold the rows once ([M, K]: both take them) or twice ([2M, K]: the routed
    experts' input, then the shared expert's), its scales always twice ([2M]: the routed
    rows', then the shared rows'). -> [2, M, N]: the routed product, then the shared one
    (``defer``: their :class:`fp8.Unscaled` stacked, which sums them where the scales
    apply; ``scale_rows`` False: without the rows' scales, for the SwiGLU to apply).

    At a decode step of 8 or 16 rows on Hopper this is one launch of the Mosaic kernel (a
    tile more: the shared expert's), where the shared expert took launches of its own (its
    down projection cuBLAS's). Elsewhere: the two products apart.

    ``swiglu`` (``w``, ``shared[0]``: gate and up): ``silu(gate) * up`` of every row, scaled,
    as :class:`fp8.Quantized` f16 rows [2M, N] (the routed rows, then the shared rows) under
    unit scales, clamped to f16's range; a routed row of no expert is undefined and its
    scale 0. Those are the W8A16 down projection's rows: f16 ``x`` values take the weights
    widened. ``held`` [M] f32: the routed rows' scales there (1: some expert, 0: none) where
    the caller has them already (a decode step's token rows: the same for every layer);
    otherwise they come from ``row_groups``, an XLA kernel between the launches of a
    layer, where it stops the gate/up launch from starting before the routing's kernel
    ends (programmatic dependent launch; ~2 us a layer on an H100, session 48)."""
    parts, scales = _parts(w, n_axis=1), _parts(w_scale, n_axis=1)
    s_parts = tuple(p[None] for p in _parts(shared[0], n_axis=0))  # [1, N, K]: one group
    s_scales = tuple(s[None] for s in _parts(shared[1], n_axis=0))
    m, (rows, k), ns = row_groups.shape[0], x.values.shape, [p.shape[1] for p in parts]
    if rows not in (m, 2 * m) or x.scale.shape != (2 * m,):
        raise ValueError(f"by row with a shared expert, {m} tokens: rows {x.values.shape} "
                         f"(want {m} or {2 * m}) and scales {x.scale.shape} (want {2 * m})")
    f16_rows = x.values.dtype == jnp.float16
    mosaic = m in SHARED_EXPERT_ROWS and resolve_fp8(impl, k, *ns) == "mosaic"

    def launch(*lhs_scale, **kw):
        """The Mosaic kernel's one launch: by row, the shared expert's tile among them."""
        config = dataclasses.replace(pick_config(m, k, sum(ns), fp8=True, f16_rows=f16_rows),
                                     block_m=m)
        return _mosaic_grouped_matmul(
            x.values, parts + s_parts, row_groups.astype(jnp.int32),
            tuple(s.astype(jnp.float32) for s in scales + s_scales), *lhs_scale,
            config=config, by_row=True, shared_blocks=(0, int(rows == 2 * m)),
            groups_settled=groups_settled, **kw)

    if swiglu:
        if len(parts) != 2 or f16_rows:
            raise ValueError("swiglu: FP8 rows through two weights (gate, up)")
        if mosaic:
            h = launch(x.scale, out_dtype=jnp.float16, swiglu=True)
        else:  # the products, then the SwiGLU in XLA
            gate, up = jnp.split(_by_row_with_shared(
                x, w, w_scale, row_groups, shared, impl=impl, out_dtype=jnp.float32,
                scale_rows=True, defer=False).reshape(2 * m, -1), 2, axis=-1)
            h = _swiglu(gate, up, jnp.float16).astype(jnp.float16)
        if held is None:
            held = (row_groups < parts[0].shape[0]).astype(jnp.float32)
        return fp8.Quantized(h, jnp.concatenate([held, jnp.ones((m,), jnp.float32)]),
                             jnp.dtype(out_dtype))
    if mosaic:
        y = launch(out_dtype=jnp.promote_types(jnp.bfloat16, out_dtype))
    else:
        values = (x.values[:m], x.values[m:]) if rows == 2 * m else (x.values, x.values)
        xr, xs = (fp8.Quantized(v, s, x.dtype) for v, s in zip(values, (x.scale[:m],
                                                                        x.scale[m:])))
        y = jnp.concatenate([
            grouped_matmul_fp8_by_row(xr, parts, scales, row_groups, impl=impl,
                                      out_dtype=out_dtype, scale_rows=False),
            grouped_matmul_fp8(xs, s_parts, s_scales, jnp.full((1,), m, jnp.int32),
                               impl=impl, out_dtype=out_dtype, scale_rows=False)])
    y, row_scale = y.reshape(2, m, -1), x.scale.reshape(2, m)
    if defer and scale_rows:
        return fp8.Unscaled(y, row_scale, None, jnp.dtype(out_dtype), stacked=True)
    return (y * row_scale[..., None] if scale_rows else y).astype(out_dtype)


# Fewer work items leave most SMs idle: Scout's q/k/v at TP=2 (28 N tiles of 128) measured
# 0.78-0.99x XLA's dot per weight on the H200 unsplit, 1.06-1.72x with K in 4 splits
# (fp8-projections-2026-12-01-s10); with 64-column tiles (56 items) as fast as the splits.
DENSE_MIN_N_TILES = 48  # work items: N tiles times K splits
_NARROW_N = 64


def dense_config(rows: int, k: int, n: int, k_splits: int = 1) -> GroupedMatmulConfig:
    """:func:`pick_config`'s swap-AB tiles for :func:`dense_fp8`, with 64-column weight tiles
    where 128-column ones leave SMs idle and 64-column ones fill at most one wave. A decode
    call is bound by the bytes in flight per SM, so idle SMs are lost bandwidth; narrower
    tiles give them work without splitting K, whose f32 partial sums XLA added in kernels of
    their own (two a layer in the step). At Scout's decode shapes on the H200 they took
    0.92-1.01x the time of the K splits they replace, before those splits' sums
    (fp8-projections-2026-12-02). ``k_splits``: K split over SMs as well (explicit only)."""
    config = pick_config(rows, k, n, fp8=True)
    sms = common.num_sms()
    if n // config.block_n < sms and n // _NARROW_N <= sms and n % _NARROW_N == 0:
        config = dataclasses.replace(config, block_n=_NARROW_N)
    return dataclasses.replace(config, k_splits=k_splits)


def dense_fp8(x, w, w_scale, *, impl: str = "auto", out_dtype=None,
              scale_ub: float | None = None, k_splits: int = 1,
              config: GroupedMatmulConfig | None = None, defer: bool = False,
              joint: bool = False):
    """A few rows through dense FP8 projections of one input (attention's q, k and v; an
    MLP's gate and up; or one weight) in one launch: ``x [..., K]`` (or
    :class:`fp8.Quantized`), weights ``w`` ``[N_p, K]`` float8_e4m3fn with ``w_scale [N_p]``
    (tuples; N may differ) -> a tuple of ``[..., N_p]``, each equal to
    :func:`fp8.scaled_matmul` with that weight (``defer``: its :class:`fp8.Unscaled` product).

    ``"mosaic"``: :func:`grouped_matmul_fp8` with one group of every row, so every part's
    N tiles share one wave of SMs (the swap-AB form at decode, which reads weights faster
    than XLA's FP8 dot there: NOTES-grouped-matmul.md), in tiles of :func:`dense_config`
    (``k_splits`` and ``config`` override it). ``joint`` (not ``defer``): that launch's
    output as it is, ``[..., N_1 + ... + N_P]`` (the parts side by side), for a consumer
    that is a kernel and would otherwise get slices of it, each a copy kernel of XLA's
    (attention's q and k into :mod:`qk_rows`); XLA's dots still give a tuple.
    ``"auto"`` takes it on Hopper for at most ``SWAP_AB_MAX_ROWS`` rows and
    ``DENSE_MIN_N_TILES`` work items, K a multiple of 128 and each N of 128; ``"xla"`` (and
    "auto" elsewhere) runs :func:`fp8.scaled_matmul` per weight. One weight alone (o, down)
    measured 1.00-1.10x XLA's dot at a decode step's 16
    rows and 1.22-1.37x at one row (fp8-projections-2026-12-02), XLA's time including the
    reduction kernel its split-K GEMM runs after.
    """
    parts, scales = _parts(w, n_axis=0), _parts(w_scale, n_axis=0)
    ns = [p.shape[0] for p in parts]
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    config = config or dense_config(rows, k, sum(ns), k_splits)
    if impl == "auto" and (rows > SWAP_AB_MAX_ROWS or k % _BLOCK_K_FP8 or
                           sum(ns) // config.block_n * config.k_splits < DENSE_MIN_N_TILES):
        impl = "xla"
    if resolve_fp8(impl, k, *ns) == "xla":
        return tuple(fp8.scaled_matmul(x, p, s, out_dtype=out_dtype, scale_ub=scale_ub,
                                       defer=defer) for p, s in zip(parts, scales))
    x = x if isinstance(x, fp8.Quantized) else fp8.Quantized.of(x, scale_ub)
    flat = fp8.Quantized(x.values.reshape(rows, k), x.scale.reshape(rows), x.dtype)
    y = _fp8_launch(flat, tuple(p[None] for p in parts), tuple(s[None] for s in scales),
                    jnp.full((1,), rows, jnp.int32), config, out_dtype or x.dtype,
                    scale_rows=True, defer=defer, dense=True)
    split = lambda a: jnp.split(a, list(itertools.accumulate(ns))[:-1], axis=-1)
    if defer:
        return tuple(fp8.Unscaled(v, y.row_scale, None, y.dtype).reshape(*lead, n)
                     for v, n in zip(split(y.values), ns))
    if joint:
        return y.reshape(*lead, sum(ns))
    return tuple(v.reshape(*lead, n) for v, n in zip(split(y), ns))


def tile_info(group_sizes, block_m: int, tile, num_groups: int | None = None):
    """Row tile ``tile``'s group and rows, and the number of tiles that hold rows.

    Tiles are numbered group by group, each group's rows starting a new tile (a tile holds
    one group's rows; two groups may share a block of ``block_m`` rows, each writing its
    own), as JAX's ``ragged_dot_mgpu.GroupInfo`` numbers them, except that an empty group
    takes no tile number: the tiles holding rows are then exactly ``0 .. count - 1``, so
    the kernel deals them to the SMs without a list computed beforehand. ``group_sizes``
    is read element by element (an unrolled loop: Scout has 16 experts), so it may be a
    GMEM ref (or a tuple of ints, known when the kernel is built); only its first
    ``num_groups`` (default: all) count. Returns (``GroupInfo``,
    count).
    """
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import GroupInfo

    tile, zero = jnp.int32(tile), jnp.int32(0)
    end = first = group = block = group_start = group_end = zero
    for i in range(group_sizes.shape[0] if num_groups is None else num_groups):
        size = group_sizes[i]
        start, end = end, end + size
        start_block = lax.div(start, jnp.int32(block_m))
        tiles = lax.select(size > 0, lax.div(end - 1, jnp.int32(block_m)) + 1 - start_block, zero)
        this = (first <= tile) & (tile < first + tiles)
        block = lax.select(this, tile - first + start_block, block)
        group = lax.select(this, jnp.int32(i), group)
        group_start = lax.select(this, start, group_start)
        group_end = lax.select(this, end, group_end)
        first = first + tiles
    block_start = block * block_m
    actual_start = jnp.maximum(group_start, block_start)
    actual_end = jnp.minimum(group_end, block_start + block_m)
    info = GroupInfo(group_id=group, block=block, block_start=block_start,
                     actual_start=actual_start, actual_end=actual_end,
                     start_within_block=actual_start - block_start,
                     actual_size=actual_end - actual_start)
    return info, first


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "by_row", "shared_blocks",
                                             "dense_rows", "swiglu", "groups_settled"))
def _mosaic_grouped_matmul(lhs, rhs, group_sizes, rhs_scale=None, lhs_scale=None, *,
                           config: GroupedMatmulConfig, out_dtype=None, by_row: bool = False,
                           shared_blocks: tuple[int, int] | None = None,
                           dense_rows: int | None = None, swiglu: bool = False,
                           groups_settled: bool = False):
    """bf16/f16: rhs [G, K, N] or a tuple of P of them (N may differ). FP8 (scales given): rhs
    [G, N, K] (or P of them), rhs_scale [G, N] f32 per column (one per weight; the rows'
    scales are the caller's), out_dtype the output's. -> [M, N_1 + ... + N_P].
    ``by_row``: ``group_sizes`` is each row's group instead (int32 [M], rows in any order;
    >= G: none), for the swap-AB form with K whole and at most ``block_m`` rows.

    ``shared_blocks`` (by row, ``block_m`` rows): a shared expert beside the routed ones,
    one more row tile (the first) whose weights (the last P of ``rhs``, [1, N, K] each, and of
    ``rhs_scale``) every row goes through. (routed, shared): the lhs row block (of
    ``block_m`` rows) each reads, 0 and 0 for one input, 0 and 1 for inputs stacked. ->
    [2 * block_m, N_1 + ... + N_P]: the routed rows, then all the shared rows.

    ``lhs_scale`` (FP8 swap-AB, not by row; M a multiple of ``block_m``): the rows' scales
    [M] f32, applied in the epilogue with the columns' (the product comes out whole, where
    XLA's multiply after the kernel was a kernel of its own unless a consumer fused it).

    ``dense_rows``: one group of that many rows (a dense projection, G = 1), known when the
    kernel is built, so its tiles are too: the kernel does not read ``group_sizes`` (a global
    load each CTA waited on before its first weight copy).

    W8A16: FP8 weights with f16 ``lhs`` (swap-AB only), each weight tile widened to f16
    (``config.widen_in_registers``); the column scales as for FP8 rows.

    ``swiglu`` (FP8 by row, swap-AB, two parts of one N: gate and up; ``lhs_scale`` the rows'
    scales, [2 * block_m] with a shared expert, else [block_m]): a tile holds ``block_n / 2``
    rows of gate and the same rows of up, two weight copies a K step, and its epilogue
    writes ``silu(gate) * up`` with both scales applied, clamped to ``out_dtype``'s range ->
    [sets * block_m, N]. The SwiGLU then needs no launch of its own when its output needs
    no per-token scale (f16 rows for the W8A16 down projection); :func:`reference_swiglu`.

    ``groups_settled`` (by row): ``group_sizes`` (the rows' groups) come from a kernel two
    launches back or more, never the one just before (the decode MoE's down projection: the
    routing came before gate/up). Every kernel waits for its predecessor before it lets the
    next one launch (``common.DEPENDENT_LAUNCH``), so such inputs are complete when this one
    starts: it reads them, and copies a routed first tile's weights, before its own wait."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import GroupInfo

    scaled = rhs_scale is not None
    n_axis = 1 if scaled else 2
    sets = 1 if shared_blocks is None else 2  # the routed experts' weights, the shared one's
    if sets == 1:
        rhs, rhs_scale = _parts(rhs, n_axis), (_parts(rhs_scale, 1) if scaled else ())
    else:
        half = len(rhs) // 2
        rhs = _parts(rhs[:half], n_axis) + _parts(rhs[half:], n_axis)
        rhs_scale = tuple(rhs_scale)
    parts = len(rhs) // sets
    m, k = lhs.shape
    g, ns = rhs[0].shape[0], [p.shape[n_axis] for p in rhs[:parts]]
    bm, bn, bk, splits = config.block_m, config.block_n, config.block_k, config.k_splits
    if sets == 2:
        if not (by_row and scaled and m == (1 + max(shared_blocks)) * bm
                and [p.shape for p in rhs[parts:]] == [(1, *p.shape[1:]) for p in rhs[:parts]]):
            raise ValueError(f"a shared expert: FP8 by row, lhs of {1 + max(shared_blocks)} "
                             f"blocks of block_m={bm} rows (got {m}), weights [1, N, K] as the "
                             f"routed ones' [G, N, K]")
        m = bm  # the tokens; lhs holds their rows once or twice
    # A tile's rows of each weight it reads, and its output columns: swiglu's tile holds
    # n_tile rows of gate and the same rows of up.
    n_tile = bn // 2 if swiglu else bn
    if k % (bk * splits) or any(n % n_tile for n in ns):
        raise ValueError(f"K={k} must be a multiple of block_k*k_splits={bk * splits} "
                         f"and each N={ns} of {n_tile} (block_n={bn})")
    # Row tiles: every group's rows, each group starting a new tile (+ g - 1 at most; the
    # kernel visits the ones holding rows, tile_info). N tiles: each part's in turn, so a
    # tile's output columns are ni * bn for every part; part p's are tiles
    # [part_start[p], part_start[p + 1]).
    part_start = [sum(ns[:p]) // bn for p in range(parts + 1)]
    n = part_start[-1] * bn
    grid_m, grid_n, k_steps = common.cdiv(m, bm) + g - 1, part_start[-1], k // bk // splits
    swap = config.swap_ab
    if swap and not scaled:
        raise ValueError("swap_ab is the FP8 kernel's form (K-major weights)")
    if scaled and lhs.dtype not in (fp8.DTYPE, jnp.float16):
        raise ValueError(f"FP8 weights take float8_e4m3fn or f16 rows, got {lhs.dtype}")
    widen = scaled and lhs.dtype == jnp.float16  # W8A16: the weight tiles widened to f16
    if widen and not (swap and bk % _BLOCK_K_FP8 == 0):
        raise ValueError(f"f16 rows with FP8 weights (W8A16): the swap-AB form and block_k a "
                         f"multiple of {_BLOCK_K_FP8}, got {config}")
    if lhs_scale is not None and not swiglu and (by_row or not swap or splits > 1 or m % bm
                                                 or lhs_scale.shape != (m,)):
        raise ValueError(f"lhs_scale {lhs_scale.shape}: swap-AB with K whole, not by row, and "
                         f"M={m} rows (a multiple of block_m={bm}) only")
    if by_row and not (swap and splits == 1 and m <= bm):
        raise ValueError(f"by_row takes the swap-AB form, K whole and at most block_m={bm} "
                         f"rows: {config}, {m} rows")
    if by_row:  # a row tile per group that holds rows (at most one per row); shared: + 1
        grid_m = min(g, m) + sets - 1
    if swiglu:
        if not (by_row and scaled and parts == 2 and ns[0] == ns[1] and n_tile % 64 == 0
                and not config.promote and m == bm and lhs_scale is not None
                and lhs_scale.shape == (sets * bm,)):
            raise ValueError(f"swiglu: FP8 by row, gate and up of one N, block_n={bn} a "
                             f"multiple of 128, {bm} rows and their scales "
                             f"[{sets * bm}], got N={ns}, {m} rows, lhs_scale "
                             f"{None if lhs_scale is None else lhs_scale.shape}")
        grid_n, n = ns[0] // n_tile, ns[0]
    # Swapped partial sums are stored as computed, [N, rows] per split (Mosaic finds no
    # layout for a transposed f32 store), each row tile in a slab of columns of its own
    # (_swapped_rows maps rows back to them).
    swap_split = swap and splits > 1
    final_dtype = out_dtype or lhs.dtype
    out_dtype = final_dtype if splits == 1 else jnp.float32
    # 8-bit weights are K-major [N, K] tiles, transposed for the wgmma (a view, no copy).
    rhs_block, rhs_index = (((n_tile, bk), lambda kk, ni: (ni, kk)) if scaled else
                            ((bk, bn), lambda kk, ni: (kk, ni)))

    if dense_rows is not None and (g != 1 or by_row):
        raise ValueError(f"dense_rows: one group (G = {g}), not by row")
    if swap and splits == 1 and jnp.dtype(out_dtype).itemsize != 2:
        raise ValueError(f"swap-AB tiles are stored transposed, which Mosaic lays out for "
                         f"16-bit outputs only: out_dtype bf16 or f16, got {out_dtype}")

    # Decode tiles (swap-AB, K whole) run their K loop over one TMA ring for the whole launch,
    # not a pipeline of their own per tile, so that a CTA can fill it with its first tile's
    # weights before the launch waits for the kernels before it (common.DEPENDENT_LAUNCH):
    # the weights are no kernel's output, and those copies then overlap the kernel before.
    ring_steps = min(config.max_concurrent_steps, k_steps)
    ring_types = None
    if swap and splits == 1 and not config.promote and lhs.shape[0] % bm == 0:
        ring_types = (plgpu.SMEM((ring_steps, bm, bk), lhs.dtype),
                      plgpu.Barrier(num_arrivals=1 + (2 if swiglu else 1),
                                    num_barriers=ring_steps),
                      *[plgpu.SMEM((ring_steps, n_tile, bk), rhs[0].dtype)] * (2 if swiglu else 1))

    def grouped_matmul_kernel(sizes_gmem, lhs_gmem, *rest):
        if ring_types is None:
            kernel_body(sizes_gmem, lhs_gmem, *rest)
        else:
            pl.run_scoped(lambda x_ring, full, *w_rings: kernel_body(
                sizes_gmem, lhs_gmem, *rest, ring=(x_ring, full, w_rings)), *ring_types)

    def kernel_body(sizes_gmem, lhs_gmem, *rest, ring=None):
        # A dense launch's group size is static: tile_info reads a tuple at trace time.
        sizes = sizes_gmem if dense_rows is None else (dense_rows,)
        rhs_gmem, rest = rest[:parts * sets], rest[parts * sets:]
        if scaled:
            rs_gmem, rest = rest[:parts * sets], rest[parts * sets:]
        else:
            rs_gmem = (None,) * parts
        ls_gmem, o_gmem = rest if lhs_scale is not None else (None, *rest)

        @jax.named_scope("tile")
        def tile(info, ti, split, ni, part_ni, w_gmem, ws_gmem, shared=False,
                 prefetch=False, prefetched=False):
            """One output tile, row tile ``ti``: rows of ``info``'s group, columns ``ni * bn``
            (the part's N tile ``part_ni`` of weights ``w_gmem``), K range ``split``.
            ``shared``: the shared expert's tile, every row stored (after the routed rows).
            ``swiglu``: ``w_gmem``, ``ws_gmem`` are gate's and up's, ``n_tile`` rows of each.
            ``prefetch``: only issue the copies of the weights' first ring of K steps (the
            CTA's first tile, before the launch's dependency wait); ``prefetched`` (a bool
            or a traced one): the tile whose weights that was, which copies the rest."""
            k0 = split * k_steps
            w_gmem, ws_gmem = (w_gmem, ws_gmem) if swiglu else ((w_gmem,), (ws_gmem,))
            weights = [w.at[info.group_id] for w in w_gmem]

            def fetch_weights(step, slot):
                _, full, w_rings = ring
                for w_ring, w in zip(w_rings, weights):
                    plgpu.copy_gmem_to_smem(
                        w.at[pl.ds(part_ni * n_tile, n_tile), pl.ds((k0 + step) * bk, bk)],
                        w_ring.at[slot], full.at[slot])

            def fetch_rows(step, slot):
                x_ring, full, _ = ring
                plgpu.copy_gmem_to_smem(
                    lhs_gmem.at[pl.ds(info.block * bm, bm), pl.ds((k0 + step) * bk, bk)],
                    x_ring.at[slot], full.at[slot])

            if prefetch:
                for step in range(ring_steps):
                    fetch_weights(step, step)
                return

            def ring_k_loop(body):
                """The K loop over the launch's ring, as emit_pipeline runs it (a slot is
                refilled a step after its wgmma was issued)."""
                x_ring, full, w_rings = ring
                for step in range(ring_steps):
                    _unless(prefetched, functools.partial(fetch_weights, step, step))
                    fetch_rows(step, step)

                @pl.loop(0, k_steps)
                def _(kk):
                    slot = lax.rem(kk, ring_steps)
                    with jax.named_scope("slot_wait"):  # (regions: common.kernel_trace)
                        plgpu.barrier_wait(full.at[slot])
                    with jax.named_scope("product"):
                        body(None, x_ring.at[slot], *[w.at[slot] for w in w_rings])
                    refill = kk + ring_steps - 1

                    @pl.when((kk >= 1) & (refill < k_steps))
                    def _():
                        fetch_weights(refill, lax.rem(refill, ring_steps))
                        fetch_rows(refill, lax.rem(refill, ring_steps))

            def product(acc_ref, lhs_smem, rhs_smem):
                if widen:
                    _widened_product(acc_ref, lhs_smem, rhs_smem,
                                     config.widen_in_registers and not common.interpreting())
                elif swap:  # acc [bn, bm] = W [bn, bk] x^T: both operands K-major as stored
                    plgpu.wgmma(acc_ref, rhs_smem, lhs_smem.T)
                else:
                    plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.T if scaled else rhs_smem)

            acc_shape = (bn, bm) if swap else (bm, bn)

            def epilogue_scales():
                """The tile's expert's column scales, one array per weight copy (and swap-AB's
                row scales: the rows are the accumulator's columns), or None."""
                cols = rows = None
                if scaled:
                    cols = [plgpu.load(ws.at[info.group_id, pl.ds(part_ni * n_tile, n_tile)],
                                       layout=plgpu.Layout.WGMMA.reduce(1 if swap else 0),
                                       optimized=False) for ws in ws_gmem]
                if ls_gmem is not None:
                    # By row the scales are the routed rows', then the shared rows'.
                    block = (int(shared) if sets == 2 else 0) if by_row else info.block
                    rows = plgpu.load(ls_gmem.at[pl.ds(block * bm, bm)],
                                      layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
                return cols, rows

            # Swap-AB (decode) tiles load them before the K loop: loaded after it, each tile
            # waited a global-memory round trip between its last wgmma and its store, and a
            # decode launch runs one or two short tiles a CTA. A prefill tile's K loop is
            # long, and its accumulator fills the registers: it loads them after.
            if swap:
                scales = epilogue_scales()
            pipeline = functools.partial(
                plgpu.emit_pipeline,
                grid=(k_steps,),
                in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda kk: (info.block, k0 + kk),
                                    delay_release=1),
                    *[plgpu.BlockSpec(rhs_block, lambda kk: rhs_index(k0 + kk, part_ni),
                                      delay_release=1) for _ in w_gmem],
                ],
                max_concurrent_steps=config.max_concurrent_steps)

            def acc_scope(acc_ref):
                """The product, one accumulator array per weight copy (swiglu: gate, up)."""
                pieces = [acc_ref.at[pl.ds(i * n_tile, n_tile)] for i in range(len(w_gmem))]

                def body(_, lhs_smem, *w_smems):
                    for piece, w_smem in zip(pieces if swiglu else [acc_ref], w_smems):
                        product(piece, lhs_smem, w_smem)

                if ring is None:
                    pipeline(body)(lhs_gmem, *weights)
                else:
                    ring_k_loop(body)
                acc = acc_ref[...]  # (halves of the value: slicing the ref, Mosaic finds strides)
                return [acc[:n_tile], acc[n_tile:]] if swiglu else [acc]

            def promoted(_, lhs_smem, rhs_smem, total):
                """Each K step's product in a fresh accumulator, added to f32 registers."""
                def step(acc_ref):
                    product(acc_ref, lhs_smem, rhs_smem)
                    return acc_ref[...]
                return total + pl.run_scoped(step, plgpu.ACC(acc_shape))

            if config.promote:
                zeros = plgpu.layout_cast(jnp.zeros(acc_shape, jnp.float32), plgpu.Layout.WGMMA)
                accs = [pipeline(promoted, init_carry=zeros)(lhs_gmem, *weights)]
            else:
                accs = pl.run_scoped(acc_scope, plgpu.ACC(acc_shape))
            cols, rows = scales if swap else epilogue_scales()
            if cols is not None:
                accs = [a * jax.lax.broadcast_in_dim(c, a.shape, [0 if swap else 1])
                        for a, c in zip(accs, cols)]
            if rows is not None:
                accs = [a * jax.lax.broadcast_in_dim(rows, a.shape, [1]) for a in accs]
            acc = _swiglu(*accs, out_dtype) if swiglu else accs[0]
            out = o_gmem if splits == 1 else o_gmem.at[split]
            if by_row:  # the rows of the tile's group, one TMA store each
                cols_out = pl.ds(ni * n_tile, n_tile)

                @functools.partial(pl.run_scoped,
                                   o_smem=plgpu.SMEM((bm, n_tile), dtype=out_dtype))
                @jax.named_scope("store")
                def store_rows(o_smem):
                    o_smem.T[...] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    if shared:
                        plgpu.copy_smem_to_gmem(o_smem, out.at[pl.ds(m, m), cols_out])
                    for r, group in enumerate(() if shared else row_groups):
                        pl.when(group == info.group_id)(functools.partial(
                            plgpu.copy_smem_to_gmem, o_smem.at[pl.ds(r, 1)],
                            out.at[pl.ds(r, 1), cols_out]))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                return
            if swap_split:
                @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bn, bm), dtype=out_dtype))
                @jax.named_scope("store")
                def store_partial(o_smem):
                    o_smem[...] = acc
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        o_smem, out.at[pl.ds(ni * bn, bn), pl.ds(ti * bm, bm)])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                return

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), dtype=out_dtype))
            @jax.named_scope("store")
            def store_scope(o_smem):
                (o_smem.T if swap else o_smem)[...] = acc.astype(out_dtype)
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

        sms = common.num_sms()

        def tiles(info, ti, ni, split=0, set_index=0, **prefetch):
            """Work item (``ti``, ``ni``, ``split``): row tile ``ti`` of ``info``'s rows in N
            tile ``ni``, K range ``split``, through set ``set_index``'s weights (1: the
            shared expert's). ``prefetch``: :func:`tile`'s."""
            w_gmem, ws_gmem = (rhs_gmem[set_index * parts:][:parts],
                               rs_gmem[set_index * parts:][:parts])
            if parts == 1 or swiglu:  # swiglu: gate's and up's rows in every tile
                tile(info, ti, split, ni, ni, *((w_gmem, ws_gmem) if swiglu else
                                                (w_gmem[0], ws_gmem[0])), set_index == 1,
                     **prefetch)
                return
            # The part this N tile belongs to picks the weights (a static branch each).
            for part in range(parts):
                lo, hi = part_start[part], part_start[part + 1]
                pl.when((lo <= ni) & (ni < hi))(functools.partial(
                    tile, info, ti, split, ni, ni - lo, w_gmem[part], ws_gmem[part],
                    set_index == 1, **prefetch))

        def by_row_info(group, block):
            """Every row of lhs block ``block`` in the tile's columns; ``group``'s are
            stored."""
            zero = jnp.int32(0)
            return GroupInfo(group_id=group, block=jnp.int32(block), block_start=zero,
                             actual_start=zero, actual_end=jnp.int32(m),
                             start_within_block=zero, actual_size=jnp.int32(m))

        shared_first = by_row and sets == 2
        first = _dealt(lax.axis_index("sm"), sms)  # the CTA's first work item

        def routing(row_groups):
            """By row: the row tile -> group map and the count of row tiles with rows, from
            the rows' groups. Once, before the loop: at decode most of an SM's work items are
            past the tiles that hold rows, and skipping one should cost a comparison, not 16
            global loads."""
            hits = [functools.reduce(jnp.logical_or, [rg == i for rg in row_groups])
                    for i in range(g)]
            tile_group = functools.partial(_tile_group, hits)
            return tile_group, tile_group(0)[1] + sets - 1

        # Where no kernel's output is needed to find the first item's weights (a dense
        # launch's tiles, the shared expert's; with ``groups_settled`` a routed expert's
        # too), the ring takes them before the dependency wait; the tile then copies only
        # the rest.
        dense_first_fetched = routed_first_fetched = False
        if by_row and groups_settled:  # written two launches back or more: complete now
            row_groups = [sizes_gmem[r] for r in range(m)]
            tile_group, tiles_with_rows = routing(row_groups)
        if shared_first:
            routed_block, shared_block = shared_blocks

            def shared_tile(ni, **prefetch):
                """The shared expert's tile (row tile 0) in N tile ``ni``."""
                tiles(by_row_info(jnp.int32(0), shared_block), jnp.int32(0), ni, set_index=1,
                      **prefetch)

            def routed_tile(ti, ni, **prefetch):
                """Row tile ``ti`` (>= 1): the rows of its expert."""
                tiles(by_row_info(tile_group(ti - 1)[0], routed_block), ti, ni, **prefetch)

            first_shared = first // grid_n == 0
            if ring is not None:
                pl.when(first_shared)(lambda: shared_tile(first % grid_n, prefetch=True))
                if groups_settled:
                    pl.when(~first_shared & (first // grid_n < tiles_with_rows))(
                        lambda: routed_tile(first // grid_n, first % grid_n, prefetch=True))
                    routed_first_fetched = True
        elif dense_rows is not None and ring is not None:
            _, dense_tiles = tile_info(sizes, bm, 0, g)
            pl.when(first // grid_n < dense_tiles)(lambda: tiles(
                tile_info(sizes, bm, first // grid_n, g)[0], first // grid_n, first % grid_n,
                prefetch=True))
            dense_first_fetched = True  # the loop's first round: each CTA's first item
        with jax.named_scope("wait"):
            common.dependent_launch()
        if by_row and not groups_settled:
            # Issued here, first waited for where a routed tile needs its group.
            row_groups = [sizes_gmem[r] for r in range(m)]
        if shared_first:
            # The shared expert's tile is row tile 0 (since session 36: a launch of two waves,
            # gate/up, reads its weights in the first), and it needs no routing. A CTA whose
            # first item is one runs it before waiting for the rows' groups, so its weight
            # copies start a global-memory round trip earlier; the loop skips it.
            pl.when(first_shared)(lambda: shared_tile(first % grid_n,
                                                      prefetched=ring is not None))
        if by_row and not groups_settled:
            tile_group, tiles_with_rows = routing(row_groups)
        elif not by_row:
            _, tiles_with_rows = tile_info(sizes, bm, 0, g)
        if swap:
            # Whole rounds, so that the permuted indices of each round are all visited
            # (those past the row tiles are skipped), up to the last round that holds a
            # tile with rows: at decode grid_m counts a row tile per group (17 rounds of
            # gate/up with the shared expert), where one hit expert needs 2 rounds.
            loop_items = common.cdiv(tiles_with_rows * grid_n * splits, sms) * sms
        else:
            loop_items = grid_m * grid_n * splits

        @plgpu.nd_loop((loop_items,), collective_axes="sm")
        def work_loop(loop_info: plgpu.NDLoopInfo):
            w = loop_info.index[0]
            first_round = w < sms
            if swap:
                # Decode: row tiles major, so the few that hold rows are the first work
                # items, one per SM. (The snake interleaved all grid_m row tiles of an N
                # tile, most of them empty, and dealt the busy ones to a third of the SMs,
                # two or more each.) Each round of num_sms items is dealt to the CTAs in a
                # spread order (_dealt), not to CTAs 0, 1, 2, ...: the down projection's 40
                # items took 25% longer on CTAs 0-39 than spread over the GPU (H200).
                w = _dealt(w, sms)
            split = w % splits
            if swap:
                ti, ni = lax.div(w // splits, grid_n), lax.rem(w // splits, grid_n)
            else:  # prefill: bands of N tiles, whose weights stay in L2 across row tiles
                ti, ni = plgpu.planar_snake(w // splits, (grid_m, grid_n), 1,
                                            config.grid_block_n)

            @pl.when(ti < tiles_with_rows)
            def _():
                if not by_row:
                    tiles(tile_info(sizes, bm, ti, g)[0], ti, ni, split,
                          prefetched=first_round if dense_first_fetched else False)
                elif not shared_first:
                    tiles(by_row_info(tile_group(ti)[0], 0), ti, ni)
                else:
                    pl.when((ti == 0) & ~first_round)(lambda: shared_tile(ni))
                    pl.when(ti > 0)(lambda: routed_tile(
                        ti, ni, prefetched=first_round if routed_first_fetched else False))

    # Named by form and shape, so that a step's profile tells the calls apart.
    grouped_matmul_kernel.__name__ = grouped_matmul_kernel.__qualname__ = (
        f"grouped_matmul{'_fp8' * scaled}{'_by_row' * by_row}{'_shared' * (sets == 2)}"
        f"{'_swiglu' * swiglu}"
        f"_n{n}_k{k}")
    out_shape = ((sets * m, n) if splits == 1 else
                 (splits, n, grid_m * bm) if swap_split else (splits, m, n))
    kernel = plgpu.kernel(
        grouped_matmul_kernel, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(common.num_sms(),), grid_names=("sm",),
        compiler_params=common.compiler_params(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    out = kernel(group_sizes, lhs, *rhs, *rhs_scale,
                 *(() if lhs_scale is None else (lhs_scale.astype(jnp.float32),)))
    if swap_split:
        return _swapped_rows(out, group_sizes, g, m, bm).astype(final_dtype)
    return out if splits == 1 else out.sum(0).astype(final_dtype)


def _swiglu(gate, up, out_dtype):
    """``silu(gate) * up`` in f32, clamped to ``out_dtype``'s finite range (an f16 row
    saturates where a value would overflow, as an FP8 row's capped scale does)."""
    h = gate / (1.0 + jnp.exp(-gate)) * up
    big = float(jnp.finfo(out_dtype).max)
    return jnp.minimum(jnp.maximum(h, -big), big)


def reference_swiglu(x, x_scale, gate, up, row_groups, shared=None):
    """:func:`_mosaic_grouped_matmul`'s ``swiglu`` semantics in f32, by row: ``x`` [M, K]
    rows (FP8 or 16-bit; with ``shared`` [M, K], both take them, or [2M, K], the routed rows
    then the shared rows), ``x_scale`` [M] ([2M] with ``shared``: the routed rows', then the
    shared rows'), ``gate`` and ``up`` each (values [G, N, K], scales [G, N]), ``shared``
    the shared expert's (gate, up) as ([1, N, K], [1, N]) pairs. -> ``silu(gate) * up``,
    [M, N] ([2M, N] with ``shared``: the routed rows, then the shared rows); a routed row
    of no group (``row_groups`` >= G): 0."""
    m, g = len(row_groups), gate[0].shape[0]
    rows = x.astype(jnp.float32)
    groups = jnp.asarray(row_groups)
    hit = jnp.minimum(groups, g - 1)

    def product(inp, scale, wq, ws):  # inp [R, K], wq [R, N, K]: row r through wq[r]
        w = fp8.dequantize(wq, ws)
        return jnp.einsum("rk,rnk->rn", inp, w,
                          precision=jax.lax.Precision.HIGHEST) * scale[:, None]

    def swiglu(inp, scale, pick, weights):
        gh, uh = (product(inp, scale, wq[pick], ws[pick]) for wq, ws in weights)
        return jax.nn.silu(gh) * uh

    routed = jnp.where((groups < g)[:, None],
                       swiglu(rows[:m], x_scale[:m], hit, (gate, up)), 0.0)
    if shared is None:
        return routed
    shared_in = rows[m:] if rows.shape[0] == 2 * m else rows
    return jnp.concatenate([routed, swiglu(shared_in, x_scale[m:], jnp.zeros((m,), jnp.int32),
                                           shared)])


def _widened_product(acc_ref, x_smem, w_smem, in_registers: bool):
    """W8A16's K step, swap-AB: ``acc [bn, bm] += W [bn, bk] x^T`` with ``w_smem`` float8 and
    ``x_smem`` f16, W widened to f16 a [64, 128] piece at a time (one wgmma M block by one
    128-byte K row of the 8-bit tile). ``in_registers``: the widened piece is the wgmma's A
    operand in registers (the GPU's form); else it goes through a shared-memory tile (GPU
    interpret mode's, which has no register A operand; a wgmma wait per piece)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bn, bk = w_smem.shape
    pieces = [(pl.ds(h * 64, 64), pl.ds(c * _BLOCK_K_FP8, _BLOCK_K_FP8))
              for h in range(bn // 64) for c in range(bk // _BLOCK_K_FP8)]

    def widened(rows, cols):
        return plgpu.load(w_smem.at[rows, cols], layout=plgpu.Layout.WGMMA,
                          optimized=False).astype(jnp.float16)

    if in_registers:
        for rows, cols in pieces:
            plgpu.wgmma(acc_ref.at[rows], widened(rows, cols), x_smem.at[:, cols].T)
        return

    @functools.partial(pl.run_scoped, w16_smem=plgpu.SMEM((64, _BLOCK_K_FP8), jnp.float16))
    def _(w16_smem):
        for rows, cols in pieces:
            w16_smem[...] = widened(rows, cols)
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref.at[rows], w16_smem, x_smem.at[:, cols].T)
            plgpu.wgmma_wait(0)  # before the next piece overwrites the tile


def _unless(cond, f):
    """``f()`` unless ``cond``: a traced bool (``pl.when``) or a Python one (decided now)."""
    from jax.experimental import pallas as pl

    if isinstance(cond, bool):
        return None if cond else f()
    pl.when(~cond)(f)


def _dealt(w, sms: int):
    """The work item a persistent loop's index ``w`` takes (CTA ``w % sms``, round
    ``w // sms``; an int or int32 array): item ``j`` of a round goes to CTA ``j * step %
    sms``, ``step`` coprime with ``sms`` near sms / golden ratio, so a round's first few
    items land on CTAs spread evenly over the GPU. A bijection on each round."""
    step = round(sms * 0.618)
    while math.gcd(step, sms) != 1:
        step += 1
    return w // sms * sms + w % sms * pow(step, -1, sms) % sms


def _tile_group(hits, tile):
    """By row: row tile ``tile``'s group, the ``tile``-th of the groups ``hits`` (a bool per
    group) marks, and the number of such groups."""
    tile, first, group = jnp.int32(tile), jnp.int32(0), jnp.int32(0)
    for i, hit in enumerate(hits):
        group = lax.select(hit & (first == tile), jnp.int32(i), group)
        first = first + hit.astype(jnp.int32)
    return group, first


def _swapped_rows(out, group_sizes, num_groups: int, m: int, block_m: int):
    """The swap-AB kernel's K-split partial sums ``[splits, N, tiles * block_m]`` (row tile
    t's columns at ``t * block_m``, numbered as :func:`tile_info` numbers them) -> ``[m, N]``
    f32, each row's column gathered before the sum (a decode call fills few of the tiles).
    Rows of no group get some tile's column: undefined, as the kernel leaves them."""
    sizes = group_sizes[:num_groups]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    tiles = jnp.where(sizes > 0, (ends - 1) // block_m + 1 - starts // block_m, 0)
    first = jnp.cumsum(tiles) - tiles  # each group's first tile number
    row = jnp.arange(m, dtype=jnp.int32)
    # searchsorted's default is a loop: on a GPU, a kernel and a host sync per step
    group = jnp.minimum((ends[None, :] <= row[:, None]).sum(1), num_groups - 1)
    tile = first[group] + row // block_m - starts[group] // block_m
    cols = tile * block_m + row % block_m
    return jnp.take(out, cols, axis=2, mode="clip").sum(0).T
