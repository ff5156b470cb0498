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
  for V into a ``num_stages`` ring. The ring runs straight across tile
  boundaries, so the next tile's pages stream in while this tile finishes.
* warpgroup 0 (consumer): copies Q into a swizzled wgmma tile, then per block
  ``S = Q K^T`` (wgmma), mask (only on blocks that reach past ``kv_end`` or the
  causal diagonal), online softmax in base 2, ``O += P V`` (wgmma). The
  epilogue writes an unsplit item's rows straight into ``out`` in q's dtype
  (one TMA per token; ``out`` is a Ref updated in place, so no cast kernel
  follows) and a split piece's normalised f32 rows into its slot of a compact
  partial buffer (:class:`Pieces`); an unsplit tile's lse goes to a small
  lse-tile array, a piece's to its slot beside its rows. With
  ``DecodeConfig.narrow_tiles`` (the FP8 cache's default) a tile of at most 16 rows
  (one token of a GQA group) takes the block's keys as the wgmma M instead:
  ``S^T = K Q^T``, ``O^T += V^T P^T``, a quarter of the tensor-core work. With
  ``DecodeConfig.consumers=2`` a second consumer warpgroup takes every other block (by the
  parity of the global step, so each ring slot keeps one consumer) and hands its partial
  softmax state to consumer 0 at the tile's end.

A second, small kernel merges split pieces by log-sum-exp
(:func:`_combine_call`; a *parent* is an item's key range on one KV head, split by the
planner) and writes their rows into ``out``: a few
CTAs per column block take the step's split parents in turn from
a compact list and stream only the pieces' rows (a decode piece's first 8), so its cost
follows the real number of parents, pieces and tokens, not the static
capacity (an XLA merge over the padded partial buffer pays for the whole
capacity on every call: benchmarks/NOTES-decode.md, v1; a CTA per partial
slot paid ~8 waves of empty CTAs: v6). Unsplit tiles (short contexts, round robin) never
touch it. Per-token lse values are
gathered from the tiles by XLA (``T x Hq`` floats).

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
``kv_end`` are loaded (whole pages) and masked: their P is 0, and 0 * NaN would
poison the output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn import planner
from jaxattn.kernels import common
from jaxattn.planner import DECODE_TILE_ROWS, Bounds, WorkList

ROWS = DECODE_TILE_ROWS  # wgmma M: rows of one (item, KV head) tile
# Query rows of a narrow tile (DecodeConfig.narrow_tiles): a wgmma N for S^T and O^T.
NARROW_ROWS = 16
# Tile metadata columns (one int32 row per tile, read as scalars from GMEM). _PART: the
# partial slot of a split piece, or -1 - item for an unsplit tile (its lse tile's row).
_SEQ, _QSTART, _QLEN, _QPOS, _KVSTART, _KVEND, _PART, _KVH = range(8)
_COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True)


@dataclasses.dataclass(frozen=True)
class CombineConfig:
    """Static tuning of the combine kernel (:func:`_combine_call`).

    cols: head-dim columns per CTA (a parent's rows are split over ``D / cols`` CTAs);
      widened where a token's rows would not start on a 128-byte boundary
      (:func:`combine_columns`).
    warpgroups: warpgroups per CTA; for a parent of ``share_from`` pieces or more,
      warpgroup w takes pieces w, w + W, ... with a softmax state of its own, and
      warpgroup 0 merges the W states at the end: W chains of per-piece latency
      instead of one. Fewer pieces are warpgroup 0's alone.
    approx_math: the fast (approximate) exp, as the main kernel uses.

    A piece comes in one TMA copy: its first 8 rows for a one-token piece (its G rows
    rounded up), else all 64, plus its lse (two arrivals on the slot's barrier). The
    earlier form took one copy per token and a plain arrival for each token it lacked
    (~11 single-thread arrivals per piece at decode); one copy took 5.5 / 4.0 / 2.7 µs
    against 6.4 / 4.4 / 3.0 at 1 x 128k / 2 x 64k / 8 x 32k on the H200
    (benchmarks/results/decode-combine-2026-12-02-s20.md).

    On the H200 (benchmarks/results/decode-combine-2026-12-02-s19.md, the kernel alone)
    the session-18 form (64 columns, one warpgroup, exact exp) took 8.4 µs at 1 x 128k
    (8 parents of 16 pieces), 5.1 at 2 x 64k and 2.7 at 8 x 32k (64 parents of 2);
    two warpgroups 6.7 / 4.4 / 3.1, the fast exp 8.1 / 4.9 / 2.7. Narrower column blocks
    help few parents (16 columns, 4 warpgroups, fast exp: 5.5 at 1 x 128k) and hurt
    many (7.9 at 8 x 32k: a quarter as many workers per column block, each paying a
    parent's fixed latency four times in turn).
    """

    cols: int = 64
    warpgroups: int = 2
    share_from: int = 4
    approx_math: bool = True

    def __post_init__(self):
        if self.cols not in (16, 32, 64, 128):
            raise ValueError(f"CombineConfig.cols={self.cols} must be 16, 32, 64 or 128")
        if self.warpgroups not in (1, 2, 4):
            raise ValueError(f"CombineConfig.warpgroups={self.warpgroups} must be 1, 2 or 4")
        if self.share_from < 2:
            raise ValueError(f"CombineConfig.share_from={self.share_from} must be >= 2")


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


