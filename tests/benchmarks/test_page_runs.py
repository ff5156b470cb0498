"""benchmarks.page_runs: the engine's block manager keeps a kernel block's pages consecutive
through a churned pool, where least-recently-freed order scatters them."""

from benchmarks import page_runs

SMALL = page_runs.Workload(max_num_seqs=8, step_tokens=512, chunk_size=1024,
                           prompt_tokens=(100, 2_000), output_tokens=(16, 300),
                           steps=1_500, sample_every=50)


def test_block_groups_keep_every_block_in_one_run():
    lru, groups = (page_runs.simulate(SMALL, run, seed=3) for run in (1, 8))
    assert all(s["global"] == 1.0 and s["chunked"] in (1.0, None) for s in groups)
    late = page_runs.summary(lru)
    assert late["global"]["median"] < 0.9 and late["chunked"]["median"] < 0.9
    assert max(s["waiting"] for s in groups) > 0  # the pool was kept full

