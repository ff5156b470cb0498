"""Split-KV flash-decoding over a paged KV cache: a Pallas Mosaic GPU kernel (Hopper).

Work comes from the planner's *decode* :class:`~jaxattn.planner.WorkList`:
one item per KV-split piece of a sequence with at most ``bounds.dq`` new
tokens. A *tile* is (item, KV head), or a piece of one's keys. Its 64 query rows
pack the item's tokens times the ``G = Hq / Hkv`` query heads of the KV group
(row ``r`` = token ``r // G``, head ``r % G``), so each K/V page of the group is
read from HBM once, by one wgmma M tile.

Kernel shape (one CTA per SM, persistent): :func:`deal_tiles` deals the tiles to the
CTAs, round robin in list order (longest first), and each CTA runs its
tiles as one contiguous run of the metadata's rows. Per CTA:

* warpgroup 1 (producer): per tile, one TMA of the item's query rows into a
  plain SMEM buffer; per KV block, one TMA per page (or page slice) for K and
  for V into a ``num_stages`` ring, or one each where the block's pages lie in order
  in the pool (``DecodeConfig.merge_pages``). The ring runs straight across tile
  boundaries, so the next tile's pages stream in while this tile finishes.
* warpgroup 0 (consumer): copies Q into a swizzled wgmma tile, then per block
  ``S = Q K^T`` (wgmma), mask (only on blocks that reach past ``kv_end`` or the
  causal diagonal), online softmax in base 2, ``O += P V`` (wgmma). The
  epilogue writes an unsplit item's rows straight into ``out`` in q's dtype
  (one TMA per token; ``out`` is a Ref updated in place, so no cast kernel
  follows; or FP8 under a static ``out_scale`` for an FP8 output projection, so no
  quantising kernel either) and a split piece's normalised f32 rows into its slot of a compact
  partial buffer (:class:`Pieces`); an unsplit tile's lse goes to a small
  lse-tile array, a piece's to its slot beside its rows. With
  ``DecodeConfig.narrow_tiles`` (the FP8 cache's default) a tile of at most 16 rows
  (one token of a GQA group) takes the block's keys as the wgmma M instead:
  ``S^T = K Q^T``, ``O^T += V^T P^T``, a quarter of the tensor-core work. With
  ``DecodeConfig.consumers=2`` a second consumer warpgroup takes every other block (by the
  parity of the global step, so each ring slot keeps one consumer) and hands its partial
  softmax state to consumer 0 at the tile's end.

A second, small kernel merges the pieces of split parents by log-sum-exp and writes their
rows into ``out`` (:mod:`jaxattn.kernels.decode_combine`; a *parent* is an item's key range
on one KV head, split by the planner); unsplit tiles (short contexts, round robin) never
touch it. (With ``DecodeConfig.fold_combine`` the main kernel's CTA that finishes a parent's
last piece merges it instead.) Which CTA runs which tile, and the pieces' slots, come from the
step's metadata (:mod:`jaxattn.kernels.decode_schedule`). Per-token lse values are gathered
from the tiles by XLA (``T x Hq`` floats).

FP8 cache (``k_pages``/``v_pages`` float8_e4m3fn with per-token, per-KV-head
scales, :mod:`jaxattn.kv_quant`): the producer copies each page's scale row next
to its values (one more small TMA per page, same barrier); the consumer turns
the fp8 tile into a 16-bit tile in SMEM with the scale applied per key row
(``k[r, :] = k8[r, :] * s[r]``, :func:`common.dequantize_tile`) just before the
wgmma that reads it, or (the default, ``DecodeConfig.dequant_warpgroup``) a third
warpgroup does so into a small ring. The tiles are f16 by default
(``DecodeConfig.f16_dequant``: f16 arithmetic, with q and P as f16 too), else q's dtype;
everything after is the bf16 kernel's. Where a layer's K (V) rows all share one power-of-two
scale (Llama 4's: :mod:`jaxattn.kv_quant`), that side's scale rows are not copied and its
tiles are converted only: the softmax scale (the normalisation ``1 / l``) takes the scale.
With a bf16 cache none of it is traced (a static branch). Two forms lost on the H200 and
were removed in session 34 (their runs: benchmarks/NOTES-fp8-kv.md): ``S = Q8 K8^T`` on the
fp8 K tile, as the prefill does (1.12-1.16x bf16's time when the default took 1.15-1.20x,
before its f16 tiles brought it to 1.00-1.03x, and 4-10% of the lse values off by 0.05-0.2:
the FP8 wgmma's short accumulator over sharp logits), and K and V dequantised on two
warpgroups instead of one (no faster; with narrow tiles 1.13x against 1.09x).

Assumption (as in other paged kernels): every cache slot holds a finite value
(pools start zeroed; writes store finite K/V). A block's key slots past
``kv_end`` within its last page are loaded and masked: their P is 0, and 0 * NaN would
poison the output. Its copies wholly past ``kv_end`` are skipped (16-bit caches), their
slot rows left as an earlier block or the zeroed ring had them, finite too; an FP8 cache
copies them all, clamped to the last page.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.kernels import common
from jaxattn.kernels import fp8 as fp8_lib
from jaxattn.kernels.decode_combine import (CombineConfig, Merger, Pieces, combine_columns,
                                            combine_pieces)
from jaxattn.kernels.decode_schedule import (KV_END, KV_HEAD, KV_START, PARENT, PART, Q_LEN,
                                             Q_POS, Q_START, SEQ, DecodeMeta, decode_metadata)
from jaxattn.planner import DECODE_TILE_ROWS, Bounds, WorkList

ROWS = DECODE_TILE_ROWS  # wgmma M: rows of one (item, KV head) tile
# Query rows of a narrow tile (DecodeConfig.narrow_tiles): a wgmma N for S^T and O^T.
NARROW_ROWS = 16
# 16-bit zeros in 8-value (16-byte) vectors: zero_smem's stores.
ZERO_LAYOUT = common.DEQUANT_LAYOUTS[8]
# DecodeConfig.merge_pages in default_config (a bf16 cache, and an FP8 cache whose K and V
# each have one scale); benchmarks.multigpu --no-merge-pages turns it off for the serving
# step. Read when a config is made.
MERGE_PAGES = True
# DecodeConfig.fold_combine in default_config on the GPU (off: at batch 1 the combine kernel
# wins, session 57); benchmarks.multigpu --fold-combine turns it on. Read when a config is made.
FOLD_COMBINE = False


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static tuning of the decode kernel.

    block_kv: keys per pipeline stage (a wgmma N for QK, K for PV): 64..256,
      a multiple of 64 and of the page size (or a divisor of it).
    num_stages: depth of the K/V ring. The kernel is HBM-bound; each SM needs
      ~20-30 KiB in flight to cover DRAM latency, and a stage of K+V holds
      2 * block_kv * D * 2 bytes.
    num_ctas: persistent CTAs (None: ``bounds.num_workers``, one per SM); the metadata
      deals the tiles to as many (:func:`decode_metadata`).
    p_in_registers: feed P to the PV wgmma from registers (GPU fast path; GPU
      interpret mode cannot run it, so tests use the SMEM path there).
    dequant_warpgroup: FP8 cache: a third warpgroup dequantises each K/V tile into a
      ring of ``dequant_stages`` 16-bit tiles while the consumer computes on the previous
      one; False: the consumer dequantises each tile before its wgmma (serial with the
      math). Same numbers either way (the same pass). :func:`default_config` turns it on
      for an FP8 cache. (Two forms measured slower and were removed: scales folded onto
      S's and P's columns with e4m3 converted to bf16 exactly, 1.36-1.40x bf16; and K and V
      converted to f16 without scales, which the consumer applied to S's and P's columns
      within f16's range, 1.38-1.42x against this form's 1.15-1.20x,
      benchmarks/results/fp8-kv-2026-12-01-s10-decode.md.)
    dequant_stages: with ``dequant_warpgroup``: depth of the dequantised K (and V) ring. One
      is still a pipeline: the consumer frees K's tile after QK and V's after PV, so the next
      block's K is converted during this block's softmax and PV. With bf16 tiles one stage
      under 6 fp8 stages took 1-4% less time than two under 4 from 8k keys up in three H200
      runs, and 0-1.4% more at 256 x 2k (benchmarks/results/decode-blocks-2026-12-02-s17.md,
      decode-variants-2026-12-03-s27.md); with f16 tiles two under 4 took 1-6% less from
      256 x 2k to 32 x 8k and 1% more at 8 x 32k (decode-variants-2026-12-04-s28*.md).
    consumers: 1 or 2 consumer warpgroups. Two take a tile's blocks by the parity of their
      global step (so each ring slot, and each of its barriers, has one consumer: even
      ``num_stages`` and ``dequant_stages``), each with its own softmax state; consumer 1
      hands its (acc, m, l) to consumer 0 through SMEM at the tile's end. Two chains of
      per-block latencies (wait, QK, softmax, PV) run at once instead of one. On the H200
      (decode-blocks-2026-12-02-s17.md): bf16 gains nothing; FP8 with K and V on two
      dequantising warpgroups (a form since removed) took 1.04-1.08x the 64-key bf16
      kernel's time from 8k keys up (the default 1.12-1.13x) but
      1.26x at 256 x 2k (short tiles: consumer 1 idled while consumer 0 merged and wrote; it
      has staged the next q before that since, untimed); not the default.
    narrow_tiles: a tile of at most :data:`NARROW_ROWS` query rows (one decode token of a
      GQA group: Scout's 5 heads) computes ``S^T = K Q^T`` and ``O^T += V^T P^T`` with the
      64 keys of a block as the wgmma M and its rows as N = 16, instead of padding its rows
      to a 64-row M: a quarter of the tensor-core work per block. Tiles with more rows
      (several tokens of an item) take the 64-row form. On the H200
      (benchmarks/results/fp8-kv-2026-12-02-s16-narrow.md, same run): FP8 cache 5% faster
      from 8k keys up (1% slower at 256 x 2k), bf16 0-1.3% slower (its kernel is not
      waiting on the consumer), so :func:`default_config` turns it on for FP8 only.
    f16_dequant: FP8 cache: K and V are dequantised to f16 in f16 arithmetic (``f16(x8) *
      f16(scale)``, :func:`common.dequantize_tile`: ~1 instruction a value against ~3 for
      bf16), and the query rows (converted once per tile) and P go to the wgmmas as f16: the
      dequantising warpgroup's work is what bounds the FP8 kernel. No per-tile unit is
      needed: the cache keeps its scales in f16's normal range and its values below f16's
      largest (:mod:`jaxattn.kv_quant`); a query past +-65504 is clipped there. On the H200
      it took the FP8 kernel from 1.08-1.14x the 64-key bf16 kernel's time to 1.00-1.03x
      (two runs, decode-variants-2026-12-04-s28*.md), and it is closer to the reference than
      the bf16 tiles (11 significant bits against 8), so :func:`default_config` takes it.
    dequant_vector: FP8 cache: values per thread vector when a tile is dequantised (2, 4
      or 8: :data:`common.DEQUANT_LAYOUTS`): the width of its fp8 loads and 16-bit stores
      in shared memory (2: the wgmma layout, 2-byte loads). Same numbers either way.
    merge_pages: a block whose small pages lie one after another in the pool (as a fresh
      engine hands out a prompt's pages) comes in one TMA copy of its ``block_kv`` rows for
      K and one for V instead of one per page (an FP8 cache's scale rows, where it has them,
      still one per page); other blocks page by page. The producer compares the block's
      page ids, which it reads anyway. Same bytes in shared memory either way. On one H100,
      over 16-token pages in order at 256 x 2k / 32 x 8k / 8 x 32k / 1 x 128k, it took
      0.1-0.8 / 0.8-1.2 / 1.0-3.8 / 2.4-2.8% off the layer's GPU time in two runs
      (decode-2026-12-07-s55-merge*.md), and over shuffled pages (where few blocks merge)
      nothing, either way (s55-shuffled-merge-{on,off}); so the bf16 default has it. Over an
      FP8 cache (32-token pages in order, fp8-kv-2026-12-07-s56-merged.md, one H100 run):
      with one K and one V scale (Llama 4's layers: no scale rows to copy) 0.9 / 1.0 / 3.5 /
      3.1% off at the same shapes, so that default has it too; with per-row scales (still a
      copy per page for them) 0.7 / 0.5 / 1.9 / 1.8% slower, so that default does not.
    fold_combine: no combine kernel: the CTA whose piece of a split parent finishes last
      merges the parent itself, after its last tile, in the shared memory of its K/V ring
      (free by then; a CTA with tiles after a piece takes its tickets then). Each piece's
      consumer, once its stores have completed, adds 1 to its parent's ticket in
      ``DecodeMeta.tickets`` (an atomic at GPU scope, :func:`common.ticket`); the one that
      finds ``n - 1`` merges the n pieces from the partial buffer (L2-resident by then) as
      the combine kernel does (:class:`decode_combine.Merger`: consumer 0 and the producer
      half the columns each, or consumer 0 all of FP8 rows at G = 5) and puts the ticket back
      to 0 for the next layer. It saves the combine's launch and its wait for the whole main
      kernel, but a parent's merge runs on one CTA where the combine kernel spreads it over
      two: on one H100 (two runs, benchmarks/results/decode-2026-12-07-s57-fold*.md, GPU
      time) the layer took 1.3-2.7 µs less at 8 x 32k (2-piece parents) and 32 x 8k (none
      split: no empty combine launch) and 2.5-4.1 µs more at 1 x 8k and 1 x 128k (16 pieces
      a KV head), so :data:`FOLD_COMBINE` leaves it off. GPU only: interpret mode has no
      atomics. Where the merge's ring does not fit the K/V ring's memory the combine kernel
      runs instead.
    combine: the combine kernel's tuning (:class:`CombineConfig`).
    """

    block_kv: int = 64
    num_stages: int = 4
    num_ctas: int | None = None
    p_in_registers: bool = False
    dequant_warpgroup: bool = False
    dequant_stages: int = 2
    consumers: int = 1
    narrow_tiles: bool = False
    f16_dequant: bool = False
    dequant_vector: int = 2
    merge_pages: bool = False
    fold_combine: bool = False
    combine: CombineConfig = CombineConfig()

    def __post_init__(self):
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"block_kv={self.block_kv} must be a multiple of 64 in [64, 256]")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")
        if self.dequant_stages < 1:
            raise ValueError(f"dequant_stages={self.dequant_stages} must be >= 1")
        if self.consumers not in (1, 2):
            raise ValueError(f"consumers={self.consumers} must be 1 or 2")
        if self.consumers == 2 and (self.num_stages % 2 or self.dequant_stages % 2):
            raise ValueError("consumers=2 takes blocks by the parity of their step, so each ring "
                             "slot has one consumer: num_stages and dequant_stages must be "
                             "even")
        if self.dequant_vector not in common.DEQUANT_LAYOUTS:
            raise ValueError(f"dequant_vector={self.dequant_vector} must be one of "
                             f"{tuple(common.DEQUANT_LAYOUTS)}")
        if self.num_ctas is not None and self.num_ctas < 1:
            raise ValueError(f"num_ctas={self.num_ctas} must be positive")