def default_config(interpret=False, fp8=False) -> DecodeConfig:
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
    dequantised ring, and with a 1-deep one took 1.42-1.61x (bf16 tiles)."""
    if fp8:
        return DecodeConfig(num_stages=4, p_in_registers=not interpret,
                            dequant_warpgroup=True, dequant_stages=2, narrow_tiles=True,
                            f16_dequant=True, dequant_vector=4)
    return DecodeConfig(block_kv=128, num_stages=2, p_in_registers=not interpret)


def fit_blocks(config: DecodeConfig, bounds: Bounds) -> DecodeConfig:
    """A default ``config`` with 64-key blocks (4 stages) unless its blocks divide
    ``bounds.block_kv``: split pieces and chunks start at multiples of that, and a block
    that is one copy of a large page's slice must start on its own boundary."""
    if bounds.block_kv % config.block_kv == 0:
        return config
    return dataclasses.replace(config, block_kv=64, num_stages=4)


def split_capacity(bounds: Bounds, cap_items: int) -> int:
    """Static bound on the split pieces (tiles whose parent, an item's key range on one KV
    head, has two or more).

    A parent split into n >= 2 pieces of L keys has work w > L, so n = ceil(w / L) <
    w / L + 1 < 2 w / L; summing over split parents, pieces < 2 * sum(w) / L <= 2 W because
    the planner picks L >= sum(w) / W (W = bounds.split_target): at most 2W - 1 items, a
    tile on each KV head.
    """
    return max(1, min(cap_items, 2 * bounds.split_target - 1) * bounds.num_kv_heads)


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


