"""The decode kernels' metadata: small XLA work, once per step, from the planner's decode work
list (:func:`decode_metadata`).

It deals the (item, KV head) tiles to the main kernel's persistent CTAs (:func:`deal_tiles`),
gives each piece of a split parent a slot in the partial buffer that
:mod:`jaxattn.kernels.decode_combine` merges, and records where each token's lse comes from.
Every array has a static size (:func:`split_capacity` bounds the partial slots), so a step's
lengths change only values. A model builds it once per step and shares it among the layers
of one attention kind (``jaxattn.kernels.prepare``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.kernels import common
from jaxattn.planner import Bounds, WorkList

# Tile metadata columns (one int32 row per tile, read as scalars from GMEM). PART: the
# partial slot of a split piece, or -1 - item for an unsplit tile (its lse tile's row).
# PARENT: a split piece's parent's first slot (its row of cmeta holds the piece count), else -1.
SEQ, Q_START, Q_LEN, Q_POS, KV_START, KV_END, PART, KV_HEAD, PARENT = range(9)


def split_capacity(bounds: Bounds, cap_items: int) -> int:
    """Static bound on the split pieces (tiles whose parent, an item's key range on one KV
    head, has two or more).

    A parent split into n >= 2 pieces of L keys has work w > L, so n = ceil(w / L) <
    w / L + 1 < 2 w / L; summing over split parents, pieces < 2 * sum(w) / L <= 2 W because
    the planner picks L >= sum(w) / W (W = bounds.split_target): at most 2W - 1 items, a
    tile on each KV head.
    """
    return max(1, min(cap_items, 2 * bounds.split_target - 1) * bounds.num_kv_heads)


class DecodeMeta(NamedTuple):
    """Kernel metadata derived from the decode work list (once per step, shared by all
    layers of a kind)."""

    meta: jax.Array  # int32 [tiles, 9]: the tiles CTA by CTA (columns SEQ..PARENT)
    cta_start: jax.Array  # int32 [num_ctas + 1]: CTA c runs tiles [cta_start[c], cta_start[c+1])
    cmeta: jax.Array  # int32 [n_part, 4]: per partial slot (pieces if its parent's first
    #                   slot else 0, q_start, q_len, KV head)
    parents: jax.Array  # int32 [1 + n_part]: number of split parents, then their first slots
    tok_src: jax.Array  # int32 [T, Hkv]: where a token's lse tile is: its item's (>= 0), the
    #                     merged tile of its parent's first slot (-2 - slot), none (-1)
    q_start: jax.Array  # int32 [cap]
    zero_rows: jax.Array  # int32 [1 + T]: how many token rows no tile covers, then those rows
    tickets: jax.Array  # int32 [n_part]: zeros. The main kernel's folded combine counts a
    #                     parent's finished pieces at its first slot, and the piece that
    #                     finishes last merges the parent and puts 0 back, so every layer
    #                     sharing this metadata finds zeros (kernels.decode, fold_combine).


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
    parent = jnp.where(is_split, slot - items.split[item], -1)  # split k sits k slots in
    meta = jnp.stack([items.seq[item], q_start, items.q_len[item], items.q_pos[item], kv_start,
                      kv_end, part, kvh, parent], axis=1)
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
    # Zeros computed from the step's values, not a constant: XLA gives them one buffer of
    # their own, made once per step (a constant or broadcast could be rematerialised per use).
    tickets = jnp.minimum(cmeta[:, 0], 0)
    return DecodeMeta(meta, cta_start, cmeta, _parents(cmeta), tok_src,
                      items.q_start.astype(jnp.int32), zero_rows.astype(jnp.int32), tickets)


def _parents(cmeta):
    """int32 [1 + n_part]: how many slots hold a parent's first piece, then those slots."""
    n_part = cmeta.shape[0]
    first = cmeta[:, 0] > 0
    at = jnp.where(first, jnp.cumsum(first, dtype=jnp.int32), n_part + 1)
    return (jnp.zeros((n_part + 1,), jnp.int32)
            .at[at].set(jnp.arange(n_part, dtype=jnp.int32), mode="drop")
            .at[0].set(first.sum(dtype=jnp.int32)))
