"""Split-KV flash-decoding over a paged KV cache: a Pallas Mosaic GPU kernel (Hopper).

Work comes from the scheduler's *decode* :class:`~jaxattn.scheduler.WorkList`:
one item per KV-split piece of a sequence with at most ``bounds.dq`` new
tokens. A *tile* is (item, KV head). Its 64 query rows pack the item's tokens
times the ``G = Hq / Hkv`` query heads of the KV group (row ``r`` = token
``r // G``, head ``r % G``), so each K/V page of the group is read from HBM
once, by one wgmma M tile.

Kernel shape (one CTA per SM, persistent, static round robin over tiles in
list order, longest first):

* warpgroup 1 (producer): per tile, one TMA of the item's query rows into a
  plain SMEM buffer; per KV block, one TMA per page (or page slice) for K and
  for V into a ``num_stages`` ring. The ring runs straight across tile
  boundaries, so the next tile's pages stream in while this tile finishes.
* warpgroup 0 (consumer): copies Q into a swizzled wgmma tile, then per block
  ``S = Q K^T`` (wgmma), mask (only on blocks that reach past ``kv_end`` or the
  causal diagonal), online softmax in base 2, ``O += P V`` (wgmma). The
  epilogue writes an unsplit item's rows straight into ``out`` (one TMA per
  token) and a split piece's normalised tile into a compact partial buffer.

Split pieces are merged afterwards by log-sum-exp in fused XLA
(:func:`_combine`); only split pieces take that path, so unsplit decode
(the common short-context case) pays nothing for it.

Assumption (as in other paged kernels): every cache slot holds a finite value
(pools start zeroed; writes store finite K/V). A block's key slots past
``kv_end`` are loaded (whole pages) and masked: their P is 0, and 0 * NaN would
poison the output.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.scheduler import DECODE_TILE_ROWS, Bounds, WorkList

ROWS = DECODE_TILE_ROWS  # wgmma M: rows of one (item, KV head) tile
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Item metadata columns (one int32 row per work item, read as scalars from GMEM).
_SEQ, _QSTART, _QLEN, _QPOS, _KVSTART, _KVEND, _PART = range(7)
_META_COLS = 8  # padded: 32-byte rows


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static tuning of the decode kernel.

    block_kv: keys per pipeline stage (a wgmma N for QK, K for PV): 64..256,
      a multiple of 64 and of the page size (or a divisor of it).
    num_stages: depth of the K/V ring. The kernel is HBM-bound; each SM needs
      ~20-30 KiB in flight to cover DRAM latency, and a stage of K+V holds
      2 * block_kv * D * 2 bytes.
    num_ctas: persistent CTAs (None: ``bounds.num_workers``, one per SM).
    p_in_registers: feed P to the PV wgmma from registers (GPU fast path; GPU
      interpret mode cannot run it, so tests use the SMEM path there).
    head_major_pages: pools are ``[num_pages, Hkv, page_size, D]`` instead of
      the project's ``[num_pages, page_size, Hkv, D]`` (for the layout
      benchmark only).
    """

    block_kv: int = 64
    num_stages: int = 4
    num_ctas: int | None = None
    p_in_registers: bool = False
    head_major_pages: bool = False

    def __post_init__(self):
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"block_kv={self.block_kv} must be a multiple of 64 in [64, 256]")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")
        if self.num_ctas is not None and self.num_ctas < 1:
            raise ValueError(f"num_ctas={self.num_ctas} must be positive")


def default_config(interpret=False) -> DecodeConfig:
    """The tuned configuration; under interpret mode P goes through SMEM."""
    return DecodeConfig(p_in_registers=not interpret)


def _cdiv(a, b):
    return (a + b - 1) // b


