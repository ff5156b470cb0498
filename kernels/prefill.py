"""FA3-style Pallas Mosaic GPU kernel for the prefill work list (Hopper).

One persistent CTA per SM walks the (item, query head) tiles of the planner's
prefill :class:`~jaxattn.planner.WorkList`. A CTA has three warpgroups:

* warpgroup 2 (producer) issues TMA copies: the tile's Q rows, then the K and
  V tiles of the item's key range through the page table (one copy per page,
  or one per tile when its pages are consecutive) into a ``num_stages`` ring
  in SMEM. It runs ahead across tiles. (FP8 cache: it also dequantises the V
  tiles, below.)
* warpgroups 0 and 1 (consumers) own 64 query rows each. Per KV tile:
  ``S = Q K^T`` (wgmma, f32), per-row masking only on tiles that cross the
  item's key bound or the causal diagonal, online softmax in base 2 with
  ``scale * log2(e)`` folded into one FMA, ``P`` cast to the input dtype,
  ``O += P V`` (wgmma). The two consumers take turns issuing GEMMs (FA3
  ping-pong): a turn is handed over with a hardware named barrier
  (``bar.arrive`` to the other warpgroup, ``bar.sync`` to wait for one's own
  turn), so one warpgroup's GEMMs run while the other does its softmax.
  Within a warpgroup the FA3 intra-warpgroup overlap is on by default: a
  turn issues QK(j) and PV(j-1) together, and softmax(j) runs while PV(j-1)
  is still on the tensor cores (P stays in registers between blocks).

For large batches tiles are numbered KV head first, then item, then the KV
group's query heads (``PrefillConfig.tile_order``): the tiles in flight (one
per SM) all read one KV head's K/V, the group's query heads run side by side
on neighbouring SMs and read each K/V tile at about the same moment, so K/V
comes from L2 rather than HBM (at 128k tokens one KV head's K/V is 64 MiB;
every head's is 512 MiB). Small batches number item first (all heads of an
item together), which keeps each wave's tiles equally long. Items come
longest first (the planner sorts them) and are dealt to CTAs in a snake
order, so every CTA gets a similar mix of long and short tiles.

FP8 cache (float8_e4m3fn pages with per-token, per-KV-head scales,
:mod:`jaxattn.kv_quant`): the rings hold the fp8 pages and their scale rows
(one more small TMA per page, on the same barrier). By default
(``PrefillConfig.fp8_qk``) ``S = Q8 K8^T`` is an e4m3 wgmma on the fp8 K tile, as in
FlashAttention-3's FP8 path: each consumer quantises its Q rows per row, and the Q and
K scales multiply S's rows and columns. V is dequantised (:func:`common.dequantize_tile`,
the scale applied per key row) once, by the producer warpgroup, into a 2-deep ring of
bf16 tiles both consumers read (``PrefillConfig.producer_dequant``); the producer does
it one block behind its copies, so they stay ahead. (Without it each consumer dequantises
a copy of its own before its turn.) ``fp8_qk=False`` dequantises K in the consumers,
which costs SMEM: only 64-key tiles fit at head_dim 128 (:func:`pick_config`). Where a
layer's K (V) rows all share one power-of-two scale (Llama 4's: :mod:`jaxattn.kv_quant`),
that side's scale rows are neither copied nor applied per key: the softmax scale (the
epilogue's ``1 / l``) takes it. With a bf16 cache none of it is traced (a static branch).

Output rows are written only for the item's valid rows: the epilogue stages
O in an untiled SMEM buffer and stores it with predicated TMA copies of
64/32/16/8/4/2/1 rows (a ladder of static box shapes covers any count), so a
tile never clobbers rows of another sequence. The log-sum-exp goes to a
tile-major array (one full 64-float store per warpgroup), scattered to rows
by XLA afterwards. Rows no item covers are zeroed by the kernel from a list
of row ranges (the padding tail of a bucketed batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import llvm

from jaxattn.kernels import common
from jaxattn.planner import Bounds, WorkList

WG_ROWS = 64  # query rows of one consumer warpgroup: the wgmma M dimension
COMPUTE_WGS = 2
TILE_ORDERS = ("auto", "kv_major", "item_major")
# "auto" numbers tiles kv_major once one KV head's tiles fill this many waves of CTAs;
# below that a kv_major wave mixes the longest and shortest items (load imbalance) while
# all K/V in flight fits L2 anyway, so item_major is faster (benchmarks/NOTES-prefill.md).
# On the H200 kv_major took 10% less time at 11720 and 12287 causal tokens (3.5 and 3.6
# waves) and item_major 3-8% less at 8191, 8487 and 10001 (2.4-3.0 waves), each length's
# orders in turn 3 times in one run (results/prefill-2026-12-02-s19-orders.md, session 19).
_KV_MAJOR_MIN_WAVES = 3.25
# Named (hardware) barriers of the consumers' turn: consumer w waits on TURN_BARRIER + w.
# Mosaic GPU itself uses barrier 0 (CTA-wide) and 1..num_warpgroups (per warpgroup).
TURN_BARRIER = 8
# Dequantised V tiles in flight with ``PrefillConfig.producer_dequant`` (the SMEM of the two
# private tiles the consumers dequantise into otherwise).
DEQ_STAGES = 2
# PrefillConfig.fp8_pv: P in [0, 1] goes to e4m3 times this, so entries down to 2^-14 stay
# above e4m3's subnormals (2^-6) and the largest, 256, below its 448.
P8_GAIN = 256.0
# Registers per thread a CTA of 3 warpgroups launches with (65536 / 384, rounded down to 8).
_LAUNCH_REGISTERS = 65536 // (128 * (COMPUTE_WGS + 1)) // 8 * 8


def _tiled(shape, dtype):
    """SMEM operand tile for wgmma/TMA: (8, 128B) tiles, 128-byte swizzle."""
    elems = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                plgpu.SwizzleTransform(128)))


class Forms(NamedTuple):
    """The kernel forms a config takes over one cache (all False for a bf16 cache): what
    the scratch and the kernel body branch on, derived in one place."""

    fp8: bool  # FP8 cache: scale rings, extra copies, dequantisation
    qk8: bool  # S = Q8 K8^T on the fp8 K tile; only V dequantised
    shared_v: bool  # V dequantised once, by the producer, into a ring both consumers read
    f16_pv: bool  # V's tiles and P as f16 for the PV wgmma (else q's dtype)
    pv8: bool  # P.V as an e4m3 wgmma on V^T pages (no V conversion at all)


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Static tuning of the prefill kernel.

    block_q: query rows per tile (= Bounds.block_q): 64 per consumer warpgroup,
      so 128 keeps both busy; 64 is accepted (warpgroup 1 then idles).
    block_kv: keys per KV tile (= Bounds.block_kv).
    num_stages: depth of the K/V SMEM ring.
    p_in_registers: feed P to the PV wgmma from registers (fast, GPU only);
      False stages P through SMEM, which GPU interpret mode can execute.
    tile_order: how (item, query head) tiles are numbered, i.e. which tiles run
      at the same time on the SMs and so share K/V through L2:
      "kv_major": KV head outermost, then items (longest first), then the
      group's query heads -- the tiles in flight all read one KV head, and
      a group's heads read the same K/V tile at about the same moment;
      "item_major": item, then all query heads;
      "auto" (default): kv_major when one KV head's tiles fill at least
      ``_KV_MAJOR_MIN_WAVES`` waves of CTAs, else item_major (decided in the
      kernel from the item count).
    overlap: FA3 intra-warpgroup overlap: each turn issues QK(j) and PV(j-1)
      back to back, and softmax(j) runs while PV(j-1) is on the tensor cores
      (needs p_in_registers; GPU only). Bit-identical output to the plain loop.
    named_barriers: hand the turn between the consumers with hardware named
      barriers (bar.sync / bar.arrive); False uses an mbarrier per consumer,
      the same protocol in a form GPU interpret mode can execute.
    consumer_registers: per-thread registers of a consumer warpgroup
      (setmaxnreg); the producer gets what is left of the launch allotment.
      The default is the measured best (benchmarks/NOTES-prefill.md, v3).
    fp8_qk: FP8 cache: ``S = Q K^T`` as an e4m3 x e4m3 wgmma straight from the fp8 K
      tile (each consumer quantises its Q rows per row once per tile; the Q row scale
      and the K per-key scale multiply S), as FlashAttention-3's FP8 path does; only V is
      dequantised, and 128-key tiles fit shared memory (True, the default). False:
      K and V are both dequantised to bf16 tiles and Q stays bf16 (the bf16 kernel's
      numbers over the dequantised pages), at 64-key tiles, 2.1-2.2x bf16's time.
    producer_dequant: FP8 cache: the producer warpgroup dequantises each V tile once, into
      a ring of ``DEQ_STAGES`` bf16 tiles both consumers read, one block behind its TMA
      copies (False: each consumer dequantises a copy of its own before its turn, twice the
      conversions, on the consumers' path). Same numbers either way. The conversion needs
      registers the producer does not have at ``consumer_registers=232``:
      :func:`pick_config` gives it with 224 (on the H200 224/56 beat 216/72 by 3-6% and
      232/40 by 12-14%; with it the FP8 cache's prefill takes 1.04-1.24x bf16's time
      instead of 1.30-1.55x, benchmarks/NOTES-fp8-kv.md, session 25). Writing V as f16
      in a unit per tile with P as f16 (fewer conversion instructions, 20% lower mean
      error) took 8-12% more time on the H200 (1.14-1.34x bf16's against 1.06-1.24x), so
      it was removed (results/fp8-kv-2026-12-03-s27-prefill.md).
    dequant_vector: FP8 cache: values per thread vector when a tile is dequantised (2, 4 or
      8: :data:`common.DEQUANT_LAYOUTS`), the width of its fp8 loads and bf16 stores in
      shared memory (2: the wgmma layout). Same numbers either way. :func:`pick_config`
      takes 8 (8-byte loads): on the H200 1.165 / 1.076 / 1.023x bf16's time at causal 8k /
      causal 32k / chunked 128k against 1.224 / 1.098 / 1.037x for 2 and 1.205 / 1.113 /
      1.047x for 4 (same run, results/fp8-kv-2026-12-04-s29.md; session 29's first run:
      1.180 / 1.090 for 8 against 1.237 / 1.103 for 2). Those were shuffled pages; over
      pages in order with merged copies 4 values ran 3-4 points ahead of 8 at causal 8k-32k
      in two runs (results/fp8-kv-2026-12-04-s32-*.md). A per-tile choice (4 for merged
      tiles, 8 for the rest) ran at 8's time, not 4's (session 33, NOTES-fp8-kv): the gain
      is not in the merged tiles' dequantisation. 8 stays, as a serving pool's pages
      scatter as it churns.
    merge_pages: pages smaller than a KV tile: when the tile's pages lie one after another
      in the pool (what the engine's allocator hands a prompt), fill it with one TMA copy
      instead of one per page; :func:`tile_first_pages` gives the producer one read per
      tile to decide. Same numbers either way. On the H200 (results/prefill-2026-12-04-
      s31-first-pages.md, time / the contiguous API at chunked 128k, causal 8k, causal
      32k) 16-token pages in order took 0.999 / 1.039 / 1.008 merged against 1.036 /
      1.115 / 1.073 page by page, level with 128-token pages (1.005 / 1.032 / 1.002).
      Scattered pages are copied page by page as before: shuffled 32-token pages took
      1.063 / 1.094 / 1.070 there, 1.068 / 1.098 / 1.059 before the merge
      (prefill-2026-12-04-s31-paging.md; a third run gave 1.021 / 1.073 / 1.049).
      A step finds the runs once per attention kind (``kernels.prepare(page_table=)``).
    f16_pv: FP8 cache: V's tiles dequantised to f16 and P cast to f16 for the PV wgmma
      (P <= 1: f16's range suffices and its significand is finer than bf16's). With a fixed
      V scale the conversion is one ``cvt.rn.f16x2.e4m3x2`` per pair of values (bf16 tiles
      go e4m3 -> f16 -> f32 -> bf16). Session 28 timed f16 tiles with per-row V scales (a
      multiply per pair) at 1.03-1.08x the bf16 tiles' time, for reasons not found; this
      form is here to time it without the multiply. Not the default.
    fp8_pv: FP8 cache, an experiment (not reachable from the engine): ``O += P V`` as an
      e4m3 x e4m3 wgmma, with V passed transposed, ``[P, Hkv, D, page_size]`` pages of at
      least a KV tile (8-bit wgmma operands must be K-major: keys contiguous), under one V
      scale (``fixed_v_scale``). P is quantised to e4m3 at 256x (so its small entries stay
      above e4m3's subnormals; the epilogue divides it out) and staged through SMEM (Mosaic
      has no relayout of a register tile into the 8-bit operand layout). No V conversion
      at all, so the producer only copies. Needs ``fp8_qk``. See benchmarks/NOTES-fp8-kv.md,
      session 35.
    """

    block_q: int = 128
    block_kv: int = 128
    num_stages: int = 2
    p_in_registers: bool = True
    tile_order: str = "auto"
    overlap: bool = True
    named_barriers: bool = True
    consumer_registers: int = 232
    fp8_qk: bool = True
    producer_dequant: bool = False
    dequant_vector: int = 2
    merge_pages: bool = True
    f16_pv: bool = False
    fp8_pv: bool = False

    def __post_init__(self):
        if self.block_q not in (WG_ROWS, COMPUTE_WGS * WG_ROWS):
            raise ValueError(f"block_q={self.block_q} must be {WG_ROWS} or {COMPUTE_WGS * WG_ROWS}")
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"block_kv={self.block_kv} must be a multiple of 64 in [64, 256]")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")
        if self.overlap and not self.p_in_registers:
            raise ValueError("overlap=True needs p_in_registers=True")
        if self.consumer_registers % 8 or not _LAUNCH_REGISTERS <= self.consumer_registers <= 240:
            raise ValueError(f"consumer_registers={self.consumer_registers} must be a multiple "
                             f"of 8 in [{_LAUNCH_REGISTERS}, 240]")
        if self.dequant_vector not in common.DEQUANT_LAYOUTS:
            raise ValueError(f"dequant_vector={self.dequant_vector} must be one of "
                             f"{tuple(common.DEQUANT_LAYOUTS)}")
        if self.tile_order not in TILE_ORDERS:
            raise ValueError(f"tile_order={self.tile_order!r} is not one of {TILE_ORDERS}")
        if self.fp8_pv and not self.fp8_qk:
            raise ValueError("fp8_pv=True needs fp8_qk=True")

    def forms(self, kv_dtype=None) -> Forms:
        """The forms this config takes over a cache of ``kv_dtype`` (None: the queries')."""
        fp8 = kv_dtype is not None and jnp.dtype(kv_dtype) == common.FP8_KV
        pv8 = fp8 and self.fp8_pv
        return Forms(fp8=fp8, qk8=fp8 and self.fp8_qk,
                     shared_v=fp8 and self.producer_dequant and not pv8,
                     f16_pv=fp8 and self.f16_pv and not pv8, pv8=pv8)

    @property
    def producer_registers(self) -> int:
        # The CTA launches with _LAUNCH_REGISTERS per thread; setmaxnreg.inc blocks until the
        # producer's setmaxnreg.dec has returned enough, so the three must sum to the launch
        # allotment (more would hang the kernel).
        return (COMPUTE_WGS + 1) * _LAUNCH_REGISTERS - COMPUTE_WGS * self.consumer_registers

    def scratch(self, head_dim: int, dtype, pages_per_tile: int, kv_dtype=None,
                scale_rows: tuple[bool, bool] = (True, True)) -> list:
        """The kernel's scratch, in the order of its scratch arguments.

        ``pages_per_tile``: TMA copies that fill one K or V stage (the arrival
        count of its full barrier; no size depends on it). ``kv_dtype``: the
        cache's, when it is not ``dtype`` (FP8: the rings hold fp8, each page
        brings a scale row too, and the dequantised tiles follow the list;
        ``scale_rows`` (K's, V's) False: that side's pages do not, its scale being fixed,
        and it has no scale ring).
        """
        wg_tile = (COMPUTE_WGS, WG_ROWS, head_dim)
        ring = (self.num_stages, self.block_kv, head_dim)
        fp8, qk8, shared_v, f16_pv, pv8 = self.forms(kv_dtype)
        pv_dtype = jnp.float16 if f16_pv else dtype  # the PV wgmma's operands
        kv_ring = common.tiled_smem(ring, kv_dtype) if fp8 else _tiled(ring, dtype)
        # fp8_pv: V^T tiles [D, keys], keys contiguous (the 8-bit wgmma's K-major B)
        v_ring = (common.tiled_smem((self.num_stages, head_dim, self.block_kv), kv_dtype)
                  if pv8 else kv_ring)
        copies = 2 if fp8 else 1  # TMA copies per page: values (+ their scales)
        deq_tile = _tiled((COMPUTE_WGS, self.block_kv, head_dim), dtype)  # one per consumer
        scale_ring = plgpu.SMEM((self.num_stages, self.block_kv), jnp.float32)
        k_rows, v_rows = scale_rows
        extra = [] if not fp8 else [
            scale_ring if k_rows else None,  # k scale ring
            scale_ring if v_rows else None,  # v scale ring
            None if qk8 else deq_tile,  # k dequantised (the fp8 QK reads the fp8 tile)
            # v dequantised: one tile per consumer, or the producer's ring both read (none
            # for the e4m3 PV, which reads the fp8 tile)
            None if pv8 else
            _tiled((DEQ_STAGES, self.block_kv, head_dim), pv_dtype) if shared_v else
            _tiled((COMPUTE_WGS, self.block_kv, head_dim), pv_dtype),
            # the producer's ring: filled, and read by both consumers' PV
            plgpu.Barrier(num_barriers=DEQ_STAGES) if shared_v else None,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=DEQ_STAGES)
            if shared_v else None,
        ]
        return [
            plgpu.SMEM(wg_tile, dtype),  # q as loaded (untiled)
            # q for the wgmma (fp8 QK: e4m3, quantised per row by its consumer)
            common.tiled_smem(wg_tile, kv_dtype) if qk8 else _tiled(wg_tile, dtype),
            kv_ring,  # k ring
            v_ring,  # v ring
            plgpu.SMEM(wg_tile, dtype),  # o staging (untiled: any row offset)
            plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32),  # lse staging
            # P for the PV wgmma, only when it does not stay in registers (an e4m3 P never
            # does).
            common.tiled_smem((COMPUTE_WGS, WG_ROWS, self.block_kv), kv_dtype) if pv8 else
            None if self.p_in_registers else _tiled((COMPUTE_WGS, WG_ROWS, self.block_kv),
                                                    pv_dtype),
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # q_full
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # q_free
            plgpu.Barrier(num_arrivals=(copies if k_rows else 1) * pages_per_tile,
                          num_barriers=self.num_stages),  # k_full
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=self.num_stages),  # k_free
            plgpu.Barrier(num_arrivals=(copies if v_rows else 1) * pages_per_tile,
                          num_barriers=self.num_stages),  # v_full
            # v_free: the consumers' PV, or the producer's dequantisation, has read the slot
            plgpu.Barrier(num_arrivals=1 if shared_v else COMPUTE_WGS,
                          num_barriers=self.num_stages),
            # The turn handover on mbarriers, one per consumer (named barriers need none).
            None if self.named_barriers else plgpu.Barrier(num_barriers=COMPUTE_WGS),
            *extra,
        ]

    def smem_bytes(self, head_dim: int, dtype, kv_dtype=None,
                   scale_rows: tuple[bool, bool] = (True, True)) -> int:
        """Shared memory the kernel allocates (what Mosaic's budget check counts); with
        ``scale_rows`` (:meth:`scratch`'s) left at its default, the most it allocates."""
        return common.smem_bytes(self.scratch(head_dim, dtype, pages_per_tile=1,
                                              kv_dtype=kv_dtype, scale_rows=scale_rows))


