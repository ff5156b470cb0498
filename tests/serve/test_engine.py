"""The engine loop: continuous batching, chunked prefill, preemption, prefix sharing, stops,
aborts and the compile count — outputs must not depend on what else runs."""

import jax
import numpy as np
import pytest

from jaxattn.serve.llm import LLM
from jaxattn.serve.config import bucket_ladder
from jaxattn.serve.engine import LLMEngine
from jaxattn.serve.sampling_params import SamplingParams

MAX_LEN, PAGE = 256, 16


@pytest.fixture(scope="module")
def runner(make_runner):
    return make_runner(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                       num_pages=128, page_size=PAGE)


def _engine(runner, tokenizer, num_pages=None, **config):
    e = LLMEngine(runner, tokenizer, runner.config.replace(**config), num_pages=num_pages)
    e.warmup(progress=False)
    return e


def _prompts(n, seed=0, lo=3, hi=150):
    rng = np.random.default_rng(seed)
    return [rng.integers(6, 1000, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def _gen(engine, prompts, params):
    outs = LLM(engine=engine).generate([{"prompt_token_ids": p} for p in prompts], params,
                                       use_tqdm=False)
    assert engine.bm.num_used_pages == 0
    engine.bm.check()
    return [[o.token_ids for o in r.outputs] for r in outs]


def _params(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append(SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 40))))
        else:
            out.append(SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=i,
                                      max_tokens=int(rng.integers(1, 40)), n=1 + (i % 3 == 0)))
    return out


def test_bucket_ladder():
    assert bucket_ladder(2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert bucket_ladder(100) == (16, 32, 64, 100)
    assert bucket_ladder(8) == (8,)


def test_batched_equals_alone(runner, tokenizer):
    """Mixed lengths (prompts up to 150 tokens: chunked prefill under a 64-token budget),
    greedy and seeded sampling, n=2: each output equals the request run alone."""
    engine = _engine(runner, tokenizer)
    prompts, params = _prompts(12), _params(12)
    together = _gen(engine, prompts, params)
    alone = [_gen(engine, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert together == alone
    assert all(len(o) == sp.max_tokens for outs, sp in zip(together, params) for o in outs)


def test_preemption_recomputes_identically(runner, tokenizer):
    """A pool of one max-length sequence (16 pages) for 6 requests of ~7 pages each: sequences
    are preempted, recomputed, and still produce exactly their unpreempted outputs."""
    ref = _engine(runner, tokenizer)
    small = _engine(runner, tokenizer, num_pages=MAX_LEN // PAGE)
    prompts = _prompts(6, seed=1, lo=30, hi=60)
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, seed=i, max_tokens=60)
              for i in range(6)]
    got = _gen(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert got == [_gen(ref, [p], [sp])[0] for p, sp in zip(prompts, params)]


def test_prefix_sharing_reuses_pages_without_changing_outputs(runner, tokenizer):
    shared = _engine(runner, tokenizer)
    plain = _engine(runner, tokenizer, enable_prefix_caching=False)
    base = _prompts(1, seed=2, lo=40, hi=41)[0]
    prompts = [base + [7, 8, 9], base + [10], base[:20]]
    sp = SamplingParams(temperature=0, max_tokens=8)
    first = LLM(engine=shared).generate({"prompt_token_ids": base}, sp, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    outs = LLM(engine=shared).generate([{"prompt_token_ids": p} for p in prompts], sp,
                                       use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [32, 32, 16]
    assert [o.outputs[0].token_ids for o in outs] == [x[0] for x in _gen(plain, prompts, [sp] * 3)]


def test_stop_strings_and_stop_token_ids(runner, tokenizer):
    engine = _engine(runner, tokenizer)
    llm = LLM(engine=engine)
    prompt = {"prompt_token_ids": _prompts(1, seed=3, lo=20, hi=21)[0]}
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    text, ids = full.outputs[0].text, full.outputs[0].token_ids
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    # Streaming deltas never show any part of the stop string.
    engine.add_request("s", prompt["prompt_token_ids"],
                       SamplingParams(temperature=0, max_tokens=30, stop=[stop]))
    streamed = ""
    while engine.has_unfinished():
        streamed += "".join(d.text for d in engine.step())
    assert streamed == cut.text
    by_id = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30,
                                                stop_token_ids=[ids[5]]), use_tqdm=False)[0]
    out = by_id.outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == ids[:ids.index(ids[5]) + 1]


def test_abort_and_refusals_free_everything(runner, tokenizer):
    engine = _engine(runner, tokenizer)
    for i, p in enumerate(_prompts(5, seed=4)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, n=2))
    for _ in range(3):
        engine.step()
    assert engine.bm.num_used_pages > 0
    assert engine.abort("r0") and not engine.abort("r0") and not engine.abort("nope")
    for i in range(1, 5):
        engine.abort(f"r{i}")
    assert not engine.has_unfinished() and engine.bm.num_used_pages == 0
    engine.bm.check()
    for prompt, sp in (([], SamplingParams()), ([1] * MAX_LEN, SamplingParams(max_tokens=1)),
                       ([1] * 10, SamplingParams(max_tokens=MAX_LEN)), ([10**6], SamplingParams()),
                       ([1], SamplingParams(n=9))):
        with pytest.raises(ValueError):
            engine.add_request("bad", prompt, sp)
    assert not engine.has_unfinished()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(runner, tokenizer):
    engine = _engine(runner, tokenizer)
    real_step, calls = runner.step, []

    def flaky(seqs, rows, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real_step(seqs, rows, **kw)

    engine.runner = type("Flaky", (), {"step": staticmethod(flaky), "bounds": runner.bounds,
                                       "num_pages": runner.num_pages,
                                       "vocab_size": runner.vocab_size})()
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=5))
    deltas = engine.step() + engine.step()
    assert [d.finish_reason for d in deltas if d.request_id == "a"][-1] == "error"
    assert "injected" in deltas[-1].error and engine.bm.num_used_pages == 0
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=5))
    while engine.has_unfinished():
        deltas = engine.step()
    assert deltas[-1].finish_reason == "length"