def split_capacity(bounds: Bounds, cap_items: int) -> int:
    """Static bound on the number of split pieces (items with num_splits > 1).

    A parent split into n >= 2 pieces of L keys has work w > L, so
    n = ceil(w / L) < w / L + 1 < 2 w / L; summing over split parents,
    pieces < 2 * sum(w) / L <= 2 W because the planner picks L >= sum(w) / W
    (W = bounds.split_target). Hence at most 2W - 1 split pieces.
    """
    return max(1, min(cap_items, 2 * bounds.split_target - 1))


def _check(bounds: Bounds, q, k_pages, config: DecodeConfig):
    t, hq, d = q.shape
    page_size = k_pages.shape[2] if config.head_major_pages else k_pages.shape[1]
    g = bounds.group
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"decode kernel supports bfloat16/float16, got {q.dtype}")
    if d not in (64, 128):
        raise ValueError(f"decode kernel supports head_dim 64 or 128, got {d}")
    if bounds.dq * g > ROWS:
        raise ValueError(f"decode_q={bounds.dq} tokens x {g} heads per KV group = "
                         f"{bounds.dq * g} rows exceed one {ROWS}-row tile; lower decode_q")
    # A page (or page slice) lands in whole 8-row tiles of the swizzled K/V tile,
    # and a KV block is whole pages or a page is whole blocks.
    if page_size < 8 or page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} unsupported: use a power of two >= 8")