def pick_config(bounds: Bounds, dtype, kv_dtype=None, fp8_qk: bool = True,
                producer_dequant: bool = True, dequant_vector: int = 8,
                merge_pages: bool = True, f16_pv: bool = False,
                fp8_pv: bool = False) -> PrefillConfig:
    """The GPU config for an engine's bounds; raises ValueError if they cannot be served.

    The planner cuts items of ``bounds.block_q`` rows and KV ranges aligned to
    ``bounds.block_kv``, so the kernel's tile must equal them; the ring is as
    deep as shared memory allows (at most 4 stages). Interpret mode runs the
    same config with P staged through SMEM (it has no SMEM budget). ``kv_dtype``:
    the cache's when not ``dtype`` (FP8); ``fp8_qk``, ``producer_dequant``,
    ``dequant_vector``, ``merge_pages``, ``f16_pv``, ``fp8_pv``: :class:`PrefillConfig`'s
    (producer_dequant with the producer's registers it needs; none of V's dequantisation
    with ``fp8_pv``, whose SMEM may take a deeper ring).
    """
    common.check_supported("prefill", bounds.head_dim, dtype)
    common.check_kv_dtype("prefill", dtype, kv_dtype)
    fp8 = kv_dtype is not None and jnp.dtype(kv_dtype) == common.FP8_KV
    common.check_pages("prefill", bounds.page_size, bounds.block_kv, bounds.pages_per_seq,
                       fp8=fp8)
    shared_v = fp8 and producer_dequant and not fp8_pv
    best = None
    for stages in (2, 3, 4):
        cfg = PrefillConfig(block_q=bounds.block_q, block_kv=bounds.block_kv, num_stages=stages,
                            fp8_qk=fp8_qk, producer_dequant=shared_v,
                            dequant_vector=dequant_vector, merge_pages=merge_pages,
                            f16_pv=f16_pv, fp8_pv=fp8 and fp8_pv,
                            consumer_registers=224 if shared_v else 232)
        if cfg.smem_bytes(bounds.head_dim, dtype, kv_dtype) <= common.MAX_SMEM:
            best = cfg
    if best is None:
        raise ValueError(f"no prefill config fits shared memory for block_kv={bounds.block_kv}, "
                         f"head_dim={bounds.head_dim}, KV cache {jnp.dtype(kv_dtype or dtype)}")
    return best


