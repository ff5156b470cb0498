"""The engine end to end over the hybrid KV cache, on the embedded tiny model (its 3
chunked-local layers have 256-token chunks): prompts and outputs cross chunk boundaries
during chunked prefill and decode, so chunked pages go back to the pool mid-sequence.
Outputs must equal the non-hybrid cache's (the same engine keeping every chunked page),
alone, batched, preempted and prefix-shared; no page leaks.
"""

import numpy as np
import pytest

from jaxattn.serve.block_manager import blocks_in_runs
from jaxattn.serve.engine import LLMEngine
from jaxattn.serve.llm import LLM
from jaxattn.serve.sampling_params import SamplingParams

MAX_LEN, PAGE, CHUNK = 1024, 16, 256


@pytest.fixture(scope="module")
def runner(make_runner):
    return make_runner(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                       num_pages=4 * MAX_LEN // PAGE, page_size=PAGE)


def _engine(runner, tokenizer, **kw):
    config = kw.pop("config", {})
    e = LLMEngine(runner, tokenizer, runner.config.replace(**config), **kw)
    e.warmup(progress=False)
    return e


def _gen(engine, prompts, params, peak=None, runs=None):
    llm = LLM(engine=engine)
    if peak is not None:  # the most chunked pages in use at once, step by step
        step = engine.step

        def counting_step():
            out = step()
            peak.append(engine.bm.num_used_chunked_pages)
            if runs is not None:  # each live table's whole kernel blocks: (in one run, all)
                run = engine.bounds.block_kv // PAGE
                for sid in list(engine.bm._tables):
                    for table in (engine.bm.pages(sid), engine.bm.chunked_pages(sid)):
                        runs.append(blocks_in_runs(table, run))
            return out
        engine.step = counting_step
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if peak is not None:
        del engine.step
    assert engine.bm.num_used_pages == 0
    engine.bm.check()
    return [o.outputs[0].token_ids for o in outs]


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(6, 1000, n).tolist() for n in lengths]


# Prompt lengths around the 256 and 512 boundaries; 24 new tokens carry some across.
LENGTHS = [250, 300, 500, 700]
PARAMS = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
          SamplingParams(temperature=0.9, top_p=0.9, seed=1, max_tokens=24, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
          SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)]


@pytest.fixture(scope="module")
def reference(runner, tokenizer):
    """Each request alone on the non-hybrid cache (every chunked page kept)."""
    plain = _engine(runner, tokenizer, free_chunked_pages=False)
    return [_gen(plain, [p], [sp])[0] for p, sp in zip(_prompts(LENGTHS), PARAMS)]


def test_batched_hybrid_equals_non_hybrid_alone(runner, tokenizer, reference):
    hybrid = _engine(runner, tokenizer)
    peak, runs = [], []
    assert _gen(hybrid, _prompts(LENGTHS), PARAMS, peak, runs) == reference
    # Four sequences decoding side by side, a page at a time: still a block's pages together
    # (serve.block_manager's page groups), in both pools.
    assert sum(total for _, total in runs) > 0 and all(ok == total for ok, total in runs)
    # Four sequences of up to 724 tokens held at most their live chunks plus a step.
    b = runner.bounds
    assert 0 < max(peak) <= b.chunked_pages_for(4) < 4 * b.pages_per_seq
    assert max(peak) < sum(-(-(n + 24) // PAGE) for n in LENGTHS)


def test_preempted_on_a_small_chunked_pool(runner, tokenizer, reference):
    """A chunked pool of one sequence's window: the others wait or are preempted, recompute,
    and produce the same outputs."""
    small = _engine(runner, tokenizer, num_chunked_pages=runner.bounds.chunk_pages_per_seq)
    got = _gen(small, _prompts(LENGTHS), PARAMS)
    assert small.scheduler.num_preemptions > 0
    assert got == reference


def test_prefix_sharing_across_a_chunk_boundary(runner, tokenizer):
    """A 300-token prompt computed once: a prompt extending it shares 288 tokens (global pages
    of [0, 288), chunked pages of the live chunk [256, 288)); a 260-token prefix of it hits
    at the boundary (256 tokens, no chunked page). Outputs equal those without sharing."""
    shared = _engine(runner, tokenizer)
    plain = _engine(runner, tokenizer, config=dict(enable_prefix_caching=False))
    base = _prompts([300], seed=5)[0]
    sp = SamplingParams(temperature=0, max_tokens=8)
    LLM(engine=shared).generate({"prompt_token_ids": base}, sp, use_tqdm=False)
    prompts = [base + [7, 8, 9], base[:260], base[:200] + [11]]
    outs = LLM(engine=shared).generate([{"prompt_token_ids": p} for p in prompts], sp,
                                       use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [288, 256, 192]
    assert [o.outputs[0].token_ids for o in outs] == _gen(plain, prompts, [sp] * 3)
    assert shared.bm.num_used_pages == 0
    shared.bm.check()