def test_no_compiles_after_warmup(runner, tokenizer):
    engine = _engine(runner, tokenizer)
    warm = engine.compile_count
    llm = LLM(engine=engine)
    for seed in range(3):
        prompts = _prompts(6, seed=10 + seed, lo=1, hi=200)
        params = [SamplingParams(temperature=t, top_k=k, top_p=p, logprobs=lp, n=n, max_tokens=m,
                                 seed=seed) for t, k, p, lp, n, m in
                  [(0, 0, 1, None, 1, 3), (1, 5, 1, 2, 2, 20), (0.5, 0, 0.8, 0, 1, 40),
                   (2, 0, 1, None, 3, 1), (0, 0, 1, 5, 1, 50), (1, 1, 0.1, None, 1, 7)]]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert engine.compile_count == warm


def test_the_decode_only_bucket_takes_only_decode_rows(runner, tokenizer, monkeypatch):
    """With the kernels the smallest bucket is compiled for decode rows only
    (``Llama4Runner.decode_only_bucket``): a step with a longer row takes the next bucket,
    a batch that breaks the promise is refused where it is built, and the engine's outputs
    and compile count do not change (the reference step here ignores the promise)."""
    from jaxattn.serve.batch import SeqStep

    dq = runner.bounds.dq
    want = _gen(_engine(runner, tokenizer), _prompts(5, seed=3), _params(5, seed=3))
    monkeypatch.setattr(runner, "decode_only_bucket", 16)
    assert runner.bucket_for(5, decode_rows_only=True) == 16
    assert runner.bucket_for(5, decode_rows_only=False) == 64
    with pytest.raises(ValueError, match="decode rows only"):
        runner.build(16, [SeqStep([1] * (dq + 1), 0, [0, 1])])
    engine = _engine(runner, tokenizer)
    warm = engine.compile_count
    assert _gen(engine, _prompts(5, seed=3), _params(5, seed=3)) == want
    assert engine.compile_count == warm


