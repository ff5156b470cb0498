"""The static-shape tile planner: capacity is a proven bound, plans are complete and tight."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn import planner

from attention_cases import naive_mask

# Scout-like serving bounds: 8k tokens per step, 128k context, 8192-token chunks.
SCOUT = jaxattn.Bounds(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=131072,
                       page_size=16, num_q_heads=40, num_kv_heads=8, head_dim=128,
                       chunk_size=8192, block_q=128, block_kv=128)
BOUNDARY_LENGTHS = [1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 8191, 8192, 8193, 10000, 10001,
                    16383, 16384, 16385, 65536, 131071, 131072]


@functools.lru_cache(maxsize=None)
def _jitted_plan(bounds, chunk, causal=True):
    return jax.jit(functools.partial(planner.plan, bounds, chunk_size=chunk, causal=causal))


def _batch(bounds, q_lens, kv_lens):
    n = len(q_lens)
    cu = np.zeros(bounds.max_num_seqs + 1, np.int32)
    cu[1:n + 1] = np.cumsum(q_lens)
    cu[n + 1:] = cu[n]
    kv = np.zeros(bounds.max_num_seqs, np.int32)
    kv[:n] = kv_lens
    return cu, kv, np.int32(n)


def _exact_counts(bounds, q_lens, kv_lens, chunk):
    """Independent host count of segments and prefill items (before any capacity clipping)."""
    segments = prefill = decode_segments = 0
    for q, kv in zip(q_lens, kv_lens):
        p0 = kv - q
        cuts = [p0] + [c for c in range(((p0 // chunk) + 1) * chunk, kv, chunk)] if chunk else [p0]
        pieces = np.diff(cuts + [kv])
        segments += len(pieces)
        if q > bounds.dq:
            prefill += sum(-(-int(x) // bounds.block_q) for x in pieces)
        else:
            decode_segments += len(pieces)
    return segments, prefill, decode_segments


def _check_capacity(bounds, q_lens, kv_lens):
    cap = planner.capacity(bounds)
    for chunk in {None, bounds.chunk_size}:
        p = _jitted_plan(bounds, chunk)(*_batch(bounds, q_lens, kv_lens))
        demand = np.asarray(p.demand)
        segments, prefill, decode_segments = _exact_counts(bounds, q_lens, kv_lens, chunk)
        assert demand[0] == segments and demand[1] == prefill
        assert decode_segments <= demand[2] <= decode_segments + bounds.split_target
        assert demand[0] <= cap.segments, (demand, cap)
        assert demand[1] <= cap.prefill_items, (demand, cap)
        assert demand[2] <= cap.decode_items, (demand, cap)
        assert int(p.prefill.count) == prefill and int(p.decode.count) == demand[2]


@st.composite
def admissible_batches(draw, bounds):
    n = draw(st.integers(1, bounds.max_num_seqs))
    budget = bounds.max_num_batched_tokens
    q_lens = []
    for i in range(n):
        left = budget - sum(q_lens) - (n - i - 1)
        q_lens.append(draw(st.one_of(st.integers(1, max(1, min(left, 16))),
                                     st.integers(1, max(1, left)))))
    kv = [draw(st.one_of(st.integers(q, bounds.max_model_len),
                         st.sampled_from([x for x in BOUNDARY_LENGTHS + [bounds.max_model_len]
                                          if q <= x <= bounds.max_model_len] or [q])))
          for q in q_lens]
    return q_lens, kv


@given(admissible_batches(SCOUT))
def test_capacity_bounds_random_admissible_batches(batch):
    _check_capacity(SCOUT, *batch)


ADVERSARIAL = {
    "all_decode_max_context": ([1] * 256, [131072] * 256),
    "all_length_1_fresh": ([1] * 256, [1] * 256),
    "one_sequence_whole_budget": ([8192], [8192]),
    "whole_budget_straddling": ([8192], [8192 + 4096]),
    "whole_budget_at_max_len": ([8192], [131072]),
    # every sequence straddles a chunk boundary: 2 tokens ending just past a multiple of 8192
    "many_straddling": ([2] * 256, [8193 + 8192 * (i % 16) for i in range(256)]),
    "straddling_blocks": ([32] * 256, [8192 * (1 + i % 16) + 16 for i in range(256)]),
    "decode_q_straddling": ([SCOUT.dq] * 256, [8192 + SCOUT.dq // 2] * 256),
    "prefill_just_over_dq": ([SCOUT.dq + 1] * 256, [8193 + SCOUT.dq // 2] * 256),
    "mixed_boundaries": ([1, 63, 64, 65, 127, 128, 129, 1000, 2000, 3000],
                         [1, 8191, 8192, 8193, 10000, 10001, 16384, 65536, 131071, 131072]),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_capacity_bounds_adversarial_batches(name):
    _check_capacity(SCOUT, *ADVERSARIAL[name])


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_capacity_bounds_every_boundary_length(length):
    q = min(length, SCOUT.max_num_batched_tokens)
    _check_capacity(SCOUT, [q], [length])  # a prefill chunk ending at this length
    _check_capacity(SCOUT, [1] * 200, [length] * 200)  # decode at this context
    n = SCOUT.max_num_batched_tokens // q
    _check_capacity(SCOUT, [q] * min(n, 256), [length] * min(n, 256))


def test_capacity_is_static_and_grows_with_bounds():
    cap = planner.capacity(SCOUT)
    assert planner.capacity(SCOUT) == cap  # pure function of static ints
    bigger = planner.capacity(jaxattn.Bounds(**{**SCOUT.__dict__, "max_num_batched_tokens": 16384}))
    assert bigger.prefill_items > cap.prefill_items and bigger.segments > cap.segments


# --- coverage on small bounds: every allowed (query, key) pair exactly once, nothing wasted ---

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=80, page_size=4,
             num_q_heads=2, num_kv_heads=1, head_dim=8, block_q=8, block_kv=8, decode_q=3,
             num_workers=4, min_split_kv=8)


def _rasterize(bounds, p, cu, kv, n, chunk, causal):
    t = bounds.max_num_batched_tokens
    count = np.zeros((t, bounds.max_model_len), np.int32)
    for items, max_rows in ((p.prefill, bounds.block_q), (p.decode, bounds.dq)):
        it = {k: np.asarray(v) for k, v in items._asdict().items()}
        work = it["kv_end"][:it["count"]] - it["kv_start"][:it["count"]]
        assert (np.diff(work) <= 0).all(), "items must be sorted longest first"
        assert (it["q_len"][it["count"]:] == 0).all(), "padding items must be empty"
        for i in range(it["count"]):
            s, q0, ql, pos0 = it["seq"][i], it["q_start"][i], it["q_len"][i], it["q_pos"][i]
            k0, k1 = it["kv_start"][i], it["kv_end"][i]
            assert s < n and 1 <= ql <= max_rows and k0 % bounds.block_kv == 0
            seq_q = cu[s + 1] - cu[s]
            assert cu[s] <= q0 and q0 + ql <= cu[s + 1]
            assert pos0 == kv[s] - seq_q + (q0 - cu[s]), "q_pos must be the rows' position"
            pos = pos0 + np.arange(ql)
            if chunk:
                assert (pos // chunk == pos[0] // chunk).all(), "item straddles a chunk boundary"
            keys = np.arange(k0, k1)
            allowed = naive_mask(pos[:, None], keys[None, :], kv[s], causal, chunk)
            assert allowed.any(axis=0).all(), "item reads keys none of its rows may see"
            count[q0:q0 + ql, k0:k1] += allowed
    want = np.zeros_like(count)
    for s in range(n):
        ql = cu[s + 1] - cu[s]
        pos = kv[s] - ql + np.arange(ql)
        keys = np.arange(bounds.max_model_len)
        want[cu[s]:cu[s + 1]] = naive_mask(pos[:, None], keys[None, :], kv[s], causal, chunk)
    np.testing.assert_array_equal(count, want)


@pytest.mark.parametrize("chunk,causal", [(None, True), (16, True), (None, False), (16, False)])
@given(data=st.data())
def test_plan_covers_each_allowed_pair_exactly_once(chunk, causal, data):
    bounds = jaxattn.Bounds(**SMALL, chunk_size=16)
    q_lens, kv_lens = data.draw(admissible_batches(bounds))
    cu, kv, n = _batch(bounds, q_lens, kv_lens)
    p = _jitted_plan(bounds, chunk, causal)(cu, kv, n)
    _rasterize(bounds, p, cu, kv, int(n), chunk, causal)


# Chunks shorter than a decode tile's tokens (64 // group) and than a page: the default
# decode_q shrinks to the chunk (a decode sequence crosses at most one boundary) and the
# engine's block_kv to gcd(chunk, page_size), so every valid Llama 4 chunk size plans.
TINY = dict(max_num_seqs=4, max_num_batched_tokens=40, max_model_len=80, page_size=4,
            num_q_heads=6, num_kv_heads=2, head_dim=8, block_q=8, num_workers=4,
            min_split_kv=8)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 6, 16, 24])
@settings(max_examples=40)
@given(data=st.data())
def test_tiny_chunks_plan_within_capacity_and_cover_every_pair(chunk, data):
    from jaxattn.serve.config import default_block_kv

    bounds = jaxattn.Bounds(**TINY, chunk_size=chunk, block_kv=default_block_kv(chunk, 4))
    assert bounds.dq == min(64 // 3, chunk)
    q_lens, kv_lens = data.draw(admissible_batches(bounds))
    _check_capacity(bounds, q_lens, kv_lens)
    _check_reads_from_live_chunk(bounds, q_lens, kv_lens)
    cu, kv, n = _batch(bounds, q_lens, kv_lens)
    for c in (None, chunk):
        p = _jitted_plan(bounds, c)(cu, kv, n)
        _rasterize(bounds, p, cu, kv, int(n), c, True)


def test_the_default_decode_q_fits_the_chunk():
    """6 query / 2 KV heads with 16-token chunks was refused at start-up (decode_q=21 > 16)."""
    b = jaxattn.Bounds(**{**TINY, "page_size": 16}, chunk_size=16, block_kv=16)
    assert b.dq == 16 and jaxattn.Bounds(**{**TINY, "page_size": 16}, block_kv=16).dq == 21
    with pytest.raises(ValueError, match="exceeds chunk_size"):  # asked for explicitly
        jaxattn.Bounds(**{**TINY, "page_size": 16}, chunk_size=16, block_kv=16, decode_q=21)


def test_decode_splits_for_one_long_sequence():
    """1 x 128k keys on 8 KV heads and 132 CTAs: 16 pieces of 8192 keys (128 tiles, one round)
    rather than the smallest the budget allows, 32 of 4096 (256 tiles, two rounds and a
    combine twice the size)."""
    p = _jitted_plan(SCOUT, None)(*_batch(SCOUT, [1], [131072]))  # compiled by the tests above
    assert int(p.decode.count) == int(p.decode.num_splits[0]) == 16
    assert int(p.decode.kv_end[0] - p.decode.kv_start[0]) == 8192
    least = dataclasses.replace(SCOUT, balance_splits=False)
    assert int(_jitted_plan(least, None)(*_batch(least, [1], [131072])).decode.count) == 32
    one = dataclasses.replace(SCOUT, split_waves=1)
    for name in ("all_decode_max_context", "mixed_boundaries", "decode_q_straddling"):
        _check_capacity(one, *ADVERSARIAL[name])  # the capacity proof holds for any W


def _round_robin_makespan(d_work, piece, bounds):
    """Brute force: every (piece, KV head) tile, longest first, dealt round-robin."""
    tiles = []
    for w in d_work:
        n = max(1, -(-w // piece)) if w else 0
        for k in range(n):
            tiles += [-(-min(piece, w - k * piece) // bounds.block_kv)
                      + planner.TILE_OVERHEAD_BLOCKS] * bounds.num_kv_heads
    load = np.zeros(bounds.num_workers)
    for i, c in enumerate(sorted(tiles, reverse=True)):
        load[i % bounds.num_workers] += c
    return load.max()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 140000), min_size=1, max_size=24), st.integers(1, 64),
       st.sampled_from([(8, 132), (4, 132), (1, 16), (2, 7)]))
def test_decode_makespan_is_the_schedule_and_the_chosen_piece_is_no_slower(work, blocks, heads):
    hkv, workers = heads
    bounds = dataclasses.replace(SCOUT, num_q_heads=5 * hkv, num_kv_heads=hkv,
                                 num_workers=workers)
    d_work = np.zeros(32, np.int32)
    d_work[:len(work)] = work
    piece = blocks * bounds.block_kv
    max_tiles = bounds.num_kv_heads * (len(work) + sum(work) // piece + 1)
    got = float(planner.decode_makespan(jax.numpy.asarray(d_work), piece, bounds, max_tiles))
    assert got == _round_robin_makespan(work, piece, bounds)
    cap = 32 + bounds.split_target
    chosen = int(planner.decode_piece(jax.numpy.asarray(d_work), bounds, cap))
    least = int(planner.decode_piece(jax.numpy.asarray(d_work),
                                     dataclasses.replace(bounds, balance_splits=False), cap))
    assert chosen >= least and chosen % bounds.block_kv == 0  # within the capacity proof
    assert _round_robin_makespan(work, chosen, bounds) <= _round_robin_makespan(work, least,
                                                                                 bounds)


# --- admission ---

@pytest.mark.parametrize("q_lens,kv_lens,n,bound", [
    ([1] * 257, [5] * 257, 257, "max_num_seqs"),
    ([8193], [8193], 1, "max_num_batched_tokens"),
    ([1], [131073], 1, "max_model_len"),
    ([10], [5], 1, "q_len"),
])
def test_inadmissible_batches_name_the_bound(q_lens, kv_lens, n, bound):
    s = max(len(q_lens), SCOUT.max_num_seqs)
    cu = np.concatenate([[0], np.cumsum(q_lens), np.full(s - len(q_lens), sum(q_lens))]).astype(np.int32)
    kv = np.concatenate([kv_lens, np.zeros(s - len(kv_lens))]).astype(np.int32)
    with pytest.raises(ValueError, match=bound):
        planner.plan(SCOUT, cu, kv, n)


def test_bounds_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        jaxattn.Bounds(**{**SMALL, "num_q_heads": 3, "num_kv_heads": 2})
    with pytest.raises(ValueError, match="page_size"):
        jaxattn.Bounds(**{**SMALL, "block_kv": 6})
    with pytest.raises(ValueError, match="chunk_size"):
        jaxattn.Bounds(**SMALL, chunk_size=12)
    with pytest.raises(ValueError, match="chunk_size"):
        planner.plan(jaxattn.Bounds(**SMALL, chunk_size=16), *_batch(jaxattn.Bounds(**SMALL), [1], [1]),
                       chunk_size=32)


# --- the hybrid KV cache: chunked-layer items never reach before the live chunk ---

def _check_reads_from_live_chunk(bounds, q_lens, kv_lens):
    """Every chunked-layer item starts at or after ``floor(p0 / C) * C`` (p0: the sequence's
    cached length), at a multiple of block_kv (the kernels' first KV tile; the decode
    kernel's copies clamp to the item's last key, the prefill kernel's tiles start at
    kv_start // block_kv): page-table entries before it (returned pages) are never read."""
    C = bounds.chunk_size
    p = _jitted_plan(bounds, C)(*_batch(bounds, q_lens, kv_lens))
    for items in (p.prefill, p.decode):
        n = int(items.count)
        seq, start, end = (np.asarray(x)[:n] for x in (items.seq, items.kv_start, items.kv_end))
        p0 = np.asarray(kv_lens)[seq] - np.asarray(q_lens)[seq]
        assert (start >= p0 // C * C).all() and (start % bounds.block_kv == 0).all()
        assert (end > start).all()


@given(admissible_batches(SCOUT))
def test_chunked_items_read_only_the_live_chunk(batch):
    _check_reads_from_live_chunk(SCOUT, *batch)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_chunked_items_read_only_the_live_chunk_adversarial(name):
    _check_reads_from_live_chunk(SCOUT, *ADVERSARIAL[name])


@pytest.mark.parametrize("max_len", [1_048_576, 10_485_760])
def test_long_context_bounds_capacity_and_plan(max_len):
    """Scout's shapes at TP=2 with 1M and 10M-token contexts: Bounds, capacity, plan and
    build_step (both page tables) accept them; capacity does not depend on max_model_len."""
    from jaxattn.serve.batch import SeqStep, build_step

    b = jaxattn.Bounds(**{**SCOUT.__dict__, "max_model_len": max_len, "max_num_seqs": 2,
                          "num_q_heads": 20, "num_kv_heads": 4})
    assert planner.capacity(b) == planner.capacity(dataclasses.replace(b, max_model_len=131072))
    assert b.chunk_pages_per_seq == 1024 and b.pages_per_seq == max_len // 16
    # The last prefill chunk of a max-length prompt, and a decode at max length.
    for q_lens, kv_lens in (([8192], [max_len]), ([1, 8192 - 1], [max_len, max_len - 1])):
        _check_capacity(b, q_lens, kv_lens)
        _check_reads_from_live_chunk(b, q_lens, kv_lens)
    pages = np.arange(b.pages_per_seq)
    live = (max_len - 1) // 8192 * 8192 // 16
    chunked = np.where(pages < live, -1, pages % 2000)  # returned entries before the chunk
    batch = build_step(b, 16, [SeqStep([5], max_len - 1, pages, chunked)],
                       num_pages=b.pages_per_seq, num_chunked_pages=2000)
    assert batch.page_table.shape == batch.chunked_page_table.shape == (2, max_len // 16)
    assert batch.slots[0] == max_len - 1 and batch.chunked_slots[0] == (pages[-1] % 2000) * 16 + 15
    assert batch.positions[0] == max_len - 1 and batch.kv_lens[0] == max_len