def default_config(interpret=False, fp8=False, fixed_scales=False) -> DecodeConfig:
    """The tuned configuration; under interpret mode P goes through SMEM.

    A bf16 cache takes 128-key blocks in a 2-stage ring (all that fits): on the H200 0.7-2.3%
    faster than 64-key blocks in 4 stages at 256 x 2k, 32 x 8k, 8 x 32k and 1 x 128k, in five
    runs (benchmarks/results/decode-blocks-2026-12-02-s17*.json); :func:`fit_blocks` keeps 64
    where the planner's pieces may start off a 128-key boundary. An FP8 cache gets the
    dequantising warpgroup: on the H200 it takes 1.19-1.20x the bf16 kernel's time against
    1.32-1.35x with the consumer dequantising (1.36-1.40x with the folded scales;
    benchmarks/results/fp8-kv-2026-11-30.md); and narrow tiles (1.12-1.15x); and K/V
    dequantised to f16 in a 2-deep ring under 4 fp8 stages: 1.00-1.03x the 64-key bf16
    kernel's time in two runs (1.01-1.03x the bf16 default's), against 1.08-1.14x for the
    bf16 tiles' best form (decode-variants-2026-12-04-s28*.md); and in 4-value vectors
    (4-byte fp8 loads): 0.96-1.05x the bf16 default's time in two runs (at most 1.005x from
    8k keys), against 1.01-1.05x for 2 (the wgmma layout) and 1.02-1.05x for 8
    (decode-variants-2026-12-04-s29*.md). Its 128-key blocks do not fit a 2-deep
    dequantised ring, and with a 1-deep one took 1.42-1.61x (bf16 tiles). A bf16 cache's
    blocks of pages in order come in one copy each (:data:`MERGE_PAGES`), and an FP8 cache's
    where ``fixed_scales`` (one K and one V scale: no scale rows to copy)."""
    if fp8:
        return DecodeConfig(num_stages=4, p_in_registers=not interpret,
                            dequant_warpgroup=True, dequant_stages=2, narrow_tiles=True,
                            f16_dequant=True, dequant_vector=4,
                            merge_pages=MERGE_PAGES and fixed_scales,
                            fold_combine=FOLD_COMBINE and not interpret)
    return DecodeConfig(block_kv=128, num_stages=2, p_in_registers=not interpret,
                        merge_pages=MERGE_PAGES, fold_combine=FOLD_COMBINE and not interpret)


