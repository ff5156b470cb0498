"""The decode kernels' metadata (kernels/sched.py): the tile deal, the partial
slots of split pieces and where each token's lse comes from, against the planner's lists."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn import planner
from jaxattn.kernels import decode_schedule as sched


_PLANNERS = {}


# Compiled once per bounds (run op by op, the metadata took most of the test's time).
_decode_metadata = jax.jit(sched.decode_metadata, static_argnames=("bounds", "num_tokens"))


def _planner(chunk, num_workers, min_split_kv):
    """One jitted planner per bounds, so hypothesis examples reuse compilations."""
    key = (chunk, num_workers, min_split_kv)
    if key not in _PLANNERS:
        bounds = jaxattn.Bounds(max_num_seqs=8, max_num_batched_tokens=96, max_model_len=4096,
                                page_size=16, num_q_heads=10, num_kv_heads=2, head_dim=64,
                                chunk_size=chunk, block_kv=64, num_workers=num_workers,
                                min_split_kv=min_split_kv)
        fn = jax.jit(lambda cu, kv, n: planner.plan(bounds, cu, kv, n, chunk_size=chunk).decode)
        _PLANNERS[key] = bounds, fn
    return _PLANNERS[key]


@settings(max_examples=60, deadline=None)
@given(blocks=st.lists(st.integers(0, 40), min_size=1, max_size=24),
       num_ctas=st.integers(1, 40))
def test_round_robin_deals_every_tile_once_in_turn(blocks, num_ctas):
    """decode_schedule.deal_tiles: the live tiles, each once, CTA c's a contiguous run of the live
    tiles c, c + num_ctas, ... in list order."""
    nb = np.asarray(blocks, np.int32)
    pair, valid, cta_start = map(np.asarray, sched.deal_tiles(jnp.asarray(nb), num_ctas))
    live = np.flatnonzero(nb)
    n = int(valid.sum())
    assert n == len(live) and valid[:n].all() and not valid[n:].any()
    assert cta_start[0] == 0 and cta_start[-1] == n and (np.diff(cta_start) >= 0).all()
    for c in range(num_ctas):
        assert list(pair[cta_start[c]:cta_start[c + 1]]) == list(live[c::num_ctas])


@settings(max_examples=30, deadline=None)
@given(chunk=st.sampled_from([None, 256]), num_workers=st.sampled_from([1, 3, 16]),
       min_split_kv=st.sampled_from([64, 512]),
       seqs=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 4096)), min_size=1,
                     max_size=8))
def test_metadata_slots_hold_every_split_piece(chunk, num_workers, min_split_kv, seqs):
    """The partial buffer holds every split piece of the planner, in order (q_start, KV head,
    first key), so a parent's pieces are contiguous slots, and each token's lse points at its
    tile."""
    bounds, planner_fn = _planner(chunk, num_workers, min_split_kv)
    n = len(seqs)
    cu = np.zeros(9, np.int32)
    cu[1:n + 1] = np.cumsum([q for q, _ in seqs])
    cu[n + 1:] = cu[n]
    kv_lens = np.zeros(8, np.int32)
    kv_lens[:n] = [max(q, kv) for q, kv in seqs]
    items = planner_fn(cu, kv_lens, np.int32(n))
    md = jax.tree.map(np.asarray, _decode_metadata(items, bounds=bounds, num_tokens=96))
    tiles = md.meta[:md.cta_start[-1]]
    split = tiles[:, sched.PART] >= 0
    slots = np.sort(tiles[split, sched.PART])
    assert (slots == np.arange(len(slots))).all()  # dense, unique, under n_part
    assert len(slots) <= md.cmeta.shape[0]
    by_slot = tiles[split][np.argsort(tiles[split, sched.PART])]
    key = [(r[sched.Q_START], r[sched.KV_HEAD], r[sched.KV_START]) for r in by_slot]
    assert key == sorted(key)
    for s in md.parents[1:1 + md.parents[0]]:
        k = md.cmeta[s, 0]
        rows = tiles[np.isin(tiles[:, sched.PART], np.arange(s, s + k))]
        assert len(rows) == k >= 2
        assert (rows[:, sched.PARENT] == s).all()  # each piece finds its parent's count
        assert {(r[sched.Q_START], r[sched.KV_HEAD]) for r in rows} == {
            (md.cmeta[s, 1], md.cmeta[s, 3])}
        ranges = sorted((r[sched.KV_START], r[sched.KV_END]) for r in rows)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # one key range
    # A token's lse comes from an unsplit tile of its rows and head, or its parent's merge.
    for t, h in zip(*np.nonzero(md.tok_src != -1)):
        src = md.tok_src[t, h]
        if src >= 0:
            mine = tiles[tiles[:, sched.PART] == -1 - src]
            assert h in mine[:, sched.KV_HEAD]
            assert (mine[:, sched.Q_START] <= t).all()
            assert (t < mine[:, sched.Q_START] + mine[:, sched.Q_LEN]).all()
        else:
            s = -2 - src
            assert s in md.parents[1:1 + md.parents[0]] and md.cmeta[s, 3] == h
            assert md.cmeta[s, 1] <= t < md.cmeta[s, 1] + md.cmeta[s, 2]
    assert (tiles[~split, sched.PARENT] == -1).all()
    assert md.tickets.shape == (md.cmeta.shape[0],) and (md.tickets == 0).all()
    covered = (md.tok_src != -1).all(axis=1)
    assert (covered == (md.tok_src != -1).any(axis=1)).all()  # every head or none
    assert set(md.zero_rows[1:1 + md.zero_rows[0]]) == set(np.flatnonzero(~covered))


def test_parents_list_the_first_slot_of_each_split_parent():
    cmeta = jnp.zeros((7, 3), jnp.int32).at[jnp.array([0, 2, 5]), 0].set(jnp.array([2, 3, 2]))
    np.testing.assert_array_equal(sched._parents(cmeta), [3, 0, 2, 5, 0, 0, 0, 0])
