"""The device sampler: greedy, temperature, top-k, top-p, seeds, logprobs — one compiled shape."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxattn.serve.sampling import SamplingBatch, draw, filter_mask, mode_of, top_k
from jaxattn.serve.sampling_params import MAX_LOGPROBS, SamplingParams

S, V = 8, 64


def _logits(seed=0):
    return np.random.default_rng(seed).standard_normal((S, V)).astype(np.float32) * 2


def _draw(logits, rows, lp=False):
    out = draw(logits, SamplingBatch.build(rows, S), lp, len(rows))
    return jax.device_get(out)


def test_greedy_rows_take_the_argmax_padding_included():
    logits = _logits()
    out = _draw(logits, [(0.0, 0, 1.0, 0, 0, 0)] * 3)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


def test_a_rows_draw_depends_on_its_own_key_only():
    logits = np.tile(_logits(1)[:1], (S, 1))
    # Alone (no row needs a threshold search) and beside a row that does: same draws; a top-p
    # row alone (one search) and beside a top-k row (both searches): same draws.
    top_k_row = (0.7, 3, 0.5, 9, 1, 2)
    for pos in range(32):
        row, nucleus = (1.0, 0, 1.0, 1234, 0, pos), (0.9, 0, 0.8, 77, 0, pos)
        alone = _draw(logits, [row]).token_ids[0]
        mixed = _draw(logits, [top_k_row, (0.0, 0, 1.0, 0, 0, 0), row]).token_ids[2]
        assert alone == mixed, pos
        alone = _draw(logits, [nucleus]).token_ids[0]
        mixed = _draw(logits, [top_k_row, nucleus]).token_ids[1]
        assert alone == mixed, pos
    modes = [mode_of(SamplingBatch.build(rows, S)) for rows in (
        [(0.0, 0, 1.0, 0, 0, 0)], [row], [row, nucleus], [nucleus, top_k_row],
        [(0.0, 5, 0.5, 0, 0, 0), nucleus])]  # a greedy row's limits do not count
    assert modes == ["greedy", "random", "top_p", "filtered", "top_p"]
    # Other positions / output indices / seeds draw independently.
    draws = {_draw(logits, [(1.0, 0, 1.0, 1234, 0, p)]).token_ids[0] for p in range(20)}
    assert len(draws) > 3


def test_temperature_sampling_follows_the_softmax():
    logits = np.tile(np.linspace(0, 3, V, dtype=np.float32)[None], (S, 1))
    rows = lambda pos: [(1.0, 0, 1.0, 5, 0, pos * S + i) for i in range(S)]
    toks = np.concatenate([_draw(logits, rows(p)).token_ids for p in range(50)])
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    top = probs.argsort()[-5:]
    freq = np.bincount(toks, minlength=V)[top] / len(toks)
    np.testing.assert_allclose(freq, probs[top], atol=0.05)


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_keeps_the_k_most_likely(k):
    logits = _logits(2)
    allowed = np.argsort(-logits, -1)[:, :k]
    for pos in range(10):
        toks = _draw(logits, [(2.0, k, 1.0, 11, 0, pos)] * S).token_ids
        for i in range(S):
            assert toks[i] in allowed[i]


def test_top_p_keeps_the_nucleus():
    p = np.array([0.5, 0.3, 0.15] + [0.05 / (V - 3)] * (V - 3))
    logits = np.tile(np.log(p).astype(np.float32)[None], (S, 1))
    seen = set()
    for pos in range(20):
        seen |= set(_draw(logits, [(1.0, 0, 0.7, 3, 0, pos * S + i) for i in range(S)])
                    .token_ids.tolist())
    assert seen == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there


def test_logprobs_are_the_models_log_softmax():
    logits = _logits(3)
    out = _draw(logits, [(1.0, 0, 1.0, 1, 0, 0), (0.0, 0, 1.0, 0, 0, 0)], lp=True)
    ref = jax.nn.log_softmax(logits, -1)
    for i in range(2):
        np.testing.assert_allclose(out.logprobs[i], ref[i, out.token_ids[i]], rtol=1e-5)
        # The full MAX_LOGPROBS (OpenAI's chat limit, 20) come back in order.
        assert out.top_ids.shape[1] == MAX_LOGPROBS == 20
        np.testing.assert_array_equal(out.top_ids[i], np.argsort(-logits[i])[:MAX_LOGPROBS])
        np.testing.assert_allclose(out.top_logprobs[i], np.sort(ref[i])[::-1][:MAX_LOGPROBS],
                                   rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), v=st.integers(1, 300), k=st.integers(1, 20),
       block=st.sampled_from([1, 4, 7, 16]), levels=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), with_inf=st.booleans())
def test_blocked_top_k_is_lax_top_k(rows, v, k, block, levels, seed, with_inf):
    """Values and ids exactly as lax.top_k's, ties (few distinct values) and -inf included."""
    k = min(k, v)
    x = np.random.default_rng(seed).integers(0, levels, (rows, v)).astype(np.float32)
    if with_inf:
        x[x == 0] = -np.inf
    want_vals, want_ids = jax.lax.top_k(x, k)
    vals, ids = top_k(x, k, block)
    np.testing.assert_array_equal(vals, want_vals)
    np.testing.assert_array_equal(ids, want_ids)
    assert ids.dtype == np.int32