def fit_blocks(config: DecodeConfig, bounds: Bounds) -> DecodeConfig:
    """A default ``config`` with 64-key blocks (4 stages) unless its blocks divide
    ``bounds.block_kv``: split pieces and chunks start at multiples of that, and a block
    that is one copy of a large page's slice must start on its own boundary."""
    if bounds.block_kv % config.block_kv == 0:
        return config
    return dataclasses.replace(config, block_kv=64, num_stages=4)


def pick_config(bounds: Bounds, dtype, interpret=False, kv_dtype=None) -> DecodeConfig:
    """The decode config for an engine's bounds; raises ValueError if they cannot be served."""
    fp8 = kv_dtype is not None and jnp.dtype(kv_dtype) == common.FP8_KV
    config = fit_blocks(default_config(interpret, fp8), bounds)
    common.check_kv_dtype("decode", dtype, kv_dtype)
    _check(bounds, dtype, bounds.head_dim, bounds.page_size, bounds.pages_per_seq, config.block_kv,
           fp8=fp8)
    return config


def _check(bounds: Bounds, dtype, d: int, page_size: int, pages_per_seq: int, block_kv: int,
           fp8: bool = False):
    g = bounds.group
    common.check_supported("decode", d, dtype)
    if bounds.dq * g > ROWS:
        raise ValueError(f"decode_q={bounds.dq} tokens x {g} heads per KV group = "
                         f"{bounds.dq * g} rows exceed one {ROWS}-row tile; lower decode_q")
    common.check_pages("decode", page_size, block_kv, pages_per_seq, fp8)