def _kernel_call(meta, count, page_table, q4, k_pages, v_pages, *, n_part: int, scale: float,
                 causal: bool, config: DecodeConfig, num_ctas: int, interpret):
    t, hkv, g, d = q4.shape
    cap = meta.shape[0]
    dtype = q4.dtype
    if config.head_major_pages:
        _, _, page_size, _ = k_pages.shape
    else:
        _, page_size, _, _ = k_pages.shape
    bk, stages = config.block_kv, config.num_stages
    rpc = min(page_size, bk)  # key rows per TMA copy
    cpb = bk // rpc  # copies per block (per K and per V)
    dq_pad = _cdiv(ROWS, g)  # token rows of the Q/O staging buffers: dq_pad * g >= 64
    rows_pad = dq_pad * g
    c = scale * _LOG2E
    tiles_transform = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def page_src(ref, page, row, kvh):
        if config.head_major_pages:
            return ref.at[page, kvh, pl.ds(row, rpc)]
        return ref.at[page, pl.ds(row, rpc), kvh]

    def body(meta_ref, count_ref, pt_ref, q_ref, k_ref, v_ref,  # inputs (GMEM)
             out_ref, lse_ref, opart_ref,  # outputs (GMEM)
             q_raw, q_tile, k_smem, v_smem, p_smem, o_smem, lse_smem,
             q_full, q_free, k_full, v_full, consumed):
        wg = lax.axis_index("wg")
        cta = lax.axis_index("cta")
        num_tiles = count_ref[0] * hkv
        n_local = jnp.maximum(0, _cdiv(num_tiles - cta, num_ctas))

        def tile_info(i):
            tile = cta + i * num_ctas
            item, kvh = tile // hkv, lax.rem(tile, hkv)
            f = lambda col: meta_ref[item, col]
            return item, kvh, f

        @pl.when(wg == 1)
        def _producer():
            def tile_body(i, step):
                item, kvh, f = tile_info(i)
                seq, q_start, kv_start, kv_end = f(_SEQ), f(_QSTART), f(_KVSTART), f(_KVEND)

                @pl.when(i > 0)
                def _():
                    plgpu.barrier_wait(q_free)

                # One TMA per token: the item's (token, group head) rows are a 3-D box in
                # q, and Mosaic's layout inference cannot take a reshaped TMA target that
                # is also read into registers. Tokens past the item are loaded too (their
                # rows are ignored); the clamp keeps the last ones inside q.
                for tok in range(dq_pad):
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
                        plgpu.copy_gmem_to_smem(page_src(k_ref, page, row, kvh),
                                                k_smem.at[slot, dst], k_full.at[slot])
                        plgpu.copy_gmem_to_smem(page_src(v_ref, page, row, kvh),
                                                v_smem.at[slot, dst], v_full.at[slot])
                    return step + 1

                n_blocks = jnp.maximum(0, _cdiv(kv_end - kv_start, bk))
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

        @pl.when(wg == 0)
        def _consumer():
            row_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 0, layout=plgpu.Layout.WGMMA)
            col_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA)

            def tile_body(i, step):
                item, kvh, f = tile_info(i)
                q_start, q_len, q_pos = f(_QSTART), f(_QLEN), f(_QPOS)
                kv_start, kv_end, part = f(_KVSTART), f(_KVEND), f(_PART)

                plgpu.barrier_wait(q_full)
                q_tile[...] = q_raw[pl.ds(0, ROWS), :]
                plgpu.commit_smem()
                plgpu.barrier_arrive(q_free)

                def block_body(j, carry, masked: bool):
                    step, acc, m, l = carry
                    slot = lax.rem(step, stages)
                    plgpu.barrier_wait(k_full.at[slot])

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].T)
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                    if masked:
                        key = col_ids + (kv_start + j * bk)
                        ok = key < kv_end
                        if causal:  # key <= q_pos + row // g  <=>  (key - q_pos) * g <= row
                            ok &= (key - q_pos) * g <= row_ids
                        s = jnp.where(ok, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1) * c)
                    # A row that has seen only masked keys keeps m = -inf: use 0 so
                    # exp2 gives 0 (not NaN) for its masked entries and its alpha.
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    alpha = jnp.exp2(m - m_use)
                    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_use, s.shape, [0]))
                    l = l * alpha + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    p16 = p.astype(dtype)
                    plgpu.barrier_wait(v_full.at[slot])
                    if config.p_in_registers:
                        def pv(acc_ref):
                            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    else:
                        p_smem[...] = p16
                        plgpu.commit_smem()

                        def pv(acc_ref):
                            plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                            return acc_ref[...]

                        acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, d), jnp.float32))
                    plgpu.barrier_arrive(consumed.at[slot])
                    return step + 1, acc, m_new, l

                n_blocks = jnp.maximum(0, _cdiv(kv_end - kv_start, bk))
                # Blocks wholly below kv_end and the first row's diagonal need no mask.
                clear_end = jnp.minimum(kv_end, q_pos + 1) if causal else kv_end
                n_clear = jnp.clip((clear_end - kv_start) // bk, 0, n_blocks)
                carry = (step,
                         plgpu.layout_cast(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
                         plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                                           plgpu.Layout.WGMMA.reduce(1)),
                         plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32),
                                           plgpu.Layout.WGMMA.reduce(1)))
                carry = lax.fori_loop(0, n_clear, functools.partial(block_body, masked=False), carry)
                step, acc, m, l = lax.fori_loop(n_clear, n_blocks,
                                                functools.partial(block_body, masked=True), carry)

                seen = l > 0
                l_safe = jnp.where(seen, l, 1.0)
                o = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
                lse = jnp.where(seen, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)
                # The previous tile's stores must have finished reading o/lse_smem.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_smem[pl.ds(0, ROWS), :] = o
                lse_smem[...] = lse
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[item, kvh])

                @pl.when(part >= 0)  # split piece: the whole normalised tile
                def _():
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, ROWS)], opart_ref.at[part, kvh])

                for tok in range(dq_pad):  # unsplit: its tokens' rows straight into out
                    @pl.when((part < 0) & (tok < q_len))
                    def _():
                        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(tok * g, g)],
                                                out_ref.at[q_start + tok, kvh])
                return step

            lax.fori_loop(0, n_local, tile_body, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

    scratch = (
        plgpu.SMEM((rows_pad, d), dtype),  # q_raw: TMA target, row = token * g + head
        plgpu.SMEM((ROWS, d), dtype, transforms=tiles_transform),  # q_tile (wgmma A)
        plgpu.SMEM((stages, bk, d), dtype, transforms=tiles_transform),  # K ring
        plgpu.SMEM((stages, bk, d), dtype, transforms=tiles_transform),  # V ring
        None if config.p_in_registers else  # P staging (interpret-safe path)
        plgpu.SMEM((ROWS, bk), dtype, transforms=tiles_transform),
        plgpu.SMEM((rows_pad, d), jnp.float32),  # o staging, same rows
        plgpu.SMEM((ROWS,), jnp.float32),  # lse staging
        plgpu.Barrier(num_arrivals=dq_pad),  # q_full: one TMA per token
        plgpu.Barrier(),  # q_free
        plgpu.Barrier(num_arrivals=cpb, num_barriers=stages),  # k_full
        plgpu.Barrier(num_arrivals=cpb, num_barriers=stages),  # v_full
        plgpu.Barrier(num_barriers=stages),  # consumed
    )
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    if interpret and config.p_in_registers:
        raise ValueError("GPU interpret mode cannot run p_in_registers=True (register A "
                         "operand of wgmma); use DecodeConfig(p_in_registers=False)")
    out_type = (jax.ShapeDtypeStruct((t, hkv, g, d), jnp.float32),
                jax.ShapeDtypeStruct((cap, hkv, ROWS), jnp.float32),
                jax.ShapeDtypeStruct((n_part, hkv, ROWS, d), jnp.float32))
    return plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch, grid=(num_ctas,), grid_names=("cta",),
        num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret or None,
    )(meta, count, page_table, q4, k_pages, v_pages)