def _kernel_call(meta, cta_start, zero_rows, page_table, q4, k_pages, v_pages, out_ref, *,
                 cap: int,
                 n_part: int, scale: float, causal: bool, config: DecodeConfig, interpret,
                 k_scale=None, v_scale=None, fixed_k_scale=None, fixed_v_scale=None):
    t, hkv, g, d = q4.shape
    num_ctas = cta_start.shape[0] - 1
    dtype = q4.dtype
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

    def decode_kernel(meta_ref, cta_ref, zero_ref, pt_ref, q_ref, k_ref, v_ref, *rest):
        # inputs (GMEM) [+ k/v scales]; out_ref: [T, Hkv, G, D] in q's dtype, a Ref updated
        # in place (uninitialised: the producers zero the rows no tile covers); outputs
        # lse_ref, opart_ref, lpart_ref (GMEM); scratch [+
        # the FP8 cache's].
        ks_ref, vs_ref, *rest = rest if fp8 else (None, None, *rest)
        (out_ref, lse_ref, opart_ref, lpart_ref, q_raw, q_tile, k_smem, v_smem, p_smem,
         (o_smem, o_out, o_t_smem, merge_acc), lse_smem, q_full, q_free, k_full, v_full,
         consumed, pt_smem, eye, pair, *fp8_scratch) = rest
        # Two consumers: consumer 0 tells consumer 1 that q is staged, and takes its partial
        # state (merge_acc, merge_ml; full/free) at each tile's end.
        q_ready, merge_full, merge_free, merge_ml = pair or (None,) * 4
        if fp8:
            ks_smem, vs_smem, k_deq, v_deq, *deq_barriers = fp8_scratch
        if deq_wg:  # k_deq/v_deq: [dstages, bk, d] rings
            kdeq_full, vdeq_full, kdeq_free, vdeq_free = deq_barriers
        # wgmma_tile's FP8 arguments: (dequantised-ring barrier, dequantised tile(s), scales).
        deq_k = (kdeq_full if deq_wg else None, k_deq, ks_smem) if fp8 else ()
        deq_v = (vdeq_full if deq_wg else None, v_deq, vs_smem) if fp8 else ()
        wg = lax.axis_index("wg")
        cta = lax.axis_index("cta")
        first_tile = cta_ref[cta]
        n_local = cta_ref[cta + 1] - first_tile

        def tile_info(i):
            f = lambda col: meta_ref[first_tile + i, col]
            return f(_KVH), f

        def zero_uncovered_rows():
            """Rows no tile covers (padding, other lists' rows) get zeros, the CTAs taking
            them in turn, from q_raw before its first q lands."""
            n_zero = zero_ref[0]

            @pl.when(cta < n_zero)
            def _():
                q_raw[pl.ds(0, ROWS), :] = plgpu.layout_cast(jnp.zeros((ROWS, d), dtype),
                                                             plgpu.Layout.WGMMA)
                plgpu.commit_smem()

                @pl.loop(cta, n_zero, step=num_ctas)
                def _(k):
                    row = zero_ref[1 + k]

                    @pl.loop(0, hkv)
                    def _(h):
                        plgpu.copy_smem_to_gmem(q_raw.at[pl.ds(0, g)], out_ref.at[row, h])

                plgpu.wait_smem_to_gmem(0)

        def producer():
            zero_uncovered_rows()

            def tile_body(i, step):
                kvh, f = tile_info(i)
                seq, q_start, kv_start, kv_end = f(_SEQ), f(_QSTART), f(_KVSTART), f(_KVEND)

                @pl.when(i > 0)
                def _():
                    plgpu.barrier_wait(q_free)

                # One TMA per token: the item's (token, group head) rows are a 3-D box in
                # q, and Mosaic's layout inference cannot take a reshaped TMA target that
                # is also read into registers. Tokens past the item are loaded too (their
                # rows are ignored); the clamp keeps the last ones inside q.
                @pl.loop(0, dq_pad)
                def _(tok):
                    plgpu.copy_gmem_to_smem(q_ref.at[jnp.minimum(q_start + tok, t - 1), kvh],
                                            q_raw.at[pl.ds(tok * g, g)], q_full)

                last_key = kv_end - 1

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

                    for cp, (key, page) in enumerate(zip(keys, pages)):
                        row = lax.rem(key, page_size) // rpc * rpc if rpc < page_size else 0
                        dst = pl.ds(cp * rpc, rpc)
                        src = pl.ds(row, rpc)
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
                    return step + 1

                n_blocks = jnp.maximum(0, common.cdiv(kv_end - kv_start, bk))
                return lax.fori_loop(0, n_blocks, block_body, step)

            steps = lax.fori_loop(0, n_local, tile_body, jnp.int32(0))

            # Observe every completion of the barriers this warpgroup waits on
            # (GPU interpret mode checks it; the hardware does not care).
            @pl.loop(jnp.maximum(0, steps - stages), steps)
            def _(s):
                plgpu.barrier_wait(consumed.at[lax.rem(s, stages)])

            @pl.when(n_local > 0)
            def _():
                plgpu.barrier_wait(q_free)

        # (full, free, done, fp8 ring, scale ring, dequantised ring) of K, then of V.
        def dequantizer():
            """Warpgroup 2 (``dequant_warpgroup``): walks the same (tile, block) steps as the
            others, dequantising K's then V's fp8 slot ``step % stages`` into their rings'
            slot ``step % dstages``, then frees the fp8 slot."""
            jobs = ((k_full, kdeq_free, kdeq_full, k_smem, ks_smem, k_deq),
                    (v_full, vdeq_free, vdeq_full, v_smem, vs_smem, v_deq))

            def tile_body(i, step):
                _, f = tile_info(i)
                kv_start, kv_end = f(_KVSTART), f(_KVEND)

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

            def tile_body(i, step):
                kvh, f = tile_info(i)
                q_start, q_len, q_pos = f(_QSTART), f(_QLEN), f(_QPOS)
                kv_start, kv_end, part = f(_KVSTART), f(_KVEND), f(_PART)

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
                return step + n_blocks

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

            def write_tile(o, lse, kvh, q_start, q_len, part):
                """o [64, d] (f32, the tile's rows, normalised) and its lse ([64] or [n])
                out: an unsplit item's rows into ``out`` (``part = -1 - item``), a piece's into
                its slot ``part``."""
                # The previous tile's stores must have finished reading o/lse_smem.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                # An unsplit item's rows are final: q's dtype, so no cast kernel follows.
                @pl.when(part < 0)
                def _():
                    o_out[pl.ds(0, ROWS), :] = o.astype(dtype)

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

            lax.fori_loop(0, n_local, tile_body, jnp.int32(0))
            if c == 0:
                plgpu.wait_smem_to_gmem(0)
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
                          plgpu.SMEM((_COMPILER_PARAMS.reduction_scratch_bytes,), jnp.int8),
                          collective_axes="wg")
        else:
            all_but_consumer_0()
        pl.when(wg == 0)(functools.partial(consumer, 0))

    narrow_t = common.tiled_smem((d, NARROW_ROWS), dtype)  # O^T, a half
    narrow_eye = common.tiled_smem((ROWS, NARROW_ROWS), dtype)
    kv_ring = (common.tiled_smem((stages, bk, d), k_pages.dtype) if fp8 else
               plgpu.SMEM((stages, bk, d), dtype, transforms=tiles_transform))
    scratch = (
        plgpu.SMEM((rows_pad, d), dtype),  # q_raw: TMA target, row = token * g + head
        plgpu.SMEM((ROWS, d), op_dtype, transforms=tiles_transform),  # q_tile (wgmma A)
        kv_ring,  # K ring
        kv_ring,  # V ring
        None if config.p_in_registers else  # P staging (interpret-safe path), per consumer
        tuple(plgpu.SMEM((ROWS, bk), op_dtype, transforms=tiles_transform)
              for _ in range(consumers)),
        # o staging, same rows: a split piece's (f32) or an unsplit item's (q's dtype); a
        # tile uses one, and the next one's store waits until its TMA has read it. A
        # narrow tile first stages O^T there, in two halves, for its transposing wgmma.
        # Two consumers: consumer 1's accumulator (a wide tile's [64, d] or a narrow one's O^T
        # [d, n]) passes through it too, between consumer 0's stores.
        plgpu.RefUnion(plgpu.SMEM((rows_pad, d), jnp.float32), plgpu.SMEM((rows_pad, d), dtype),
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
    )
    scales = ()
    if fp8:
        scales = (k_scale, v_scale)
        deq = (dstages,) if deq_wg else ()  # a ring, or one tile the consumer fills
        scratch += (None if fixed_k else  # K scale ring (one per key row)
                    plgpu.SMEM((stages, bk), jnp.float32),
                    None if fixed_v else plgpu.SMEM((stages, bk), jnp.float32),  # V scale ring
                    plgpu.SMEM((*deq, bk, d), op_dtype, transforms=tiles_transform),  # K
                    plgpu.SMEM((*deq, bk, d), op_dtype, transforms=tiles_transform))  # V
        if deq_wg:  # K/V dequantised (full), K/V read by the consumer (free)
            scratch += tuple(plgpu.Barrier(num_barriers=dstages) for _ in range(4))
    if interpret and config.p_in_registers:
        raise ValueError("GPU interpret mode cannot run p_in_registers=True (register A "
                         "operand of wgmma); use DecodeConfig(p_in_registers=False)")
    out_type = (jax.ShapeDtypeStruct((cap, hkv, ROWS), jnp.float32),
                jax.ShapeDtypeStruct((n_part, ROWS, d), jnp.float32),
                jax.ShapeDtypeStruct((n_part, ROWS), jnp.float32))
    lse_tiles, piece_rows, piece_lse = plgpu.kernel(
        decode_kernel, out_type=out_type, scratch_types=scratch, grid=(num_ctas,),
        grid_names=("cta",), num_threads=2 + int(deq_wg) + consumers - 1, thread_name="wg",
        compiler_params=_COMPILER_PARAMS, interpret=interpret or None,
    )(meta, cta_start, zero_rows, page_table, q4, k_pages, v_pages, *scales, out_ref)
    return lse_tiles, Pieces(piece_rows, piece_lse)


def combine_columns(config: CombineConfig, d: int, g: int, out_dtype) -> int:
    """Head-dim columns per combine CTA: ``config.cols``, widened until a token's rows
    (``g * cols`` values) span whole 128-byte units in the output staging buffer (and so in
    the f32 slots), since token ``tok``'s TMA copies start ``tok * g * cols * itemsize``
    bytes in and a TMA's SMEM address must be 128-byte aligned. (32 columns at G = 5 in
    bf16 start token 1 at 320 bytes: a misaligned-address fault on the H200 for
    multi-token pieces.)"""
    cw = min(d, config.cols)
    while cw < d and (g * cw * jnp.dtype(out_dtype).itemsize) % 128:
        cw *= 2
    return cw


def _combine_call(cmeta, parents, pieces: Pieces, out_ref, *, g: int, workers: int,
                  out_dtype, interpret, config: CombineConfig = CombineConfig()):
    """Merge the split pieces of each parent (an item's key range on one KV head) by
    log-sum-exp.

    ``parents`` (int32 [1 + n_part]): the number of split parents, then each
    one's first partial slot. The grid is (w, head-dim column blocks) with
    ``w`` a few workers that take parents ``w, w + W, ...``: with at most
    ``workers`` CTAs in all, a step without split parents costs one wave of
    CTAs that exit at once. Per parent each warpgroup of a CTA streams its share of
    the pieces (a one-token piece's first 8 rows, else all 64) through a ring of SMEM
    slots, keeps a running max / sum / weighted O in registers; warpgroup 0 merges the
    shares and writes the parent's rows into ``out_ref`` (in place, ``out_dtype``). Returns the
    merged lse tiles [n_part, 64] (row of a parent's first slot).
    """
    n_part, _, d = pieces.rows.shape
    cw = combine_columns(config, d, g, out_dtype)
    nwg = config.warpgroups
    one_token_rows = common.cdiv(g, 8) * 8
    # A piece's load is small (1.25 KiB for one token); depth hides the TMA latency when
    # one long sequence has W pieces. `ring` slots per warpgroup (a group of barriers holds
    # at most 32).
    ring = max(2, min(16, 32 // nwg, (160 * 1024) // (ROWS * cw * 4) // nwg))
    # Each parent has two pieces or more, so there are at most n_part // 2.
    n_w = max(1, min(n_part // 2, workers // (d // cw)))
    reduce_layout = plgpu.Layout.WGMMA.reduce(1)

    def decode_combine_kernel(cmeta_ref, parents_ref, opart_ref, lpart_ref, out_ref,
                              lse_out_ref, o_buf, l_buf, o_out, full, shares):
        cols = pl.ds(lax.axis_index("col") * cw, cw)
        wg = lax.axis_index("wg")

        @pl.loop(lax.axis_index("w"), parents_ref[0], step=n_w)
        def _(i):
            merge(parents_ref[1 + i], wg, cols, cmeta_ref, opart_ref, lpart_ref, out_ref,
                  lse_out_ref, o_buf, l_buf, o_out, full, shares)

    def merge(slot0, wg, cols, cmeta_ref, opart_ref, lpart_ref, out_ref, lse_out_ref, o_buf,
              l_buf, o_out, full, shares):
        """One parent: its pieces sit in slots [slot0, slot0 + n); this warpgroup's are
        slot0 + wg + j * nwg. Every barrier gets as many waits as arrivals, so the
        ring's phases carry over to the next parent."""
        n, q_start, q_len, kvh = (cmeta_ref[slot0, i] for i in range(4))
        # A parent of few pieces is warpgroup 0's alone: handing over states costs more.
        shared = n >= config.share_from
        stride = jnp.where(shared, nwg, 1)
        n_mine = jnp.where(shared, jnp.maximum(n - wg + nwg - 1, 0) // nwg,
                           jnp.where(wg == 0, n, 0))

        def issue(j):
            b = wg * ring + lax.rem(j, ring)
            slot = slot0 + wg + j * stride
            # A one-token piece's first rows (its g rows, rounded up to 8), else all 64.
            # Rows past the piece's tokens are whatever the slot holds; rows are
            # independent and those are never written out.
            for rows, when in ((pl.ds(0, one_token_rows), q_len == 1),
                               (pl.ds(0, ROWS), q_len > 1)):
                pl.when(when)(functools.partial(
                    plgpu.copy_gmem_to_smem, opart_ref.at[slot, rows, cols],
                    o_buf.at[b, rows], full.at[b]))
            plgpu.copy_gmem_to_smem(lpart_ref.at[slot], l_buf.at[b], full.at[b])

        @pl.loop(0, jnp.minimum(n_mine, ring))
        def _(j):
            issue(j)

        def step(j, carry):
            b = wg * ring + lax.rem(j, ring)
            plgpu.barrier_wait(full.at[b])
            o = plgpu.load(o_buf.at[b], layout=plgpu.Layout.WGMMA)
            lse = plgpu.load(l_buf.at[b], layout=reduce_layout)

            @pl.when(j + ring < n_mine)
            def _():
                plgpu.commit_smem()  # every thread has read slot b before it is refilled
                issue(j + ring)

            # Rows of tokens past q_len hold stale data; rows are independent and
            # those are never written out.
            return combine(carry, (o, lse))

        state = lax.fori_loop(0, n_mine, step, (
            plgpu.layout_cast(jnp.zeros((ROWS, cw), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), reduce_layout),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), reduce_layout)))
        out = (slot0, q_start, q_len, kvh, cols, out_ref, lse_out_ref, l_buf, o_out)
        if nwg == 1:
            write(*state, *out)
            return
        # Warpgroups 1.. hand their states to warpgroup 0 through SMEM and wait until it
        # has read them (the next parent's states go to the same place).
        o_sh, ms_sh, ready, taken = shares
        pl.when(~shared & (wg == 0))(lambda: write(*state, *out))

        @pl.when(shared & (wg > 0))
        def _():
            acc, m, s = state
            o_sh[wg - 1] = acc
            ms_sh[wg - 1, 0] = m
            ms_sh[wg - 1, 1] = s
            plgpu.barrier_arrive(ready)
            plgpu.barrier_wait(taken)

        @pl.when(shared & (wg == 0))
        def _():
            plgpu.barrier_wait(ready)
            mine = state
            for w in range(nwg - 1):
                # A share is a weighted sum of rows under its own max, its weights' sum s.
                mine = combine(mine, (plgpu.load(o_sh.at[w], layout=plgpu.Layout.WGMMA),
                                      plgpu.load(ms_sh.at[w, 0], layout=reduce_layout),
                                      plgpu.load(ms_sh.at[w, 1], layout=reduce_layout)))
            plgpu.barrier_arrive(taken)
            write(*mine, *out)

    def combine(state, piece):
        """A softmax state (weighted O, max, sum of weights) with a piece added: a
        normalised piece (o, lse) has one weight, a state's share (o, m, s) weights s."""
        (acc, m, s), (o, lse, *w_sum) = state, piece
        m_new = jnp.maximum(m, lse)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha, w = jnp.exp(m - m_use), jnp.exp(lse - m_use)
        acc = (acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
               + lax.broadcast_in_dim(w, acc.shape, [0]) * o)
        return acc, m_new, s * alpha + (w * w_sum[0] if w_sum else w)

    def write(acc, m, s, slot0, q_start, q_len, kvh, cols, out_ref, lse_out_ref, l_buf, o_out):
        seen = s > 0
        s_safe = jnp.where(seen, s, 1.0)
        o_out[...] = (acc / lax.broadcast_in_dim(s_safe, acc.shape, [0])).astype(out_dtype)
        l_buf[0] = jnp.where(seen, m + jnp.log(s_safe), -jnp.inf)
        plgpu.commit_smem()

        @pl.loop(0, q_len)
        def _(tok):
            plgpu.copy_smem_to_gmem(o_out.at[pl.ds(tok * g, g)],
                                    out_ref.at[q_start + tok, kvh, :, cols])

        @pl.when(lax.axis_index("col") == 0)
        def _():
            plgpu.copy_smem_to_gmem(l_buf.at[0], lse_out_ref.at[slot0])

        # The next parent's result and lse go to o_out and slot 0 only after these stores
        # have read them.
        plgpu.wait_smem_to_gmem(0)

    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    shares = None if nwg == 1 else (
        plgpu.SMEM((nwg - 1, ROWS, cw), jnp.float32),  # warpgroups 1..'s weighted O
        plgpu.SMEM((nwg - 1, 2, ROWS), jnp.float32),  # ... and their max and weight sum
        plgpu.Barrier(num_arrivals=nwg - 1),  # ready: their states are in SMEM
        plgpu.Barrier())  # taken: warpgroup 0 has read them
    return plgpu.kernel(
        decode_combine_kernel, out_type=jax.ShapeDtypeStruct((n_part, ROWS), jnp.float32),
        grid=(n_w, d // cw), grid_names=("w", "col"), num_threads=nwg, thread_name="wg",
        scratch_types=(plgpu.SMEM((nwg * ring, ROWS, cw), jnp.float32),
                       plgpu.SMEM((nwg * ring, ROWS), jnp.float32),
                       plgpu.SMEM((ROWS, cw), out_dtype),  # a parent's merged rows
                       plgpu.Barrier(num_arrivals=2, num_barriers=nwg * ring),  # rows + lse
                       shares),
        compiler_params=plgpu.CompilerParams(approx_math=config.approx_math),
        interpret=interpret or None,
    )(cmeta, parents, pieces.rows, pieces.lse, out_ref)


class Pieces(NamedTuple):
    """What the main kernel leaves the combine kernel: each split piece's rows and lse
    tile by partial slot."""

    rows: jax.Array  # f32 [n_part, 64, D]: normalised rows (tokens x group heads)
    lse: jax.Array  # f32 [n_part, 64]


class DecodeMeta(NamedTuple):
    """Kernel metadata derived from the decode work list (once per step, shared by all
    layers of a kind)."""

    meta: jax.Array  # int32 [tiles, 8]: the tiles CTA by CTA (columns _SEQ.._KVH)
    cta_start: jax.Array  # int32 [num_ctas + 1]: CTA c runs tiles [cta_start[c], cta_start[c+1])
    cmeta: jax.Array  # int32 [n_part, 4]: per partial slot (pieces if its parent's first
    #                   slot else 0, q_start, q_len, KV head)
    parents: jax.Array  # int32 [1 + n_part]: number of split parents, then their first slots
    tok_src: jax.Array  # int32 [T, Hkv]: where a token's lse tile is: its item's (>= 0), the
    #                     merged tile of its parent's first slot (-2 - slot), none (-1)
    q_start: jax.Array  # int32 [cap]
    zero_rows: jax.Array  # int32 [1 + T]: how many token rows no tile covers, then those rows


def deal_tiles(blocks, num_ctas: int):
    """Deal (item, KV head) tiles of ``blocks`` [P] KV blocks (0: no tile) to the CTAs,
    whole tiles in turn in list order (p = item * Hkv + KV head, longest items first): the
    live tile of rank r goes to CTA r % num_ctas, as its (r // num_ctas)-th, so the CTA that
    takes tile p runs beside those taking the item's other heads. No sort: the metadata is
    XLA work on every step's path.

    Two other ways were built and measured slower on the H200, then removed (they are in
    commit 3ed61af): a balanced (stream-K) schedule, each CTA an equal span of the tiles laid
    end to end, cut where spans end (2.3-6.8% more GPU time, benchmarks/NOTES-decode.md
    v10), and round robin's full rounds followed by a balanced last round (2.6-6.5% more at
    three of four shapes, v11). Cut tiles are pieces the combine kernel merges one by one,
    ~0.45 µs each (v11).

    Returns the schedule's tiles [P] (tile p, valid) and ``cta_start`` [num_ctas + 1]: CTA c
    runs schedule tiles [cta_start[c], cta_start[c + 1]).
    """
    n_pairs, w = blocks.shape[0], num_ctas
    live = blocks > 0
    n = live.sum(dtype=jnp.int32)
    c = jnp.arange(w + 1, dtype=jnp.int32)
    cta_start = c * (n // w) + jnp.minimum(c, lax.rem(n, w))
    rank = jnp.cumsum(live, dtype=jnp.int32) - 1
    at = cta_start[lax.rem(rank, w)] + rank // w
    pair = jnp.zeros((n_pairs,), jnp.int32).at[jnp.where(live, at, n_pairs)].set(
        jnp.arange(n_pairs, dtype=jnp.int32), mode="drop")
    return pair, jnp.arange(n_pairs) < n, cta_start


def _planned_slots(items: WorkList, hkv: int):
    """int32 [cap, Hkv]: the partial slot of each (item, KV head) of a planner-split item, in
    order (q_start, KV head, split): a parent of n pieces takes n * Hkv slots from its first
    piece's, ``base * Hkv``, KV head h the n from ``base * Hkv + h * n``."""
    cap = items.seq.shape[0]
    valid = jnp.arange(cap) < items.count
    is_split = valid & (items.num_splits > 1)
    qs, k = items.q_start, items.split
    earlier = is_split[None, :] & ((qs[None, :] < qs[:, None])
                                   | ((qs[None, :] == qs[:, None]) & (k[None, :] < k[:, None])))
    base = earlier.sum(axis=1, dtype=jnp.int32) - k  # split items of earlier parents
    h = jnp.arange(hkv, dtype=jnp.int32)[None, :]
    return (base * hkv)[:, None] + h * items.num_splits[:, None] + k[:, None]


def decode_metadata(items: WorkList, *, bounds: Bounds, num_tokens: int,
                    num_ctas: int | None = None) -> DecodeMeta:
    """Kernel metadata from the work list: small XLA work ahead of the kernels.

    The (item, KV head) tiles are dealt to ``num_ctas`` CTAs (default
    ``bounds.num_workers``) by :func:`deal_tiles`. A parent (an item's key range on one KV
    head) is split when the planner split the item; its pieces get slots in the partial
    buffer in order (q_start, KV head, split), so each parent's are contiguous for the
    combine kernel.
    """
    w = num_ctas or bounds.num_workers
    cap, hkv, gran = items.seq.shape[0], bounds.num_kv_heads, bounds.block_kv
    n_part = split_capacity(bounds, cap)
    item_ok = jnp.arange(cap) < items.count
    blocks = jnp.where(item_ok, common.cdiv(items.kv_end - items.kv_start, gran), 0)
    pair, valid, cta_start = deal_tiles(jnp.repeat(blocks, hkv), w)
    item, kvh = pair // hkv, lax.rem(pair, hkv)
    kv_start, kv_end, q_start = items.kv_start[item], items.kv_end[item], items.q_start[item]
    is_split = valid & (items.num_splits[item] > 1)
    size = is_split.shape[0]
    tiles = jnp.arange(size, dtype=jnp.int32)
    planned = _planned_slots(items, hkv)  # [cap, Hkv]
    slot = planned[item, kvh]
    # slot < n_part always holds (split_capacity); the guard only keeps a broken
    # plan from writing out of bounds.
    is_split &= slot < n_part
    part = jnp.where(is_split, slot, -1 - item)
    meta = jnp.stack([items.seq[item], q_start, items.q_len[item], items.q_pos[item], kv_start,
                      kv_end, part, kvh], axis=1)
    meta = jnp.where(valid[:, None], meta, 0).astype(jnp.int32)
    # The partial slots: a parent's first slot holds its piece count.
    o = jnp.zeros((n_part,), jnp.int32).at[jnp.where(is_split, slot, n_part)].set(
        tiles, mode="drop")  # the tile in each slot
    split_o = jnp.arange(n_part) < is_split.sum()  # split tiles fill the first slots
    key_o = (q_start[o], kvh[o])
    first = split_o & jnp.concatenate([jnp.ones((1,), bool), (key_o[0][1:] != key_o[0][:-1])
                                       | (key_o[1][1:] != key_o[1][:-1])])
    group = jnp.cumsum(first, dtype=jnp.int32) - 1
    sizes = jnp.zeros((n_part,), jnp.int32).at[jnp.where(split_o, group, n_part)].add(
        1, mode="drop")
    cmeta = jnp.stack([jnp.where(first, sizes[jnp.maximum(group, 0)], 0), q_start[o],
                       items.q_len[item[o]], kvh[o]], axis=1).astype(jnp.int32)
    # Each (item, KV head)'s lse: its tile's, or the merged tile at its parent's first slot
    # (that of the piece with split 0, the item whose tokens are kept below).
    pair_src = jnp.where((items.num_splits > 1)[:, None],
                         -2 - planned,
                         jnp.arange(cap, dtype=jnp.int32)[:, None])
    dq, t = bounds.dq, num_tokens
    tok = items.q_start[:, None] + jnp.arange(dq)[None, :]
    keep = (item_ok[:, None] & (items.split[:, None] == 0)
            & (jnp.arange(dq)[None, :] < items.q_len[:, None]))
    tok_src = jnp.full((t, hkv), -1, jnp.int32).at[jnp.where(keep, tok, t)].set(
        jnp.broadcast_to(pair_src[:, None, :], (cap, dq, hkv)), mode="drop")
    uncovered = tok_src[:, 0] == -1
    zero_rows = jnp.concatenate([uncovered.sum(dtype=jnp.int32).reshape(1),
                                 jnp.nonzero(uncovered, size=t, fill_value=0)[0]])
    return DecodeMeta(meta, cta_start, cmeta, _parents(cmeta), tok_src,
                      items.q_start.astype(jnp.int32), zero_rows.astype(jnp.int32))


def _parents(cmeta):
    """int32 [1 + n_part]: how many slots hold a parent's first piece, then those slots."""
    n_part = cmeta.shape[0]
    first = cmeta[:, 0] > 0
    at = jnp.where(first, jnp.cumsum(first, dtype=jnp.int32), n_part + 1)
    return (jnp.zeros((n_part + 1,), jnp.int32)
            .at[at].set(jnp.arange(n_part, dtype=jnp.int32), mode="drop")
            .at[0].set(first.sum(dtype=jnp.int32)))


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
                fixed_k_scale=None, fixed_v_scale=None):
    """The split-KV kernel alone (the benchmark times it): returns a Ref to out
    [T, Hkv, G, D] in q's dtype holding the unsplit tiles' rows (rows no tile covers 0, split
    parents' rows not yet written), their lse tiles [cap, Hkv, 64] (a split item's are not
    written) and the split pieces' :class:`Pieces`."""
    config = config or fit_blocks(default_config(bool(interpret), fp8=k_scale is not None),
                                  bounds)
    _check(bounds, q.dtype, q.shape[-1], k_pages.shape[1], page_table.shape[1], config.block_kv,
           fp8=k_scale is not None)
    common.check_kv_dtype("decode", q.dtype, k_pages.dtype, k_scale is not None)
    num_ctas = md.cta_start.shape[0] - 1
    if config.num_ctas not in (None, num_ctas):
        raise ValueError(f"DecodeConfig.num_ctas={config.num_ctas}, but the metadata deals "
                         f"tiles to {num_ctas} CTAs (decode_metadata's num_ctas)")
    t, hq, d = q.shape
    g = bounds.group
    # Uninitialised (no memset kernel): the kernel writes every row. In interpret mode NaN,
    # so the tests see a row it missed.
    shape = (t, hq // g, g, d)
    out_ref = jax.new_ref(jnp.full(shape, jnp.nan, q.dtype) if interpret
                          else lax.empty(shape, q.dtype))
    lse_tiles, pieces = _kernel_call(
        md.meta, md.cta_start, md.zero_rows, page_table.astype(jnp.int32),
        q.reshape(shape), k_pages, v_pages, out_ref, cap=md.q_start.shape[0],
        n_part=md.cmeta.shape[0],
        scale=float(scale), causal=causal, config=config, interpret=interpret,
        k_scale=k_scale, v_scale=v_scale, fixed_k_scale=fixed_k_scale,
        fixed_v_scale=fixed_v_scale)
    return out_ref, lse_tiles, pieces


def decode_attention(q, k_pages, v_pages, page_table, items: WorkList, *, bounds: Bounds,
                     scale: float, causal: bool = True, interpret=False,
                     config: DecodeConfig | None = None, metadata: DecodeMeta | None = None,
                     k_scale=None, v_scale=None, fixed_k_scale=None, fixed_v_scale=None):
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
    covers are 0 / -inf.
    """
    t, hq, d = q.shape
    # A model passes the metadata in: it depends only on the step's plan, so every layer
    # of a kind shares one copy (benchmarks/NOTES-decode.md, v3).
    md = metadata if metadata is not None else decode_metadata(
        items, bounds=bounds, num_tokens=t, num_ctas=config.num_ctas if config else None)
    out_ref, lse_tiles, pieces = main_kernel(q, k_pages, v_pages, page_table, md,
                                             bounds=bounds, scale=scale, causal=causal,
                                             interpret=interpret, config=config,
                                             k_scale=k_scale, v_scale=v_scale,
                                             fixed_k_scale=fixed_k_scale,
                                             fixed_v_scale=fixed_v_scale)
    lse_merged = _combine_call(md.cmeta, md.parents, pieces, out_ref, g=bounds.group,
                               workers=bounds.num_workers, out_dtype=q.dtype,
                               interpret=interpret, config=(config or DecodeConfig()).combine)
    return (out_ref[...].reshape(t, hq, d),
            _gather_lse(lse_tiles, lse_merged, md, bounds.group))