def _fold_mergers(config: DecodeConfig, rings: tuple, g: int, d: int, out_dtype,
                  out_scale) -> tuple[Merger, int] | None:
    """The folded combine's merge: (its shape, how many warpgroups run it). The consumer and
    the producer each take half the columns where a token's rows of ``d / 2`` columns start
    on 128-byte boundaries (bf16 rows; not FP8 rows at G = 5), else the consumer takes all;
    with the deepest ring, at most 8, whose buffers fit in the K/V ``rings``' shared memory.
    None where the fold is off or not even 2 slots fit."""
    if not config.fold_combine:
        return None
    budget = common.smem_bytes(rings)
    half = combine_columns(CombineConfig(cols=d // 2), d, g, out_dtype) < d
    for ring in range(8, 1, -1):
        for n in (2, 1) if half else (1,):
            merger = Merger(g=g, cw=d // n, nwg=1, ring=ring, share_from=2,
                            out_dtype=out_dtype, out_scale=out_scale)
            if common.smem_bytes(merger.buffers() * n) <= budget:
                return merger, n
    return None


def _kernel_call(meta, cta_start, zero_rows, page_table, q4, k_pages, v_pages, out_ref,
                 cmeta, tickets, *, cap: int,
                 n_part: int, scale: float, causal: bool, config: DecodeConfig, interpret,
                 k_scale=None, v_scale=None, fixed_k_scale=None, fixed_v_scale=None,
                 out_scale=None):
    _, hkv, g, d = q4.shape
    num_ctas = cta_start.shape[0] - 1
    dtype = q4.dtype
    # An unsplit item's rows go out in q's dtype, or as FP8 under the static out_scale.
    out_dtype = out_ref.dtype
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    _, page_size, _, _ = k_pages.shape
    bk, stages = config.block_kv, config.num_stages
    # Key rows per TMA copy: whole small pages, or a block-sized slice of a large page or
    # of a sequence's single page (rows past its end come back as zeros).
    rpc = bk if page_size >= bk or page_table.shape[1] == 1 else page_size
    cpb = bk // rpc  # copies per block (per K and per V)
    dq_pad = common.cdiv(ROWS, g)  # token rows of the Q/O staging buffers: dq_pad * g >= 64
    rows_pad = dq_pad * g
    fp8 = k_scale is not None  # static: the FP8 cache's extra copies and dequantisation
    # Every K scale is this power of two: K's scale rows are not copied, its tiles are
    # converted without them, and the softmax scale takes it (the same products: a power of
    # two scales exactly, and f16 holds every e4m3 value times a scale >= 2^-15).
    fixed_k = fp8 and fixed_k_scale is not None
    c_log2 = scale * common.LOG2E * (fixed_k_scale if fixed_k else 1.0)
    # Likewise V's: its tiles converted without scale rows, and the normalisation (1 / l)
    # takes it.
    fixed_v = fp8 and fixed_v_scale is not None
    tiles_transform = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    deq_wg = fp8 and config.dequant_warpgroup  # warpgroup 2 dequantises into a 16-bit ring
    dstages = config.dequant_stages
    consumers = config.consumers
    if consumers == 2 and fp8 and not deq_wg:
        raise ValueError("DecodeConfig(consumers=2) over an FP8 cache needs dequant_warpgroup="
                         "True (the consumers cannot share one dequantised tile)")
    # TMA copies per page slice: values (+ their scales)
    k_copies, v_copies = (1 if fixed_k else 2, 1 if fixed_v else 2) if fp8 else (1, 1)
    # The wgmmas' 16-bit operands (q as the wgmma takes it, the dequantised K/V tiles, P).
    op_dtype = jnp.dtype(jnp.float16) if fp8 and config.f16_dequant else jnp.dtype(dtype)
    # Tiles of at most NARROW_ROWS query rows take the keys as the wgmma M.
    narrow = config.narrow_tiles and g <= NARROW_ROWS
    # Copies of a block that lie wholly past kv_end are skipped (16-bit caches; an FP8
    # slot's stale bytes could be a NaN code, so its copies all run, clamped to the last page).
    skip_copies = cpb > 1 and not fp8
    # One copy of values per block where its small pages are consecutive
    # (DecodeConfig.merge_pages); an FP8 cache's scale rows still come page by page.
    merge = config.merge_pages and cpb > 1
    params = common.compiler_params(approx_math=True)  # (+ the profiler's: kernel_trace)
    if interpret and config.fold_combine:
        raise ValueError("GPU interpret mode has no atomics for DecodeConfig(fold_combine=True)"
                         "; use the combine kernel (fold_combine=False)")
    # The K/V rings (and an FP8 cache's dequantised ones): free once the consumer has read
    # the CTA's last block, so the folded combine's merge takes their memory then.
    kv_ring = (common.tiled_smem((stages, bk, d), k_pages.dtype) if fp8 else
               plgpu.SMEM((stages, bk, d), dtype, transforms=tiles_transform))
    deq_tile = plgpu.SMEM(((dstages,) if deq_wg else ()) + (bk, d), op_dtype,
                          transforms=tiles_transform)  # a ring, or one tile the consumer fills
    rings = (kv_ring, kv_ring, *((deq_tile, deq_tile) if fp8 else ()))
    fold = _fold_mergers(config, rings, g, d, out_ref.dtype, out_scale)
    merger, n_merge = fold or (None, 0)

    def decode_kernel(meta_ref, cta_ref, zero_ref, pt_ref, q_ref, k_ref, v_ref, *rest):
        # inputs (GMEM) [+ k/v scales]; out_ref: [T, Hkv, G, D] in q's dtype (or FP8), a Ref updated
        # in place (uninitialised: the producers zero the rows no tile covers); outputs
        # lse_ref, opart_ref, lpart_ref (GMEM); scratch [+
        # the FP8 cache's].
        ks_ref, vs_ref, *rest = rest if fp8 else (None, None, *rest)
        # merge: the pools as [P * page_size, Hkv, D] rows, where a run of pages is one box.
        k_rows, v_rows, *rest = rest if merge else (None, None, *rest)
        # fold: the parents' piece counts (cmeta) and tickets; the merged lse tiles out.
        cmeta_ref, tickets_ref, *rest = rest if fold else (None, None, *rest)
        out_ref, lse_ref, opart_ref, lpart_ref, *rest = rest
        lse_merged_ref, *rest = rest if fold else (None, *rest)
        ((q_raw, *q_raw8), q_tile, ring_union, p_smem, (o_smem, o_out, o_t_smem, merge_acc),
         lse_smem, q_full, q_free, k_full, v_full, consumed, pt_smem, eye, pair, fold_scratch,
         *fp8_scratch) = rest
        ring_refs, fold_bufs = ring_union if fold else (ring_union, None)
        if fold:  # each merging warpgroup's (rows, lse tiles, merged rows)
            k = len(merger.buffers())
            fold_bufs = [fold_bufs[k * w:k * (w + 1)] for w in range(n_merge)]
        k_smem, v_smem, *deq_refs = ring_refs
        # Two consumers: consumer 0 tells consumer 1 that q is staged, and takes its partial
        # state (merge_acc, merge_ml; full/free) at each tile's end.
        q_ready, merge_full, merge_free, merge_ml = pair or (None,) * 4
        if fp8:
            ks_smem, vs_smem, *deq_barriers = fp8_scratch
            k_deq, v_deq = deq_refs
        if deq_wg:  # k_deq/v_deq: [dstages, bk, d] rings
            kdeq_full, vdeq_full, kdeq_free, vdeq_free = deq_barriers
        # wgmma_tile's FP8 arguments: (dequantised-ring barrier, dequantised tile(s), scales).
        deq_k = (kdeq_full if deq_wg else None, k_deq, ks_smem) if fp8 else ()
        deq_v = (vdeq_full if deq_wg else None, v_deq, vs_smem) if fp8 else ()
        wg = lax.axis_index("wg")
        cta = lax.axis_index("cta")
        # The step's plan was written launches ago, so the CTA's tile range is read before
        # the wait for the kernel just before (under programmatic dependent launch, that
        # kernel's work and this one's start overlap).
        first_tile = cta_ref[cta]
        n_local = cta_ref[cta + 1] - first_tile

        def wait():
            """Each warpgroup's wait for the kernel before (``common.dependent_launch``),
            before its first read of that kernel's outputs and its first global store."""
            with jax.named_scope("wait"):  # (the regions: common.kernel_trace)
                common.dependent_launch(interpret)

        def tile_info(i):
            f = lambda col: meta_ref[first_tile + i, col]
            return f(KV_HEAD), f

        def split_range(i, part, lo, hi):
            """The fold's range [lo, hi) of local tiles holding split pieces, with tile i."""
            split = part >= 0
            return jnp.where(split, jnp.minimum(lo, i), lo), jnp.where(split, i + 1, hi)

        @jax.named_scope("fold")
        def fold_merge(lo, hi, w):
            """The folded combine (after the CTA's last tile, its K/V ring free), on
            warpgroup ``w`` of the ``n_merge`` that merge (0: the consumer, 1: the producer,
            each a half of the columns): the consumer takes a ticket for each split piece
            among local tiles [lo, hi) and hands it to the producer; where this piece was its
            parent's last, each merges its columns of the parent here."""
            bars, flag, job = fold_scratch
            if w == 0:  # every piece's rows and lse are in global memory, not only read out
                plgpu.wait_smem_to_gmem(0)

            @pl.loop(lo, hi)
            def _(i):
                kvh, f = tile_info(i)
                part, parent = f(PART), f(PARENT)

                @pl.when(part >= 0)
                def _():
                    n = cmeta_ref[parent, 0]
                    if w == 0:
                        done = common.ticket(tickets_ref.at[pl.ds(parent, 1)], n, flag)
                        if job:
                            plgpu.barrier_arrive(job[0])
                    else:
                        plgpu.barrier_wait(job[0])
                        done = flag[0]
                        plgpu.barrier_arrive(job[1])

                    @pl.when(done == n - 1)
                    def _():
                        if w:  # the ticket's acquire was the consumer's; TMA reads next
                            common.fence_async_global()
                        # The ring's last readers were the wgmma and the dequantising
                        # warpgroup; TMA writes the pieces there now.
                        plgpu.commit_smem()
                        merger.merge(parent, (n, f(Q_START), f(Q_LEN), kvh), wg=0,
                                     cols=pl.ds(w * merger.cw, merger.cw), opart_ref=opart_ref,
                                     lpart_ref=lpart_ref, out_ref=out_ref,
                                     lse_out_ref=lse_merged_ref, buffers=fold_bufs[w],
                                     barriers=bars[w], write_lse=w == 0)

                    if w == 0 and job:  # the producer has read the ticket: the next may go
                        plgpu.barrier_wait(job[1])

        @jax.named_scope("zero")
        def zero_smem():
            """q_raw's rows start at zero: a tile's q copies cover only its own tokens, so the
            rows past them hold zeros or an earlier tile's q (finite, which a narrow tile's
            transposing wgmma needs: 0 * NaN is NaN). Likewise the V ring where a block's
            copies past kv_end are skipped and the slot holds no earlier block's rows: its
            masked keys' P is 0, times a finite V."""
            # In 16-byte vectors (the wgmma layout's are 4 bytes, each behind its swizzled
            # address arithmetic: ~1.1 us for a bf16 cache's 80 KiB, session 51's trace).
            def zeros(dt):  # [64, d]; 8-bit rows (the FP8 view) in the wgmma layout
                wide = jnp.dtype(dt).itemsize > 1
                return plgpu.layout_cast(jnp.zeros((ROWS, d), dt),
                                         ZERO_LAYOUT if wide else plgpu.Layout.WGMMA)

            for view in (q_raw, *q_raw8):  # (FP8 rows: the zero rows' 8-bit view too)
                view[pl.ds(0, ROWS), :] = zeros(view.dtype)
            if skip_copies:
                # Only a block cut short at kv_end leaves rows of its V slot unwritten. Where
                # the CTA's first tile begins with `stages` whole blocks, each slot's first
                # block writes all of it, and a later short block finds an earlier one's
                # (finite) rows there: no zeroing, so the first copies go out sooner. (The
                # plan was written launches ago: read before the wait, as the tile range.)
                row = jnp.minimum(first_tile, meta_ref.shape[0] - 1)
                whole = (meta_ref[row, KV_START] + (stages - 1) * bk + (cpb - 1) * rpc
                         < meta_ref[row, KV_END])

                @pl.when((n_local > 0) & ~whole)
                def _():
                    for s in range(stages):
                        for r in range(0, bk, ROWS):
                            v_smem[s, pl.ds(r, ROWS)] = zeros(dtype)
            plgpu.commit_smem()

        @jax.named_scope("zero")
        def zero_uncovered_rows():
            """Rows no tile covers (padding, other lists' rows) get zeros from q_raw (FP8
            rows: its 8-bit view, zeros too) before its first q lands, the CTAs taking them in
            turn from the last: tiles are dealt from CTA 0, so with fewer tiles than CTAs the
            ones that run a tile do not wait for these stores."""
            n_zero = zero_ref[0]
            zc = num_ctas - 1 - cta

            @pl.when(zc < n_zero)
            def _():
                zeros = q_raw8[0] if q_raw8 else q_raw

                @pl.loop(zc, n_zero, step=num_ctas)
                def _(k):
                    row = zero_ref[1 + k]

                    @pl.loop(0, hkv)
                    def _(h):
                        plgpu.copy_smem_to_gmem(zeros.at[pl.ds(0, g)], out_ref.at[row, h])

                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def producer():
            zero_smem()  # shared memory only: before the wait, beside the kernel before
            wait()
            zero_uncovered_rows()

            @jax.named_scope("tile")
            def tile_body(i, carry):
                step, lo, hi = carry
                kvh, f = tile_info(i)
                seq, q_start, kv_start, kv_end = f(SEQ), f(Q_START), f(KV_START), f(KV_END)
                if n_merge == 2:  # (else the consumer merges alone)
                    lo, hi = split_range(i, f(PART), lo, hi)

                @pl.when(i > 0)
                def _():
                    plgpu.barrier_wait(q_free)

                # One TMA per token: the item's (token, group head) rows are a 3-D box in
                # q, and Mosaic's layout inference cannot take a reshaped TMA target that
                # is also read into registers. Only the item's tokens are loaded (a decode
                # item has one of dq_pad); the rest arrive without a copy, their rows
                # whatever finite values q_raw holds (zero_smem), ignored.
                q_len = f(Q_LEN)

                @pl.loop(0, q_len)
                def _(tok):
                    plgpu.copy_gmem_to_smem(q_ref.at[q_start + tok, kvh],
                                            q_raw.at[pl.ds(tok * g, g)], q_full)

                @pl.loop(q_len, dq_pad)
                def _(tok):
                    plgpu.barrier_arrive(q_full)

                last_key = kv_end - 1

                @jax.named_scope("kv_block")
                def block_body(j, step):
                    slot = lax.rem(step, stages)
                    # Page ids first: their GMEM latency overlaps the wait for a free slot.
                    # Copies past kv_end re-read the item's last page (masked later), so
                    # the page table is never read beyond the item's range.
                    base = kv_start + j * bk
                    keys = [jnp.minimum(base + cp * rpc, last_key) for cp in range(cpb)]
                    pages = [pt_ref[seq, key // page_size] for key in keys]

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(consumed.at[slot])

                    def copies(key, page, cp, values=True):
                        row = lax.rem(key, page_size) // rpc * rpc if rpc < page_size else 0
                        dst = pl.ds(cp * rpc, rpc)
                        src = pl.ds(row, rpc)
                        if values:
                            plgpu.copy_gmem_to_smem(k_ref.at[page, src, kvh],
                                                    k_smem.at[slot, dst], k_full.at[slot])
                            plgpu.copy_gmem_to_smem(v_ref.at[page, src, kvh],
                                                    v_smem.at[slot, dst], v_full.at[slot])
                        if fp8 and not fixed_k:  # the rows' scales, on the same barriers
                            plgpu.copy_gmem_to_smem(ks_ref.at[page, kvh, src],
                                                    ks_smem.at[slot, dst], k_full.at[slot])
                        if fp8 and not fixed_v:
                            plgpu.copy_gmem_to_smem(vs_ref.at[page, kvh, src],
                                                    vs_smem.at[slot, dst], v_full.at[slot])

                    def page_by_page():
                        for cp, (key, page) in enumerate(zip(keys, pages)):
                            if not skip_copies or cp == 0:  # a block's first copy is live
                                copies(key, page, cp)
                                continue
                            live = base + cp * rpc < kv_end

                            @pl.when(live)
                            def _():
                                copies(key, page, cp)

                            # Wholly past kv_end (a short tail: most of a decode block at
                            # few keys): arrive without a copy. The block is masked, its slot
                            # rows stale or zero (finite, zero_smem).
                            @pl.when(~live)
                            def _():
                                plgpu.barrier_arrive(k_full.at[slot])
                                plgpu.barrier_arrive(v_full.at[slot])

                    if not merge:
                        page_by_page()
                        return step + 1
                    # Consecutive pages: every copy of the block starts below kv_end (one
                    # wholly past it is clamped to the last page, which repeats a page id),
                    # so the one copy lands what the per-page copies would.
                    run = functools.reduce(operator.and_, [
                        page == pages[0] + cp for cp, page in enumerate(pages) if cp])

                    @pl.when(run)
                    def _():
                        rows = pl.ds(pages[0] * page_size, bk)
                        plgpu.copy_gmem_to_smem(k_rows.at[rows, kvh], k_smem.at[slot],
                                                k_full.at[slot])
                        plgpu.copy_gmem_to_smem(v_rows.at[rows, kvh], v_smem.at[slot],
                                                v_full.at[slot])
                        for cp, (key, page) in enumerate(zip(keys, pages)):
                            copies(key, page, cp, values=False)  # FP8: scale rows, per page
                            if cp:  # the arrivals this page's own value copies would make
                                plgpu.barrier_arrive(k_full.at[slot])
                                plgpu.barrier_arrive(v_full.at[slot])

                    pl.when(~run)(page_by_page)
                    return step + 1

                n_blocks = jnp.maximum(0, common.cdiv(kv_end - kv_start, bk))
                return lax.fori_loop(0, n_blocks, block_body, step), lo, hi

            steps, lo, hi = lax.fori_loop(0, n_local, tile_body, (jnp.int32(0), n_local,
                                                                  jnp.int32(0)))

            # Observe every completion of the barriers this warpgroup waits on
            # (GPU interpret mode checks it; the hardware does not care).
            @pl.loop(jnp.maximum(0, steps - stages), steps)
            def _(s):
                plgpu.barrier_wait(consumed.at[lax.rem(s, stages)])

            @pl.when(n_local > 0)
            def _():
                plgpu.barrier_wait(q_free)

            if n_merge == 2:
                fold_merge(lo, hi, 1)

        # (full, free, done, fp8 ring, scale ring, dequantised ring) of K, then of V.
        def dequantizer():
            """Warpgroup 2 (``dequant_warpgroup``): walks the same (tile, block) steps as the
            others, dequantising K's then V's fp8 slot ``step % stages`` into their rings'
            slot ``step % dstages``, then frees the fp8 slot."""
            jobs = ((k_full, kdeq_free, kdeq_full, k_smem, ks_smem, k_deq),
                    (v_full, vdeq_free, vdeq_full, v_smem, vs_smem, v_deq))
            wait()

            def tile_body(i, step):
                _, f = tile_info(i)
                kv_start, kv_end = f(KV_START), f(KV_END)

                @jax.named_scope("dequant")
                def block_body(j, step):
                    slot = lax.rem(step, stages)
                    for full, free, done, src, scl, dst in jobs:
                        rows_scale = None if scl is None else scl.at[slot]  # None: fixed
                        common.dequantize_to_ring(src.at[slot], rows_scale, full.at[slot], dst,
                                                  free, done, step, dstages,
                                                  config.dequant_vector)
                    plgpu.barrier_arrive(consumed.at[slot])
                    return step + 1

                n_blocks = jnp.maximum(0, common.cdiv(kv_end - kv_start, bk))
                return lax.fori_loop(0, n_blocks, block_body, step)

            steps = lax.fori_loop(0, n_local, tile_body, jnp.int32(0))

            @pl.loop(jnp.maximum(0, steps - dstages), steps)
            def _(s):  # observe the last completions (GPU interpret mode checks it)
                for _, free, *_ in jobs:
                    plgpu.barrier_wait(free.at[lax.rem(s, dstages)])

        def consumer(c):
            """Consumer ``c``: the tile's blocks whose global step has parity ``c`` (all of
            them with one consumer). Consumer 0 also stages q and writes the tile out, after
            taking consumer 1's partial (m, l, acc) through SMEM and merging it."""
            wait()
            row_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 0, layout=plgpu.Layout.WGMMA)
            col_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
            if narrow:  # S^T's (key, query row) ids; the identity that transposes O^T
                key_ids = plgpu.broadcasted_iota(jnp.int32, (bk, NARROW_ROWS), 0,
                                                 layout=plgpu.Layout.WGMMA)
                qrow_ids = plgpu.broadcasted_iota(jnp.int32, (bk, NARROW_ROWS), 1,
                                                  layout=plgpu.Layout.WGMMA)
                if c == 0:
                    eye_r, eye_c = (plgpu.broadcasted_iota(jnp.int32, (ROWS, NARROW_ROWS), a,
                                                           layout=plgpu.Layout.WGMMA)
                                    for a in (0, 1))
                    eye[...] = jnp.where(eye_r == eye_c, 1.0, 0.0).astype(dtype)
                    plgpu.commit_smem()
            # Each consumer stages P in a ref of its own.
            p_stage = None if p_smem is None else p_smem[c]
            pt_stage = None if pt_smem is None else pt_smem[c]

            def wgmma_tile(slot, dslot, full, ring, deq_full=None, deq=None, scales=None):
                """The K (V) tile of this step as a wgmma operand, once it is ready: the
                landed bf16 tile; FP8: the dequantising warpgroup's slot of ``deq``, or the
                fp8 tile dequantised here into ``deq`` (its last reader has completed)."""
                if deq_wg:
                    plgpu.barrier_wait(deq_full.at[dslot])
                    return deq.at[dslot]
                plgpu.barrier_wait(full.at[slot])
                if not fp8:
                    return ring.at[slot]
                rows_scale = None if scales is None else scales.at[slot]  # None: fixed
                return common.dequantize_tile(ring.at[slot], rows_scale, deq,
                                              config.dequant_vector)

            def own_blocks(block_body, carry, step0, n_clear, n_blocks):
                """Runs ``block_body(j, step, carry, masked)`` over this consumer's blocks j
                of the tile (global step ``step0 + j``): unmasked ones, then masked ones."""
                first = lax.rem(c + 2 - lax.rem(step0, 2), 2) if consumers == 2 else 0
                count = lambda n: jnp.maximum(0, common.cdiv(n - first, consumers))

                def body(masked):
                    def f(t, carry):
                        j = first + t * consumers
                        return block_body(j, step0 + j, carry, masked=masked)
                    return f

                carry = lax.fori_loop(0, count(n_clear), body(False), carry)
                return lax.fori_loop(count(n_clear), count(n_blocks), body(True), carry)

            def merged(acc, m, l, axis, i):
                """Two consumers: consumer 1 hands its partial softmax state (acc, m, l; its
                rows along ``axis`` of acc) for local tile ``i`` to consumer 0 through SMEM and
                gets None; consumer 0 gets the merged state, having first staged the next
                tile's q (both are done with this one's), so consumer 1 starts it during
                consumer 0's epilogue. With one consumer, the state as it is."""
                if consumers == 1:
                    return acc, m, l
                n = m.shape[0]
                acc_buf = merge_acc[0] if axis == 0 else merge_acc[1]
                if c == 1:
                    @pl.when(i > 0)
                    def _():  # consumer 0 has read the last one, and its stores the buffer
                        plgpu.barrier_wait(merge_free)

                    acc_buf[...] = acc
                    merge_ml[0, pl.ds(0, n)] = m
                    merge_ml[1, pl.ds(0, n)] = l
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(merge_full)
                    return None
                vec = plgpu.Layout.WGMMA.reduce(1 - axis)
                plgpu.barrier_wait(merge_full)
                acc1 = plgpu.load(acc_buf, layout=plgpu.Layout.WGMMA)
                m1 = plgpu.load(merge_ml.at[0, pl.ds(0, n)], layout=vec)
                l1 = plgpu.load(merge_ml.at[1, pl.ds(0, n)], layout=vec)
                # Every thread has read the partial before any writes the output there (the
                # o staging union): a warpgroup barrier.
                plgpu.commit_smem()
                pl.when(i + 1 < n_local)(stage_q)
                bcast = lambda x: lax.broadcast_in_dim(x, acc.shape, [axis])
                m_new = jnp.maximum(m, m1)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                a0, a1 = jnp.exp2(m - m_use), jnp.exp2(m1 - m_use)
                return acc * bcast(a0) + acc1 * bcast(a1), m_new, l * a0 + l1 * a1

            @jax.named_scope("stage_q")
            def stage_q():
                """Consumer 0: the next tile's q from the producer's buffer into the wgmma
                tile."""
                plgpu.barrier_wait(q_full)
                if op_dtype != dtype:  # f16 operands: q clipped to f16's range
                    f16_max = float(jnp.finfo(op_dtype).max)
                    x = plgpu.load(q_raw.at[pl.ds(0, ROWS)], layout=plgpu.Layout.WGMMA)
                    q_tile[...] = jnp.clip(x.astype(jnp.float32), -f16_max, f16_max).astype(
                        op_dtype)
                else:
                    q_tile[...] = q_raw[pl.ds(0, ROWS), :]
                plgpu.commit_smem()
                plgpu.barrier_arrive(q_free)
                if consumers == 2:
                    plgpu.barrier_arrive(q_ready)

            def tile_body(i, carry):
                step, lo, hi = carry  # lo..hi: the local tiles that were split pieces
                kvh, f = tile_info(i)
                q_start, q_len, q_pos = f(Q_START), f(Q_LEN), f(Q_POS)
                kv_start, kv_end, part = f(KV_START), f(KV_END), f(PART)
                if fold and c == 0:  # (only the fold's consumer 0 takes tickets)
                    lo, hi = split_range(i, part, lo, hi)

                if consumers == 1:
                    stage_q()
                else:  # consumer 0 stages a later tile's q as soon as both are done with q
                    if c == 0:
                        pl.when(i == 0)(stage_q)
                    else:
                        plgpu.barrier_wait(q_ready)

                n_blocks = jnp.maximum(0, common.cdiv(kv_end - kv_start, bk))
                # Blocks wholly below kv_end and the first row's diagonal need no mask.
                clear_end = jnp.minimum(kv_end, q_pos + 1) if causal else kv_end
                n_clear = jnp.clip((clear_end - kv_start) // bk, 0, n_blocks)
                blocks = (kv_start, kv_end, q_pos, n_clear, n_blocks, step, i)
                out = (kvh, q_start, q_len, part)

                def write(result, *out):
                    if result is not None:  # None: consumer 1, whose rows consumer 0 wrote
                        write_tile(*result, *out)
                if narrow:
                    is_narrow = q_len * g <= NARROW_ROWS

                    @pl.when(is_narrow)
                    def _():
                        write(narrow_tile(*blocks), *out)

                    @pl.when(~is_narrow)
                    def _():
                        write(wide_tile(*blocks), *out)
                else:
                    write(wide_tile(*blocks), *out)
                return step + n_blocks, lo, hi

            @jax.named_scope("attend")
            def wide_tile(kv_start, kv_end, q_pos, n_clear, n_blocks, step0, i):
                """The tile's query rows as the wgmma M (64 rows): -> (o [64, d] f32, lse [64]);
                None on consumer 1."""
                def block_body(j, step, carry, masked: bool):
                    acc, m, l = carry
                    slot = lax.rem(step, stages)
                    dslot = lax.rem(step, dstages)
                    k_tile = wgmma_tile(slot, dslot, k_full, k_smem, *deq_k)

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_tile, k_tile.T)
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                    if deq_wg:
                        plgpu.barrier_arrive(kdeq_free.at[dslot])
                    if masked:
                        key = col_ids + (kv_start + j * bk)
                        ok = key < kv_end
                        if causal:  # key <= q_pos + row // g  <=>  (key - q_pos) * g <= row
                            ok &= (key - q_pos) * g <= row_ids
                        s = jnp.where(ok, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1) * c_log2)
                    # A row that has seen only masked keys keeps m = -inf: use 0 so
                    # exp2 gives 0 (not NaN) for its masked entries and its alpha.
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    alpha = jnp.exp2(m - m_use)
                    p = jnp.exp2(s * c_log2 - lax.broadcast_in_dim(m_use, s.shape, [0]))
                    l = l * alpha + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    p16 = p.astype(op_dtype)
                    v_tile = wgmma_tile(slot, dslot, v_full, v_smem, *deq_v)
                    if config.p_in_registers:
                        def pv(acc_ref):
                            plgpu.wgmma(acc_ref, p16, v_tile)
                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    else:
                        p_stage[...] = p16
                        plgpu.commit_smem()

                        def pv(acc_ref):
                            plgpu.wgmma(acc_ref, p_stage, v_tile)
                            return acc_ref[...]

                        acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, d), jnp.float32))
                    # The fp8 ring slot is the dequantising warpgroup's to free.
                    plgpu.barrier_arrive(vdeq_free.at[dslot] if deq_wg else consumed.at[slot])
                    return acc, m_new, l

                carry = (plgpu.layout_cast(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
                         plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                                           plgpu.Layout.WGMMA.reduce(1)),
                         plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32),
                                           plgpu.Layout.WGMMA.reduce(1)))
                state = merged(*own_blocks(block_body, carry, step0, n_clear, n_blocks),
                               axis=0, i=i)
                if state is None:
                    return None
                acc, m, l = state
                seen = l > 0
                l_safe = jnp.where(seen, l, 1.0)
                o = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
                if fixed_v:
                    o = o * fixed_v_scale
                return o, jnp.where(seen, (m + jnp.log2(l_safe)) * common.LN2, -jnp.inf)

            @jax.named_scope("attend")
            def narrow_tile(kv_start, kv_end, q_pos, n_clear, n_blocks, step0, i):
                """A tile of at most NARROW_ROWS query rows, the keys as the wgmma M:
                ``S^T = K Q^T`` [bk, n] and ``O^T += V^T P^T`` [d, n], so the tensor core's
                work follows the rows (n = 16) instead of a 64-row M; the softmax's max over
                keys is a reduction across the warpgroup, its sums stay per thread until the
                end. -> (o [64, d] f32, lse [n]), None on consumer 1; o's rows come out of
                the tensor core too (``I [64, n] @ (O^T)^T``, in two halves of dtype: ~16
                significant bits)."""
                n = NARROW_ROWS
                col = lambda x, shape: lax.broadcast_in_dim(x, shape, [1])  # [n] over rows

                def block_body(j, step, carry, masked: bool):
                    acc, m, l = carry  # acc = O^T [d, n]; m [n]; l [bk, n] partial sums
                    slot = lax.rem(step, stages)
                    dslot = lax.rem(step, dstages)
                    k_tile = wgmma_tile(slot, dslot, k_full, k_smem, *deq_k)

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, k_tile, q_tile.at[pl.ds(0, n)].T)
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((bk, n), jnp.float32)) * c_log2
                    if deq_wg:
                        plgpu.barrier_arrive(kdeq_free.at[dslot])
                    if masked:
                        key = key_ids + (kv_start + j * bk)
                        ok = key < kv_end
                        if causal:
                            ok &= (key - q_pos) * g <= qrow_ids
                        s = jnp.where(ok, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=0))
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    alpha = jnp.exp2(m - m_use)
                    p = jnp.exp2(s - col(m_use, s.shape))
                    l = l * col(alpha, l.shape) + p
                    acc = acc * col(alpha, acc.shape)
                    pt_stage.T[...] = p.astype(op_dtype)  # pt_stage [n, bk] holds P
                    plgpu.commit_smem()
                    v_tile = wgmma_tile(slot, dslot, v_full, v_smem, *deq_v)

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, v_tile.T, pt_stage.T)
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((d, n), jnp.float32))
                    plgpu.barrier_arrive(vdeq_free.at[dslot] if deq_wg else consumed.at[slot])
                    return acc, m_new, l

                col_layout = plgpu.Layout.WGMMA.reduce(0)
                carry = (plgpu.layout_cast(jnp.zeros((d, n), jnp.float32), plgpu.Layout.WGMMA),
                         plgpu.layout_cast(jnp.full((n,), -jnp.inf, jnp.float32), col_layout),
                         plgpu.layout_cast(jnp.zeros((bk, n), jnp.float32), plgpu.Layout.WGMMA))
                acc, m, l = own_blocks(block_body, carry, step0, n_clear, n_blocks)
                state = merged(acc, m, l.sum(axis=0), axis=1, i=i)
                if state is None:
                    return None
                acc, m, l = state
                seen = l > 0
                l_safe = jnp.where(seen, l, 1.0)
                o_t = acc / col(l_safe, acc.shape)
                if fixed_v:
                    o_t = o_t * fixed_v_scale
                hi = o_t.astype(dtype)
                lo = (o_t - hi.astype(jnp.float32)).astype(dtype)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_t_smem shares o staging
                o_t_smem[0][...] = hi
                o_t_smem[1][...] = lo
                plgpu.commit_smem()

                def transpose(acc_ref):
                    for half in o_t_smem:
                        plgpu.wgmma(acc_ref, eye, half.T)
                    return acc_ref[...]

                o = pl.run_scoped(transpose, plgpu.ACC((ROWS, d), jnp.float32))
                return o, jnp.where(seen, (m + jnp.log2(l_safe)) * common.LN2, -jnp.inf)

            @jax.named_scope("write")
            def write_tile(o, lse, kvh, q_start, q_len, part):
                """o [64, d] (f32, the tile's rows, normalised) and its lse ([64] or [n])
                out: an unsplit item's rows into ``out`` (``part = -1 - item``), a piece's into
                its slot ``part``."""
                # The previous tile's stores must have finished reading o/lse_smem.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                # An unsplit item's rows are final: q's dtype (or FP8), so no cast or
                # quantising kernel follows.
                @pl.when(part < 0)
                def _():
                    o_out[pl.ds(0, ROWS), :] = fp8_lib.cast_out(o, out_dtype, out_scale)

                @pl.when(part >= 0)  # a piece's rows: f32 for the combine
                def _():
                    o_smem[pl.ds(0, ROWS), :] = o

                lse_smem[pl.ds(0, lse.shape[0])] = lse
                plgpu.commit_smem()

                @pl.when(part < 0)
                def _():
                    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[-1 - part, kvh])

                @pl.when(part >= 0)  # by slot, so the combine needs no index to find it
                def _():
                    plgpu.copy_smem_to_gmem(lse_smem, lpart_ref.at[part])

                # Only the item's own token rows go out: straight into `out` when the
                # item is unsplit, else into the piece's slot of the partial buffer.
                @pl.loop(0, q_len)  # q_len <= dq <= 64 // g
                def _(tok):
                    rows = pl.ds(tok * g, g)

                    @pl.when(part < 0)
                    def _():
                        plgpu.copy_smem_to_gmem(o_out.at[rows], out_ref.at[q_start + tok, kvh])

                    @pl.when(part >= 0)
                    def _():
                        plgpu.copy_smem_to_gmem(o_smem.at[rows], opart_ref.at[part, rows])

                if consumers == 2:  # consumer 1's next partial goes where these stores read
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    plgpu.barrier_arrive(merge_free)

            _, lo, hi = lax.fori_loop(0, n_local, tile_body,
                                      (jnp.int32(0), n_local, jnp.int32(0)))
            if c == 0 and fold:
                fold_merge(lo, hi, 0)
            if c == 0:
                # The stores' reads of SMEM, not their writes: the kernel's end orders
                # those for whatever reads out next (as CUTLASS's TMA epilogues do).
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            else:
                @pl.when(n_local > 0)
                def _():  # observe the last completion (GPU interpret mode checks it)
                    plgpu.barrier_wait(merge_free)

        def all_but_consumer_0(_pad=None):
            pl.when(wg == 1)(producer)
            if deq_wg:
                pl.when(wg == 2)(dequantizer)
            if consumers == 2:
                pl.when(wg == 2 + int(deq_wg))(functools.partial(consumer, 1))

        if consumers == 2:
            # Mosaic's cross-warp reductions (a narrow tile's max over keys) take scratch at the
            # SMEM offset in use where they are lowered: the same for two consumers lowered side
            # by side, which raced on it (wrong maxima on the H200). Consumer 1 is lowered inside
            # a scoped pad, so its scratch lies past consumer 0's. The scope's one barrier is
            # at its entry, the kernel's first instruction for every warpgroup.
            pl.run_scoped(all_but_consumer_0,
                          plgpu.SMEM((params.reduction_scratch_bytes,), jnp.int8),
                          collective_axes="wg")
        else:
            all_but_consumer_0()
        pl.when(wg == 0)(functools.partial(consumer, 0))

    narrow_t = common.tiled_smem((d, NARROW_ROWS), dtype)  # O^T, a half
    narrow_eye = common.tiled_smem((ROWS, NARROW_ROWS), dtype)
    scratch = (
        # q_raw: TMA target, row = token * g + head (+ an 8-bit view: FP8 rows' zeros)
        plgpu.RefUnion(plgpu.SMEM((rows_pad, d), dtype),
                       *([plgpu.SMEM((rows_pad, d), out_dtype)] if out_dtype != dtype else [])),
        plgpu.SMEM((ROWS, d), op_dtype, transforms=tiles_transform),  # q_tile (wgmma A)
        # K ring, V ring (+ FP8: dequantised K, V), or those and the fold's merge buffers
        plgpu.RefUnion(rings, merger.buffers() * n_merge) if fold else rings,
        None if config.p_in_registers else  # P staging (interpret-safe path), per consumer
        tuple(plgpu.SMEM((ROWS, bk), op_dtype, transforms=tiles_transform)
              for _ in range(consumers)),
        # o staging, same rows: a split piece's (f32) or an unsplit item's (q's dtype); a
        # tile uses one, and the next one's store waits until its TMA has read it. A
        # narrow tile first stages O^T there, in two halves, for its transposing wgmma.
        # Two consumers: consumer 1's accumulator (a wide tile's [64, d] or a narrow one's O^T
        # [d, n]) passes through it too, between consumer 0's stores.
        plgpu.RefUnion(plgpu.SMEM((rows_pad, d), jnp.float32),
                       plgpu.SMEM((rows_pad, d), out_dtype),
                       (narrow_t, narrow_t) if narrow else (),
                       () if consumers == 1 else (plgpu.SMEM((ROWS, d), jnp.float32),
                                                  plgpu.SMEM((d, NARROW_ROWS), jnp.float32))),
        plgpu.SMEM((ROWS,), jnp.float32),  # lse staging
        plgpu.Barrier(num_arrivals=dq_pad),  # q_full: one TMA per token
        plgpu.Barrier(),  # q_free
        plgpu.Barrier(num_arrivals=k_copies * cpb, num_barriers=stages),  # k_full
        plgpu.Barrier(num_arrivals=v_copies * cpb, num_barriers=stages),  # v_full
        # consumed: the slot's one reader (the dequantising warpgroup or the consumer) is done
        plgpu.Barrier(num_barriers=stages),
        # narrow tiles: P [n, bk] per consumer (its transpose is PV's B), the identity [64, n]
        tuple(plgpu.SMEM((NARROW_ROWS, bk), op_dtype, transforms=tiles_transform)
              for _ in range(consumers)) if narrow else None,
        narrow_eye if narrow else None,
        None if consumers == 1 else (
            plgpu.Barrier(),  # q_ready
            plgpu.Barrier(),  # merge_full
            plgpu.Barrier(),  # merge_free
            plgpu.SMEM((2, ROWS), jnp.float32)),  # consumer 1's m and l
        # fold: each merging warpgroup's barriers; the word that carries a ticket (to the
        # consumer's threads, and to the producer: job ready / read)
        ((merger.barriers(),) * n_merge, plgpu.SMEM((1,), jnp.int32),
         (plgpu.Barrier(), plgpu.Barrier()) if n_merge == 2 else None) if fold else None,
    )
    scales = ()
    if fp8:
        scales = (k_scale, v_scale)
        scratch += (None if fixed_k else  # K scale ring (one per key row)
                    plgpu.SMEM((stages, bk), jnp.float32),
                    None if fixed_v else plgpu.SMEM((stages, bk), jnp.float32))  # V scale ring
        if deq_wg:  # K/V dequantised (full), K/V read by the consumer (free)
            scratch += tuple(plgpu.Barrier(num_barriers=dstages) for _ in range(4))
    if interpret and config.p_in_registers:
        raise ValueError("GPU interpret mode cannot run p_in_registers=True (register A "
                         "operand of wgmma); use DecodeConfig(p_in_registers=False)")
    out_type = (jax.ShapeDtypeStruct((cap, hkv, ROWS), jnp.float32),
                jax.ShapeDtypeStruct((n_part, ROWS, d), jnp.float32),
                jax.ShapeDtypeStruct((n_part, ROWS), jnp.float32),
                *([jax.ShapeDtypeStruct((n_part, ROWS), jnp.float32)] if fold else []))
    lse_tiles, piece_rows, piece_lse, *lse_merged = plgpu.kernel(
        decode_kernel, out_type=out_type, scratch_types=scratch, grid=(num_ctas,),
        grid_names=("cta",), num_threads=2 + int(deq_wg) + consumers - 1, thread_name="wg",
        compiler_params=params, interpret=interpret or None,
    )(meta, cta_start, zero_rows, page_table, q4, k_pages, v_pages, *scales,
      *((k_pages.reshape(-1, hkv, d), v_pages.reshape(-1, hkv, d)) if merge else ()),
      *((cmeta, tickets) if fold else ()), out_ref)
    return lse_tiles, Pieces(piece_rows, piece_lse), (lse_merged[0] if fold else None)


