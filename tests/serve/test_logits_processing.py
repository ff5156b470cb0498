"""Logit processing on the device (penalties, logit_bias, grammar masks, min_p) against a
numpy reference, the device penalty table, and the engine's use of both."""

import jax
import numpy as np
import pytest

from jaxattn.serve import sampling
from jaxattn.serve.config import EngineConfig
from jaxattn.serve.engine import LLMEngine
from jaxattn.serve.sampling_params import SamplingParams
from jaxattn.serve.structured import StructuredOutput

S, V, SLOTS = 6, 70, 4


def _reference(logits, proc, counts, in_prompt):
    """vLLM's order: bias, repetition (prompt or output), frequency and presence (output)."""
    x = logits.copy()
    for i in range(S):
        for t, b in zip(proc.bias_ids[i], proc.bias_values[i]):
            x[i, t] += b
    seen = (counts > 0) | in_prompt
    rep = proc.repetition[:, None]
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    x = x - proc.frequency[:, None] * counts - proc.presence[:, None] * (counts > 0)
    bits = np.unpackbits(proc.mask.view(np.uint8), axis=1, bitorder="little")[:, :V]
    return np.where(bits.astype(bool), x, -np.inf)


def _proc(rng):
    proc = sampling.Processing.neutral(S, V, SLOTS)
    proc.presence[:] = rng.uniform(-2, 2, S)
    proc.frequency[:] = rng.uniform(-2, 2, S)
    proc.repetition[:] = rng.uniform(0.5, 3, S)
    proc.repetition[0] = 1.0
    for i in range(S):
        ids = rng.choice(V, 5, replace=False)
        proc.bias_ids[i, :5], proc.bias_values[i, :5] = ids, rng.uniform(-100, 100, 5)
    proc.bias_values[2, 0] = -np.inf  # what min_tokens writes on a stop id
    allowed = rng.random((S, V)) < 0.7
    allowed[3] = True
    packed = np.packbits(np.pad(allowed, ((0, 0), (0, proc.mask.shape[1] * 32 - V))),
                         axis=1, bitorder="little")
    proc.mask[:] = packed.view(np.int32)
    return proc


def test_process_logits_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((S, V)).astype(np.float32) * 3
    proc = _proc(rng)
    counts = rng.integers(0, 4, (S, V)) * (rng.random((S, V)) < 0.2)
    in_prompt = rng.random((S, V)) < 0.2
    state = (counts | (in_prompt.astype(np.int64) << 30)).astype(np.int32)
    got = np.asarray(jax.jit(sampling.process_logits)(logits, proc, state))
    want = _reference(logits, proc, counts, in_prompt)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-4)


def test_min_p_keeps_tokens_at_least_min_p_times_the_top():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((S, V)).astype(np.float32)
    min_p = np.array([0, 0.05, 0.2, 0.5, 0.9, 1.0], np.float32)
    got = np.asarray(sampling.apply_min_p(x, min_p))
    p = np.exp(x - x.max(-1, keepdims=True))
    keep = p >= min_p[:, None] * p.max(-1, keepdims=True) - 1e-6
    np.testing.assert_array_equal(np.isfinite(got), keep)
    assert np.isfinite(got[-1]).sum() == 1  # min_p = 1: only the argmax


def test_seeded_rows_count_prompt_output_and_the_token_in_flight():
    state = sampling.new_penalty_state(SLOTS, V)
    prev = np.zeros(S, np.int32)
    prev[2] = 9  # row 2 of the step in flight drew token 9
    seeds = [sampling.PenaltySeed(1, [3, 3, 5], [5, 7, 7], 2),
             sampling.PenaltySeed(3, list(range(V)) * 70, [], None)]  # many entries: chunked
    state = state.at[1].set(99)  # a previous owner's counts are wiped
    for args in sampling.seed_arrays(seeds, S, SLOTS):
        state = sampling.seed_rows(state, *args, prev)
    state = np.asarray(state)
    want = np.zeros(V, np.int64)
    want[[3, 5]] |= 1 << 30
    want[5] += 1
    want[7] += 2
    want[9] += 1
    np.testing.assert_array_equal(state[1], want)
    np.testing.assert_array_equal(state[3], np.full(V, 1 << 30))
    assert not state[[0, 2, SLOTS]].any()  # others and the spare row untouched


