"""The static-shape tile planner: turn a ragged batch into fixed-size work lists.

Every metadata array an attention kernel reads is produced here, and its size
comes from exactly one place: :func:`capacity`, a pure-Python function of the
static :class:`Bounds`. :func:`plan` is jittable jnp code that fills those
arrays from the runtime lengths and returns the number of valid entries as
data. Prompt lengths therefore change *values*, never *shapes*: nothing
recompiles and no buffer can be the wrong size (the bug class behind the
``scheduler_metadata must have shape`` crash on long Llama 4 prompts).

Semantics (shared with :mod:`jaxattn.reference`): sequence ``s`` has
``q_len = cu_q_lens[s+1] - cu_q_lens[s]`` new tokens and ``kv_len`` keys in
total (the new tokens included). New token ``i`` sits at absolute position
``p = kv_len - q_len + i`` (bottom-right causal). It attends to keys
``[lo(p), p]`` where ``lo(p) = floor(p / C) * C`` for chunked-local layers
(chunk size ``C``) and ``0`` for global layers. Non-causal attention sees
``[lo(p), hi(p))`` with ``hi`` the end of ``p``'s chunk (or ``kv_len``).

Work lists
----------
A sequence's new tokens are first cut into *segments* at chunk boundaries
(one segment per sequence on global layers), so that every row of a work
item shares one key range start. Then:

* **prefill items** (sequences with ``q_len > decode_q``): each segment is cut
  into blocks of ``block_q`` tokens; one item per block. The prefill kernel
  writes these rows directly.
* **decode items** (``q_len <= decode_q``: decode and speculative
  verification): one item per segment, whose key range is split into pieces
  of ``L`` keys (split-KV / flash-decoding) so the items fill the GPU. ``L``
  is chosen from the data so the piece count stays under a static budget
  ``W = split_target(bounds)`` (:func:`decode_piece`: of the sizes that do, the
  one whose round-robin schedule finishes first); pieces are merged by log-sum-exp.

Items are sorted by key-range length, longest first (for persistent kernels
that take items in order); invalid (padding) items follow the valid ones
with ``q_len = 0`` and an empty key range.

Capacity formulas (``T`` = max_num_batched_tokens, ``S`` = number of
sequences, ``bq`` = block_q, ``C`` = chunk size, ``dq`` = decode_q)
-----------------------------------------------------------------------
A sequence with ``q`` new tokens crosses at most ``ceil((q-1)/C)`` chunk
boundaries (positions are consecutive), and each crossing adds at most one
segment and one block. Summing over sequences with
``sum(floor(x_s)) <= floor(sum(x_s))`` and ``ceil(x/C) <= x//C + [x > 0]``:

* segments <= ``S + (T - S)//C + min(S, T - S)``                 (chunked)
  segments <= ``S``                                            (global)
* prefill items <= ``(T - Sp)//bq + Sp + [(T - Sp)//C + Sp]``, where
  ``Sp <= min(S_max, T // (dq + 1))`` sequences can be prefill sequences
  (each holds more than ``dq`` tokens); the bracket only when chunked.
* decode items <= ``Sd + [min(Sd, T - Sd)] + W`` with ``Sd <= min(S_max, T)``:
  at most one boundary per decode sequence (``dq <= C``), plus the split
  pieces: ``sum max(1, ceil(w_i / L)) <= n + sum(w_i) / L <= n + W`` because
  ``L >= sum(w_i) / W``.

Each bound is nondecreasing in ``T``, so ``T = max_num_batched_tokens`` is
the worst case; :func:`capacity` maximises over the admissible ``S``.

Page tables (the hybrid KV cache)
---------------------------------
A step carries two page tables, both ``[max_num_seqs, pages_per_seq]`` with
``pages_per_seq = ceil(max_model_len / page_size)`` and indexed by logical page
``position // page_size``: one for the global layers' pool and one for the
chunked-local layers' pool. Every key a chunked-layer item reads lies in
``[kv_start, kv_end)`` with ``kv_start`` the start of its segment's chunk (above),
a multiple of ``block_kv`` (``block_kv`` divides ``C``) that the kernels' first KV
tile starts at; a segment's chunk starts at or after ``w = floor(p0 / C) * C`` for
the sequence's first new position ``p0`` (its cached length). So no chunked-layer
read touches a table entry before ``w / page_size``: those entries may name a page
returned to the pool. Live chunked pages of one sequence with ``q`` new tokens, with
``w'`` the start of ``w``'s page and ``a = C - 1 + page_size - gcd(C, page_size)``:
``ceil((p0 - w' + q) / page_size) <= ceil((a + T) / page_size)``
(:attr:`Bounds.chunk_pages_per_seq`), since ``p0 - w <= C - 1`` and ``w - w'`` is a
multiple of ``gcd(C, page_size)`` below ``page_size`` (``a = C - 1`` when pages divide
the chunk); over ``S`` sequences at most ``S * (ceil(a / page_size) + 1) + ceil(T /
page_size)`` (:meth:`Bounds.chunked_pages_for`), using ``ceil(a + b) <=
ceil(a) + ceil(b)`` and ``sum ceil(q_s / page_size) <= ceil(T / page_size) + S``.
Positions and slots are int32: ``max_model_len`` up to 2**31 - 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Rows of one decode tile: a wgmma M dimension. Decode items pack
# (token, query head of the KV group) pairs into these rows.
DECODE_TILE_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Static limits of one engine configuration; hashable, so usable as a jit static arg.

    ``num_q_heads``/``num_kv_heads`` are the heads one device computes (local
    heads under tensor parallelism). ``chunk_size`` is the chunk of the
    chunked-local layers (``None`` if the model has none); global layers plan
    with ``chunk_size=None`` under the same bounds.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int | None = None
    block_q: int = 128  # prefill tile: query tokens per work item
    block_kv: int = 128  # keys per kernel KV tile; split pieces are multiples of it
    decode_q: int | None = None  # max new tokens of a decode-path sequence; None: see dq
    num_workers: int = 132  # persistent CTAs (SMs of an H100)
    min_split_kv: int = 512  # split-KV never makes pieces shorter than this
    split_waves: int = 2  # decode split budget in waves of (item, KV head) tiles: split_target
    # Decode piece size: the one whose schedule finishes first (decode_piece); False: the
    # smallest the budget allows (the rule before; benchmarks/decode.py times both).
    balance_splits: bool = True

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size",
                     "num_q_heads", "num_kv_heads", "head_dim", "block_q", "block_kv",
                     "num_workers", "min_split_kv", "split_waves"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Bounds.{name} must be a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"Bounds.num_q_heads={self.num_q_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if not self.tiles_fit_pages:
            raise ValueError(f"Bounds.page_size={self.page_size} must divide block_kv="
                             f"{self.block_kv} or be a multiple of it (a KV tile is whole "
                             f"pages or a slice of one), or hold a whole sequence "
                             f"(page_size >= max_model_len={self.max_model_len})")
        if self.chunk_size is not None:
            if self.chunk_size < 1 or self.chunk_size % self.block_kv:
                raise ValueError(f"Bounds.chunk_size={self.chunk_size} must be a positive "
                                 f"multiple of block_kv={self.block_kv}")
        if self.decode_q is not None and not 1 <= self.decode_q * self.group <= DECODE_TILE_ROWS:
            raise ValueError(f"Bounds.decode_q={self.decode_q} x {self.group} query heads per KV "
                             f"head must fit one {DECODE_TILE_ROWS}-row decode tile")
        if self.max_model_len >= 2**31:
            raise ValueError(f"Bounds.max_model_len={self.max_model_len} must fit int32 positions")
        if self.chunk_size is not None and self.dq > self.chunk_size:
            raise ValueError(f"Bounds.decode_q={self.dq} exceeds chunk_size={self.chunk_size}")

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def dq(self) -> int:
        """New tokens per sequence at or below which the decode path takes it.

        Default: as many as one decode tile holds (``64 // group``), but at most a chunk:
        a decode sequence then crosses at most one chunk boundary, which the capacity
        bound counts on. With chunks that short (a few tokens) the longer sequences of a
        step take the prefill path, whose items are cut at every boundary anyway.
        """
        if self.decode_q is not None:
            return self.decode_q
        dq = max(1, DECODE_TILE_ROWS // self.group)
        return dq if self.chunk_size is None else min(dq, self.chunk_size)

    @property
    def tiles_fit_pages(self) -> bool:
        """A KV tile is whole pages, or a slice of one page (never two pages' parts)."""
        return (self.block_kv % self.page_size == 0 or self.page_size % self.block_kv == 0
                or self.pages_per_seq == 1)

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @property
    def chunk_pages_per_seq(self) -> int:
        """Most chunked-layer pages one sequence holds in a step: the live chunk's pages before
        its new tokens plus theirs (module docstring); ``pages_per_seq`` without chunks."""
        if self.chunk_size is None:
            return self.pages_per_seq
        return min(self.pages_per_seq,
                   cdiv(self._live_offset + self.max_num_batched_tokens, self.page_size))

    @property
    def _live_offset(self) -> int:
        """Most tokens between the first live chunked page's start and a sequence's first
        new position: ``C - 1`` to the chunk start ``w``, plus ``w``'s offset in its page,
        a multiple of ``gcd(C, page_size)`` below ``page_size`` (0 when pages divide C)."""
        return self.chunk_size - 1 + self.page_size - math.gcd(self.chunk_size, self.page_size)

    def chunked_pages_for(self, num_seqs: int) -> int:
        """Chunked-layer pages that ``num_seqs`` running sequences can hold at once, at most
        (the step's new tokens included): with that many, that pool never runs out first."""
        if self.chunk_size is None:
            return num_seqs * self.pages_per_seq
        return min(num_seqs * self.chunk_pages_per_seq,
                   num_seqs * (cdiv(self._live_offset, self.page_size) + 1)
                   + cdiv(self.max_num_batched_tokens, self.page_size))

    @property
    def split_target(self) -> int:
        """W: the decode split budget, ``split_waves`` waves of (item, KV head) tiles (two:
        unequal sequences balance; one would halve a lone long sequence's pieces and its
        combine: benchmarks/decode.py times both)."""
        return max(1, -(-self.split_waves * self.num_workers // self.num_kv_heads))


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Static sizes of every metadata array the planner fills."""

    segments: int
    prefill_items: int
    decode_items: int


def capacity(bounds: Bounds) -> Capacity:
    """Sizes of all plan arrays, from static ints only (formulas in the module docstring)."""
    T, C = bounds.max_num_batched_tokens, bounds.chunk_size
    chunked = C is not None
    s_max = min(bounds.max_num_seqs, T)

    def segments(s):
        return s + ((T - s) // C + min(s, T - s) if chunked else 0)

    def prefill(s):
        return (T - s) // bounds.block_q + s + ((T - s) // C + s if chunked else 0)

    def decode(s):
        return s + (min(s, T - s) if chunked else 0)

    s_prefill = min(s_max, T // (bounds.dq + 1))
    return Capacity(
        segments=max(segments(s) for s in range(1, s_max + 1)),
        prefill_items=max(1, max((prefill(s) for s in range(1, s_prefill + 1)), default=0)),
        decode_items=max(decode(s) for s in range(1, s_max + 1)) + bounds.split_target,
    )


class WorkList(NamedTuple):
    """Int32 arrays padded to a static capacity; entries ``[0, count)`` are valid."""

    seq: jax.Array  # sequence index (row of the page table)
    q_start: jax.Array  # first row in the packed q / output
    q_len: jax.Array  # rows of this item (0 for padding)
    q_pos: jax.Array  # absolute position of the first row
    kv_start: jax.Array  # keys [kv_start, kv_end) this item reads
    kv_end: jax.Array
    split: jax.Array  # index of this piece among its parent's KV splits
    num_splits: jax.Array  # pieces of the parent (1: unsplit)
    count: jax.Array  # scalar: number of valid items


class Plan(NamedTuple):
    prefill: WorkList
    decode: WorkList
    # int32[3]: entries the batch needed (segments, prefill, decode) before any
    # truncation to capacity. Proven <= capacity for admissible batches; tests check it.
    demand: jax.Array


class AdmissionError(ValueError):
    """A batch the bounds exclude; the message names the bound."""


def check_admissible(bounds: Bounds, cu_q_lens, kv_lens, num_seqs) -> None:
    """Host-side admission check of concrete lengths; raises AdmissionError naming the bound."""
    cu = np.asarray(cu_q_lens, dtype=np.int64)
    kv = np.asarray(kv_lens, dtype=np.int64)
    n = int(np.asarray(num_seqs).reshape(-1)[0])
    if not 0 <= n <= min(bounds.max_num_seqs, kv.shape[0]):
        raise AdmissionError(f"num_seqs={n} exceeds max_num_seqs={bounds.max_num_seqs}"
                             f" (or the {kv.shape[0]} rows of kv_lens)")
    q = np.diff(cu[: n + 1])
    if cu[0] != 0 or (q < 0).any():
        raise AdmissionError("cu_q_lens must start at 0 and be nondecreasing")
    if cu[n] > bounds.max_num_batched_tokens:
        raise AdmissionError(f"{cu[n]} new tokens exceed max_num_batched_tokens="
                             f"{bounds.max_num_batched_tokens}")
    if (kv[:n] > bounds.max_model_len).any():
        raise AdmissionError(f"kv_len={kv[:n].max()} exceeds max_model_len={bounds.max_model_len}")
    if (q > kv[:n]).any():
        s = int(np.argmax(q > kv[:n]))
        raise AdmissionError(f"sequence {s} has q_len={q[s]} > kv_len={kv[s]} "
                             "(kv_len counts the new tokens too)")


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _enumerate(counts: jax.Array, size: int):
    """Expand per-parent counts into ``size`` slots: (parent, index within parent, valid, total).

    Slot j belongs to the parent whose cumulative range holds j; slots past
    the total are invalid (parent clamped to a real index so gathers stay in
    bounds).
    """
    ends = jnp.cumsum(counts)
    slots = jnp.arange(size, dtype=jnp.int32)
    # compare_all (a fused [size, parents] compare-and-count) instead of the default
    # binary search: that one is a loop, i.e. a chain of tiny kernel launches per step.
    parent = jnp.searchsorted(ends, slots, side="right", method="compare_all").astype(jnp.int32)
    parent = jnp.minimum(parent, counts.shape[0] - 1)
    local = slots - (ends[parent] - counts[parent])
    return parent, local, slots < ends[-1], ends[-1]


def cdiv(a, b):
    """Ceiling division, for Python ints and traced int32 alike."""
    return (a + b - 1) // b


def _sorted(items: dict, work: jax.Array, valid: jax.Array) -> WorkList:
    """Longest first; padding last with an empty, harmless entry."""
    order = jnp.argsort(jnp.where(valid, -work, 1), stable=True)
    fields = {k: jnp.where(valid, v, 0)[order].astype(jnp.int32) for k, v in items.items()}
    return WorkList(**fields, count=valid.sum().astype(jnp.int32))


# Fixed cost of one decode (item, KV head) tile, in KV blocks' worth of time (loading its
# query rows, the ring hand-over, writing its rows or partial): a model constant of
# decode_piece's schedule estimate, not a measurement.
TILE_OVERHEAD_BLOCKS = 2


def decode_makespan(d_work, piece, bounds: Bounds, max_tiles: int):
    """The decode kernel's busiest CTA, in KV blocks, for pieces of ``piece`` keys.

    ``d_work`` [n]: each decode segment's keys (0: none). The kernel deals (item, KV head)
    tiles round-robin over ``bounds.num_workers`` CTAs, items longest first and an item's
    heads together, so CTA 0 gets the longest tile of every round: its load is the makespan.
    The sorted tiles are the full pieces (all ``piece`` keys) and then one last piece per
    segment (its remainder, or the whole segment), each ``num_kv_heads`` times.
    ``piece`` may carry leading batch dimensions (candidates); ``max_tiles`` bounds the tiles.
    """
    w, hkv, bkv = bounds.num_workers, bounds.num_kv_heads, bounds.block_kv
    piece = jnp.asarray(piece)[..., None]  # [..., 1]
    n = jnp.where(d_work > 0, jnp.maximum(1, cdiv(d_work, piece)), 0)  # [..., n]
    full = hkv * (n - (n > 0)).sum(-1)  # tiles of full pieces
    last = jnp.where(n > 0, cdiv(d_work - (n - 1) * piece, bkv) + TILE_OVERHEAD_BLOCKS, 0)
    last = -jnp.sort(-last, axis=-1)  # [..., n], longest first
    tiles = full + hkv * (n > 0).sum(-1)
    k = jnp.arange(cdiv(max_tiles, w) + 1) * w  # CTA 0's tile indices
    j = k - full[..., None]  # their positions among the last pieces' tiles
    lasts = jnp.take_along_axis(last, jnp.clip(j // hkv, 0, last.shape[-1] - 1), axis=-1)
    lasts = jnp.where((j >= 0) & (k < tiles[..., None]), lasts, 0).sum(-1)
    return (piece[..., 0] // bkv + TILE_OVERHEAD_BLOCKS) * cdiv(full, w) + lasts


def decode_piece(d_work, bounds: Bounds, max_items: int):
    """L: keys per decode piece (a multiple of block_kv), for segments of ``d_work`` keys.

    At least ``max(min_split_kv, sum(d_work) / W)`` (``W = split_target``), which keeps
    the piece count within the capacity bound, and among the sizes ``sum / k`` for k = 1..W
    above that the one whose schedule (:func:`decode_makespan`) finishes first, the largest
    on a tie (fewer pieces for the combine). The smallest alone left CTAs idle in a last,
    partial round and cut sequences into a short remainder piece: 8 x 32k keys on 8 KV
    heads and 132 CTAs took 5 pieces of 8064 and 512 keys each (320 tiles, 2.4 rounds);
    2 pieces of 16384 (128 tiles, one round) finish ~4% sooner (by this model) with 60%
    fewer tiles to combine.
    """
    total = d_work.sum()
    bkv, w = bounds.block_kv, bounds.split_target
    least = cdiv(jnp.maximum(bounds.min_split_kv, cdiv(total, w)), bkv) * bkv
    if not bounds.balance_splits:
        return least
    k = jnp.arange(1, w + 1, dtype=jnp.int32)  # candidates, largest piece first
    cands = jnp.maximum(least, cdiv(cdiv(total, k), bkv) * bkv)
    span = decode_makespan(d_work, cands, bounds, max_items * bounds.num_kv_heads)
    return cands[jnp.argmin(span)]


def plan(bounds: Bounds, cu_q_lens, kv_lens, num_seqs, *, chunk_size=None,
         causal: bool = True) -> Plan:
    """Fill the work lists for one batch. Jittable; all shapes come from ``capacity``.

    ``chunk_size`` must be ``None`` (global layer) or ``bounds.chunk_size``.
    With concrete (non-traced) inputs the batch is first checked against the
    bounds and a ValueError names the bound it breaks.
    """
    if chunk_size is not None and chunk_size != bounds.chunk_size:
        raise ValueError(f"chunk_size={chunk_size} must be None or bounds.chunk_size="
                         f"{bounds.chunk_size} (capacity is computed for that chunk size)")
    if _is_concrete(cu_q_lens, kv_lens, num_seqs):
        check_admissible(bounds, cu_q_lens, kv_lens, num_seqs)
    cap = capacity(bounds)
    cu = jnp.asarray(cu_q_lens, jnp.int32)
    kv_lens = jnp.asarray(kv_lens, jnp.int32)
    n_seq = kv_lens.shape[0]
    live = jnp.arange(n_seq) < jnp.asarray(num_seqs, jnp.int32).reshape(())
    q_lens = jnp.where(live, cu[1:] - cu[:-1], 0)
    p0 = kv_lens - q_lens  # position of each sequence's first new token

    # Stage 1: segments (a sequence's new tokens split at chunk boundaries).
    if chunk_size is None:
        c_first = jnp.zeros_like(p0)
        n_seg = (q_lens > 0).astype(jnp.int32)
    else:
        c_first = p0 // chunk_size
        n_seg = jnp.where(q_lens > 0, (p0 + q_lens - 1) // chunk_size - c_first + 1, 0)
    seq, i, seg_valid, n_segments = _enumerate(n_seg, cap.segments)
    if chunk_size is None:
        seg_lo, seg_hi, key_lo = p0[seq], p0[seq] + q_lens[seq], jnp.zeros_like(seq)
        key_hi_noncausal = kv_lens[seq]
    else:
        key_lo = (c_first[seq] + i) * chunk_size
        seg_lo = jnp.maximum(p0[seq], key_lo)
        seg_hi = jnp.minimum(p0[seq] + q_lens[seq], key_lo + chunk_size)
        key_hi_noncausal = jnp.minimum(kv_lens[seq], key_lo + chunk_size)
    seg_rows = jnp.where(seg_valid, seg_hi - seg_lo, 0)
    seg_qstart = cu[seq] + seg_lo - p0[seq]
    is_decode = q_lens[seq] <= bounds.dq

    # Stage 2a: prefill items, blocks of block_q tokens within a segment.
    bq = bounds.block_q
    n_blk = jnp.where(seg_valid & ~is_decode, cdiv(seg_rows, bq), 0)
    sg, b, valid, n_prefill = _enumerate(n_blk, cap.prefill_items)
    rows = jnp.minimum(bq, seg_rows[sg] - b * bq)
    pos = seg_lo[sg] + b * bq
    kv_end = pos + rows if causal else key_hi_noncausal[sg]
    prefill = _sorted(
        dict(seq=seq[sg], q_start=seg_qstart[sg] + b * bq, q_len=rows, q_pos=pos,
             kv_start=key_lo[sg], kv_end=kv_end, split=jnp.zeros_like(sg),
             num_splits=jnp.ones_like(sg)),
        work=kv_end - key_lo[sg], valid=valid)

    # Stage 2b: decode items, one per segment, key range split into pieces of L keys.
    dec = seg_valid & is_decode
    d_end = seg_hi if causal else key_hi_noncausal
    d_work = jnp.where(dec, d_end - key_lo, 0)
    piece = decode_piece(d_work, bounds, cap.decode_items)
    n_pieces = jnp.where(dec, jnp.maximum(1, cdiv(d_work, piece)), 0)
    sg, k, valid, n_decode = _enumerate(n_pieces, cap.decode_items)
    start = key_lo[sg] + k * piece
    decode = _sorted(
        dict(seq=seq[sg], q_start=seg_qstart[sg], q_len=seg_rows[sg], q_pos=seg_lo[sg],
             kv_start=start, kv_end=jnp.minimum(start + piece, d_end[sg]), split=k,
             num_splits=n_pieces[sg]),
        work=jnp.minimum(piece, d_work[sg] - k * piece), valid=valid)
    demand = jnp.stack([n_segments, n_prefill, n_decode]).astype(jnp.int32)
    return Plan(prefill=prefill, decode=decode, demand=demand)