def check_out_scale(out_scale, g: int, d: int) -> None:
    """FP8 rows from the kernels: ``out_scale`` a power of two (the kernels multiply by its
    inverse, exactly), and a token's ``g`` rows of ``d`` one-byte values a whole number of
    128-byte units, where its TMA copies start (not so for D = 64 at an odd group size:
    quantise the bf16 output instead)."""
    if out_scale is None:
        return
    if not (out_scale > 0 and math.frexp(out_scale)[0] == 0.5):
        raise ValueError(f"out_scale={out_scale} must be a power of two")
    if not out_scale_in_kernel(g, d):
        raise ValueError(f"out_scale: a token's {g} x {d} FP8 rows are not a multiple of 128 "
                         f"bytes (the TMA copies' alignment)")


def out_scale_in_kernel(g: int, d: int) -> bool:
    """Whether the kernels can write FP8 rows for this group size and head dim."""
    return (g * d) % 128 == 0


def _gather_lse(lse_tiles, lse_merged, md: DecodeMeta, g: int):
    """lse [T, Hq]: token row (t, h) of an item is row t * g + h of its (merged) tile."""
    src = md.tok_src  # [T, Hkv]
    t, hkv = src.shape
    item, slot = jnp.maximum(src, 0), jnp.maximum(-2 - src, 0)
    q_start = jnp.where(src >= 0, md.q_start[item], md.cmeta[slot, 1])
    row = (jnp.arange(t)[:, None, None] - q_start[..., None]) * g + jnp.arange(g)  # [T, Hkv, G]
    own = lse_tiles[item[..., None], jnp.arange(hkv)[None, :, None], row]
    merged = lse_merged[slot[..., None], row]
    lse = jnp.where((src >= 0)[..., None], own, merged)
    return jnp.where((src != -1)[..., None], lse, -jnp.inf).reshape(t, hkv * g)