def _combine(out4, lse_tiles, opart, items: WorkList, part, n_split, *, g: int):
    """LSE-merge split pieces and scatter all rows into out [T, Hq, D] f32, lse [T, Hq] f32."""
    t, hkv, _, d = out4.shape
    cap = items.seq.shape[0]
    n_part = opart.shape[0]
    valid = jnp.arange(cap) < items.count
    r = jnp.arange(ROWS)
    tok_off, head_in_group = r // g, r % g
    heads = jnp.arange(hkv)[:, None] * g + head_in_group[None, :]  # [Hkv, 64]

    def rows_of(q_start, q_len, keep):  # [n] -> token index [n, 64] (t = dropped)
        tok = q_start[:, None] + tok_off[None, :]
        return jnp.where(keep[:, None] & (tok_off[None, :] < q_len[:, None]), tok, t)

    # Unsplit items: the kernel wrote out rows already; their lse comes from the tiles.
    tok = rows_of(items.q_start, items.q_len, valid & (part < 0))
    lse = jnp.full((t, hkv * g), -jnp.inf, jnp.float32)
    tok_b = jnp.broadcast_to(tok[:, None, :], (cap, hkv, ROWS))
    head_b = jnp.broadcast_to(heads[None], (cap, hkv, ROWS))
    lse = lse.at[tok_b, head_b].set(lse_tiles, mode="drop")

    # Split pieces: slot p of opart holds item part_item[p].
    part_item = jnp.zeros(n_part, jnp.int32).at[jnp.where(part >= 0, part, n_part)].set(
        jnp.arange(cap, dtype=jnp.int32), mode="drop")
    pv = jnp.arange(n_part) < n_split
    qs, ql = items.q_start[part_item], items.q_len[part_item]
    row_ok = pv[:, None] & (tok_off[None, :] < ql[:, None])  # [P, 64]
    lse_p = jnp.where(row_ok[:, None, :], lse_tiles[part_item], -jnp.inf)  # [P, Hkv, 64]
    same = (qs[:, None] == qs[None, :]) & pv[:, None] & pv[None, :]  # pieces of one parent
    m = jnp.where(same[:, :, None, None], lse_p[None], -jnp.inf).max(axis=1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_p - m_safe)  # each piece against its own parent's max
    o_w = jnp.where(row_ok[:, None, :, None], opart * w[..., None], 0.0)
    s = jnp.einsum("pj,jhr->phr", same.astype(jnp.float32), w)
    o = jnp.einsum("pj,jhrd->phrd", same.astype(jnp.float32), o_w,
                   precision=lax.Precision.HIGHEST)
    o = o / jnp.where(s > 0, s, 1.0)[..., None]
    lse_c = jnp.where(s > 0, m_safe + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)
    first = pv & (items.split[part_item] == 0)  # one writer per parent
    tok = rows_of(qs, ql, first)
    tok_b = jnp.broadcast_to(tok[:, None, :], (n_part, hkv, ROWS))
    head_b = jnp.broadcast_to(heads[None], (n_part, hkv, ROWS))
    out = out4.reshape(t, hkv * g, d).at[tok_b, head_b].set(o, mode="drop")
    lse = lse.at[tok_b, head_b].set(lse_c, mode="drop")
    # Rows no item covers were never written (and fully masked rows are 0 already).
    out = jnp.where(jnp.isfinite(lse)[..., None], out, 0.0)
    return out, lse