def test_a_step_that_loses_the_donated_cache_is_recovered(runner, tokenizer, monkeypatch):
    """A device step that fails after taking the donated KV pools: its own sequences fail, the
    pools are rebuilt, every other running sequence recomputes to the same output, and the
    engine keeps serving (before the fix every later step failed on deleted buffers)."""
    prompts = _prompts(6, seed=7, lo=60, hi=150)  # chunked prefill: 64-token steps
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [_gen(_engine(runner, tokenizer), [p], params)[0][0] for p in prompts]

    engine = _engine(runner, tokenizer)
    real_step, calls, failed_ids = runner._step, [0], set()

    def lose_cache_on_third_call(kv, batch, prev_tokens=None):
        calls[0] += 1
        if calls[0] == 3:
            for x in kv.k + kv.v:
                x.delete()  # what a donated call that dies mid-flight leaves behind
            raise RuntimeError("injected: device step failed after donation")
        return real_step(kv, batch, prev_tokens)

    monkeypatch.setattr(runner, "_step", lose_cache_on_third_call)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outputs = {str(i): [] for i in range(len(prompts))}
    finished = {}
    while engine.has_unfinished():
        for d in engine.step():
            outputs[d.request_id] += d.token_ids
            if d.finish_reason:
                finished[d.request_id] = d.finish_reason
                if d.finish_reason == "error":
                    assert "injected" in d.error
                    failed_ids.add(d.request_id)
    assert calls[0] > 3 and failed_ids and len(failed_ids) < len(prompts)
    for i in range(len(prompts)):
        if str(i) not in failed_ids:
            assert finished[str(i)] == "length" and outputs[str(i)] == alone[i]
    assert engine.bm.num_used_pages == 0
    engine.bm.check()
    assert _gen(engine, prompts[:2], params) == [[a] for a in alone[:2]]


class _Recorder:
    """The runner, recording for each step whether some input token was still on the device
    (a negative id: the previous step's draw) and how many steps were enqueued."""

    def __init__(self, inner):
        self.inner, self.steps, self.chained = inner, 0, 0

    def __getattr__(self, name):  # everything but step is the inner runner's
        return getattr(self.inner, name)

    def step(self, seqs, rows, **kw):
        self.steps += 1
        self.chained += any(t < 0 for s in seqs for t in s.token_ids)
        return self.inner.step(seqs, rows, **kw)


