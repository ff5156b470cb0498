"""The split-KV combine: a small Mosaic GPU kernel (Hopper) that merges the pieces of each
split parent by log-sum-exp, after :mod:`jaxattn.kernels.decode`'s main kernel.

A *parent* is a decode item's key range on one KV head that the planner split into pieces;
the main kernel leaves each piece's normalised rows and lse in a compact partial buffer
(:class:`Pieces`, slots from :mod:`jaxattn.kernels.decode_schedule`). A few CTAs per column
block take the step's split parents in turn from a compact list and stream only the pieces'
rows (a decode piece's first 8), so its cost follows the real number of parents, pieces and
tokens, not the static capacity (an XLA merge over the padded partial buffer pays for the
whole capacity on every call: benchmarks/NOTES-decode.md, v1; a CTA per partial slot paid ~8
waves of empty CTAs: v6). Unsplit tiles (short contexts, round robin) never touch it. Its
merge of one parent (:class:`Merger`) also runs inside the main kernel, on the CTA that
finishes the parent's last piece, under ``DecodeConfig.fold_combine``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.kernels import common, fp8
from jaxattn.planner import DECODE_TILE_ROWS as ROWS  # rows of a tile, and of a piece


@dataclasses.dataclass(frozen=True)
class CombineConfig:
    """Static tuning of the combine kernel (:func:`combine_pieces`).

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
    (benchmarks/results/decode-combine-2026-12-02-s20.md). A warpgroup's share of a
    one-token parent larger than its ring of 64-row slots (8 of a 16-piece parent's,
    against 5 slots at the default) comes in batches of 8-row slots, all in flight at once,
    instead of a second round trip through the ring: on one H100 the combine took 5.5 / 5.8
    µs at 1 x 8k / 1 x 128k against 5.9-6.0 / 6.1-6.3 in two runs of the ring alone, the
    layer 17.4 µs twice at 1 x 8k against 17.6-17.8
    (benchmarks/results/decode-2026-12-07-s56-{new,base}*.md).

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


class Pieces(NamedTuple):
    """What the main kernel leaves the combine kernel: each split piece's rows and lse
    tile by partial slot."""

    rows: jax.Array  # f32 [n_part, 64, D]: normalised rows (tokens x group heads)
    lse: jax.Array  # f32 [n_part, 64]


def combine_columns(config: CombineConfig, d: int, g: int, out_dtype) -> int:
    """Head-dim columns per combine CTA: ``config.cols``, widened until a token's rows
    (``g * cols`` values) span whole 128-byte units in the output staging buffer (and so in
    the f32 slots), since token ``tok``'s TMA copies start ``tok * g * cols * itemsize``
    bytes in and a TMA's SMEM address must be 128-byte aligned. (32 columns at G = 5 in
    bf16 start token 1 at 320 bytes: a misaligned-address fault on the H200 for
    multi-token pieces.) FP8 rows (one byte each) widen to 128 columns at G = 5: twice the
    bytes per ring slot, so 2 slots a warpgroup at the default 2 warpgroups, and 4
    warpgroups exceed shared memory."""
    cw = min(d, config.cols)
    while cw < d and (g * cw * jnp.dtype(out_dtype).itemsize) % 128:
        cw *= 2
    return cw


REDUCE_LAYOUT = plgpu.Layout.WGMMA.reduce(1)


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


