"""The bounded soak (benchmarks/soak.py) at CI size, against the real server on loopback.

A few hundred requests at fixed concurrency on a KV pool too small for the load (so the pool
runs out and sequences are preempted under it): streamed and not, chat, n=2, client
disconnects and timeouts, over-limit prompts. Every request ends as planned, the re-run
sample is identical, nothing leaks (pages, engine and stream tables, memory) and nothing
compiles.
"""

import asyncio
import os
import sys

import pytest

from jaxattn.serve.engine import LLMEngine

from server_util import LiveServer

# benchmarks/ is a folder of the repository, not of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import soak  # noqa: E402

MAX_LEN = 256


@pytest.fixture(scope="module")
def server(make_runner, tokenizer):
    # 40 pages for 8 sequences of up to 16 pages each: the pool runs out under this load. (The
    # runner has test_engine's and test_faults' shape, 128 pages, compiled once for all three:
    # the engine uses the first 40.)
    runner = make_runner(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                         num_pages=128)
    engine = LLMEngine(runner, tokenizer, num_pages=40)
    engine.warmup(progress=False)
    with LiveServer(engine) as s:
        yield s


@pytest.mark.slow
def test_soak_ci_size(server):
    cfg = soak.SoakConfig(requests=300, concurrency=12, max_tokens=20, short_prompt=64,
                          long_frac=0.3, verify=32, seed=1)
    summary = asyncio.run(soak.run_soak(server.url, cfg, soak.rss_of(os.getpid()),
                                        progress=False))
    print(soak.table(summary))
    assert summary["failures"] == [] and summary["http_5xx"] == 0
    outcomes = summary["outcomes"]
    assert sum(outcomes.values()) == cfg.requests
    assert outcomes.get("rejected") == summary["planned"]["reject"] > 0
    assert outcomes.get("aborted", 0) >= summary["planned"]["disconnect"] > 0
    assert summary["preemptions"] > 0  # the pool ran out under load
    assert summary["verified_alone"] == cfg.verify and summary["mismatches"] == []
    assert summary["pages_used_after"] == 0 and summary["idle_after"]
    assert summary["compiles_after_warmup"] == 0
    assert summary["rss"]["ok"], summary["rss"]
    assert summary["passed"]
    # Nothing is left in the engine's or the async front's tables either.
    engine = server.engine
    engine.bm.check()
    assert not engine._requests and not len(engine.output) and not server.async_engine._streams
