"""Block manager: pages are never leaked, double-owned, or shared before their KV is written.

A hypothesis state machine drives allocate / compute (grow + write + commit) /
free with a 3-token alphabet, so prompts share prefixes all the time. A shadow
copy of every page's contents (what the model would have written there) checks
that a shared page holds exactly the tokens of the prompt that takes it, and
that nothing ever writes into a page another sequence holds. A second machine runs
the hybrid manager (a chunked-local pool whose pages before the live chunk go back):
the same checks hold for both pools, and a sequence never holds more chunked pages
than its live chunk plus the step's new tokens.
"""

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import jaxattn
from jaxattn.serve.block_manager import NULL_PAGE, BlockManager, OutOfPages, blocks_in_runs

PS, NUM_PAGES = 4, 12
CHUNK = 8  # two pages per chunk in the hybrid machine


class BlockManagerMachine(RuleBasedStateMachine):
    hybrid = False
    run = 1  # pages of a kernel block, kept consecutive where the pool can

    def __init__(self):
        super().__init__()
        self.bm = (BlockManager(NUM_PAGES, PS, num_chunked_pages=NUM_PAGES, chunk_size=CHUNK,
                                run_pages=self.run)
                   if self.hybrid else BlockManager(NUM_PAGES, PS, run_pages=self.run))
        self.seqs = {}  # seq_id -> {"tokens", "computed"}
        self.content = {}  # (pool, page) -> list of the PS tokens last written into it
        self.next_id = 0

    def _tables(self, sid):
        """(pool, table) per kind; chunked entries before the live chunk are NULL_PAGE."""
        out = [(self.bm.glob, self.bm.pages(sid))]
        if self.hybrid:
            out.append((self.bm.chunked, self.bm.chunked_pages(sid)))
        return out

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=24))
    def allocate(self, prompt):
        sid, self.next_id = self.next_id, self.next_id + 1
        cached = self.bm.allocate(sid, prompt)
        assert cached % PS == 0 and 0 <= cached <= len(prompt) - 1
        for pool, table in self._tables(sid):
            assert len(table) * PS == cached
            for i, page in enumerate(table):  # a shared page holds exactly these prompt tokens
                if page != NULL_PAGE:
                    assert self.content[pool, page] == list(prompt[i * PS:(i + 1) * PS])
        if self.hybrid:  # the live chunk's pages are there, none before it
            ctable = self.bm.chunked_pages(sid)
            first = cached // CHUNK * CHUNK // PS
            assert ctable[:first] == [NULL_PAGE] * first and NULL_PAGE not in ctable[first:]
        self.seqs[sid] = {"tokens": list(prompt), "computed": cached}

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def compute(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        s = self.seqs[sid]
        s["tokens"] += data.draw(st.lists(st.integers(0, 2), max_size=5))  # sampled tokens
        pending = len(s["tokens"]) - s["computed"]
        if pending == 0:
            return
        target = s["computed"] + data.draw(st.integers(1, pending))
        self.bm.slide(sid, s["computed"])  # what the scheduler does before anything grows
        if not self.bm.can_grow(sid, target):
            used = self.bm.num_used_pages
            with pytest.raises(OutOfPages):
                self.bm.grow(sid, target)
            assert self.bm.num_used_pages == used  # a refusal changes nothing
            return
        self.bm.grow(sid, target)
        for pool, table in self._tables(sid):
            for pos in range(s["computed"], target):
                page = table[pos // PS]
                assert page != NULL_PAGE and pool.ref[page] == 1, \
                    "a write into a returned page or one another sequence holds"
                self.content.setdefault((pool, page), [None] * PS)[pos % PS] = s["tokens"][pos]
        if self.hybrid:  # the live chunk before the step plus the step's tokens, no more
            window = s["computed"] // CHUNK * CHUNK
            live = [p for p in self.bm.chunked_pages(sid) if p != NULL_PAGE]
            assert len(live) == -(-(target - window) // PS)
        s["computed"] = target
        self.bm.commit(sid, s["tokens"], target)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        self.bm.free(sid)  # a second free (every abort path may call it) is a no-op
        del self.seqs[sid]

    @invariant()
    def pages_accounted_for(self):
        self.bm.check()
        for kind, pool in enumerate(self.bm._pools()):
            owned = {p for sid in self.seqs for p in self._tables(sid)[kind][1] if p != NULL_PAGE}
            assert len(owned) + len(pool.free) == NUM_PAGES
        for sid, s in self.seqs.items():
            assert len(self.bm.pages(sid)) * PS >= s["computed"]


class HybridBlockManagerMachine(BlockManagerMachine):
    hybrid = True


class RunBlockManagerMachine(BlockManagerMachine):
    run = 3  # 12 pages: four groups (a chunk is two pages, so blocks cross chunks too)


class HybridRunBlockManagerMachine(BlockManagerMachine):
    hybrid, run = True, 2


TestBlockManager = BlockManagerMachine.TestCase
TestHybridBlockManager = HybridBlockManagerMachine.TestCase
TestRunBlockManager = RunBlockManagerMachine.TestCase
TestHybridRunBlockManager = HybridRunBlockManagerMachine.TestCase


def test_blocks_in_runs_counts_whole_blocks_and_skips_returned_pages():
    assert blocks_in_runs([4, 5, 6, 7, 9, 8, 10, 11, 12], 4) == (1, 2)
    assert blocks_in_runs([NULL_PAGE] * 4 + [0, 1, 2, 3], 4) == (1, 1)


@pytest.mark.parametrize("run_pages", [1, 4])
def test_blocks_stay_consecutive_while_sequences_grow_side_by_side(run_pages):
    """Decode steps grow several sequences a page at a time, turn about: least recently freed
    order deals them pages 0, 1, 2, ... in turn, so no sequence's block is consecutive; with
    ``run_pages`` each block starts a free group and the sequence's next pages follow it.
    Once two of them are freed, a prompt taking every free page has all its blocks
    consecutive (least recently freed order: only the never-used half)."""
    bm = BlockManager(96, 4, run_pages=run_pages)
    for sid in range(4):
        bm.allocate(sid, [sid] * 4)
    for step in range(1, 17):  # 16 pages each, 4 blocks of 4
        for sid in range(4):
            bm.grow(sid, 4 * step)
    counts = [blocks_in_runs(bm.pages(sid), 4) for sid in range(4)]
    assert counts == ([(4, 4)] * 4 if run_pages > 1 else [(0, 4)] * 4)
    bm.free(1)
    bm.free(3)
    bm.allocate(9, [9] * 256)
    bm.grow(9, 256)  # every free page: 32 never used, and the freed sequences' 32
    assert blocks_in_runs(bm.pages(9), 4) == ((16, 16) if run_pages > 1 else (8, 16))
    bm.check()


def test_a_block_continues_after_cached_pages_and_falls_back_when_groups_run_out():
    """A table that starts with prefix-cached pages continues its block right after them;
    with no wholly free group left a block takes the least recently freed pages (every page
    is still handed out)."""
    bm = BlockManager(16, 4, run_pages=4)
    prompt = list(range(24))
    bm.allocate(0, prompt)
    bm.grow(0, 24)  # pages 0-3, then 4-5 of the next group
    assert bm.pages(0) == [0, 1, 2, 3, 4, 5]
    bm.commit(0, prompt, 24)
    assert bm.allocate(1, prompt[:20] + [99]) == 20  # five pages shared
    bm.grow(1, 28)  # its 6th and 7th pages follow the shared page 4 where free: 5 is not
    assert bm.pages(1)[:5] == [0, 1, 2, 3, 4] and bm.pages(1)[5] != 5
    assert bm.pages(1)[5:] == [6, 7]  # the least recently freed page, then its next
    for sid in (2, 3, 4):  # three blocks start; two wholly free groups are left (8-11, 12-15)
        bm.allocate(sid, [sid] * 8)
        bm.grow(sid, 4)
    assert [bm.pages(sid) for sid in (2, 3, 4)] == [[8], [12], [9]]
    bm.grow(4, 4 * (1 + bm.num_free_pages))  # every free page, consecutive or not
    assert bm.num_free_pages == 0 and bm.pages(4) == [9, 10, 11, 13, 14, 15]
    bm.check()


def test_prefix_pages_shared_after_commit_only():
    bm = BlockManager(8, 4)
    prompt = list(range(10))
    assert bm.allocate(0, prompt) == 0
    bm.grow(0, 10)
    assert bm.allocate(1, prompt) == 0  # nothing computed yet: nothing to share
    bm.free(1)
    bm.commit(0, prompt, 10)
    assert bm.allocate(2, prompt) == 8  # two full pages; the last token is left to compute
    assert bm.pages(2) == bm.pages(0)[:2]
    bm.free(0)
    bm.free(2)
    assert bm.num_used_pages == 0
    assert bm.allocate(3, prompt + [99]) == 8  # freed pages stay findable until reused
    bm.check()


def test_out_of_pages_is_a_signal_not_a_crash():
    bm = BlockManager(3, 4)
    bm.allocate(0, [1] * 12)
    assert bm.can_grow(0, 12) and not bm.can_grow(0, 13)
    with pytest.raises(OutOfPages):
        bm.grow(0, 13)
    assert bm.num_free_pages == 3 and bm.pages(0) == []
    bm.grow(0, 12)
    assert bm.num_free_pages == 0
    bm.free(0)
    assert bm.num_free_pages == 3
    bm.check()



def test_a_step_takes_its_pages_in_ascending_order():
    """The prefill kernel copies a KV tile of consecutive pages at once: a prompt's pages
    follow one another in a fresh pool, and again after they were freed tail first."""
    bm = BlockManager(32, 4)
    bm.allocate(0, [1] * 40)
    bm.grow(0, 40)
    assert bm.pages(0) == list(range(10))
    bm.grow(0, 44)  # a decode step's page: the next one free
    bm.free(0)  # tail first: the free list is now 11, ..., 31, 10, 9, ..., 0
    bm.allocate(1, [2] * 100)
    bm.grow(1, 100)  # 25 pages: 11-31, then the 4 freed longest ago (10, 9, 8, 7)
    assert bm.pages(1) == list(range(7, 32))
    bm.check()