def _named_barrier(op: str, barrier_id, num_threads: int):
    """``bar.sync`` / ``bar.arrive`` on a hardware named barrier (id: int32 scalar)."""

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
    def bar(_, bid):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [bid.registers[()]],
                        f"bar.{op} $0, {num_threads};", "r", has_side_effects=True)

    bar(barrier_id)


def _store_rows(src, dst, n, max_rows):
    """TMA-store the first ``n`` rows of ``src`` (untiled SMEM) to GMEM rows via ``dst(off, size)``.

    TMA box shapes are static, so ``n`` (dynamic, <= max_rows) is written as
    a sum of powers of two, each piece one conditional copy.
    """
    off = 0
    size = max_rows
    while size >= 1:
        @pl.when((n & size) != 0)
        def _(off=off, size=size):
            plgpu.copy_smem_to_gmem(src.at[pl.ds(off, size)], dst(off, size), commit_group=False)

        off = off + (n & size)
        size //= 2
    plgpu.commit_smem_to_gmem_group()


# Rows of the packed item metadata array the kernel reads.
_META = ("q_start", "q_len", "q_pos", "kv_start", "kv_end", "seq")


def tile_schedule(count, cta, *, hq: int, group: int, num_workers: int,
                  tile_order: str = "auto"):
    """Which (item, query head) tiles persistent CTA ``cta`` runs, in order.

    Returns ``(n, tile_of, item_head)``: the CTA runs ``n`` tiles, its i-th is
    ``tile_of(i)``, and ``item_head(tile)`` is that tile's (item, query head). Tiles are
    numbered item_major (``item * hq + head``) or kv_major (``kv_head * count * group +
    item * group + head in group``), items longest first (the planner's order); see
    :class:`PrefillConfig`. Each order is dealt out as a snake: round r takes W tiles,
    odd rounds reversed, so a CTA that got a long tile in one round gets a short one next.

    kv_major deals each KV head's ``count * group`` tiles as a snake of its own, mirrored
    (CTA c as W-1-c) on odd heads. One snake across all heads would hand each head's partial
    last round, and then the next head's longest tiles, to the same CTAs: for 20000
    causal tokens (Scout heads, 132 SMs) the busiest CTA then had 23% more work than the
    mean (0.917x cuDNN measured there); per head and mirrored, 0.1%, and at most 1.2%
    over 14k-128k (tests/kernels/test_prefill.py simulates it).
    """
    w = num_workers
    hkv = hq // group

    def snake(num, c):
        rounds, rem = num // w, num % w
        last = jnp.where(rounds % 2 == 0, c, w - 1 - c)
        return (rounds + (last < rem).astype(jnp.int32),
                lambda i: i * w + jnp.where(i % 2 == 0, c, w - 1 - c))

    item_n, item_tile = snake(count * hq, cta)
    per_head = count * group
    even_n, even_tile = snake(per_head, cta)
    odd_n, odd_tile = snake(per_head, w - 1 - cta)
    pair_n = jnp.maximum(even_n + odd_n, 1)
    kv_n = (hkv // 2) * (even_n + odd_n) + (hkv % 2) * even_n

    def kv_tile(i):
        pair, j = i // pair_n, i % pair_n
        odd = j >= even_n
        rr = jnp.where(odd, j - even_n, j)
        return ((2 * pair + odd.astype(jnp.int32)) * per_head
                + jnp.where(odd, odd_tile(rr), even_tile(rr)))

    def kv_item_head(tile):
        kv_head, rest = tile // per_head, tile % per_head
        return rest // group, kv_head * group + rest % group

    def item_item_head(tile):
        return tile // hq, tile % hq

    if tile_order == "item_major":
        return item_n, item_tile, item_item_head
    if tile_order == "kv_major":
        return kv_n, kv_tile, kv_item_head
    # auto: kv_major once one KV head's tiles fill _KV_MAJOR_MIN_WAVES waves of CTAs.
    use_kv = per_head >= math.ceil(_KV_MAJOR_MIN_WAVES * w)

    def auto_item_head(tile):
        (a, b), (c, d) = kv_item_head(tile), item_item_head(tile)
        return jnp.where(use_kv, a, c), jnp.where(use_kv, b, d)

    return (jnp.where(use_kv, kv_n, item_n),
            lambda i: jnp.where(use_kv, kv_tile(i), item_tile(i)), auto_item_head)


def tile_pages(page_size: int, block_kv: int, table_cols: int) -> int:
    """Whole small pages per KV tile, or 1: a tile is a slice of one large (or whole-sequence)
    page."""
    return 1 if page_size >= block_kv or table_cols == 1 else block_kv // page_size


def prefill_attention(q, k_pages, v_pages, page_table, items: WorkList, zero_ranges, *,
                      config: PrefillConfig, scale: float, causal: bool, num_workers: int,
                      interpret=False, k_scale=None, v_scale=None, fixed_k_scale=None,
                      fixed_v_scale=None, first_pages=None):
    """Run the kernel over ``items`` (the prefill work list).

    q [T, Hq, D]; k_pages, v_pages [P, page_size, Hkv, D]; page_table [S, pages];
    zero_ranges int32 [R, 2]: row ranges [a, b) to fill with zeros (rows no
    item covers). An FP8 cache (float8_e4m3fn pages) passes its scales
    ``k_scale``/``v_scale`` [P, Hkv, page_size] f32; ``fixed_k_scale``: every K scale is
    this power of two (a layer's one K scale, :mod:`jaxattn.kv_quant`), so with
    the FP8 QK the producer copies no K scale rows and S's columns need no per-key scaling:
    the softmax scale takes it instead, exactly the same products (a power of two scales
    exactly). ``fixed_v_scale``: every V scale is this power of two: no V scale rows are
    copied, V's tiles are converted without them, and the epilogue's ``1 / l`` takes it
    (the same products again). ``config.fp8_pv``: ``v_pages`` come transposed, [P, Hkv, D,
    page_size], with ``fixed_v_scale``. ``first_pages``: this page table's
    :func:`tile_first_pages`, when the step shares it among its layers (None: computed
    here). Returns out [T, Hq, D] (q.dtype; rows outside items and
    zero ranges are unspecified) and lse_tiles [capacity, Hq, 128] f32
    (natural log) indexed by item and row within the item.
    """
    t, hq, d = q.shape
    num_pages, page_size, hkv, _ = k_pages.shape
    common.check_supported("prefill", d, q.dtype)
    common.check_kv_dtype("prefill", q.dtype, k_pages.dtype, k_scale is not None)
    kv_dtype = k_pages.dtype if k_scale is not None else None  # None: a bf16 cache
    fp8, qk8, shared_v, f16_pv, pv8 = config.forms(kv_dtype)  # static
    common.check_pages("prefill", page_size, config.block_kv, page_table.shape[1], fp8)
    if pv8:
        if fixed_v_scale is None:
            raise ValueError("PrefillConfig(fp8_pv=True) needs fixed_v_scale (V's one scale)")
        want = (num_pages, hkv, d, page_size)
        if v_pages.shape != want:
            raise ValueError(f"PrefillConfig(fp8_pv=True) takes V transposed, {want}, got "
                             f"{v_pages.shape}")
        if tile_pages(page_size, config.block_kv, page_table.shape[1]) != 1:
            raise ValueError(f"PrefillConfig(fp8_pv=True): a KV tile must lie in one page (a "
                             f"V^T page's keys are a tile's columns), got page_size={page_size}")
    if interpret:  # no register-A wgmma, no inline PTX in interpret mode
        config = dataclasses.replace(config, p_in_registers=False, overlap=False,
                                     named_barriers=False)
    dtype = q.dtype
    # P's, and V's tiles' (FP8): f16, e4m3 (fp8_pv, P scaled by P8_GAIN) or q's dtype
    pv_dtype = kv_dtype if pv8 else jnp.float16 if f16_pv else dtype
    group = hq // hkv
    bkv, stages = config.block_kv, config.num_stages
    pages_per_tile = tile_pages(page_size, bkv, page_table.shape[1])
    max_page_col = page_table.shape[1] - 1
    merge = config.merge_pages and pages_per_tile > 1
    cap = items.seq.shape[0]
    meta = jnp.stack([getattr(items, f) for f in _META]).astype(jnp.int32)  # [6, cap]
    count = jnp.reshape(items.count, (1,)).astype(jnp.int32)
    zero_ranges = jnp.asarray(zero_ranges, jnp.int32).reshape(-1, 2)
    n_zero = zero_ranges.shape[0]
    page_table = page_table.astype(jnp.int32)
    # [S, KV tiles] (a placeholder when no tile merges): one read per tile on the producer's
    # path instead of one per page.
    if not merge:
        first_pages = jnp.full((1, 1), -1, jnp.int32)
    elif first_pages is None:
        first_pages = tile_first_pages(page_table, pages_per_tile)
    elif first_pages.shape != (page_table.shape[0], -(-page_table.shape[1] // pages_per_tile)):
        raise ValueError(f"first_pages {first_pages.shape} is not tile_first_pages of a "
                         f"{page_table.shape} page table at {pages_per_tile} pages a tile")
    qk_scale = float(scale) * common.LOG2E
    fixed_k = qk8 and fixed_k_scale is not None  # static: K's scale rows are neither read
    if fixed_k:                                   # nor applied
        qk_scale *= fixed_k_scale
    fixed_v = fp8 and fixed_v_scale is not None  # static: nor V's
    # What the epilogue multiplies 1 / l by: V's one scale, over P's gain for the e4m3 PV.
    o_scale = (fixed_v_scale / (P8_GAIN if pv8 else 1.0)) if fixed_v else None
    tile_rows = COMPUTE_WGS * WG_ROWS

    def prefill_kernel(meta_ref, count_ref, zero_ref, pt_ref, first_ref, q_ref, k_ref, v_ref,
                       *rest):
        common.dependent_launch(interpret)
        ks_ref, vs_ref, *rest = rest if fp8 else (None, None, *rest)  # the FP8 cache's scales
        (o_ref, lse_ref, q_stage, q_smem, k_smem, v_smem, o_smem, lse_smem, p_smem,
         q_full, q_free, k_full, k_free, v_full, v_free, turn, *fp8_scratch) = rest
        # (ks_smem / vs_smem None where that side's scale is fixed)
        ks_smem, vs_smem, k_deq, v_deq, vd_full, vd_free = fp8_scratch if fp8 else (None,) * 6

        def v_rows(slot):  # a V slot's scale rows; None: V's one scale, in the epilogue
            return None if fixed_v else vs_smem.at[slot]
        wg = lax.axis_index("wg")
        cta = lax.axis_index("sm")
        my_tiles, tile_of, item_head = tile_schedule(
            count_ref[0], cta, hq=hq, group=group, num_workers=num_workers,
            tile_order=config.tile_order)

        def item_fields(tile):
            item, head = item_head(tile)
            return item, head, [meta_ref[i, item] for i in range(len(_META))]

        def kv_blocks(kv_start, kv_end):
            return kv_start // bkv, common.cdiv(kv_end, bkv)

        @pl.when(wg < COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(config.consumer_registers, action="increase")
            qw = q_smem.at[wg]
            ow = o_smem.at[wg]
            row0 = wg * WG_ROWS

            # Zero the rows no item covers, 64-row slabs spread over all consumer warpgroups.
            ow[...] = jnp.zeros((WG_ROWS, d), dtype)
            plgpu.commit_smem()
            gid = cta * COMPUTE_WGS + wg
            n_gid = num_workers * COMPUTE_WGS

            @pl.loop(0, n_zero)
            def _zero_range(r):
                a, b = zero_ref[r, 0], zero_ref[r, 1]
                n_units = common.cdiv(b - a, WG_ROWS) * hq  # (64-row slab, head) pairs

                @pl.loop(gid, n_units, step=n_gid)
                def _zero_unit(u):
                    slab = u // hq
                    head = u - slab * hq
                    start = a + slab * WG_ROWS
                    _store_rows(ow, lambda off, size: o_ref.at[pl.ds(start + off, size), head],
                                jnp.minimum(WG_ROWS, b - start), WG_ROWS)

            # Ping-pong: the consumers take turns issuing GEMMs. A turn is
            # turn_wait(); issue wgmmas; turn_pass(). Warpgroup 0 holds the first turn,
            # so warpgroup 1 passes one in up front and warpgroup 0 takes the last one
            # back at the end (every arrival is waited for).
            if config.named_barriers:
                def turn_wait():
                    _named_barrier("sync", TURN_BARRIER + wg, COMPUTE_WGS * 128)

                def turn_pass():
                    _named_barrier("arrive", TURN_BARRIER + 1 - wg, COMPUTE_WGS * 128)
            else:
                def turn_wait():
                    plgpu.barrier_wait(turn.at[wg])

                def turn_pass():
                    plgpu.barrier_arrive(turn.at[1 - wg])

            pl.when(wg == 1)(turn_pass)

            # The K tile of a ring slot as a wgmma operand (call after its full barrier's
            # wait). FP8 without the fp8 QK: this consumer's own dequantised copy, whose last
            # reader (the previous QK) has completed wherever this is called.
            def k_tile(slot):
                if not fp8 or qk8:
                    return k_smem.at[slot]
                return common.dequantize_tile(k_smem.at[slot], ks_smem.at[slot], k_deq.at[wg],
                                              config.dequant_vector)

            def v_ready(c):
                """Global step c's V tile as the PV operand, once it is ready. FP8: the
                producer's dequantised slot, or this consumer's own dequantised copy (its
                last reader, the previous PV, has completed wherever this is called)."""
                if shared_v:
                    plgpu.barrier_wait(vd_full.at[c % DEQ_STAGES])
                    return v_deq.at[c % DEQ_STAGES]
                slot = c % stages
                plgpu.barrier_wait(v_full.at[slot])
                if pv8:  # the V^T tile as it landed: the e4m3 wgmma's K-major B operand
                    return v_smem.at[slot].T
                if not fp8:
                    return v_smem.at[slot]
                return common.dequantize_tile(v_smem.at[slot], v_rows(slot), v_deq.at[wg],
                                              config.dequant_vector)

            def p_operand(p):
                """P [64, bkv] f32 as the PV wgmma's operand type (fp8_pv: e4m3, times
                P8_GAIN)."""
                return (p * P8_GAIN).astype(pv_dtype) if pv8 else p.astype(pv_dtype)

            def p_staged(p_op):
                """The PV wgmma's A operand: P in registers, or (fp8_pv) P's e4m3 tile in
                this consumer's SMEM (call where its last reader, the previous PV, is done)."""
                if not pv8:
                    return p_op
                p_smem.at[wg][...] = p_op
                plgpu.commit_smem()
                return p_smem.at[wg]

            def v_release(c):
                """Step c's PV has completed: its V tile (ring or dequantised slot) is free."""
                if shared_v:
                    plgpu.barrier_arrive(vd_free.at[c % DEQ_STAGES])
                else:
                    plgpu.barrier_arrive(v_free.at[c % stages])

            def key_scaled(s, slot):
                """FP8 QK: S's columns times their keys' scales (read before K's slot is freed)."""
                if not qk8 or fixed_k:  # (that one is in qk_scale)
                    return s
                return s * common.column_scales(ks_smem.at[slot], s.shape)

            def tile_body(i, step):
                item, head, (q_start, q_len, q_pos, kv_start, kv_end, _) = item_fields(tile_of(i))
                lo, hi = kv_blocks(kv_start, kv_end)
                first_row_pos = q_pos + row0
                # Tiles below this index need no mask: fully inside [.., kv_end) and below the diagonal.
                unmasked_hi = kv_end // bkv
                if causal:
                    unmasked_hi = jnp.minimum(unmasked_hi, (first_row_pos + 1) // bkv)
                unmasked_hi = jnp.clip(unmasked_hi, lo, hi)

                # Q arrives untiled (TMA into tiled SMEM needs 8-aligned rows; q_start is
                # arbitrary); re-tile it through registers for the wgmma.
                plgpu.barrier_wait(q_full.at[wg])
                # qk: the softmax's log2 scale; with the FP8 QK, per query row (times its
                # e4m3 scale).
                if qk8:
                    qk = common.quantize_rows(q_stage.at[wg], qw) * qk_scale
                else:
                    qw[...] = q_stage[wg]
                    qk = qk_scale
                plgpu.commit_smem()
                plgpu.barrier_arrive(q_free.at[wg])

                def mask(s, j):
                    rows = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, bkv), 0,
                                                  layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, bkv), 1,
                                                  layout=plgpu.Layout.WGMMA)
                    key = cols + j * bkv
                    ok = key < kv_end
                    if causal:
                        ok = ok & (key <= rows + first_row_pos)
                    return ok

                def bcast_rows(x, shape):
                    return lax.broadcast_in_dim(x, shape, [0])

                # Turns of one tile: QK(lo); then PV(j-1) and QK(j) for each further
                # block; then PV(hi-1). Both consumers take the same number of turns.
                if config.overlap:
                    acc, m_i, l_i = overlapped_kv_loop(step, lo, unmasked_hi, hi, mask, bcast_rows,
                                                       qk)
                else:
                    acc, m_i, l_i = kv_loop(step, lo, unmasked_hi, hi, mask, qk)
                epilogue(item, head, q_start, q_len, acc, m_i, l_i)
                return step + (hi - lo)

            def kv_loop(step, lo, unmasked_hi, hi, mask, qk):
                plgpu.barrier_wait(k_full.at[step % stages])
                turn_wait()

                def kv_step(j, carry, masked):
                    acc, m_i, l_i = carry
                    c = step + j - lo
                    slot = c % stages
                    kt = k_tile(slot)

                    def qk_scope(acc_ref):
                        plgpu.wgmma(acc_ref, qw, kt.T)
                        turn_pass()
                        return acc_ref[...]

                    s = key_scaled(pl.run_scoped(qk_scope, plgpu.ACC((WG_ROWS, bkv), jnp.float32)),
                                   slot)
                    plgpu.barrier_arrive(k_free.at[slot])

                    if masked:
                        s = jnp.where(mask(s, j), s, -jnp.inf)

                    m_new = jnp.maximum(m_i, common.times_rows(s.max(axis=1), qk))
                    alpha = jnp.exp2(m_i - m_new)
                    p = jnp.exp2(common.times_rows(s, qk)
                                 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l_i = l_i * alpha + p.sum(axis=1)
                    p16 = p_operand(p)
                    in_registers = config.p_in_registers and not pv8
                    if in_registers:
                        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                    vt = v_ready(c)
                    turn_wait()

                    def wait_next_k():
                        @pl.when(j + 1 < hi)
                        def _():
                            plgpu.barrier_wait(k_full.at[(c + 1) % stages])

                    if in_registers:
                        def pv(acc_ref):
                            plgpu.wgmma(acc_ref, p16, vt)
                            wait_next_k()

                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    else:  # (the previous PV has completed: its run_scoped waited)
                        pw = p_smem.at[wg]
                        pw[...] = p16
                        plgpu.commit_smem()

                        def pv(acc_ref):
                            plgpu.wgmma(acc_ref, pw, vt)
                            wait_next_k()
                            return acc_ref[...]

                        acc = acc + pl.run_scoped(pv, plgpu.ACC((WG_ROWS, d), jnp.float32))
                    v_release(c)
                    return acc, m_new, l_i

                m0 = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32),
                                       plgpu.Layout.WGMMA.reduce(1))
                l0 = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32),
                                       plgpu.Layout.WGMMA.reduce(1))
                acc0 = plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
                carry = (acc0, m0, l0)
                carry = lax.fori_loop(lo, unmasked_hi, functools.partial(kv_step, masked=False),
                                      carry)
                carry = lax.fori_loop(unmasked_hi, hi, functools.partial(kv_step, masked=True),
                                      carry)
                turn_pass()
                return carry

            def overlapped_kv_loop(step, lo, unmasked_hi, hi, mask, bcast_rows, qk):
                """FA3 intra-warpgroup overlap: softmax(j) runs while PV(j-1) is in flight.

                A turn issues QK(j) then PV(j-1) (into O rescaled by alpha(j-1), which
                is computed while QK(j) runs) and passes; then wait for QK(j) only,
                softmax(j), wait for PV(j-1). The carry holds P(j-1) in registers.
                """
                row_layout = plgpu.Layout.WGMMA.reduce(1)

                def softmax(s, m_old):
                    m_new = jnp.maximum(m_old, common.times_rows(s.max(axis=1), qk))
                    p = jnp.exp2(common.times_rows(s, qk) - bcast_rows(m_new, s.shape))
                    return p, m_new, jnp.exp2(m_old - m_new)

                # First turn: QK(lo) alone (masked when it is the diagonal/boundary block).
                slot0 = step % stages
                plgpu.barrier_wait(k_full.at[slot0])
                kt0 = k_tile(slot0)
                turn_wait()

                def qk0(s_ref):
                    plgpu.wgmma(s_ref, qw, kt0.T)
                    turn_pass()
                    return s_ref[...]

                s = key_scaled(pl.run_scoped(qk0, plgpu.ACC((WG_ROWS, bkv), jnp.float32)), slot0)
                plgpu.barrier_arrive(k_free.at[slot0])
                s = jnp.where(mask(s, lo) | (lo < unmasked_hi), s, -jnp.inf)
                m0 = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), row_layout)
                p, m_i, _ = softmax(s, m0)
                l_i = p.sum(axis=1)
                acc = plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
                alpha = plgpu.layout_cast(jnp.ones((WG_ROWS,), jnp.float32), row_layout)
                carry = (acc, m_i, l_i, p_operand(p), alpha)

                def step_j(j, carry, masked):
                    acc, m_i, l_i, p16, alpha = carry
                    c = step + j - lo
                    slot, pslot = c % stages, (c - 1) % stages
                    plgpu.barrier_wait(k_full.at[slot])
                    kt = k_tile(slot)
                    if fp8:  # V(j-1) dequantised before the turn too (so no wait inside it)
                        vt = v_ready(c - 1)
                    p_a = p_staged(p16)  # PV(j-2) completed in the previous step
                    turn_wait()

                    def qk_scope(s_ref):
                        plgpu.wgmma(s_ref, qw, kt.T)
                        acc_scaled = acc * bcast_rows(alpha, acc.shape)  # while QK(j) runs
                        if not fp8:
                            plgpu.barrier_wait(v_full.at[pslot])

                        def pv_body(refs):
                            o_ref, m_ref, l_ref, p_ref, a_ref = refs
                            plgpu.wgmma(o_ref, p_a, vt if fp8 else v_smem.at[pslot])
                            turn_pass()
                            s = key_scaled(plgpu.wgmma_accumulator_load(s_ref, wait_n=1),  # QK(j)
                                           slot)
                            plgpu.barrier_arrive(k_free.at[slot])
                            if masked:
                                s = jnp.where(mask(s, j), s, -jnp.inf)
                            p, m_new, a = softmax(s, m_ref[...])
                            l_ref[...] = l_ref[...] * a + p.sum(axis=1)
                            m_ref[...] = m_new
                            p_ref[...] = p
                            a_ref[...] = a

                        p0 = plgpu.layout_cast(jnp.zeros((WG_ROWS, bkv), jnp.float32),
                                               plgpu.Layout.WGMMA)
                        # run_state exits after wgmma.wait_group 0: PV(j-1) is done.
                        return pl.run_state(pv_body)(
                            (plgpu.ACC.init(acc_scaled), m_i, l_i, p0, alpha))

                    acc, m_i, l_i, p, alpha = pl.run_scoped(
                        qk_scope, plgpu.ACC((WG_ROWS, bkv), jnp.float32))
                    v_release(c - 1)
                    return acc, m_i, l_i, p_operand(p), alpha

                first = lo + 1
                mid = jnp.maximum(unmasked_hi, first)
                carry = lax.fori_loop(first, mid, functools.partial(step_j, masked=False), carry)
                acc, m_i, l_i, p16, alpha = lax.fori_loop(
                    mid, hi, functools.partial(step_j, masked=True), carry)
                # Last turn: PV(hi-1) alone.
                last = step + hi - lo - 1
                acc = acc * bcast_rows(alpha, acc.shape)
                vt = v_ready(last)
                p_a = p_staged(p16)
                turn_wait()

                def pv_last(o_ref):
                    plgpu.wgmma(o_ref, p_a, vt)
                    turn_pass()

                acc = pl.run_state(pv_last)(plgpu.ACC.init(acc))
                v_release(last)
                return acc, m_i, l_i

            def epilogue(item, head, q_start, q_len, acc, m_i, l_i):
                """Normalise, stage in SMEM, store only this warpgroup's valid rows."""
                inv_l = 1.0 / l_i
                if fixed_v:  # V's tiles came unscaled (exact: powers of two)
                    inv_l = inv_l * o_scale
                out = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
                lse = (m_i + jnp.log2(l_i)) * common.LN2
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous stores read ow
                ow[...] = out
                lse_smem.at[wg][...] = lse
                plgpu.commit_smem()
                n_rows = jnp.clip(q_len - row0, 0, WG_ROWS)
                _store_rows(ow, lambda off, size: o_ref.at[pl.ds(q_start + row0 + off, size), head],
                            n_rows, WG_ROWS)
                plgpu.copy_smem_to_gmem(lse_smem.at[wg],
                                        lse_ref.at[item, head, pl.ds(row0, WG_ROWS)])

            lax.fori_loop(0, my_tiles, tile_body, jnp.int32(0))
            pl.when(wg == 0)(turn_wait)  # the turn warpgroup 1 passed last
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # reads only: as the decode kernel

        @pl.when(wg == COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(config.producer_registers, action="decrease")

            def tile_body(i, step):
                item, head, (q_start, _, _, kv_start, kv_end, seq) = item_fields(tile_of(i))
                kv_head = head // group
                lo, hi = kv_blocks(kv_start, kv_end)

                for w in range(COMPUTE_WGS):
                    @pl.when(i > 0)
                    def _():
                        plgpu.barrier_wait(q_free.at[w])

                    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_start + w * WG_ROWS, WG_ROWS), head],
                                            q_stage.at[w], q_full.at[w])

                def page_ids(j):
                    """(page, first row) of each TMA copy that fills KV tile j."""
                    if pages_per_tile == 1:  # one copy: keys [j*bkv, (j+1)*bkv) of one page
                        if max_page_col == 0:  # one page per sequence
                            return [(pt_ref[seq, 0], j * bkv)]
                        per_page = page_size // bkv  # page_size a multiple of bkv
                        col = jnp.minimum(j // per_page, max_page_col)
                        return [(pt_ref[seq, col], lax.rem(j, per_page) * bkv)]
                    return [(pt_ref[seq, jnp.minimum(j * pages_per_tile + pg, max_page_col)], 0)
                            for pg in range(pages_per_tile)]

                rows = bkv // pages_per_tile  # rows of one TMA copy (one page, or a slice)

                def load(rows_ref, smem, full, free, c, j, first, scale_ref=None,
                         scale_smem=None):
                    """Fill slot c % stages with KV tile j: one TMA copy per page, or one for
                    the whole tile when its pages are consecutive (``first`` >= 0: the first
                    of them; None: never merged)."""
                    slot = c % stages

                    @pl.when(c >= stages)
                    def _():
                        plgpu.barrier_wait(free.at[slot])

                    def copy(page, row, pg, n=1):  # n pages' rows into the slot from row pg
                        plgpu.copy_gmem_to_smem(
                            rows_ref.at[pl.ds(page * page_size + row, n * rows), kv_head],
                            smem.at[slot, pl.ds(pg * rows, n * rows)], full.at[slot])

                    def copy_scales(page, row, pg):  # FP8: [page, head, row] rows, per page
                        plgpu.copy_gmem_to_smem(
                            scale_ref.at[page, kv_head, pl.ds(row, rows)],
                            scale_smem.at[slot, pl.ds(pg * rows, rows)], full.at[slot])

                    def page_by_page():
                        for pg, (page, row) in enumerate(page_ids(j)):
                            copy(page, row, pg)
                            if scale_ref is not None:
                                copy_scales(page, row, pg)

                    if first is None:
                        page_by_page()
                        return

                    @pl.when(first >= 0)
                    def _():
                        copy(first, 0, 0, pages_per_tile)
                        for pg in range(pages_per_tile):
                            if pg:  # the arrival this page's own copy would have made
                                plgpu.barrier_arrive(full.at[slot])
                            if scale_ref is not None:
                                copy_scales(first + pg, 0, pg)

                    pl.when(first < 0)(page_by_page)

                def load_vt(c, j):
                    """fp8_pv: fill slot c % stages with KV tile j's V^T columns (one copy;
                    a tile lies in one page)."""
                    slot = c % stages

                    @pl.when(c >= stages)
                    def _():
                        plgpu.barrier_wait(v_free.at[slot])

                    (page, row), = page_ids(j)
                    plgpu.copy_gmem_to_smem(v_ref.at[page, kv_head, pl.ds(0, d), pl.ds(row, bkv)],
                                            v_smem.at[slot], v_full.at[slot])

                @pl.loop(lo, hi)
                def _kv(j):
                    c = step + j - lo
                    # Read before the waits for a free slot, so its latency overlaps them.
                    first = first_ref[seq, j] if merge else None
                    load(k_ref, k_smem, k_full, k_free, c, j, first,
                         *((None, None) if fixed_k else (ks_ref, ks_smem)))
                    if pv8:
                        load_vt(c, j)
                    else:
                        load(v_ref, v_smem, v_full, v_free, c, j, first,
                             *((None, None) if fixed_v else (vs_ref, vs_smem)))
                    if shared_v:  # one step behind the copies, so they stay ahead
                        pl.when(c > 0)(lambda: dequantize_v(c - 1))

                return step + (hi - lo)

            def dequantize_v(c):
                """Step c's V tile into the consumers' ring (after their PV of step
                c - DEQ_STAGES), then free its fp8 slot."""
                slot = c % stages
                common.dequantize_to_ring(v_smem.at[slot], v_rows(slot), v_full.at[slot],
                                          v_deq, vd_free, vd_full, c, DEQ_STAGES,
                                          config.dequant_vector)
                plgpu.barrier_arrive(v_free.at[slot])

            total = lax.fori_loop(0, my_tiles, tile_body, jnp.int32(0))
            if shared_v:
                pl.when(total > 0)(lambda: dequantize_v(total - 1))

                @pl.loop(jnp.maximum(total - DEQ_STAGES, 0), total)
                def _drain_deq(c):
                    plgpu.barrier_wait(vd_free.at[c % DEQ_STAGES])

            # Observe every completion of the free barriers (interpret mode checks this).
            @pl.loop(jnp.maximum(total - stages, 0), total)
            def _drain(c):
                plgpu.barrier_wait(k_free.at[c % stages])
                plgpu.barrier_wait(v_free.at[c % stages])

            @pl.when(my_tiles > 0)
            def _():
                for w in range(COMPUTE_WGS):
                    plgpu.barrier_wait(q_free.at[w])

    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    out, lse_tiles = plgpu.kernel(
        prefill_kernel,
        out_type=(jax.ShapeDtypeStruct((t, hq, d), dtype),
                  jax.ShapeDtypeStruct((cap, hq, tile_rows), jnp.float32)),
        scratch_types=config.scratch(d, dtype, pages_per_tile, kv_dtype=kv_dtype,
                                     scale_rows=(not fixed_k, not fixed_v)),
        grid=(num_workers,),
        grid_names=("sm",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        # Row reductions stay inside a warp (WGMMA layout): no cross-warp scratch needed.
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=interpret or None,
    )(meta, count, zero_ranges, page_table, first_pages, q,
      # [P * page_size, Hkv, D] (a bitcast): a run of consecutive pages is one TMA box
      k_pages.reshape(-1, hkv, d), v_pages if pv8 else v_pages.reshape(-1, hkv, d),
      *(() if not fp8 else (k_scale, v_scale)))
    return out, lse_tiles


def tile_first_pages(page_table, pages_per_tile: int):
    """page_table [S, cols] -> [S, ceil(cols / pages_per_tile)] int32: the first page of each
    KV tile (``pages_per_tile`` table columns) where the tile's pages are consecutive in the
    pool, else -1. Columns past the table repeat its last page, so a tile running off the
    end is never consecutive."""
    s, cols = page_table.shape
    n = -(-cols // pages_per_tile)
    col = jnp.minimum(jnp.arange(n * pages_per_tile), cols - 1)
    pages = page_table[:, col].reshape(s, n, pages_per_tile)
    run = jnp.all(pages == pages[..., :1] + jnp.arange(pages_per_tile), axis=-1)
    return jnp.where(run, pages[..., 0], -1).astype(jnp.int32)


def scatter_lse(lse_tiles, items: WorkList, num_rows: int):
    """lse_tiles [cap, Hq, 128] -> lse [num_rows, Hq]; rows no item covers get -inf."""
    cap, hq, rows = lse_tiles.shape
    r = jnp.arange(rows, dtype=jnp.int32)
    valid = (r[None, :] < items.q_len[:, None]) & (jnp.arange(cap)[:, None] < items.count)
    dest = jnp.where(valid, items.q_start[:, None] + r[None, :], num_rows).reshape(-1)
    vals = jnp.swapaxes(lse_tiles, 1, 2).reshape(cap * rows, hq)
    lse = jnp.full((num_rows, hq), -jnp.inf, jnp.float32)
    return lse.at[dest].set(vals, mode="drop")