@pytest.mark.parametrize("pool", [128, MAX_LEN // PAGE])  # roomy; preempting
def test_async_scheduling_changes_no_output(runner, tokenizer, pool):
    """Steps enqueued before the previous step's tokens are on the host (the next input token
    read on the device) give exactly the outputs, logprobs and finish reasons of the
    synchronous engine: greedy and seeded sampling, top-k/top-p, n=2, stop tokens and
    strings, logprobs, and with a pool so small that sequences are preempted mid-flight."""
    prompts = _prompts(8, seed=11, lo=3, hi=90)
    greedy = _gen(_engine(runner, tokenizer), prompts[6:7],
                  [SamplingParams(temperature=0, max_tokens=20)])[0][0]
    params = _params(6, seed=3) + [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[greedy[4]], logprobs=3),
        SamplingParams(temperature=0.8, seed=5, max_tokens=25, stop=["a"], logprobs=2)]

    def run(**kw):
        engine = _engine(runner, tokenizer, num_pages=pool, **kw)
        rec = engine.runner = _Recorder(runner)
        outs = LLM(engine=engine).generate([{"prompt_token_ids": p} for p in prompts], params,
                                           use_tqdm=False)
        assert engine.bm.num_used_pages == 0 and not engine.has_unfinished()
        engine.bm.check()
        return [[(o.token_ids, o.text, o.finish_reason,
                  [(lp.token_id, round(lp.logprob, 4), [(t, round(x, 4)) for t, x in lp.top])
                   for lp in (o.logprobs or [])])
                 for o in r.outputs] for r in outs], rec, engine

    sync, sync_rec, _ = run(async_scheduling=False)
    got, rec, engine = run()
    assert sync[6][0][2] == "stop" and len(sync[6][0][0]) == 5  # the stop token is hit
    assert got == sync
    assert sync_rec.chained == 0 and rec.chained > 0  # it did run ahead
    # At most one extra step per sequence that stopped on a token (its draw is dropped).
    assert rec.steps <= sync_rec.steps + sum(sp.n for sp in params)
    if pool < 128:
        assert engine.scheduler.num_preemptions > 0


def test_abort_while_a_step_is_in_flight_frees_everything(runner, tokenizer):
    engine = _engine(runner, tokenizer)
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("b", [9, 10], SamplingParams(temperature=0, max_tokens=50))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    assert engine.abort("a") and engine.has_unfinished()
    got = []
    while engine.has_unfinished():
        got += [d for d in engine.step() if d.request_id == "a"]
    assert not got  # nothing more for the aborted request, not even its in-flight draw
    assert engine.bm.num_used_pages == 0
    engine.bm.check()


class _BurstRecorder(_Recorder):
    """A _Recorder that also counts multi-step calls and their steps."""

    def __init__(self, inner):
        super().__init__(inner)
        self.bursts = []

    def multi_step(self, seqs, rows, num_steps, **kw):
        self.bursts.append(num_steps)
        return self.inner.multi_step(seqs, rows, num_steps, **kw)


@pytest.mark.parametrize("pool,async_scheduling", [(128, True), (128, False),
                                                   (MAX_LEN // PAGE, True)])
def test_multi_step_decode_changes_no_output(runner, tokenizer, pool, async_scheduling):
    """Decode bursts (``num_scheduler_steps=4``: four steps in one device call, each step's
    draws the next one's tokens on the device) give exactly the single-step engine's outputs,
    logprobs and finish reasons: greedy and seeded sampling, top-k/top-p, n=2, stop tokens
    and strings mid-burst, max_tokens short of a burst, logit processing (never burst), and a
    pool so small that sequences are preempted; no page leaks, no compile after warm-up."""
    prompts = _prompts(8, seed=12, lo=3, hi=90)
    greedy = _gen(_engine(runner, tokenizer), prompts[6:7],
                  [SamplingParams(temperature=0, max_tokens=20)])[0][0]
    params = _params(5, seed=4) + [
        SamplingParams(temperature=0.7, seed=9, max_tokens=5, presence_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[greedy[6]], logprobs=3),
        SamplingParams(temperature=0.8, seed=5, max_tokens=25, stop=["a"], logprobs=2)]

    def run(**kw):
        engine = _engine(runner, tokenizer, num_pages=pool, async_scheduling=async_scheduling,
                         **kw)
        warm = engine.compile_count
        rec = engine.runner = _BurstRecorder(runner)
        outs = LLM(engine=engine).generate([{"prompt_token_ids": p} for p in prompts], params,
                                           use_tqdm=False)
        assert engine.bm.num_used_pages == 0 and not engine.has_unfinished()
        engine.bm.check()
        assert engine.compile_count == warm
        return [[(o.token_ids, o.text, o.finish_reason,
                  [(lp.token_id, round(lp.logprob, 4), [(t, round(x, 4)) for t, x in lp.top])
                   for lp in (o.logprobs or [])])
                 for o in r.outputs] for r in outs], rec, engine

    single, single_rec, _ = run()
    got, rec, engine = run(num_scheduler_steps=4)
    assert single[6][0][2] == "stop" and len(single[6][0][0]) == 7  # stopped on a token
    assert got == single
    assert not single_rec.bursts and rec.bursts and set(rec.bursts) == {4}
    # Fewer device calls: each burst stands for four steps.
    assert rec.steps + len(rec.bursts) + 2 * len(rec.bursts) <= single_rec.steps
    if pool < 128:
        assert engine.scheduler.num_preemptions > 0


def test_the_sampler_works_on_the_steps_own_rows(runner, tokenizer, monkeypatch):
    """A step samples its sequences' rows rounded up to a power of 8, not max_num_seqs: one
    request at top-p (Scout's default) samples one row, three requests eight."""
    from jaxattn.serve import sampling

    seen, sample = [], sampling.sample

    def spy(logits, params, **kw):
        seen.append((kw["mode"], kw["rows"], logits.shape[0]))
        return sample(logits, params, **kw)

    engine = _engine(runner, tokenizer)
    warm = engine.compile_count
    monkeypatch.setattr(sampling, "sample", spy)
    prompts = _prompts(3, seed=21, lo=5, hi=20)
    top_p = SamplingParams(temperature=0.6, top_p=0.9, seed=1, max_tokens=3)
    for batch in (prompts[:1], prompts):
        seen.clear()
        _gen(engine, batch, [top_p] * len(batch))
        assert {rows for _, rows, _ in seen} == {1 if len(batch) == 1 else 8}
        assert {(mode, size) for mode, _, size in seen} == {("top_p", 8)}
    assert engine.compile_count == warm


@pytest.mark.parametrize("last_row", [(1.0, 5, 0.9, 3, 1, 0), (0.0, 0, 1.0, 0, 0, 0)])
def test_multi_step_runner_matches_single_steps(runner, monkeypatch, last_row):
    """The runner's loop against the same steps one call at a time: tokens, logprobs and
    top logprobs, and the KV cache the steps wrote, with a page boundary inside the burst;
    a "filtered" batch, and a "random" one (which bursts through the filtered loop)."""
    from jaxattn.serve.batch import SeqStep

    rng = np.random.default_rng(13)
    prompts = [rng.integers(6, 1000, n).tolist() for n in (13, 16, 29)]  # 6 steps cross a page
    pages = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]
    rows = [(0.0, 0, 1.0, 0, 0, 0), (0.9, 0, 1.0, 7, 0, 0), last_row]
    n = 6

    def later(i):  # the rows at output position i + 1
        return [r[:5] + (i + 1,) for r in rows]

    def prefill():
        return runner.step([SeqStep(p, 0, pg, pg) for p, pg in zip(prompts, pages)], rows,
                           want_logprobs=True)

    def decode(i):
        return [SeqStep([-1 - j], len(p) + i, pg, pg)
                for j, (p, pg) in enumerate(zip(prompts, pages))]

    sizes, multi = [], runner._step.multi

    def spy(kv, batch, *args, **kw):
        sizes.append((len(batch.token_ids), kw["rows"]))
        return multi(kv, batch, *args, **kw)

    monkeypatch.setattr(runner._step, "multi", spy)
    prev = prefill().token_ids
    single = []
    for i in range(n):
        out = runner.step(decode(i), later(i), want_logprobs=True, prev_tokens=prev)
        prev = out.token_ids
        single.append(jax.device_get(out))
    kv_single = jax.device_get(runner._kv.k[-1][10:33])
    drawn, last = runner.multi_step(decode(0), later(0), n, prev_tokens=prefill().token_ids)
    drawn = jax.device_get(drawn)
    for i, want in enumerate(single):
        np.testing.assert_array_equal(drawn.token_ids[i][:3], want.token_ids[:3])
        np.testing.assert_allclose(drawn.logprobs[i][:3], want.logprobs[:3], rtol=1e-5)
        np.testing.assert_array_equal(drawn.top_ids[i][:3], want.top_ids[:3])
    np.testing.assert_array_equal(jax.device_get(last)[:3], single[-1].token_ids[:3])
    # The smallest bucket's step (with the kernels, the decode-only one), not a size of its own.
    # It samples its sequences' rows (three: eight), not the step's.
    assert sizes == [(runner.buckets[0], 8)]
    assert runner.buckets[0] > runner.multi_step_rows
    # f32 on the CPU; XLA fuses the loop's body its own way: ~1e-6 apart.
    np.testing.assert_allclose(jax.device_get(runner._kv.k[-1][10:33]), kv_single, atol=1e-5)
    with pytest.raises(ValueError, match="decode rows only"):
        runner.multi_step([SeqStep([1, 2], 0, [0])], rows[:1], 2)

    def stop(kv, batch, *args, **kw):  # the rows a burst of one would sample; not run
        sizes.append(kw["rows"])
        raise InterruptedError

    monkeypatch.setattr(runner._step, "multi", stop)
    with pytest.raises(InterruptedError):
        runner.multi_step(decode(0)[:1], later(0)[:1], n)
    assert sizes[-1] == 1


def test_a_burst_streams_as_one_delta_per_sequence(runner, tokenizer):
    """A burst's tokens land together: one delta per sequence carrying them all (text, ids
    and logprobs in order), and the stream adds up to the single-step engine's output."""
    prompt = _prompts(1, seed=14, lo=20, hi=21)[0]
    params = SamplingParams(temperature=0, max_tokens=13, logprobs=2)
    want = LLM(engine=_engine(runner, tokenizer)).generate(
        {"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    engine = _engine(runner, tokenizer, num_scheduler_steps=4)
    engine.add_request("s", prompt, params)
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert max(len(d.token_ids) for d in deltas) == 4
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert "".join(d.text for d in deltas) == want.text
    assert [lp.logprob for d in deltas for lp in d.logprobs] == pytest.approx(
        [lp.logprob for lp in want.logprobs], rel=1e-5)
    assert deltas[-1].finish_reason == "length" and engine.bm.num_used_pages == 0


@pytest.mark.parametrize("steps", [0, -1, 33])
def test_num_scheduler_steps_is_checked_where_it_enters(steps):
    from jaxattn.serve.config import EngineConfig

    with pytest.raises(ValueError, match="num_scheduler_steps"):
        EngineConfig(num_scheduler_steps=steps)
