"""After churn, how many of the running sequences' kernel blocks lie in consecutive pages?

    python -m benchmarks.page_runs [--steps N] [--seed S]   # -> results/page-runs-<date>.json

The kernels copy a KV block (``block_kv`` keys: 8 pages of 16 tokens) whose pages follow one
another in the pool in one TMA copy for K and one for V (``PrefillConfig.merge_pages``,
``DecodeConfig.merge_pages``), and page by page otherwise. Over 16-token pages in order the
serving step's 8k prefill chunk ran at 97-100% of the contiguous API's rate against 93-94%
shuffled (H200, NOTES-prefill session 32), and a decode layer 0.1-3.8% faster (H100,
NOTES-decode session 55). A fresh pool hands a prompt its pages in order; how a used one
hands them out is the block manager's doing. This drives ``serve.block_manager.BlockManager``
through a serving workload on the CPU (arrivals, random prompt and output lengths, prefill
chunks under a step's token budget, one token a decode step, the hybrid cache's chunked pool
sliding past finished chunks) and samples the share of the running sequences' whole blocks
whose pages are consecutive, for the engine's allocator (``run_pages = block_kv /
page_size``: a block starts in a wholly free group of pages) and for least-recently-freed
order alone (``run_pages=1``, the engine before session 55). A sequence is admitted only when
the pool can hold all of it beside what the running ones will still take, so no step stalls
(the engine preempts instead; that is not modelled).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import random
import statistics

from benchmarks.common import write_json
from jaxattn.serve.block_manager import BlockManager, blocks_in_runs


@dataclasses.dataclass(frozen=True)
class Workload:
    """A serving load at Scout's engine defaults (16-token pages, 128-key blocks, 8k chunks
    and steps). The pool holds ``pool_factor`` times the running sequences' mean size."""

    max_num_seqs: int = 32
    step_tokens: int = 8192
    chunk_size: int = 8192
    page_size: int = 16
    block_kv: int = 128
    prompt_tokens: tuple[int, int] = (1_000, 32_000)  # uniform
    output_tokens: tuple[int, int] = (64, 1_024)
    arrivals_per_step: float = 0.4  # mean; more than it serves, so a queue keeps the pool full
    pool_factor: float = 1.25
    steps: int = 8_000
    sample_every: int = 200

    @property
    def num_pages(self) -> int:
        mean = (sum(self.prompt_tokens) + sum(self.output_tokens)) / 2
        return int(self.pool_factor * self.max_num_seqs * mean / self.page_size)

    @property
    def num_chunked_pages(self) -> int:
        # jaxattn.Bounds.chunked_pages_for's bound: live chunks, the step's tokens, one each
        per_chunk = self.chunk_size // self.page_size
        return self.max_num_seqs * (per_chunk + 1) + -(-self.step_tokens // self.page_size)


def simulate(w: Workload, run_pages: int, seed: int = 0) -> list[dict]:
    """One run of ``w`` with the pools keeping ``run_pages``-page groups: a sample of the
    block shares every ``w.sample_every`` steps."""
    rng = random.Random(seed)
    ps, run = w.page_size, w.block_kv // w.page_size
    bm = BlockManager(w.num_pages, ps, enable_prefix_caching=False,
                      num_chunked_pages=w.num_chunked_pages, chunk_size=w.chunk_size,
                      run_pages=run_pages)
    waiting, running, next_id, samples = [], {}, 0, []
    for step in range(1, w.steps + 1):
        arrivals = w.arrivals_per_step
        while rng.random() < arrivals / (1 + arrivals):  # geometric, mean arrivals_per_step
            waiting.append((next_id, rng.randint(*w.prompt_tokens), rng.randint(*w.output_tokens)))
            next_id += 1
        owed = sum(-(-(p + o) // ps) - len(bm.pages(s)) for s, (_, p, o) in running.items())
        while waiting and len(running) < w.max_num_seqs:
            sid, prompt, out = waiting[0]
            if -(-(prompt + out) // ps) + owed > len(bm.glob.free):
                break
            waiting.pop(0)
            bm.allocate(sid, [0] * prompt, use_cache=False)
            running[sid] = [0, prompt, out]  # tokens computed, prompt, output
            owed += -(-(prompt + out) // ps)
        budget = w.step_tokens
        for sid, seq in list(running.items()):
            done, prompt, out = seq
            new = 1 if done >= prompt else min(prompt - done, budget)
            if new <= 0:
                continue
            bm.slide(sid, done)
            bm.grow(sid, done + new)
            budget -= new if done < prompt else 0
            seq[0] = done + new
            if seq[0] >= prompt + out:
                bm.free(sid)
                del running[sid]
        if step % w.sample_every == 0:
            row = {"step": step, "running": len(running), "waiting": len(waiting),
                   "free_pages": len(bm.glob.free)}
            for kind, tables in (("global", [bm.pages(s) for s in running]),
                                 ("chunked", [bm.chunked_pages(s) for s in running])):
                counts = [blocks_in_runs(table, run) for table in tables]
                ok, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
                row[kind] = ok / total if total else None
            samples.append(row)
    bm.check()
    return samples


def summary(samples: list[dict]) -> dict:
    """Each pool's block share over the run's second half (the pool churned): min, median."""
    late = samples[len(samples) // 2:]
    out = {}
    for kind in ("global", "chunked"):
        shares = [s[kind] for s in late if s[kind] is not None]
        out[kind] = {"min": min(shares), "median": statistics.median(shares)} if shares else None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=Workload.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args(argv)
    w = Workload(steps=args.steps)
    res = {"date": datetime.date.today().isoformat(), "workload": dataclasses.asdict(w),
           "num_pages": w.num_pages, "num_chunked_pages": w.num_chunked_pages, "runs": {}}
    engine_run = w.block_kv // w.page_size
    for name, run_pages in (("least recently freed", 1), ("block groups (engine)", engine_run)):
        samples = simulate(w, run_pages, args.seed)
        res["runs"][name] = {"run_pages": run_pages, "samples": samples,
                             "summary": summary(samples)}
        s = res["runs"][name]["summary"]
        print(f"{name}: blocks in consecutive pages over the second half, min / median: "
              + "; ".join(f"{k} {v['min']:.2f} / {v['median']:.2f}" for k, v in s.items() if v),
              flush=True)
    write_json(f"page-runs-{res['date']}{'-' + args.tag if args.tag else ''}.json", res)


if __name__ == "__main__":
    main()