@dataclasses.dataclass(frozen=True)
class Merger:
    """The static shape of one CTA's merge of split parents: ``nwg`` warpgroups, each with a
    ring of ``ring`` 64-row slots of ``cw`` f32 columns. The combine kernel runs it per
    parent, and so does the main kernel's CTA that finishes a parent's last piece
    (:mod:`jaxattn.kernels.decode`, ``DecodeConfig.fold_combine``)."""

    g: int  # query heads per KV head: a token's rows
    cw: int  # head-dim columns of a pass
    nwg: int
    ring: int
    share_from: int
    out_dtype: Any
    out_scale: float | None = None

    @property
    def one_token_rows(self) -> int:
        return common.cdiv(self.g, 8) * 8

    @property
    def one_ring(self) -> int:
        """One-token slots of a batch: a warpgroup's share of more one-token pieces (every
        piece at decode) than ``ring`` comes in batches of slots of ``one_token_rows`` rows
        in the same shared memory, a slot's 64-row window reaching into the next slots'
        rows: all in flight at once (16 a warpgroup at the combine's default, against 5 of
        64 rows)."""
        return min(32 // self.nwg, (self.ring * ROWS - ROWS) // self.one_token_rows + 1)

    @property
    def slots(self) -> int:
        return max(self.ring, self.one_ring)  # barriers (and lse tiles) per warpgroup

    def buffers(self) -> tuple:
        """Shared memory that may alias other buffers between merges (a RefUnion group).
        The rows are swizzled: a 64-row window is read in the wgmma layout, whose 8 rows a
        warp reads at once lie ``cw * 4`` bytes apart, in the same banks where unswizzled
        (an 8-way conflict on every load)."""
        swizzle = min(128, self.cw * 4)
        rows = plgpu.SMEM((self.nwg, self.ring * ROWS, self.cw), jnp.float32, transforms=(
            plgpu.TilingTransform((8, swizzle // 4)), plgpu.SwizzleTransform(swizzle)))
        return (rows,
                plgpu.SMEM((self.nwg * self.slots, ROWS), jnp.float32),  # lse tiles
                plgpu.SMEM((ROWS, self.cw), self.out_dtype))  # a parent's merged rows

    def barriers(self) -> tuple:
        """The rest of its scratch: each slot's barrier (rows + lse), and with several
        warpgroups the states they hand warpgroup 0."""
        shares = None if self.nwg == 1 else (
            plgpu.SMEM((self.nwg - 1, ROWS, self.cw), jnp.float32),  # warpgroups 1..'s O
            plgpu.SMEM((self.nwg - 1, 2, ROWS), jnp.float32),  # ... their max and weight sum
            plgpu.Barrier(num_arrivals=self.nwg - 1),  # ready: their states are in SMEM
            plgpu.Barrier())  # taken: warpgroup 0 has read them
        return plgpu.Barrier(num_arrivals=2, num_barriers=self.nwg * self.slots), shares

    def smem_bytes(self) -> int:
        full, shares = self.barriers()
        return common.smem_bytes((*self.buffers(), full, *(shares or ())))

    @jax.named_scope("merge")
    def merge(self, slot0, slot_meta, wg, cols, opart_ref, lpart_ref, out_ref, lse_out_ref,
              buffers, barriers, write_lse):
        """One parent: its pieces sit in slots [slot0, slot0 + n); this warpgroup's are
        slot0 + wg + j * nwg (``slot_meta``: the slot's row of cmeta, (n, q_start, q_len,
        kv head)). Its rows go to ``out_ref`` (columns ``cols``) and, where ``write_lse``,
        its lse to ``lse_out_ref[slot0]``. Every barrier gets as many waits as arrivals, so
        their phases carry over to the next parent."""
        o_buf, l_buf, o_out = buffers
        full, shares = barriers
        nwg, ring, one_ring, slots = self.nwg, self.ring, self.one_ring, self.slots
        n, q_start, q_len, kvh = slot_meta
        # A parent of few pieces is warpgroup 0's alone: handing over states costs more.
        shared = n >= self.share_from
        stride = jnp.where(shared, nwg, 1)
        n_mine = jnp.where(shared, jnp.maximum(n - wg + nwg - 1, 0) // nwg,
                           jnp.where(wg == 0, n, 0))
        one = q_len == 1
        # More one-token pieces than the ring holds go in batches, all in flight at once;
        # the rest through the ring (refilled as its slots are read).
        batched = one & (n_mine > ring)
        n_batched, n_ring = jnp.where(batched, n_mine, 0), jnp.where(batched, 0, n_mine)

        def issue(j, b, rows):
            """Piece j's first rows (one token's, else all 64) into this warpgroup's rows
            from ``rows``, its lse into tile b, both on barrier b."""
            bar = full.at[wg * slots + b]
            slot = slot0 + wg + j * stride
            for n_rows, when in ((self.one_token_rows, one), (ROWS, ~one)):
                pl.when(when)(functools.partial(
                    plgpu.copy_gmem_to_smem, opart_ref.at[slot, pl.ds(0, n_rows), cols],
                    o_buf.at[wg, pl.ds(rows, n_rows)], bar))
            plgpu.copy_gmem_to_smem(lpart_ref.at[slot], l_buf.at[wg * slots + b], bar)

        def add(state, b, rows):
            """The state with the piece in lse tile b and the 64-row window from ``rows``
            added. Rows past the piece's tokens are another piece's or whatever the slot
            held; rows are independent and those are never written out."""
            o = plgpu.load(o_buf.at[wg, pl.ds(rows, ROWS)], layout=plgpu.Layout.WGMMA)
            lse = plgpu.load(l_buf.at[wg * slots + b], layout=REDUCE_LAYOUT)
            return combine(state, (o, lse))

        def batch(i, state):
            """Up to ``one_ring`` one-token pieces: all copied, all waited for, then added
            (a window reads the next slots' rows, so none is read while one lands)."""
            start = i * one_ring
            count = jnp.minimum(one_ring, n_batched - start)
            plgpu.commit_smem()  # the previous batch's windows are read before these land
            with jax.named_scope("copies"):
                @pl.loop(0, count)
                def _(b):
                    issue(start + b, b, b * self.one_token_rows)

                @pl.loop(0, count)
                def _(b):
                    plgpu.barrier_wait(full.at[wg * slots + b])

            with jax.named_scope("add"):
                return lax.fori_loop(
                    0, count, lambda b, st: add(st, b, b * self.one_token_rows), state)

        @pl.loop(0, jnp.minimum(n_ring, ring))
        def _(j):
            issue(j, j, j * ROWS)

        def ring_step(j, state):
            b = lax.rem(j, ring)
            plgpu.barrier_wait(full.at[wg * slots + b])
            state = add(state, b, b * ROWS)

            @pl.when(j + ring < n_ring)
            def _():
                plgpu.commit_smem()  # every thread has read slot b before it is refilled
                issue(j + ring, b, b * ROWS)

            return state

        state = (plgpu.layout_cast(jnp.zeros((ROWS, self.cw), jnp.float32),
                                   plgpu.Layout.WGMMA),
                 plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), REDUCE_LAYOUT),
                 plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), REDUCE_LAYOUT))
        state = lax.fori_loop(0, common.cdiv(n_batched, one_ring), batch, state)
        state = lax.fori_loop(0, n_ring, ring_step, state)
        out = (slot0, q_start, q_len, kvh, cols, out_ref, lse_out_ref, l_buf, o_out, write_lse)
        if nwg == 1:
            self._write(*state, *out)
            return
        # Warpgroups 1.. hand their states to warpgroup 0 through SMEM and wait until it
        # has read them (the next parent's states go to the same place).
        o_sh, ms_sh, ready, taken = shares
        pl.when(~shared & (wg == 0))(lambda: self._write(*state, *out))

        @pl.when(shared & (wg > 0))
        @jax.named_scope("hand_over")
        def _():
            acc, m, s = state
            o_sh[wg - 1] = acc
            ms_sh[wg - 1, 0] = m
            ms_sh[wg - 1, 1] = s
            plgpu.barrier_arrive(ready)
            plgpu.barrier_wait(taken)

        @pl.when(shared & (wg == 0))
        @jax.named_scope("take_over")
        def _():
            plgpu.barrier_wait(ready)
            mine = state
            for w in range(nwg - 1):
                # A share is a weighted sum of rows under its own max, its weights' sum s.
                mine = combine(mine, (plgpu.load(o_sh.at[w], layout=plgpu.Layout.WGMMA),
                                      plgpu.load(ms_sh.at[w, 0], layout=REDUCE_LAYOUT),
                                      plgpu.load(ms_sh.at[w, 1], layout=REDUCE_LAYOUT)))
            plgpu.barrier_arrive(taken)
            self._write(*mine, *out)

    @jax.named_scope("write")
    def _write(self, acc, m, s, slot0, q_start, q_len, kvh, cols, out_ref, lse_out_ref, l_buf,
               o_out, write_lse):
        g = self.g
        seen = s > 0
        s_safe = jnp.where(seen, s, 1.0)
        o = acc / lax.broadcast_in_dim(s_safe, acc.shape, [0])
        o_out[...] = fp8.cast_out(o, self.out_dtype, self.out_scale)
        l_buf[0] = jnp.where(seen, m + jnp.log(s_safe), -jnp.inf)
        plgpu.commit_smem()

        @pl.loop(0, q_len)
        def _(tok):
            plgpu.copy_smem_to_gmem(o_out.at[pl.ds(tok * g, g)],
                                    out_ref.at[q_start + tok, kvh, :, cols])

        @pl.when(write_lse)
        def _():
            plgpu.copy_smem_to_gmem(l_buf.at[0], lse_out_ref.at[slot0])

        # The next parent's result and lse go to o_out and slot 0 only after these stores
        # have read them.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def combine_pieces(cmeta, parents, pieces: Pieces, out_ref, *, g: int, workers: int,
                   out_dtype, interpret, config: CombineConfig = CombineConfig(),
                   out_scale=None):
    """Merge the split pieces of each parent (an item's key range on one KV head) by
    log-sum-exp.

    ``parents`` (int32 [1 + n_part]): the number of split parents, then each
    one's first partial slot. The grid is (w, head-dim column blocks) with
    ``w`` a few workers that take parents ``w, w + W, ...``: with at most
    ``workers`` CTAs in all, a step without split parents costs one wave of
    CTAs that exit at once. Per parent each warpgroup of a CTA streams its share of
    the pieces (a one-token piece's first 8 rows, else all 64) through a ring of SMEM
    slots, keeps a running max / sum / weighted O in registers; warpgroup 0 merges the
    shares and writes the parent's rows into ``out_ref`` (in place, ``out_dtype``; FP8 under
    the static ``out_scale``: :func:`fp8.quantize_fixed`). Returns the merged lse tiles
    [n_part, 64] (row of a parent's first slot).
    """
    n_part, _, d = pieces.rows.shape
    cw = combine_columns(config, d, g, out_dtype)
    nwg = config.warpgroups
    # A piece's load is small (1.25 KiB for one token); depth hides the TMA latency when
    # one long sequence has W pieces. `ring` 64-row slots per warpgroup (a group of barriers
    # holds at most 32).
    ring = max(2, min(16, 32 // nwg, (160 * 1024) // (ROWS * cw * 4) // nwg))
    merger = Merger(g=g, cw=cw, nwg=nwg, ring=ring, share_from=config.share_from,
                    out_dtype=out_dtype, out_scale=out_scale)
    smem = merger.smem_bytes()
    if smem > common.MAX_SMEM:
        raise ValueError(f"CombineConfig(warpgroups={nwg}) with {cw}-column CTAs (G={g}, "
                         f"{jnp.dtype(out_dtype).name} rows) needs {smem // 1024} KiB of shared "
                         f"memory: use at most 2 warpgroups")
    # Each parent has two pieces or more, so there are at most n_part // 2.
    n_w = max(1, min(n_part // 2, workers // (d // cw)))

    def decode_combine_kernel(cmeta_ref, parents_ref, opart_ref, lpart_ref, out_ref,
                              lse_out_ref, *scratch):
        col = lax.axis_index("col")
        w = lax.axis_index("w")
        # The step's plan (parents, cmeta) was written before the layer's first kernel, so
        # this worker's first parent is read before the wait for the main kernel (whose
        # pieces it merges): that chain of GMEM reads overlaps the main kernel's tail.
        # (w < n_w <= max(1, n_part // 2), so 1 + w <= n_part indexes parents; the clip
        # keeps slot0 a row of cmeta whatever an unused entry of parents holds.)
        n_parents = parents_ref[0]
        slot0 = jnp.clip(parents_ref[1 + w], 0, n_part - 1)
        first = tuple(cmeta_ref[slot0, i] for i in range(4))
        with jax.named_scope("wait"):
            common.dependent_launch(interpret)
        merge = functools.partial(
            merger.merge, wg=lax.axis_index("wg"), cols=pl.ds(col * cw, cw),
            opart_ref=opart_ref, lpart_ref=lpart_ref, out_ref=out_ref, lse_out_ref=lse_out_ref,
            buffers=scratch[:3], barriers=scratch[3:], write_lse=col == 0)
        pl.when(w < n_parents)(lambda: merge(slot0, first))

        @pl.loop(w + n_w, n_parents, step=n_w)
        def _(i):
            slot = parents_ref[1 + i]
            merge(slot, tuple(cmeta_ref[slot, c] for c in range(4)))

    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    return plgpu.kernel(
        decode_combine_kernel, out_type=jax.ShapeDtypeStruct((n_part, ROWS), jnp.float32),
        grid=(n_w, d // cw), grid_names=("w", "col"), num_threads=nwg, thread_name="wg",
        scratch_types=(*merger.buffers(), *merger.barriers()),
        compiler_params=common.compiler_params(approx_math=config.approx_math),
        interpret=interpret or None,
    )(cmeta, parents, pieces.rows, pieces.lse, out_ref)