def main_kernel(q, k_pages, v_pages, page_table, md: DecodeMeta, *, bounds: Bounds,
                scale: float, causal: bool = True, interpret=False,
                config: DecodeConfig | None = None, k_scale=None, v_scale=None,
                fixed_k_scale=None, fixed_v_scale=None, out_scale=None):
    """The split-KV kernel alone (the benchmark times it): returns a Ref to out
    [T, Hkv, G, D] in q's dtype (FP8 with ``out_scale``) holding the unsplit tiles' rows
    (rows no tile covers 0), their lse tiles [cap, Hkv, 64] (a split item's are not
    written), the split pieces' :class:`Pieces`, and with ``DecodeConfig.fold_combine`` the
    merged lse tiles [n_part, 64] (split parents' rows written too), else None (those rows
    are the combine kernel's to write)."""
    config = config or fit_blocks(default_config(
        bool(interpret), fp8=k_scale is not None,
        fixed_scales=fixed_k_scale is not None and fixed_v_scale is not None), bounds)
    _check(bounds, q.dtype, q.shape[-1], k_pages.shape[1], page_table.shape[1], config.block_kv,
           fp8=k_scale is not None)
    common.check_kv_dtype("decode", q.dtype, k_pages.dtype, k_scale is not None)
    num_ctas = md.cta_start.shape[0] - 1
    if config.num_ctas not in (None, num_ctas):
        raise ValueError(f"DecodeConfig.num_ctas={config.num_ctas}, but the metadata deals "
                         f"tiles to {num_ctas} CTAs (decode_metadata's num_ctas)")
    t, hq, d = q.shape
    g = bounds.group
    check_out_scale(out_scale, g, d)
    # Uninitialised (no memset kernel): the kernel writes every row. In interpret mode NaN,
    # so the tests see a row it missed.
    shape = (t, hq // g, g, d)
    out_dtype = q.dtype if out_scale is None else fp8_lib.DTYPE
    out_ref = jax.new_ref(jnp.full(shape, jnp.nan, out_dtype) if interpret
                          else lax.empty(shape, out_dtype))
    lse_tiles, pieces, lse_merged = _kernel_call(
        md.meta, md.cta_start, md.zero_rows, page_table.astype(jnp.int32),
        q.reshape(shape), k_pages, v_pages, out_ref, md.cmeta, md.tickets,
        cap=md.q_start.shape[0],
        n_part=md.cmeta.shape[0],
        scale=float(scale), causal=causal, config=config, interpret=interpret,
        k_scale=k_scale, v_scale=v_scale, fixed_k_scale=fixed_k_scale,
        fixed_v_scale=fixed_v_scale, out_scale=out_scale)
    return out_ref, lse_tiles, pieces, lse_merged


def decode_attention(q, k_pages, v_pages, page_table, items: WorkList, *, bounds: Bounds,
                     scale: float, causal: bool = True, interpret=False,
                     config: DecodeConfig | None = None, metadata: DecodeMeta | None = None,
                     k_scale=None, v_scale=None, fixed_k_scale=None, fixed_v_scale=None,
                     out_scale=None):
    """Attention of the rows the decode work list covers.

    q [T, Hq, D]; k_pages, v_pages [num_pages, page_size, Hkv, D]; page_table
    [S, pages_per_seq] int32; items: ``plan(...).decode``. Key lengths and
    chunked-local windows come from the items' key ranges (the planner already
    cut chunked-local layers at the chunk start). ``interpret``: False (GPU),
    True or a ``plgpu.InterpretGPUParams`` (GPU interpret mode, e.g. with the
    race detector). An FP8 cache (float8_e4m3fn pages) passes its scales
    ``k_scale``/``v_scale`` [num_pages, Hkv, page_size] f32, and ``fixed_k_scale``
    (``fixed_v_scale``) where every K (V) scale is that power of two (that side's scale rows
    are then not read). Returns out [T, Hq, D] in q's dtype and lse [T, Hq] f32; rows no item
    covers are 0 / -inf. ``out_scale`` (a power of two, :func:`check_out_scale`): out is
    float8_e4m3fn instead, :func:`fp8.quantize_fixed` of the rows under that one scale, as
    the kernels write them (no quantising launch after them).
    """
    t, hq, d = q.shape
    # A model passes the metadata in: it depends only on the step's plan, so every layer
    # of a kind shares one copy (benchmarks/NOTES-decode.md, v3).
    md = metadata if metadata is not None else decode_metadata(
        items, bounds=bounds, num_tokens=t, num_ctas=config.num_ctas if config else None)
    out_ref, lse_tiles, pieces, lse_merged = main_kernel(
        q, k_pages, v_pages, page_table, md, bounds=bounds, scale=scale, causal=causal,
        interpret=interpret, config=config, k_scale=k_scale, v_scale=v_scale,
        fixed_k_scale=fixed_k_scale, fixed_v_scale=fixed_v_scale, out_scale=out_scale)
    if lse_merged is None:  # no fold (DecodeConfig.fold_combine): the combine kernel
        lse_merged = combine_pieces(md.cmeta, md.parents, pieces, out_ref, g=bounds.group,
                                    workers=bounds.num_workers, out_dtype=out_ref.dtype,
                                    interpret=interpret,
                                    config=(config or DecodeConfig()).combine,
                                    out_scale=out_scale)
    return (out_ref[...].reshape(t, hq, d),
            _gather_lse(lse_tiles, lse_merged, md, bounds.group))