def decode_partials(q, k_pages, v_pages, page_table, items: WorkList, *, bounds: Bounds,
                    scale: float, causal: bool = True, interpret=False,
                    config: DecodeConfig | None = None):
    """The kernel alone: out4 [T, Hkv, G, D] (unsplit rows only), lse tiles [cap, Hkv, 64],
    split-piece tiles [n_part, Hkv, 64, D], and each item's partial slot (-1: unsplit)."""
    config = config or default_config(bool(interpret))
    _check(bounds, q, k_pages, config)
    t, hq, d = q.shape
    g = bounds.group
    cap = items.seq.shape[0]
    n_part = split_capacity(bounds, cap)
    valid = jnp.arange(cap) < items.count
    is_split = valid & (items.num_splits > 1)
    rank = jnp.cumsum(is_split.astype(jnp.int32)) - 1
    part = jnp.where(is_split & (rank < n_part), rank, -1).astype(jnp.int32)
    n_split = jnp.minimum(is_split.sum(), n_part)
    meta = jnp.stack([items.seq, items.q_start, items.q_len, items.q_pos, items.kv_start,
                      items.kv_end, part, jnp.zeros_like(part)], axis=1).astype(jnp.int32)
    count = jnp.reshape(items.count, (1,)).astype(jnp.int32)
    out4, lse_tiles, opart = _kernel_call(
        meta, count, page_table.astype(jnp.int32), q.reshape(t, hq // g, g, d), k_pages, v_pages,
        n_part=n_part, scale=float(scale), causal=causal, config=config,
        num_ctas=config.num_ctas or bounds.num_workers, interpret=interpret)
    return out4, lse_tiles, opart, part, n_split


def decode_attention(q, k_pages, v_pages, page_table, kv_lens, items: WorkList, *,
                     bounds: Bounds, scale: float, causal: bool = True, chunk_size=None,
                     interpret=False, config: DecodeConfig | None = None):
    """Attention of the rows the decode work list covers.

    q [T, Hq, D]; k_pages, v_pages [num_pages, page_size, Hkv, D]; page_table
    [S, pages_per_seq] int32; items: ``plan(...).decode``. ``kv_lens`` and
    ``chunk_size`` are implied by the items' key ranges (the planner already
    cut chunked-local layers at the chunk start) and are accepted for a
    uniform kernel signature. ``interpret``: False (GPU), True or a
    ``plgpu.InterpretGPUParams`` (GPU interpret mode, e.g. with the race
    detector). Returns out [T, Hq, D] f32 and lse [T, Hq] f32; rows no item
    covers are 0 / -inf.
    """
    del kv_lens, chunk_size
    out4, lse_tiles, opart, part, n_split = decode_partials(
        q, k_pages, v_pages, page_table, items, bounds=bounds, scale=scale, causal=causal,
        interpret=interpret, config=config)
    return _combine(out4, lse_tiles, opart, items, part, n_split, g=bounds.group)
