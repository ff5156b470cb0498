"""Which sequences compute how many tokens in the next step (continuous batching).

Each step has a token budget (``max_num_batched_tokens``) and a sequence
budget (``max_num_seqs``). Running sequences go first, decoding ones (one
pending token) before those still in prefill, so a long prompt never stalls
the streams already flowing; what is left of the budget goes to prefill
chunks, of running sequences and then of waiting ones in arrival order.

When a running sequence needs a page and none is free, the latest-arrived
running sequence not yet scheduled in this step is *preempted by recompute*:
its pages are freed and it goes back to the front of the waiting queue with
its tokens (prompt + output so far) to be prefilled again. Its sampler key
depends only on (seed, output index), so its output does not change. Waiting
sequences are admitted strictly in order and only into free pages (admission
never preempts), so the oldest request always makes progress.

Before anything grows, every running sequence returns the chunked-layer pages
before its live chunk (``BlockManager.slide``): that is what bounds the chunked
pool's use to a chunk per sequence plus one step's tokens (the proof is in
:mod:`jaxattn.serve.block_manager`). A step still in flight may read those pages;
a later step that reuses them runs after it on the device.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses

from jaxattn.serve.block_manager import BlockManager
from jaxattn.serve.sequence import Sequence, Status


@dataclasses.dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    num_new: int  # tokens computed this step, from seq.tokens[num_computed] (the last may be
    #               in flight: drawn by the step before, not on the host yet)
    samples: bool  # the step reaches the last drawn token: draw the next one


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[Scheduled]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in arrival order (priority)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of the queues and free its pages; safe in any state, twice too."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free(seq.seq_id)
        if seq.status is not Status.FINISHED:
            seq.status, seq.finish_reason = Status.FINISHED, reason

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[Scheduled] = []
        taken: set[int] = set()
        preempted: list[Sequence] = []

        for seq in self.running:
            self.bm.slide(seq.seq_id, seq.num_computed)

        def take(seq: Sequence, n: int):
            scheduled.append(Scheduled(seq, n, n == seq.num_pending))
            taken.add(seq.seq_id)

        # A sequence whose last token is still being drawn has nothing left to compute.
        decoding = [s for s in self.running if s.num_pending == 1 and not s.last_draw_in_flight]
        prefilling = [s for s in self.running if s.num_pending > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending, budget)
            while not self.bm.can_grow(seq.seq_id, seq.num_computed + n):
                victim = next((s for s in reversed(self.running) if s.seq_id not in taken), None)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.bm.grow(seq.seq_id, seq.num_computed + n)
                take(seq, n)
                budget -= n

        # Admission: only when nothing was preempted this step (pages are short), in order.
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            if not self.bm.has(seq.seq_id):
                seq.num_computed = self.bm.allocate(seq.seq_id, seq.tokens,
                                                    use_cache=not seq.scores_prompt)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed
            n = min(seq.num_pending, budget)
            if not self.bm.can_grow(seq.seq_id, seq.num_computed + n):
                self.bm.free(seq.seq_id)  # give the shared prefix pages back until it fits
                seq.num_computed = 0
                break
            self.bm.grow(seq.seq_id, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            # By seq_id (arrival): a readmitted preempted sequence keeps its priority.
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)
            take(seq, n)
            budget -= n
        return SchedulerOutput(scheduled, preempted)

    def preempt_all(self) -> int:
        """Send every running sequence back to wait for recompute (the KV cache was lost)."""
        n = len(self.running)
        for seq in reversed(list(self.running)):  # appendleft in reverse keeps arrival order
            self._preempt(seq)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