def test_draws_are_counted_in_their_rows_only():
    logits = np.zeros((S, V), np.float32)
    logits[:, 11] = 1.5  # presence 2 takes it below the rest once drawn
    params = sampling.SamplingBatch.build([sampling.GREEDY_ROW] * S, S)
    proc = sampling.Processing.neutral(S, V, SLOTS)
    proc.slot[0], proc.slot[1] = 2, 0
    proc.presence[0] = proc.presence[1] = 2.0
    state = sampling.new_penalty_state(SLOTS, V)
    for _ in range(3):
        out, state = sampling.draw_processed(logits, params, proc, state, False, S)
    st = np.asarray(state)
    assert st[2, 11] == 1 and st[0, 11] == 1  # then the penalty moved them off token 11
    assert st[2].sum() == 3 and st[0].sum() == 3
    assert not st[[1, 3, SLOTS]].any()


# The engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner(make_runner):
    r = make_runner(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_pages=64)
    return r


def _run(runner, tokenizer, params_list, *, async_scheduling=True, num_pages=None,
         preemptions=None):
    engine = LLMEngine(runner, tokenizer, EngineConfig(async_scheduling=async_scheduling),
                       num_pages=num_pages)
    prompts = ["the clockmaker said", "a sky of boxes", "once upon a time there was"]
    for i, p in enumerate(params_list):
        engine.add_request(str(i), tokenizer.encode(prompts[i % 3]), p)
    out = {}
    while engine.has_unfinished():
        for d in engine.step():
            assert d.error is None, d.error
            out.setdefault(d.request_id, []).extend(d.token_ids)
    if preemptions is not None:
        preemptions.append(engine.scheduler.num_preemptions)
    return [out[str(i)] for i in range(len(params_list))]


def test_penalties_and_grammars_same_with_async_and_sync_scheduling(runner, tokenizer):
    """The token in flight counts for the next step's penalties; a grammar row waits for it."""
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]},
                                               "n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["k", "n"], "additionalProperties": False}
    params = [SamplingParams(temperature=0, max_tokens=30, frequency_penalty=2.0),
              SamplingParams(temperature=1, seed=4, max_tokens=30, repetition_penalty=3.0,
                             presence_penalty=1.0),
              SamplingParams(temperature=1, seed=5, max_tokens=40,
                             structured_output=StructuredOutput(json=schema)),
              SamplingParams(temperature=0, max_tokens=20)]
    a = _run(runner, tokenizer, params, async_scheduling=True)
    b = _run(runner, tokenizer, params, async_scheduling=False)
    assert a == b
    assert len(set(a[0])) == len(a[0])  # greedy with a big frequency penalty never repeats
    assert len(set(a[3])) < len(a[3])  # ...while plain greedy does on this model
    import json

    text = tokenizer.decode(a[2])
    assert json.loads(text)["k"] in ("a", "b")


def test_penalties_survive_preemption(runner, tokenizer):
    """Recompute reseeds a sequence's penalty row: outputs are those of a roomy cache."""
    params = [SamplingParams(temperature=1, seed=s, max_tokens=60, frequency_penalty=1.5,
                             repetition_penalty=2.0) for s in range(6)]
    roomy = _run(runner, tokenizer, params)
    n = []
    tight = _run(runner, tokenizer, params, num_pages=16, preemptions=n)
    assert n[0] > 0
    assert roomy == tight


def test_bad_processing_requests_are_refused(runner, tokenizer):
    engine = LLMEngine(runner, tokenizer)
    ids = tokenizer.encode("hi")
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("a", ids, SamplingParams(logit_bias={runner.vocab_size: 1}))
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
                dict(repetition_penalty=0), dict(min_p=1.5), dict(min_tokens=-1),
                dict(min_tokens=20, max_tokens=10), dict(logit_bias={"x": 1}),
                dict(logit_bias={5: 101}), dict(logit_bias={i: 1 for i in range(301)})):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError):
        StructuredOutput(json={"type": "nonsense"})
