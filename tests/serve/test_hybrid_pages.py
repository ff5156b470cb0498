"""Page accounting of the hybrid KV cache across chunk boundaries (no model: the scheduler
and block manager driven the way the engine drives them).

A chunked-local layer's query at position p reads keys [floor(p / C) * C, p], so a sequence
with n tokens computed never reads a chunked page before floor(n / C) * C again; those pages
go back to the pool as it crosses a boundary, during chunked prefill and decode alike.
Checked alone, packed with others under a token budget, under preemption (a chunked pool
too small for everyone) and with shared prefixes; the bounds of the capacity proof
(``Bounds.chunk_pages_per_seq`` / ``chunked_pages_for``) hold at every step.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn.serve.block_manager import NULL_PAGE, BlockManager
from jaxattn.serve.sampling_params import SamplingParams
from jaxattn.serve.scheduler import Scheduler
from jaxattn.serve.sequence import Sequence

PS, CHUNK = 4, 16


def _bounds(max_num_seqs=4, budget=8, max_len=200, chunk=CHUNK):
    return jaxattn.Bounds(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          max_model_len=max_len, page_size=PS, num_q_heads=2, num_kv_heads=1,
                          head_dim=8, chunk_size=chunk, block_kv=math.gcd(PS, chunk),
                          decode_q=1)


def _seq(i, prompt, max_tokens):
    return Sequence(i, str(i), 0, list(prompt), SamplingParams(max_tokens=max_tokens), 0,
                    frozenset(), max_tokens)


def _live(bm, seq):
    return [p for p in bm.chunked_pages(seq.seq_id) if p != NULL_PAGE]


def _check_step(bm, bounds, sched, out):
    """The scheduled step's chunked pages: exactly the live chunk before it plus its new
    tokens, within the proven bounds; returned entries are exactly those before the chunk."""
    for s in out.scheduled:
        seq, n0 = s.seq, s.seq.num_computed
        first = n0 // bounds.chunk_size * bounds.chunk_size // PS  # the live chunk's first page
        table = bm.chunked_pages(seq.seq_id)
        assert table[:first] == [NULL_PAGE] * first
        assert NULL_PAGE not in table[first:]
        assert len(_live(bm, seq)) == -(-(n0 + s.num_new) // PS) - first
        assert len(_live(bm, seq)) <= bounds.chunk_pages_per_seq
    used = bm.num_used_chunked_pages
    held = sum(len(_live(bm, s)) for s in sched.running)
    assert used == held if not bm.enable_prefix_caching else used <= held  # shared once
    assert used <= bounds.chunked_pages_for(len(sched.running))
    bm.check()


def _drive(sched, bm, bounds, seqs, *, on_step=None, max_steps=10_000):
    """Run to completion as the engine does (synchronously): compute, then draw a token."""
    for seq in seqs:
        sched.add(seq)
    for _ in range(max_steps):
        if not sched.has_work():
            break
        out = sched.schedule()
        _check_step(bm, bounds, sched, out)
        if on_step:
            on_step(out)
        for s in out.scheduled:
            s.seq.num_computed += s.num_new
            bm.commit(s.seq.seq_id, s.seq.tokens, s.seq.num_computed)
            if s.samples:
                s.seq.tokens.append(1000 + s.seq.seq_id * 100 + s.seq.num_output_tokens)
                if s.seq.num_output_tokens >= s.seq.max_tokens:
                    sched.finish(s.seq, "length")
    assert not sched.has_work()
    assert bm.num_used_pages == 0
    bm.check()


def test_alone_pages_return_at_each_boundary():
    """One sequence: a 40-token prompt in prefill chunks of 8 (crossing 16 and 32 inside a
    step's tokens), then decode to 60 tokens; the chunked pages held follow the formula
    and drop back at 16, 32 and 48."""
    b = _bounds(budget=8)
    bm = BlockManager(64, PS, num_chunked_pages=b.chunked_pages_for(1), chunk_size=CHUNK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    held = []
    _drive(sched, bm, b, [_seq(0, range(40), 20)],
           on_step=lambda out: held.append((out.scheduled[0].seq.num_computed,
                                            bm.num_used_chunked_pages)))
    # (computed before the step, chunked pages held during it)
    assert held[:5] == [(0, 2), (8, 4), (16, 2), (24, 4), (32, 2)]
    assert dict(held)[47] == 4 and dict(held)[48] == 1  # 48 is a boundary: one page left
    assert max(h for _, h in held) <= b.chunk_pages_per_seq


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 70), st.integers(1, 30)), min_size=1, max_size=6),
       st.integers(4, 12), st.booleans(), st.sampled_from([CHUNK, 1, 2, 3, 6, 10]))
def test_packed_sequences_stay_within_the_bounds(reqs, budget, prefix, chunk):
    """Several sequences under one token budget (chunked prefill splits prompts anywhere):
    every step holds at most the proven number of chunked pages; nothing leaks. Chunks that
    pages do not divide (a live chunk starting inside a page) too."""
    b = _bounds(max_num_seqs=4, budget=budget, chunk=chunk)
    bm = BlockManager(400, PS, num_chunked_pages=b.chunked_pages_for(4), chunk_size=chunk,
                      enable_prefix_caching=prefix)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget)
    base = list(range(50))  # shared prefixes when prefix caching is on
    seqs = [_seq(i, base[:n] + [900 + i], m) for i, (n, m) in enumerate(reqs)]
    _drive(sched, bm, b, seqs)
    assert sched.num_preemptions == 0  # a chunked pool of chunked_pages_for(S) never runs out


def test_small_chunked_pool_preempts_and_everything_finishes():
    """A chunked pool for one sequence's window only: the others are preempted (or wait) on
    chunked pages although global pages are plentiful; all finish, nothing leaks."""
    b = _bounds(max_num_seqs=4, budget=8)
    bm = BlockManager(400, PS, num_chunked_pages=b.chunk_pages_per_seq, chunk_size=CHUNK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    seqs = [_seq(i, [i] * 10, 40) for i in range(4)]
    _drive(sched, bm, b, seqs)
    assert sched.num_preemptions > 0
    assert all(s.num_output_tokens == 40 for s in seqs)


def test_preempted_sequence_returns_every_page():
    bm = BlockManager(64, PS, num_chunked_pages=64, chunk_size=CHUNK)
    bm.allocate(0, list(range(40)))
    bm.grow(0, 40)
    bm.commit(0, list(range(40)), 40)
    assert bm.slide(0, 40) == 8  # pages of [0, 32)
    assert bm.num_used_chunked_pages == 2 and len(bm.glob.free) == 54
    bm.free(0)  # preemption frees both tables
    assert bm.num_used_pages == 0
    bm.check()


def test_prefix_hit_takes_global_pages_and_only_the_live_chunks():
    """A 40-token prompt computed and committed by sequence 0 (its chunked pages of [0, 32)
    returned before they were committed by a later step, as in the engine): a second
    prompt with the same 36 tokens gets 36 cached tokens only if the chunked pages of
    [32, 36) are cached; a chunk-aligned hit needs none."""
    prompt = list(range(40))
    bm = BlockManager(64, PS, num_chunked_pages=64, chunk_size=CHUNK)
    bm.allocate(0, prompt)
    bm.grow(0, 40)
    bm.commit(0, prompt, 40)
    bm.slide(0, 40)
    # Shares global pages [0, 36) and chunked [32, 36): the longest prefix of the new prompt.
    assert bm.allocate(1, prompt[:37]) == 36
    assert bm.pages(1) == bm.pages(0)[:9]
    assert bm.chunked_pages(1) == [NULL_PAGE] * 8 + bm.chunked_pages(0)[8:9]
    # Without its chunked pages, a hit falls back to the chunk boundary: 32 tokens, no
    # chunked page (nothing before 32 is read again), global pages [0, 32).
    bm.free(0)
    bm.free(1)
    bm.reset_prefix_cache()
    bm.allocate(2, prompt)
    bm.grow(2, 40)
    bm.slide(2, 40)  # [0, 32) returned before commit: never registered
    bm.commit(2, prompt, 40)
    bm.chunked.reset()  # and the live chunk's registrations forgotten too
    assert bm.allocate(3, prompt[:37]) == 32
    assert bm.chunked_pages(3) == [NULL_PAGE] * 8 and bm.pages(3) == bm.pages(2)[:8]
    bm.check()
    for sid in (2, 3):
        bm.free(sid)
    assert bm.num_used_pages == 0


def test_prefix_hit_with_chunks_pages_do_not_divide():
    """6-token chunks on 4-token pages: a live chunk can start inside a page. A 21-token
    prompt hits 20 cached tokens only with the chunked page holding [18, 20); without it the
    hit falls back to 16 tokens, whose live chunk starts at 12: inside page 3, which must
    then be taken too (not left as a returned entry the step would read)."""
    prompt = list(range(24))
    bm = BlockManager(64, PS, num_chunked_pages=64, chunk_size=6)
    bm.allocate(0, prompt)
    bm.grow(0, 24)
    bm.commit(0, prompt, 24)
    assert bm.allocate(1, prompt[:21]) == 20
    assert bm.chunked_pages(1) == [NULL_PAGE] * 4 + bm.chunked_pages(0)[4:5]
    page4 = bm.chunked_pages(0)[4]
    del bm.chunked.by_hash[bm.chunked.hash_of.pop(page4)]  # forget [16, 20)'s chunked page
    assert bm.allocate(2, prompt[:21]) == 16
    assert bm.chunked_pages(2) == [NULL_PAGE] * 3 + bm.chunked_pages(0)[3:4]
    bm.check()
    for sid in (0, 1, 2):
        bm.free(sid)
    assert bm.num_used_pages == 0


def test_no_chunked_pool_for_all_global_models():
    bm = BlockManager(8, PS)
    bm.allocate(0, list(range(10)))
    bm.grow(0, 10)
    assert bm.chunked_pages(0) is None and bm.slide(0, 10) == 0
    assert bm.num_pages == 8 and bm.num_used_pages == 3
    bm.free(0)
    bm.check()


def test_chunked_pool_without_freeing_keeps_every_page():
    """chunk_size=None: the non-hybrid cache (the tests' reference) keeps all chunked pages."""
    bm = BlockManager(16, PS, num_chunked_pages=16)
    bm.allocate(0, list(range(40)))
    bm.grow(0, 40)
    assert bm.slide(0, 40) == 0 and bm.num_used_chunked_pages == 10
    bm.free(0)
    bm.check()


@pytest.mark.parametrize("max_len", [1_048_576, 10_485_760])
def test_scout_bounds_at_long_context(max_len):
    """Scout at TP=2: the chunked window per sequence stays ~1024 pages at any length."""
    b = jaxattn.Bounds(max_num_seqs=4, max_num_batched_tokens=8192, max_model_len=max_len,
                       page_size=16, num_q_heads=20, num_kv_heads=4, head_dim=128,
                       chunk_size=8192)
    assert b.pages_per_seq == max_len // 16
    assert b.chunk_pages_per_seq == -(-(8191 + 8192) // 16) == 1024
    assert b.chunked_pages_for(4) == min(4 * 1024, 4 * 513 + 512)
    assert np.int32(max_len) == max_len


@pytest.mark.parametrize("max_len", [1_048_576, 10_485_760])
def test_engine_config_and_planner_accept_long_context(max_len):
    """--max-model-len 1M / 10M (Scout's config allows 10M) through the engine's flags, its
    bounds at TP=2 and the memory planner (TP=8 on H200s holds them)."""
    import argparse

    from jaxattn.serve import memory_plan
    from jaxattn.serve.config import add_engine_args, config_from_args
    from jaxattn.parallel import ParallelConfig

    p = argparse.ArgumentParser()
    add_engine_args(p)
    engine = config_from_args(p.parse_args(["--max-model-len", str(max_len), "-tp", "2",
                                            "--max-num-seqs", "4"]))
    scout = memory_plan.named_config("scout")
    b = engine.bounds(scout, model_parallel=2)
    assert (b.max_model_len, b.chunk_size, b.num_kv_heads) == (max_len, 8192, 4)
    assert b.chunk_pages_per_seq == -(-(8191 + 2048) // 16)  # the default 2048-token budget
    plan = memory_plan.gpu_plan(scout, ParallelConfig(tensor=8), "h200", fraction=0.9,
                                max_model_len=max_len, max_num_seqs=4)
    assert plan.fits and plan.full_length_sequences >= 1