def test_blocked_top_k_at_scouts_vocabulary():
    x = np.random.default_rng(0).standard_normal((4, 202_048)).astype(np.float32)
    x[1, ::997] = x[1].max()  # 203 ties for the top, spread over many blocks
    want_vals, want_ids = jax.lax.top_k(x, MAX_LOGPROBS)
    vals, ids = jax.jit(top_k, static_argnums=1)(x, MAX_LOGPROBS)
    np.testing.assert_array_equal(vals, want_vals)
    np.testing.assert_array_equal(ids, want_ids)


@pytest.mark.parametrize("mode", ["greedy", "random", "top_p", "filtered"])
def test_only_the_live_rows_are_sampled_each_as_in_the_full_batch(mode):
    """sampler_rows' buckets: a row draws the same tokens whatever the number of rows
    sampled, and its logprobs differ by f32 rounding at most (XLA's CPU reductions over
    [1, V] and [16, V] round differently); the rows past them come back zero."""
    from jaxattn.serve.sampling import sample, sampler_row_sizes, sampler_rows

    assert [sampler_rows(n, 64) for n in (1, 2, 8, 9, 64)] == [1, 8, 8, 64, 64]
    assert sampler_row_sizes(64) == [1, 8, 64] and sampler_row_sizes(6) == [1, 6]
    logits = np.random.default_rng(4).standard_normal((16, 300)).astype(np.float32) * 3
    temp = 0.0 if mode == "greedy" else 0.8
    top_k = 20 if mode == "filtered" else 0
    top_p = 0.9 if mode in ("top_p", "filtered") else 1.0
    params = SamplingBatch.build([(temp, top_k, top_p, 7, 0, i) for i in range(16)], 16)
    full = jax.device_get(sample(logits, params, mode=mode, want_logprobs=True))
    for rows in (1, 8):
        part = jax.device_get(sample(logits, params, mode=mode, want_logprobs=True, rows=rows))
        for field, got, want in zip(part._fields, part, full):
            if "logprobs" in field:
                np.testing.assert_allclose(got[:rows], want[:rows], rtol=1e-6)
            else:
                np.testing.assert_array_equal(got[:rows], want[:rows])
            assert not np.asarray(got[rows:]).any()


def _rank_rule(x, k, p, tol=1e-4):
    """The sort-based definition (float64): the top-k, then those whose mass ranked above is
    below p. None where a cumulative mass is within ``tol`` of p (f32 sums may disagree)."""
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    top = order[:k] if 0 < k < len(x) else order
    probs = np.exp(x[top] - x[top].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    if p < 1 and np.abs(np.cumsum(probs) - p).min() < tol:
        return None
    keep[top[(before < p) | (p == 1)]] = True
    return keep


@settings(max_examples=80, deadline=None)
@given(v=st.integers(1, 400), k=st.integers(0, 400), p=st.floats(0.01, 1.0),
       scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]), seed=st.integers(0, 2**31 - 1),
       masked=st.booleans())
def test_threshold_filter_is_the_rank_rule(v, k, p, scale, seed, masked):
    """filter_mask keeps what sorting would, for distinct values (and -inf, as min_p or a
    grammar leaves them)."""
    x = np.random.default_rng(seed).permutation(v).astype(np.float32) * (scale / v)
    x -= x.max() / 2  # negative and positive values, zero among them
    if masked and v > 1:
        x[x < np.median(x)] = -np.inf
    want = _rank_rule(x.astype(np.float64), k, p)
    if want is None:
        return
    got = filter_mask(x[None], np.array([k], np.int32), np.array([p], np.float32))[0]
    drawable = np.isfinite(x)  # a -inf token is never drawn, kept or not
    np.testing.assert_array_equal(np.asarray(got) & drawable, want & drawable)
    if not 0 < k < v:  # top-k off: the same without its search
        alone = filter_mask(x[None], None, np.array([p], np.float32))[0]
        np.testing.assert_array_equal(alone, got)


def test_threshold_filter_per_row_and_ties():
    x = np.random.default_rng(5).standard_normal((4, 202_048)).astype(np.float32) * 3
    x[3, :7] = 30.0  # seven tokens tie for the top
    # Row 2's top-p falls halfway between two cumulative masses near 0.9.
    probs = np.sort(np.exp(x[2] - x[2].max()).astype(np.float64))[::-1]
    cum = np.cumsum(probs / probs.sum())
    r = np.searchsorted(cum, 0.9)
    p = (cum[r - 1] + cum[r]) / 2
    top_k = np.array([0, 50, 0, 3], np.int32)
    top_p = np.array([1.0, 1.0, p, 1.0], np.float32)
    keep = np.asarray(jax.jit(filter_mask)(x, top_k, top_p))
    assert keep[0].all()  # neither limit: every token
    np.testing.assert_array_equal(np.flatnonzero(keep[1]), np.sort(np.argsort(-x[1])[:50]))
    want = _rank_rule(x[2].astype(np.float64), 0, float(top_p[2]), tol=1e-6)
    assert want is not None and want.sum() == r + 1
    np.testing.assert_array_equal(keep[2], want)
    np.testing.assert_array_equal(np.flatnonzero(keep[3]), np.arange(7))  # ties all kept


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                dict(top_k=-2), dict(n=0), dict(max_tokens=0), dict(logprobs=21), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(top_k=-1).top_k == 0
