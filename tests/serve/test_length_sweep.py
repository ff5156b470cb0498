"""The length sweep (benchmarks/length_sweep.py) on the embedded tiny model: the same sweep as
``python -m benchmarks.length_sweep --cpu`` (prompts of every boundary up to 1025 tokens,
alone and packed on a pool that runs out, against the reference forward)."""

import os
import sys

import pytest

# benchmarks/ is a folder of the repository, not of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import length_sweep as ls  # noqa: E402


def test_sweep_lengths_cover_every_boundary():
    spec = ls.GPU_SPEC
    cats = ls.sweep_lengths(spec, chunk=8192, block_kv=128, block_q=128)
    every = {x for v in cats.values() for x in v}
    assert set(range(1, 257)) <= every
    assert {16 * k + d for k in range(1, 513) for d in (-1, 0, 1)} <= every  # pages to 8192
    assert {128 * k + d for k in range(1, 129) for d in (-1, 0, 1)} <= every  # tiles to 16384
    assert {8192 * k + d for k in range(1, 17) for d in (-1, 0, 1)} <= every  # chunks to 131072
    assert {2**k + d for k in range(18) for d in (-1, 0, 1)} - {0} <= every
    assert {9999, 10000, 10001, 131073} <= every and max(every) == 131073
    assert len(cats["random"]) == spec.random_count and max(every) <= spec.max_model_len - 2


@pytest.mark.slow
def test_length_sweep_cpu():
    spec = ls.CPU_SPEC
    engine, check, model = ls.build_engine(spec, None)
    s = ls.run_sweep(engine, check, model, spec, log=lambda *a: None)
    print(ls.table(s))
    assert s["failures"] == [] and s["skipped"] == []
    assert s["singles_run"] == s["packed_runs"] == s["lengths"] > 400
    assert s["max_length"] == spec.max_len + 1
    assert s["nonfinite_lengths"] == []
    assert s["reference_checks"] >= spec.ref_samples and s["reference_max_rel_err"] < spec.ref_rtol
    assert s["packed_preemptions"] > 0  # the packed groups ran out of pages
    assert all(v is True for v in s["limits"].values())
    assert s["compiles_after_warmup"] == 0 and s["pages_leaked"] == 0
    assert s["passed"]


def test_packed_comparison_separates_noise_routing_flips_and_bugs():
    from jaxattn.serve.outputs import TokenLogprob

    def run(first, second):
        return {"tokens": [first[0], second[0]],
                "logprobs": [TokenLogprob(t, lp, top) for t, lp, top in (first, second)]}

    top = ((7, -1.0), (8, -1.5), (9, -2.0))
    single = run((7, -1.0, top), (3, -0.5, ((3, -0.5), (4, -0.9))))
    noise = run((7, -1.1, ((7, -1.1), (8, -1.45), (9, -2.0))), (3, -0.6, ((3, -0.6), (4, -0.8))))
    flip = run((8, -1.2, ((8, -1.2), (7, -1.3), (9, -2.5))), (5, -1.0, ((5, -1.0),)))
    bug = run((9, -0.2, ((9, -0.2), (1, -3.0))), (1, -0.1, ((1, -0.1),)))
    assert ls._agree_steps(single, noise, 0.2) is None
    assert ls._agree_steps(single, flip, 0.2) and ls._agree_steps(single, flip, 1.0) is None
    assert ls._agree_steps(single, bug, 1.0)
    # the second token is compared only when the first agrees (same context)
    later = run((7, -1.0, top), (3, -2.0, ((3, -2.0), (4, -0.5))))
    assert "differ" in ls._agree_steps(single, later, 1.0)
